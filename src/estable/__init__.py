"""Estable: Stable Diffusion, end to end, on PyTorch."""

__version__ = "0.1.0"
