"""The server's settings: where it listens, who may call it, how much it accepts, where it keeps jobs.

One dataclass, filled by ``estable serve`` from its flags (or by a test directly), checked once in
:meth:`ServerSettings.check` before anything is loaded or bound. No torch, no FastAPI: importable anywhere.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EstableError

__all__ = ["Limits", "ServerSettings", "default_data_dir", "is_loopback"]

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def default_data_dir() -> Path:
    """Where jobs and images are kept without --data-dir: ``$XDG_DATA_HOME/estable`` (``~/.local/share/estable``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "estable"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of the loopback interface; False for 0.0.0.0, :: and the rest."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Limits:
    """Bounds on one request (over → 422 naming the field); the body cap (over → 413)."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_batch_count: int = 16
    max_prompt_length: int = 4000  # characters, prompt and negative prompt each
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048  # an uploaded image's width × height, read from its header
    max_job_pixels: int = 8 * 1024 * 1024  # width × height × batch size of one batch (hires size included)

    def as_config(self) -> dict[str, int]:
        return {"max_width": self.max_width, "max_height": self.max_height, "max_steps": self.max_steps,
                "max_batch_size": self.max_batch_size, "max_prompt_length": self.max_prompt_length,
                "max_job_pixels": self.max_job_pixels}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    model: str = "default"  # a checkpoint path, a name in models_dir, or "default" (the built-in model)
    models_dir: Path | None = None
    api_key: str | None = None
    api_auth: tuple[str, str] | None = None  # (user, password) for HTTP basic auth, as A1111's --api-auth
    data_dir: Path = field(default_factory=default_data_dir)
    queue_size: int = 16  # jobs waiting (the running one not counted); full → 503
    keep_jobs: int = 0  # finished jobs kept with their images, the newest first (0: all)
    job_timeout: float = 600.0  # seconds a job may run before it fails
    grace: float = 30.0  # seconds SIGTERM waits for admitted jobs before interrupting them
    cors_origins: tuple[str, ...] = ()
    max_client_connections: int = 32  # one client address's open connections (0: no cap, e.g. behind a proxy)
    auth_failure_limit: int = 60  # refused authentications per client address per minute, then 429
    # reverse proxies whose X-Forwarded-For / -Proto name the client ("127.0.0.1", a comma-separated list, or "*");
    # None: none, the connection's own address is the client (no client can name another to dodge the limits)
    forwarded_allow_ips: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cuda_graphs: bool = True
    preview_interval: float = 1.0  # seconds between progress previews (0: none)
    warmup: bool = True
    limits: Limits = field(default_factory=Limits)
    # provenance and filters: the options of `estable generate`'s flags of the same names (ProvenancePolicy)
    watermark: bool = True
    watermark_key: str | None = None  # None: $ESTABLE_WATERMARK_KEY
    tree_ring: bool = False  # txt2img jobs only
    sign_key: Path | None = None  # None: $ESTABLE_SIGN_KEY
    blocklists: tuple[Path, ...] = ()
    output_check: Path | None = None
    output_clip: Path | None = None
    output_threshold: float | None = None  # None: the output check's default, 30
    # models from the wild: folders searched by name (server.extras)
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    controlnet_dir: Path | None = None
    allow_pickle: bool = False  # .pt embeddings and .pth/.ckpt ControlNets, through the safe loader

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key) or self.api_auth is not None

    def check(self) -> None:
        """Refuse settings that are unsafe or meaningless, with one line a user can act on."""
        if not self.auth_required and not is_loopback(self.host):
            raise EstableError(
                f"refusing to listen on {self.host} without an API key: anyone on the network could use this "
                "machine; pass --api-key KEY (or --api-key-file F, or --api-auth USER:PASS), or bind 127.0.0.1")
        if self.api_key is not None and len(self.api_key) < 8:
            raise EstableError("the API key must be at least 8 characters long")
        if self.api_auth is not None and len(self.api_auth[1]) < 8:
            raise EstableError("the --api-auth password must be at least 8 characters long")
        if "*" in self.cors_origins and not self.auth_required:
            raise EstableError("--cors-origin '*' lets every web site use this server; it needs an API key "
                               "(--api-key or --api-auth)")
        if not 0 <= self.port <= 65535:
            raise EstableError(f"--port must be 0..65535, not {self.port}")
        if self.max_client_connections < 0:
            raise EstableError(f"--max-connections-per-client must be 0 (no cap) or more, not "
                               f"{self.max_client_connections}")
        if self.auth_failure_limit < 1:
            raise EstableError(f"auth_failure_limit must be at least 1, not {self.auth_failure_limit}")
        if self.keep_jobs < 0:
            raise EstableError(f"--keep-jobs must be 0 (keep all) or more, not {self.keep_jobs}")
        if self.queue_size < 1:
            raise EstableError(f"--queue must be at least 1, not {self.queue_size}")
        if self.job_timeout <= 0 or self.grace < 0:
            raise EstableError("--timeout must be positive and --grace not negative")
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            raise EstableError(f"--models-dir {self.models_dir} is not a folder")
        for flag, folder in (("--lora-dir", self.lora_dir), ("--embeddings-dir", self.embeddings_dir),
                             ("--controlnet-dir", self.controlnet_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise EstableError(f"{flag} {folder} is not a folder")
        for entry in (self.forwarded_allow_ips.split(",") if self.forwarded_allow_ips is not None else ()):
            try:
                if entry.strip() != "*":
                    ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise EstableError(f"--forwarded-allow-ips takes addresses or networks separated by commas, or '*'; "
                                   f"{entry.strip()!r} is neither") from None
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise EstableError(f"--cors-origin must be an origin such as https://example.org, not {origin!r}")
