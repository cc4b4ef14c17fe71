"""Several processes, one trainer: DistributedDataParallel set up from torchrun's environment.

Under ``torchrun --nproc_per_node K`` every process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on the CPU).
Without them (or with WORLD_SIZE=1) it is a single process and every helper here is a cheap no-op.

Conventions of the trainer built on this: each rank takes its own slice of each global batch (see
``loop.ResumableBatchSampler``); only rank 0 writes logs, samples and checkpoints, with barriers around saves so
no rank runs ahead of a checkpoint. Two strategies:

  ddp   every rank holds the whole model; DistributedDataParallel averages gradients in the backward pass.
  fsdp  FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023 "PyTorch FSDP"): the trained network's
        parameters become DTensors sharded along dim 0 over the ranks; each sharded block all-gathers its full
        weights just before its forward (and again in backward) and frees them after, and its gradients are
        reduce-scattered (averaged) so that each rank keeps the gradient of its own shard. The optimizer state
        then lives on the shards too. Per rank, weights + gradients + AdamW state cost ~16 bytes × params / world
        (fp32) instead of 16 bytes × params, plus the transient full weights of the block being run.

Checkpoints under fsdp hold full (unsharded) tensors with exactly the single-process layout:
:func:`gather_full` turns every DTensor of a (nested) state into a full CPU tensor on rank 0, one tensor at a
time; :func:`shard_like` and :func:`shard_optimizer_state` cut a full state loaded from disk back into this rank's
shards (every rank reads the file, so no communication is needed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:  # FSDP2 and DTensor (torch >= 2.6)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - an old or distributed-less torch build
    FSDPModule = fully_shard = DTensor = distribute_tensor = init_device_mesh = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's variables (or return a single-process DistInfo).

    backend: None picks "nccl" when CUDA is available, else "gloo". Calling it again returns the group in use.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def current() -> DistInfo:
    """The DistInfo of an already initialised group (single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()),
                        dist.get_backend())
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself is untouched)."""
    out = t.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when a group with more than one rank is up; else ``module``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def fsdp_available() -> bool:
    """Whether this torch has FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6)."""
    return fully_shard is not None and dist.is_available()


def shard_fsdp(module: nn.Module, blocks: list[nn.Module], device: torch.device) -> nn.Module:
    """Shard ``module`` in place with FSDP2 over all ranks: each of ``blocks`` (submodules of ``module``) becomes
    one unit that all-gathers its weights on its own, then ``module`` itself takes the remaining parameters (the
    root unit). Returns ``module`` (its class is now also an ``FSDPModule``; its parameters are DTensors).

    The block granularity sets the peak memory: the largest block's full weights are materialised at a time.
    The root reshards after its forward too (FSDP2's default keeps the root's weights gathered until backward),
    so that outside a forward every parameter is a DTensor shard: the EMA update and swap, and the checkpoint
    gathering, rely on that (the cost: the root's few weights are all-gathered once more in backward).
    """
    if not fsdp_available():
        raise RuntimeError("strategy=fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state under FSDP)."""
    return DTensor is not None and isinstance(t, DTensor)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a DTensor (a collective: every rank must call it, in the same order); ``t`` itself
    when it is a plain tensor. Used e.g. for the gradient norm, which clip_grad_norm_ returns as a DTensor."""
    return t.full_tensor() if is_sharded(t) else t


def gather_full(obj: Any, keep: bool) -> Any:
    """A copy of the (nested dict / list / tuple) state ``obj`` in which every DTensor is its full tensor on the
    CPU (an all-gather per DTensor: every rank must call this on states of the same structure). Plain tensors are
    detached CPU copies. ``keep=False`` (ranks that do not write) returns None for every tensor, so that only the
    writing rank holds the full state in host memory."""
    if isinstance(obj, dict):
        return {k: gather_full(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v, keep) for v in obj)
    if isinstance(obj, torch.Tensor):
        full = obj.full_tensor() if is_sharded(obj) else obj
        return full.detach().cpu().clone() if keep else None
    return obj


def _shard_as(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` cut into ``ref``'s shards when ``ref`` is a DTensor of the same global shape; else ``full``.
    ``src_data_rank=None``: each rank takes its shard from its own copy (all ranks read the same file)."""
    if not is_sharded(ref) or tuple(full.shape) != tuple(ref.shape):
        return full  # a plain target, or a shape mismatch left for the strict loader to report
    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict (as read from a checkpoint) with each tensor sharded like the same key of ``like``
    (e.g. ``model.state_dict()`` or the EMA shadows under FSDP). Unknown keys pass through unchanged."""
    return {k: _shard_as(v, like[k]) if k in like else v for k, v in full.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full, single-process-layout optimizer ``state_dict`` (integer parameter ids in param_groups order) with
    each per-parameter state tensor of a parameter's shape (AdamW's exp_avg, exp_avg_sq) sharded like that
    parameter; scalars such as ``step`` stay plain tensors, as the optimizer keeps them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out_state: dict[Any, Any] = {}
    for pid, entry in state["state"].items():
        ref = params[int(pid)] if 0 <= int(pid) < len(params) else None
        out_state[pid] = {k: _shard_as(v, ref) if isinstance(v, torch.Tensor) and ref is not None else v
                          for k, v in entry.items()}
    return {**state, "state": out_state}


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        else:
            return module


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """No gradient communication inside the block when ``skip`` (the non-final micro-steps of gradient
    accumulation): DDP's ``no_sync()`` when ``module`` is DDP; under FSDP2 ``set_requires_gradient_sync(False)``
    on every FSDP unit inside ``module`` (each then accumulates its unsharded gradient locally, and the final
    micro-step reduce-scatters the sum); else nothing."""
    if not skip:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        units = [m for m in module.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
        for m in units:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.set_requires_gradient_sync(True, recurse=False)


def cleanup() -> None:
    """Leave the process group (all ranks together: a rank tearing down while another still talks can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistInfo", "all_reduce_mean", "barrier", "cleanup", "current", "fsdp_available", "full_value",
           "gather_full", "init_distributed", "is_sharded", "no_sync", "shard_fsdp", "shard_like",
           "shard_optimizer_state", "unwrap", "wrap_ddp"]
