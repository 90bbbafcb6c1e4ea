"""Keep freed activations in the process while a CPU evaluation runs (Linux with glibc).

glibc returns large freed blocks to the operating system: a block above its mmap threshold gets
a mapping of its own, unmapped on free, and the top of the heap is trimmed once more than the
trim threshold is free.
Both thresholds grow with the blocks a program frees, but only up to 32 MiB and 64 MiB. A
forward pass whose activations add up to more than that (W-CNN: 44 MiB per point) gets all its
memory back from the kernel at every point, one zeroed 4 KiB page at a time. On the benchmark
CNN that was 8,000 page faults per point, and half the run time (docs/benchmarks.md).

While evaluating, :func:`hold_freed_memory` raises both thresholds to the memory budget, so
freed activations are reused by the next point. When the outermost hold ends, it sets them to
what glibc's own rule would have reached after freeing the largest activation (that block's
size, and twice that) and trims the heap, so the process keeps no more memory than it would
have without the hold. ``evaluate`` holds once around all its tiles; each tile holds too, for
callers that evaluate tiles one by one (the pipeline, dask workers). Setting
``LANDSCAPES_HOLD_FREED_MEMORY=0`` turns this off. Elsewhere (macOS, Windows, musl) it does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator

__all__ = ["hold_freed_memory", "holds_freed_memory", "settle_thresholds"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MIN, _GLIBC_MAX = 128 << 10, 32 << 20  # glibc's dynamic mmap threshold: start, ceiling
ENV = "LANDSCAPES_HOLD_FREED_MEMORY"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def holds_freed_memory() -> bool:
    """Whether :func:`hold_freed_memory` acts on this platform and with this environment."""
    return _libc() is not None and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def settle_thresholds(largest_block: int) -> None:
    """Set glibc's mmap and trim thresholds where its own rule puts them once a block of
    ``largest_block`` bytes has been freed: that size (within 128 KiB–32 MiB), and twice that.
    Does nothing without glibc (and regardless of ``LANDSCAPES_HOLD_FREED_MEMORY``)."""
    libc = _libc()
    if libc is None:
        return
    threshold = int(min(max(largest_block, _GLIBC_MIN), _GLIBC_MAX))
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)


_lock = threading.Lock()
_depth = [0]  # nested holds (evaluate() around its tiles): only the outermost sets and restores
_largest = [0]


@contextlib.contextmanager
def hold_freed_memory(budget: int, largest_block: int) -> Iterator[None]:
    """Keep up to ``budget`` bytes of freed memory for reuse inside the block.

    Args:
        budget: the most freed memory to keep (the evaluation's memory budget).
        largest_block: the largest single allocation expected (the largest activation); sets
            the thresholds left behind on exit.
    """
    libc = _libc() if holds_freed_memory() else None
    if libc is None:
        yield
        return
    with _lock:
        _depth[0] += 1
        _largest[0] = max(_largest[0], int(largest_block))
        if _depth[0] == 1:
            limit = int(min(max(budget, 2 * _GLIBC_MAX), 2**31 - 1))  # mallopt takes an int
            libc.mallopt(_M_MMAP_THRESHOLD, limit)
            libc.mallopt(_M_TRIM_THRESHOLD, limit)
    try:
        yield
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                settle_thresholds(_largest[0])
                _largest[0] = 0
                libc.malloc_trim(0)
