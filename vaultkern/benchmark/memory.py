"""Peak memory of one provider, and out-of-memory detection.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus what was allocated before the provider was built (so it counts the
provider's parameters, gradients, optimizer state and activations).

CPU (an approximation, documented in bench/NOTES.md): the increase of the
process' peak resident set size (``VmHWM`` in /proc/self/status) over its
resident size before the provider was built. The peak is reset in-process by
writing ``5`` to /proc/self/clear_refs (Linux >= 4.0), so one process can
measure each provider in turn. Freed heap memory that glibc keeps and reuses
would hide a later provider's allocations, so during the measurement glibc's
mmap threshold is pinned low (``mallopt``): every allocation above 64 KiB is
its own mapping and goes back to the system when freed. Allocations below it
(small tensors, Python objects) may still be reused unseen, so the figure is
a slight underestimate, identical in kind for every provider.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from typing import Callable, Optional

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
PINNED_MMAP_THRESHOLD = 64 * 1024
# What glibc's dynamic thresholds grow to on 64-bit systems; restored after measuring.
RESTORED_MMAP_THRESHOLD = 32 * 1024 * 1024
RESTORED_TRIM_THRESHOLD = 64 * 1024 * 1024


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(match.group(1))


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


class CpuPeakRss:
    """Measures the peak-RSS increase of a callable; see the module docstring."""

    method = ("peak RSS (VmHWM) increase over RSS before building the provider; VmHWM reset "
              "in-process via /proc/self/clear_refs, glibc mmap threshold pinned at 64 KiB "
              "while measuring")

    def __init__(self):
        self.reason_unavailable: Optional[str] = None
        try:
            _status_kib("VmHWM")
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except (OSError, RuntimeError) as exc:
            self.reason_unavailable = f"cannot reset the peak RSS ({exc})"
        self._libc = _libc()
        if self.reason_unavailable is None and self._libc is None:
            self.reason_unavailable = "glibc mallopt not available (peak RSS would miss heap reuse)"

    @property
    def available(self) -> bool:
        return self.reason_unavailable is None

    def _pin(self, pinned: bool) -> None:
        if pinned:
            self._libc.mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD)
            self._libc.mallopt(_M_TRIM_THRESHOLD, PINNED_MMAP_THRESHOLD)
        else:
            self._libc.mallopt(_M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD)
            self._libc.mallopt(_M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)

    def measure(self, fn: Callable[[], None]) -> int:
        """Bytes by which the peak RSS while running ``fn`` exceeds the RSS before it."""
        if not self.available:
            raise RuntimeError(self.reason_unavailable)
        self._pin(True)
        try:
            gc.collect()
            if hasattr(self._libc, "malloc_trim"):
                self._libc.malloc_trim(0)  # hand back free heap pages before the baseline
            before = _status_kib("VmRSS")
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # VmHWM := current RSS
            fn()
            peak = _status_kib("VmHWM")
        finally:
            self._pin(False)
        return max(0, peak - before) * 1024


class CudaPeak:
    method = "torch.cuda.max_memory_allocated minus allocated before building the provider"

    def __init__(self, device: torch.device):
        self.device = device
        self.available = True
        self.reason_unavailable = None

    def measure(self, fn: Callable[[], None]) -> int:
        release(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - before)


def meter_for(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else CpuPeakRss()
