"""``estable train {vae,unet,clip,lora,controlnet,ti,preference,synonyms}``: the training commands (a thin shell over
``estable.training``).

    estable train unet --config tiny-unet --run-dir runs/try optim.lr=3e-4 max_steps=200
    estable train clip --config tiny-clip --run-dir runs/clip            (→ runs/clip/text_encoder.safetensors)
    estable train unet --config tiny-unet text.source=runs/clip          (the CLIP run's text tower, frozen)
    estable train lora --config tiny-lora base=model.safetensors lora.rank=8   (→ RUN/lora.safetensors)
    estable train controlnet --config tiny-controlnet base=model.safetensors control=canny
                                                                       (→ RUN/controlnet.safetensors)
    estable train ti --config tiny-ti token=teal colour=[0,160,160]            (→ RUN/teal.safetensors)
    estable train preference default out.safetensors --device cuda     (pairs judged, DPO, half-way mix)
    estable train synonyms default out.safetensors --synonym beneath=below   (the text tower taught a word)
    estable train unet --run-dir runs/try --resume max_steps=400       (config.json of the run is the base)
    torchrun --nproc_per_node 4 -m estable.cli train unet --config my.json --run-dir runs/big

``--config`` takes a JSON file (any subset of the fields) or a preset name; ``key=value`` overrides follow
(dotted keys for nested fields, JSON values). ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .errors import EstableError
from .training.registry import TRAINER_KINDS

_HELP = {"unet": "train the latent-diffusion U-Net (frozen VAE and text encoder)",
         "vae": "train the KL autoencoder (L1 + KL + SSIM, optional PatchGAN)",
         "clip": "train a contrastive text-image pair; exports its text tower as a text encoder for the U-Net",
         "lora": "train LoRA adapters on a frozen base model (any checkpoint); writes a kohya-named lora.safetensors",
         "controlnet": "train a ControlNet (edges, scribbles, lines or segmentation → image) on a frozen base model; "
                       "writes controlnet.safetensors",
         "ti": "textual inversion: learn a new word's input vectors on a frozen model (shapes world: an unseen "
               "colour); writes RUN/<token>.safetensors for --embeddings-dir"}
_EXPORTS = {"clip": ("clip.safetensors", "text_encoder.safetensors", "tokenizer"), "lora": ("lora.safetensors",),
            "controlnet": ("controlnet.safetensors",)}


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` with one sub-command per implemented trainer."""
    from .training.config import PRESETS

    p = subparsers.add_parser("train", help="train a network (run folders, checkpoints, exact resume)",
                              description="Train a network. Runs write config.json, log.jsonl, sample grids and "
                              "atomic checkpoints into --run-dir; --resume continues exactly where it stopped.")
    sub = p.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for kind in TRAINER_KINDS:
        presets = ", ".join(n for n, c in PRESETS.items() if type(c).__name__.lower().startswith(kind))
        q = sub.add_parser(kind, help=_HELP[kind], description=_HELP[kind])
        q.add_argument("--config", metavar="FILE_OR_PRESET",
                       help=f"JSON config file or preset ({presets}); with --resume, default: the run's config.json")
        q.add_argument("--data", metavar="SRC", help="data source: 'shapes', an image folder or a tar-shard pattern")
        q.add_argument("--run-dir", metavar="DIR", help="run folder (default: runs/<trainer>-<date>-<time>)")
        q.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
        q.add_argument("--until", type=int, metavar="STEP",
                       help="stop at this step with a checkpoint, the learning-rate schedule still planned to "
                       "max_steps (--resume continues)")
        q.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
        q.set_defaults(func=_cmd_train, trainer_kind=kind)
    e = sub.add_parser("export", help="write a U-Net run, with the VAE and text encoder it trained against, as one "
                       "model file", description="Assemble the model of a U-Net training run (EMA weights when kept; "
                       "the frozen VAE and text encoder and the tokenizer its config names) into an Estable file "
                       "that every command loads with --model.")
    e.add_argument("run", metavar="UNET_RUN", help="a U-Net training run folder")
    e.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    e.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="weights dtype (default fp16)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_cmd_export)
    _add_preference_command(sub)
    _add_synonyms_command(sub)


def _add_preference_command(sub: argparse._SubParsersAction) -> None:
    from .training.preference import GRADES, PAIR_KINDS

    text = ("preference fine-tuning by the judge (Diffusion-DPO): a shapes-world model draws train-split prompts, the "
            "compositional benchmark's judge grades each image, and the U-Net learns from pairs of one prompt's "
            "images: right against wrong, or fewer stray pixels against more (estable.training.preference)")
    q = sub.add_parser("preference", help=text, description=text + ". The judged images of each kind are kept in "
                       "--work and reused by a later call.")
    q.add_argument("model", metavar="MODEL", help="the model to fine-tune (a file, or 'default' for the built-in one)")
    q.add_argument("out", metavar="OUT", help="the .safetensors file to write (fp16, with MODEL's settings)")
    q.add_argument("--kinds", default="count,pair",
                   help=f"prompt kinds to draw pairs for, comma-separated ({', '.join(PAIR_KINDS)}; "
                   "default count,pair)")
    q.add_argument("--prompts", type=int, default=2000, help="distinct train-split prompts per kind (default 2000)")
    q.add_argument("--seeds", type=int, default=8, help="images per prompt (default 8)")
    q.add_argument("--gen-batch", type=int, default=64, help="images per sampler run while drawing (default 64)")
    q.add_argument("--world-seed", type=int, default=101, help="the train-split world of the prompts (default 101)")
    q.add_argument("--grade", choices=GRADES, default="judge",
                   help="which pairs to learn from: judge (each wrong image with a right one of its prompt), strays "
                   "(a prompt's right image with the fewest stray pixels against the one with the most, when they "
                   "differ by --stray-margin or more) or both (the judge's, cleanest winners first, and the strays'); "
                   "default judge")
    q.add_argument("--stray-margin", type=int, default=16,
                   help="stray pixels by which a strays pair's loser must exceed its winner (default 16)")
    q.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    q.add_argument("--pairs-per-step", type=int, default=64, help="pairs per step (default 64)")
    q.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    q.add_argument("--beta", type=float, default=1000.0, help="DPO's β (default 1000)")
    q.add_argument("--mix", type=float, default=0.5,
                   help="how far OUT's U-Net goes from MODEL's weights to the fine-tuned ones (default 0.5; 1: all)")
    q.add_argument("--work", metavar="DIR",
                   help="judged images, verdicts and the loss log (default: OUT's name + '.work')")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=_cmd_preference)


def _model_out_work(args: argparse.Namespace, keeps: str) -> tuple[Path, Path, Path]:
    """(MODEL's file, OUT, the work folder) of a fine-tuning command, checked: MODEL exists, OUT only with
    --overwrite, --work (default OUT's name + '.work') a folder if it exists."""
    from .pipeline import DEFAULT_MODEL, default_model_path

    source = default_model_path() if args.model == DEFAULT_MODEL else Path(args.model)
    if not source.exists():
        raise EstableError(f"no model at {source}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise EstableError(f"{out} exists; pass --overwrite to replace it")
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    if work.exists() and not work.is_dir():
        raise EstableError(f"--work {work} is a file; give a folder for {keeps}")
    return source, out, work


def _timed_log():
    """print with the seconds since this call in front."""
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    return log


def _cmd_preference(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device
    from .training import preference as pref

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(pref.PAIR_KINDS):
        raise EstableError(f"--kinds takes some of {', '.join(pref.PAIR_KINDS)}, not {args.kinds!r}")
    if min(args.prompts, args.gen_batch, args.pairs_per_step) < 1 or args.seeds < 2 or args.steps < 0:
        raise EstableError("--prompts, --gen-batch and --pairs-per-step must be at least 1, --seeds at least 2 (a "
                           "pair needs two images of a prompt) and --steps not negative")
    if not (args.lr > 0 and args.beta > 0 and 0 <= args.mix <= 1 and args.stray_margin >= 1):
        raise EstableError("--lr and --beta must be positive, --mix between 0 and 1 and --stray-margin at least 1")
    source, out, work = _model_out_work(args, "the judged images")
    device = resolve_device(args.device)
    log = _timed_log()
    written = pref.preference_fine_tune(
        source, out, kinds=kinds, prompts=args.prompts, seeds=args.seeds, gen_batch=args.gen_batch,
        world_seed=args.world_seed, steps=args.steps, pairs_per_step=args.pairs_per_step, lr=args.lr, beta=args.beta,
        mix=args.mix, work=work, device=device, grade=args.grade, margin=args.stray_margin, overwrite=args.overwrite,
        log=log)
    log(f"wrote {written}")
    return 0


def _add_synonyms_command(sub: argparse._SubParsersAction) -> None:
    text = ("teach a model's text encoder phrases its captions never used, each as a synonym of one they did: the "
            "U-Net's prediction from a caption said the new way is distilled to its prediction from the caption as "
            "written, U-Net and VAE frozen, the model's own captions kept as they were (estable.training.synonyms)")
    q = sub.add_parser("synonyms", help="teach the text encoder new phrases as synonyms of known ones",
                       description=text + ". Shapes-world models only (it renders the world's pair scenes).")
    q.add_argument("model", metavar="MODEL", help="the model to teach (a file, or 'default' for the built-in one)")
    q.add_argument("out", metavar="OUT", help="the .safetensors file to write (fp16, with MODEL's settings)")
    q.add_argument("--synonym", action="append", metavar="NEW=KNOWN",
                   help="a new phrase and the known phrase it means, e.g. beneath=below (repeatable; default: the "
                   "paraphrase test's four: on top of=above, beneath=below, on the left of=to the left of, on the "
                   "right of=to the right of)")
    q.add_argument("--scenes", type=int, default=512, help="train-split pair scenes rendered (default 512)")
    q.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    q.add_argument("--val-scenes", type=int, default=256,
                   help="held-out pair scenes the synonym term is reported on, before and after (default 256)")
    q.add_argument("--batch", type=int, default=32, help="noised scenes per step (default 32)")
    q.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    q.add_argument("--keep-weight", type=float, default=1.0,
                   help="weight of keeping the known captions' contexts (default 1)")
    q.add_argument("--keep-own-weight", type=float, default=0.0,
                   help="weight of keeping what the U-Net draws from each step's pair captions as written (their "
                   "predictions held to the untaught encoder's; default 0: off)")
    q.add_argument("--world-seed", type=int, default=103, help="the world of the scenes (default 103)")
    q.add_argument("--work", metavar="DIR", help="loss log and summary (default: OUT's name + '.work')")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=_cmd_synonyms)


def _cmd_synonyms(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device
    from .training import synonyms as syn

    pairs = syn.parse_synonyms(args.synonym) if args.synonym else dict(syn.PARAPHRASE_SYNONYMS)
    if min(args.scenes, args.val_scenes, args.batch) < 1 or args.steps < 0:
        raise EstableError("--scenes, --val-scenes and --batch must be at least 1 and --steps not negative")
    if not (args.lr > 0 and args.keep_weight >= 0 and args.keep_own_weight >= 0):
        raise EstableError("--lr must be positive and --keep-weight and --keep-own-weight not negative")
    source, out, work = _model_out_work(args, "the log")
    log = _timed_log()
    summary = syn.teach_synonyms(source, out, pairs, scenes=args.scenes, val_scenes=args.val_scenes,
                                 steps=args.steps, batch=args.batch,
                                 lr=args.lr, keep_weight=args.keep_weight, keep_own_weight=args.keep_own_weight,
                                 world_seed=args.world_seed,
                                 device=resolve_device(args.device), work=work, overwrite=args.overwrite, log=log)
    log(f"held-out synonym loss {summary['val_before']:.5f} → {summary['val_after']:.5f}; wrote {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .outputs import check_writable_folder
    from .training import distributed
    from .training.config import config_kind, load_config
    from .training.registry import make_trainer
    from .training.runs import latest_checkpoint, read_run_config

    kind = args.trainer_kind
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        raise EstableError("--resume needs --run-dir (the run folder to continue)")
    else:
        run_dir = Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    base: str | dict | None = args.config
    if base is None and args.resume:
        config_file = run_dir / "config.json"
        if not config_file.is_file():
            raise EstableError(f"{run_dir} has no config.json; pass --config")
        base = read_run_config(config_file)
        other = config_kind(base)
        if other is not None and other != kind:
            raise EstableError(f"{run_dir} is a {other} run; continue it with `estable train {other}`")
    if base is None:
        raise EstableError("--config is required (a JSON file or a preset name)")
    for item in args.overrides:
        if "=" not in item:
            raise EstableError(f"unexpected argument {item!r}; overrides are KEY=VALUE (e.g. optim.lr=3e-4)")
    overrides = list(args.overrides)
    if args.data:
        if any(item.partition("=")[0].strip() in ("data", "data.source") for item in overrides):
            raise EstableError("--data and a data.source override both set the data source; give one of them")
        overrides.append(f"data.source={json.dumps(args.data)}")
    config = load_config(kind, base, overrides)
    if args.until is not None and args.until < 1:
        raise EstableError(f"--until must be a step of 1 or more, not {args.until}")
    if args.print_config:
        print(config.to_json())
        return 0
    if run_dir.exists() and not run_dir.is_dir():
        raise EstableError(f"--run-dir {run_dir} is a file; choose a folder name")
    found = latest_checkpoint(run_dir / "checkpoints") if args.resume else None
    at = int(found.name.split("_")[1]) if found is not None and found.name[5:].isdigit() else 0  # step_0000500
    if args.until is not None and args.until < at:  # before anything is built or written
        raise EstableError(f"--until {args.until} is below the step the run is at ({at}); give a later step")
    if config.max_steps < at:
        raise EstableError(f"max_steps={config.max_steps} is below the step the run is at ({at}); give more steps")
    check_writable_folder(run_dir, create=True)  # before the models are built
    trainer = make_trainer(kind, config, run_dir, resume=args.resume, progress=False if args.no_progress else None)
    if trainer.dist.is_main:
        start = f" (resuming at step {trainer.step})" if trainer.step else ""
        print(f"training {kind} in {run_dir}{start}", flush=True)
    try:
        last = trainer.train(until=args.until)
    finally:
        trainer.close()
        distributed.cleanup()
    if trainer.dist.is_main:
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        if trainer.step >= config.max_steps:
            print(f"done: step {trainer.step}{loss}; checkpoints in {trainer.run.checkpoints_dir}")
        else:
            print(f"stopped at step {trainer.step} of {config.max_steps}{loss}; checkpoints in "
                  f"{trainer.run.checkpoints_dir} (--resume continues)")
        for name in _EXPORTS.get(kind, ()):
            print(f"wrote {trainer.run.root / name}")
        if kind == "ti":
            print(f"wrote {trainer.embedding_path}")  # type: ignore[attr-defined]
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .training.assemble import assemble_model

    _check_export_out(Path(args.run), Path(args.out))
    print(f"wrote {assemble_model(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)}")
    return 0


def _check_export_out(run: Path, out: Path) -> None:
    """EstableError when ``out`` would write over what the export reads: the run's checkpoints or config.json, or
    the VAE, text encoder or tokenizer its config names."""
    from .training.config import load_config

    reads = [run / "checkpoints", run / "config.json"]
    if (run / "config.json").is_file():
        try:
            cfg = load_config("unet", run / "config.json")
        except EstableError:
            cfg = None  # assemble_model reports it
        for source in (getattr(cfg, "vae", None), getattr(cfg, "text", None)):
            for name in (getattr(source, "source", None), getattr(source, "tokenizer", None)):
                if isinstance(name, str) and name and Path(name).exists():
                    reads.append(Path(name))
    target = out.resolve()
    for path in reads:
        resolved = path.resolve()
        if target == resolved or resolved in target.parents:
            raise EstableError(f"OUT {out} would write over {path}, which the export reads; choose a name outside it")
