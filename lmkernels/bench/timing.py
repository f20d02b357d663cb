"""Timing and peak memory of benchmark callables.

CPU: the callables of one measurement (every provider plus the same-size copy) are timed
round-robin within one process: warm-up first, then ``reps`` rounds in which each callable runs
once (the order rotates every round), so drift on a noisy VM hits all of them alike. A sample
repeats a short call enough times to last ``min_sample_s``. We report the median and the 20th
and 80th percentiles of the per-call times.

CUDA: ``triton.testing.do_bench`` (it flushes L2 between calls); without triton, CUDA events
around single calls. A case is timed over ``k`` copies of its inputs, called in turn, with k
large enough that the copies span twice the L2 (:func:`rotation_count`): every call starts
L2-cold. :func:`time_cuda_rotating` times those k calls twice: as plain launches from Python
(what an eager user sees, host overhead included) and as one replayed CUDA graph (the GPU time
alone); a provider whose calls cannot be captured (e.g. one that reads a value back to the host)
has only the first.

Peak memory: on CUDA the ``torch.cuda.max_memory_allocated`` delta of one call; on CPU the peak
of the running sum of the allocation and free events that the torch profiler records for one
call (``profile_memory=True``), i.e. the most memory the call held at once beyond what existed
before it.

Allocator (CPU): by default glibc returns large freed blocks to the OS (``munmap``, heap trim),
so the next call that allocates the same outputs takes a page fault per 4 KiB page. On this VM a
fault costs ~1.5–3 µs: a 16 MiB output then costs 6–20 ms, many times the op itself, and whether
a call pays it depends on what the previous provider freed. :func:`keep_freed_memory` makes
glibc keep freed memory for reuse (the steady state of a training loop with a caching
allocator), the same for every provider; ``--malloc default`` leaves glibc as it is.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


def keep_freed_memory() -> str | None:
    """Make glibc malloc keep freed memory in the process (no ``mmap`` for large blocks, no heap
    trim). Returns what was set, or None where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if mallopt(m_mmap_max, 0) != 1 or mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return None
    return "glibc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(seconds: list[float]) -> Timing:
    ms = [s * 1e3 for s in seconds]
    return Timing(percentile(ms, 0.5), percentile(ms, 0.2), percentile(ms, 0.8), len(ms))


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 2,
    min_sample_s: float = 2e-3,
) -> dict[str, Timing]:
    """Time CPU callables round-robin (see the module docstring)."""
    names = list(fns)
    inner = {}
    with _gc_off():
        for name in names:
            fn = fns[name]
            fn()  # the first call may allocate caches; not used for calibration
            best = math.inf
            for _ in range(max(warmup, 1)):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            inner[name] = max(1, math.ceil(min_sample_s / max(best, 1e-9)))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, n = fns[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    return {n: summarize(s) for n, s in samples.items()}


def time_cuda(fn: Callable[[], object], reps: int = 100) -> Timing:
    """Time a CUDA callable with ``triton.testing.do_bench`` (CUDA events without triton)."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no triton: the plain event timer below
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), reps)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summarize(times)


def rotation_count(case_bytes: int, l2_bytes: int, limit: int = 16) -> int:
    """How many input copies a CUDA case rotates through: enough that they span twice the L2
    (so no call finds its inputs there), at least 1, at most ``limit``."""
    if case_bytes <= 0:
        return limit
    return max(1, min(limit, math.ceil(2 * l2_bytes / case_bytes)))


def _per_call(t: Timing, k: int) -> Timing:
    return Timing(t.median_ms / k, t.p20_ms / k, t.p80_ms / k, t.samples)


def _capture(fn: Callable[[], object]):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_cuda_rotating(thunks: Sequence[Callable[[], object]], graph: bool = True) -> dict:
    """Per-call timings of CUDA callables run in turn (one per rotating input copy):
    ``{"launch": Timing}`` (plain launches) and ``"graph": Timing`` (replays of one captured
    graph of all of them), or ``"graph_error"``: why the capture failed."""
    k = len(thunks)

    def run_all():
        for t in thunks:
            t()

    out: dict = {"launch": _per_call(time_cuda(run_all), k)}
    if graph:
        try:
            g = _capture(run_all)
        except Exception as e:  # noqa: BLE001 - any capture failure is reported, not fatal
            torch.cuda.synchronize()
            out["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            out["graph"] = _per_call(time_cuda(g.replay), k)
    return out


def time_all(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int
) -> dict[str, Timing]:
    if device.type == "cuda":
        return {name: time_cuda(fn) for name, fn in fns.items()}
    return time_interleaved(fns, reps)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # libkineto prints a line on stderr at every profiler start and stop; it would break the
    # progress bar. Silence file descriptor 2 for the duration.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    held = peak = 0
    for _, nbytes in sorted(events):
        held += nbytes
        peak = max(peak, held)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """(peak bytes held by one call of ``fn`` beyond what existed before, method or reason)."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base, "cuda-allocator"
        return _cpu_peak_bytes(fn), "cpu-profiler"
    except Exception as e:  # noqa: BLE001 - a missing number, not a failed benchmark
        return None, f"peak memory unavailable ({type(e).__name__}: {e})"
