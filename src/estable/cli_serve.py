"""``estable serve``: the HTTP server (A1111's API, Estable's jobs API, the web page). A thin shell over
:mod:`estable.server`; FastAPI and uvicorn come with the ``server`` extra.

Wire it into ``estable.cli.build_parser`` with ``add_serve_command(sub)``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .errors import EstableError

__all__ = ["add_serve_command"]


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    from .server.settings import Limits, default_data_dir

    lim = Limits()
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP: A1111's API, Estable's jobs API and a web page",
        description="Serve a model over HTTP: A1111's API under /sdapi/v1 (clients written for A1111 work "
        "unchanged), Estable's jobs API under /v1, a web page at /, /docs, /metrics and /health/*. With no flags: "
        "the built-in model on http://127.0.0.1:7860/. Binding any other address than loopback needs an API key. "
        "SIGTERM drains: new jobs get 503, admitted ones finish (up to --grace seconds), exit status 0.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    p.add_argument("--model", default="default", metavar="SRC",
                   help="model to load first: a checkpoint path, a name in --models-dir, or 'default' (the "
                   "built-in model; the default)")
    p.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="folder of models (.safetensors files, diffusers folders) that clients may switch to by "
                   "name (A1111's sd_model_checkpoint); nothing outside it can be named")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route except "
                     "/health/* and the page (prefer --api-key-file: a command line is visible to other users)")
    key.add_argument("--api-key-file", type=Path, metavar="F", help="read the API key from the first line of F")
    p.add_argument("--api-auth", metavar="USER:PASS",
                   help="also accept HTTP basic auth with these credentials (as A1111's --api-auth)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help=f"where the job store (jobs.sqlite3) and images are kept (default {default_data_dir()})")
    p.add_argument("--queue", type=int, default=16, metavar="N",
                   help="jobs that may wait; more get 503 with Retry-After (default 16)")
    p.add_argument("--keep-jobs", type=int, default=0, metavar="N",
                   help="keep only the N newest finished jobs and their images in --data-dir (default 0: keep all)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds a job may run (default 600)")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds admitted jobs may still run before they are interrupted (default 30)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://example.org) to call the API; repeatable "
                   "(default: none, CORS closed)")
    p.add_argument("--max-connections-per-client", type=int, default=32, metavar="N",
                   help="open connections one client address may hold (default 32; 0: no cap, for a reverse proxy "
                        "in front, whose connections all come from one address)")
    p.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="addresses of reverse proxies in front (comma-separated, or '*') whose X-Forwarded-For and "
                        "X-Forwarded-Proto headers name the client (default: none; the connection's own address is "
                        "the client, so a client cannot name another to dodge the per-address limits)")
    p.add_argument("--max-body-mb", type=float, default=lim.max_body_bytes / 2**20, metavar="MB",
                   help="largest request body accepted, in MiB (default 32; larger → 413)")
    p.add_argument("--max-size", type=int, default=lim.max_width, metavar="PX",
                   help=f"largest width and height a request may ask for (default {lim.max_width})")
    p.add_argument("--max-steps", type=int, default=lim.max_steps, metavar="N",
                   help=f"most sampling steps a request may ask for (default {lim.max_steps})")
    p.add_argument("--max-batch", type=int, default=lim.max_batch_size, metavar="N",
                   help=f"largest batch size a request may ask for (default {lim.max_batch_size})")
    p.add_argument("--max-megapixels", type=float, default=lim.max_job_pixels / 2**20, metavar="MPX",
                   help="most pixels one batch may draw, width × height × batch size (hires size included), in "
                        f"units of 1024×1024 (default {lim.max_job_pixels / 2**20:g})")
    p.add_argument("--preview-interval", type=float, default=1.0, metavar="S",
                   help="seconds between progress previews of a running job (default 1; 0 = none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default auto: cuda if present)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="weights' precision (default auto: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, run the U-Net eagerly instead of replaying CUDA graphs")
    w = p.add_argument_group("LoRA, textual inversion, ControlNet (found by name in these folders)")
    w.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="folder (searched recursively) where prompts' <lora:NAME:WEIGHT> tags find NAME.safetensors; "
                   "GET /sdapi/v1/loras lists them")
    w.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                   help="folder of textual-inversion embeddings, used by writing a file's name in a prompt; "
                   "GET /sdapi/v1/embeddings lists them")
    w.add_argument("--controlnet-dir", type=Path, metavar="DIR",
                   help="folder of ControlNets (searched recursively), named by requests' ControlNet units (A1111's "
                   "ControlNet extension API, /v1/jobs' control list); GET /controlnet/model_list lists them")
    w.add_argument("--allow-pickle", action="store_true",
                   help="also read .pt embeddings and pickle ControlNets (tensors only, through the safe loader)")
    from .cli_provenance import add_generation_flags

    add_generation_flags(p)  # the same provenance and filter flags as `estable generate`
    p.set_defaults(func=_cmd_serve)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise EstableError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise EstableError(f"--api-key-file {args.api_key_file} is not a text file (not UTF-8); its first line "
                               "should be the key") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise EstableError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key


def _check_seconds(flag: str, value: float, *, zero: bool) -> None:
    """EstableError unless ``value`` is a finite number of seconds, above 0 (or at least 0 when ``zero``)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise EstableError(f"{flag} must be a finite number of seconds, {'0 or more' if zero else 'above 0'}, "
                           f"not {value:g}")


def settings_from_args(args: argparse.Namespace):
    from .server.settings import Limits, ServerSettings, default_data_dir

    auth = None
    if args.api_auth is not None:
        user, sep, password = args.api_auth.partition(":")
        if not sep or not user or not password:
            raise EstableError("--api-auth must be USER:PASS")
        auth = (user, password)
    from .params import MAX_SIDE

    if not 8 <= args.max_size <= MAX_SIDE:
        raise EstableError(f"--max-size must be from 8 to {MAX_SIDE} pixels, not {args.max_size}")
    if (not 0 < args.max_body_mb < math.inf or args.max_steps < 1 or args.max_batch < 1
            or not 0 < args.max_megapixels < math.inf):
        raise EstableError("--max-body-mb, --max-steps, --max-batch and --max-megapixels must be positive (and "
                           "finite)")
    _check_seconds("--timeout", args.timeout, zero=False)
    _check_seconds("--grace", args.grace, zero=True)
    _check_seconds("--preview-interval", args.preview_interval, zero=True)
    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_batch_size=args.max_batch, max_body_bytes=int(args.max_body_mb * 2**20),
                    max_image_pixels=max(args.max_size, 2048) ** 2,
                    max_job_pixels=int(args.max_megapixels * 2**20))
    return ServerSettings(
        host=args.host, port=args.port, model=args.model, models_dir=args.models_dir, api_key=_api_key(args),
        api_auth=auth, data_dir=args.data_dir or default_data_dir(), queue_size=args.queue, keep_jobs=args.keep_jobs,
        job_timeout=args.timeout, grace=args.grace, cors_origins=tuple(args.cors_origin), device=args.device,
        max_client_connections=args.max_connections_per_client, forwarded_allow_ips=args.forwarded_allow_ips,
        dtype=args.dtype, cuda_graphs=args.cuda_graphs, preview_interval=args.preview_interval, limits=limits,
        watermark=args.watermark, watermark_key=args.watermark_key, tree_ring=bool(args.tree_ring),
        sign_key=args.sign_key, blocklists=tuple(args.blocklist or ()), output_check=args.output_check,
        output_clip=args.output_clip, output_threshold=args.output_threshold, lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir, controlnet_dir=args.controlnet_dir, allow_pickle=args.allow_pickle)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    settings.check()  # before importing the server's dependencies: a refused bind needs none of them
    try:
        from .server.run import run_server
    except ImportError as exc:
        raise EstableError(f"estable serve needs the server extra ({exc.name} is missing): "
                           "pip install 'estable[server]'") from None
    return run_server(settings)
