"""Measurement primitives: wall time, peak memory, FLOPs of a forward, matmul throughput."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")

__all__ = [
    "ForeignLoad",
    "MemoryProbe",
    "Timing",
    "forward_flops",
    "largest_activation",
    "machine_info",
    "matmul_gflops",
    "settle_allocator",
    "sync",
    "timed",
    "until_quiet",
    "wait_for_quiet",
]


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc when there is one."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: psutil is a dependency of distributed, hence present
        import psutil

        return psutil.Process().memory_info().rss


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS drops to the live memory.

    Without it, memory one contender freed stays resident and the next one reuses it
    without raising RSS: its delta would depend on who ran before it.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def settle_allocator(largest_block: int) -> None:
    """Put glibc's mmap and trim thresholds where a fresh process running this workload has
    them after its first point (:func:`landscapes.allocator.settle_thresholds`).

    The thresholds are process-wide, and a contender that changes them (the engine holds freed
    memory while it evaluates) would otherwise change them for the contenders after it. Set
    before every call, each contender runs as if in a process of its own.
    """
    from landscapes.allocator import settle_thresholds

    settle_thresholds(largest_block)


def largest_activation(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the largest output of any leaf module in one forward of ``model`` on ``inputs``."""
    largest = [inputs.numel() * inputs.element_size()]

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not POSIX
        return 0


class MemoryProbe:
    """Peak memory above the level at entry: sampled RSS on the CPU, the allocator on CUDA.

    On the CPU the heap is trimmed first (so every contender starts from the same resident
    memory and pays the same page faults), then a daemon thread reads the RSS every
    ``interval`` seconds (a few microseconds each, so it cannot favour one contender); short
    spikes between samples are missed, which matters only for runs of a few milliseconds.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryProbe:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = _rss_bytes()
            self._high = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._high = max(self._high, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._high = max(self._high, _rss_bytes())
            self.peak_bytes = self._high - self._base


def _system_busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (NaN without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How busy *other* processes kept the CPUs over a span: their CPU seconds divided by
    (wall seconds × CPUs). Near 0 on a quiet machine; benchmarks run beside builds or tests
    read high, and their timings should not be trusted."""

    def __enter__(self) -> ForeignLoad:
        self._t = time.perf_counter()
        self._own = time.process_time()
        self._busy = _system_busy_seconds()
        self.fraction = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        own = time.process_time() - self._own
        busy = _system_busy_seconds() - self._busy
        cpus = len(os.sched_getaffinity(0))
        self.fraction = max(0.0, (busy - own) / (wall * cpus)) if wall > 0 else math.nan


def wait_for_quiet(threshold: float, timeout: float, *, window: float = 1.0) -> float:
    """Wait until other processes use less than ``threshold`` of the CPUs over ``window``
    seconds, or ``timeout`` seconds have passed; return the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with ForeignLoad() as load:
            time.sleep(window)
        if not load.fraction > threshold:  # NaN (no /proc/stat) counts as quiet
            break
    return time.perf_counter() - start


def until_quiet(
    run: Callable[[], dict[str, float]],
    max_foreign: float,
    retries: int,
    quiet_wait: float,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Call ``run`` (a timed run returning a record with ``foreign_load``) and run it again, after
    waiting for a quiet machine, while other processes used more than ``max_foreign`` of the CPUs
    meanwhile (at most ``retries`` times); the last record, with ``reruns`` added."""
    for attempt in range(retries + 1):
        record = run()
        if not record["foreign_load"] > max_foreign or attempt == retries:
            return record | {"reruns": attempt}
        waited = wait_for_quiet(max_foreign, quiet_wait)
        log(f"    other processes used {record['foreign_load']:.0%} of the CPUs; waited {waited:.0f} s, running again")
    raise AssertionError("unreachable")


@dataclass
class Timing:
    """Wall time and peak memory of one call."""

    seconds: float
    cpu_seconds: float  # CPU time of this process (all threads)
    peak_bytes: int
    foreign_load: float  # share of the CPUs other processes used meanwhile (see ForeignLoad)
    minor_faults: int = 0  # page faults served without I/O: mostly memory the kernel had to zero


def timed(fn: Callable[[], T], device: torch.device, largest_block: int | None = None) -> tuple[T, Timing]:
    """Call ``fn`` once; return its result with wall time (device-synchronized), process CPU
    time, peak memory, minor page faults and how busy other processes kept the CPUs meanwhile.
    With ``largest_block``, glibc's thresholds are first settled (:func:`settle_allocator`)."""
    sync(device)
    if largest_block is not None:
        settle_allocator(largest_block)
    with MemoryProbe(device) as probe, ForeignLoad() as load:
        faults, cpu, start = _minor_faults(), time.process_time(), time.perf_counter()
        result = fn()
        sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        faults = _minor_faults() - faults
    return result, Timing(seconds, cpu, probe.peak_bytes, load.fraction, faults)


def forward_flops(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    ctx: Callable[[], contextlib.AbstractContextManager[None]],
) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (matmuls and convolutions), as counted
    by ``torch.utils.flop_counter.FlopCounterMode`` under the precision context ``ctx``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), ctx(), counter:
        model(inputs)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _matmul_precision(device: torch.device, dtype: torch.dtype, tf32: bool) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def matmul_gflops(
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    tf32: bool = False,
    size: int | None = None,
    repeats: int = 9,
) -> float:
    """Measured throughput of a square matmul in GFLOP/s (median of ``repeats``).

    ``size`` defaults to 2048 on the CPU and 8192 on CUDA (large enough to saturate an H100).
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    times = []
    with _matmul_precision(device, dtype, tf32):
        for i in range(repeats + 2):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i >= 2:  # two warm-up calls
                times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _engine_version() -> dict[str, object]:
    """Which engine was measured: the git commit and a hash of the library's sources (the
    working tree may differ from the commit)."""
    import hashlib
    import subprocess
    from pathlib import Path

    import landscapes

    root = Path(landscapes.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    out: dict[str, object] = {"landscapes_sources_sha256": digest.hexdigest()[:16]}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine_info() -> dict[str, object]:
    """Versions and hardware, for the JSON record."""
    import numpy

    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        info["loss_landscapes"] = version("loss-landscapes")
        info["landscapes"] = version("landscapes")
    except Exception:  # noqa: BLE001 - informative only
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info |= _engine_version()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info
