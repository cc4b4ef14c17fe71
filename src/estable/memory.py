"""Peak resident memory of a piece of work on Linux, for the large-image measurements (tests, benchmarks).

``ru_maxrss`` (resource.getrusage) is the process's peak since it started and cannot be reset; here the
kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs``, value 5, Linux ≥ 4.0) and freed heap
memory handed back (glibc ``malloc_trim``) first, so that the peak of each measured call stands on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in {_STATUS}")


def peak_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), how far the resident memory rose above its level before the call, in bytes). Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) * 1024
