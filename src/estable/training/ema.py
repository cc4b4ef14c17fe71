"""Exponential moving average of a network's weights (Polyak & Juditsky 1992; used for every SD release).

After optimizer step t (counted from 1) every floating-point parameter θ updates its shadow θ̄:

    decay_t = min(decay, (1 + t) / (10 + t))   with warm-up (the LDM code's LitEma), else decay
    θ̄ ← decay_t · θ̄ + (1 − decay_t) · θ

The warm-up makes the average usable early in short runs (at t = 1 decay_t = 2/11). Buffers (and
non-float parameters) are copied, not averaged. Shadows are kept in float32 whatever the network's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def strip_wrappers(name: str) -> str:
    """A parameter name without ``_orig_mod.`` (torch.compile) and leading ``module.`` (DDP) parts."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


class EMA:
    """Shadow copy of ``model``'s parameters; ``update(model, step)`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {
            strip_wrappers(n): p.detach().to(torch.float32).clone() for n, p in model.named_parameters()
        }
        self._keys: dict[str, str] = {}

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step ``step`` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ for every float parameter. The float32 ones (all of them under autocast) go through
        two multi-tensor operations, the same arithmetic as one ``mul_`` and ``add_`` per tensor in two launches
        instead of two per parameter (a U-Net has hundreds: on a GPU that many launches cost the host milliseconds a
        step)."""
        d = self.decay_at(step)
        shadows, params = [], []
        for name, p in model.named_parameters():
            s = self.shadow[self._key(name)]
            if p.dtype == s.dtype and p.device == s.device:
                shadows.append(s)
                params.append(p.detach())
            elif p.dtype.is_floating_point:
                s.mul_(d).add_(p.detach().to(s), alpha=1.0 - d)
            else:
                s.copy_(p.detach())
        if shadows:
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, params, alpha=1.0 - d)

    def _key(self, name: str) -> str:
        """The shadow's name for a parameter name (wrappers stripped; cached: the update runs every step)."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = strip_wrappers(name)
        return key

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA state: {k} has shape {tuple(v.shape)}, the model {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages (cast to each parameter's dtype)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[strip_wrappers(name)].to(p.dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` with the EMA weights inside the block; the live weights are restored after."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])
