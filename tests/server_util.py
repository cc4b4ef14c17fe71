"""Shared by the server tests: a tiny random model written by the store, a real uvicorn on a free loopback port in
a thread, and small image helpers. Not a test module itself."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra: pip install -e '.[server]'")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from estable.checkpoints.store import LoadedModel, save_model  # noqa: E402
from estable.config import ModelConfig, TokenizerConfig  # noqa: E402
from estable.models.unet import UNet  # noqa: E402
from estable.server.app import create_app  # noqa: E402
from estable.server.settings import Limits, ServerSettings  # noqa: E402
from estable.server.worker import Worker  # noqa: E402
from estable.training.builders import build_text_encoder, build_vae  # noqa: E402
from estable.training.config import PRESETS  # noqa: E402

TINY = 32  # the tiny model's native size in pixels (latents 8×8, VAE factor 4)


def make_tiny_model(path: Path, seed: int = 0, **config: Any) -> Path:
    """A tiny whole model (tiny-unet's U-Net, VAE, text encoder and shapes tokenizer), random weights, fp32;
    ``config``: more ModelConfig fields (e.g. prompt_completion)."""
    p = PRESETS["tiny-unet"]
    torch.manual_seed(seed)
    unet = UNet(p.model)
    text, tok = build_text_encoder(p.text, seed)
    vae = build_vae(p.vae, seed)
    cfg = ModelConfig(family="estable", unet=p.model, vae=p.vae.config, text=text.config,
                      tokenizer=TokenizerConfig(max_length=tok.max_length, pad_token_id=tok.pad_token_id,
                                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                      **config)
    save_model(LoadedModel(cfg, unet, vae, text, tok, source=path, format="estable"), path, to="estable")
    return path


def settings(data_dir: Path, model: str | Path, **kw: Any) -> ServerSettings:
    kw.setdefault("warmup", True)
    kw.setdefault("device", "cpu")
    kw.setdefault("preview_interval", 0.0)
    kw.setdefault("limits", Limits(max_width=256, max_height=256, max_steps=60))
    return ServerSettings(host="127.0.0.1", port=0, model=str(model), data_dir=data_dir, **kw)


class SlowWorker(Worker):
    """Sleeps ``delay`` seconds in every step, so a test can act while a job runs."""

    delay = 0.05

    def generate(self, job, params, callback):
        def slow(*args):
            time.sleep(self.delay)
            callback(*args)

        return super().generate(job, params, slow)


class LiveServer:
    """The app under a real uvicorn on 127.0.0.1 (a free port), in a thread, configured as ``estable serve`` runs it
    (``estable.server.run.uvicorn_config``); ``stop()`` shuts it down cleanly."""

    def __init__(self, s: ServerSettings, worker_class: type[Worker] = Worker, wait_ready: bool = True):
        import uvicorn

        from estable.server.run import uvicorn_config

        self.settings = s
        self.app = create_app(s, worker_class=worker_class)
        self.state = self.app.state.estable
        config = uvicorn_config(self.app, s, host="127.0.0.1", port=0, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.client.get("/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def wait_for(predicate, timeout: float = 30.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every)
