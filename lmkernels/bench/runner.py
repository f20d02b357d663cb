"""The benchmark loop: for every bench x dtype x shape x mode, check each provider against the
fp32 reference, measure its peak memory, then time all passing providers (and, on CPU, the
same-size copy) together. Returns one JSON-ready document (see :mod:`lmkernels.bench.report`).
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmkernels.backends import BackendUnavailable, use_backend
from lmkernels.bench import roofline, timing
from lmkernels.bench.spec import Bench, Inputs, Provider, dtype_name

COPY = "copy"  # the CPU roofline row
EAGER, COMPILE = "torch", "torch.compile"


@dataclass
class Config:
    """What to run. ``None`` means the spec's default; patterns are fnmatch globs."""

    ops: Sequence[str] | None = None
    modes: Sequence[str] | None = None
    dtypes: Sequence[torch.dtype] | None = None
    providers: Sequence[str] | None = None
    shapes: Sequence[tuple[int, ...]] | None = None
    quick: bool = False
    reps: int | None = None
    malloc: str = "keep"  # CPU: "keep" (timing.keep_freed_memory) or "default"
    device: torch.device = field(
        default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    def reps_or_default(self) -> int:
        return self.reps or (5 if self.quick else 9)


def _match(name: str, patterns: Sequence[str] | None, alias: str | None = None) -> bool:
    """fnmatch ``name`` (or ``alias``) against ``patterns``; ``!pat`` excludes
    (``"!torch.compile"`` alone keeps everything else)."""
    if patterns is None:
        return True
    names = [name] if alias is None else [name, alias]
    hit = lambda pat: any(fnmatch.fnmatchcase(n, pat) for n in names)  # noqa: E731
    pos = [p for p in patterns if not p.startswith("!")]
    neg = [p[1:] for p in patterns if p.startswith("!")]
    return (not pos or any(map(hit, pos))) and not any(map(hit, neg))


def select(benches: Sequence[Bench], ops: Sequence[str] | None) -> list[Bench]:
    """Benches whose name, or ``family.name`` (``softmax.*``: a whole family), match ``ops``."""
    return [b for b in benches if _match(b.name, ops, f"{b.family}.{b.name}")]


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.start = max(total, 1), 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = f"[{bar}] {self.done}/{self.total} {elapsed:4.0f}s eta {eta:4.0f}s  {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------ one provider's call


def _floats(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32)


def _rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (inf on NaN or a shape mismatch)."""
    if got.numel() != want.numel():
        return float("inf")
    diff = torch.nan_to_num((_floats(got).reshape(want.shape) - want).abs(), nan=float("inf"))
    return float(diff.max()) / max(float(want.abs().max()), 1e-30) if want.numel() else 0.0


@dataclass
class Oracle:
    out: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]


def _outs(y) -> tuple[Tensor, ...]:
    """A provider's result as a tuple (ops like add_rms_norm return several tensors)."""
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _errs(got, want: tuple[Tensor, ...]) -> float:
    return max(_rel_err(g, w) for g, w in zip(_outs(got), want, strict=True))


def oracle(bench: Bench, inputs: Inputs) -> Oracle:
    """The fp32 reference output and gradients (inputs upcast; bool/int tensors as they are)."""
    args, leaves = [], []
    for a in inputs.args:
        if isinstance(a, Tensor) and a.dtype.is_floating_point:
            a32 = a.detach().to(torch.float32).requires_grad_(a.requires_grad)
            if a.requires_grad:
                leaves.append(a32)
            a = a32
        args.append(a)
    outs = _outs(bench.reference(*args))
    gos = [g.to(torch.float32) for g in _outs(inputs.grad_out)]
    grads = torch.autograd.grad(outs, leaves, gos)
    return Oracle(tuple(o.detach() for o in outs), tuple(g.detach() for g in grads))


def _under(backend: str | None, f: Callable[[], object]) -> Callable[[], object]:
    if backend is None:
        return f

    def run():
        with use_backend(backend):
            return f()

    return run


def build_thunk(
    p: Provider, fn: Callable[..., Tensor], inputs: Inputs, mode: str, want: Oracle
) -> tuple[Callable[[], object], float]:
    """The timed callable of ``p`` in ``mode`` and its error against the oracle (checked on one
    run of the same code path before any timing)."""
    leaves = [a for a in inputs.args if isinstance(a, Tensor) and a.requires_grad]
    if mode == "fwd":
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in inputs.args)
        call_args = p.prepare(args) if p.prepare else args
        thunk = _under(p.backend, lambda: fn(*call_args))
        return thunk, _errs(thunk(), want.out)

    call_args = p.prepare(inputs.args) if p.prepare else inputs.args

    def forward() -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        y = _outs(fn(*call_args))
        gos = _outs(inputs.grad_out)
        return y, tuple(g.reshape(o.shape) for g, o in zip(gos, y, strict=True))

    y, dy = _under(p.backend, forward)()
    grads = _under(p.backend, lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))()
    err = max(_errs(y, want.out), _errs(grads, want.grads))
    if mode == "bwd":
        thunk = lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)  # noqa: E731
    else:

        def thunk():
            y2, dy2 = forward()
            return torch.autograd.grad(y2, leaves, dy2)

    return _under(p.backend, thunk), err


# ------------------------------------------------------------------------------ the run loop


def _row(bench: Bench, shape, dtype, mode: str, provider: str, nbytes: int) -> dict:
    return {
        "bench": bench.name,
        "family": bench.family,
        "mode": mode,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "provider": provider,
        "bytes": nbytes,
        "status": "ok",
    }


def measure_case(
    bench: Bench,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    mode: str,
    providers: Sequence[Provider],
    inputs: Inputs,
    want: Oracle,
    compiled: dict,
    cfg: Config,
    roof: dict,
) -> list[dict]:
    """Check, then time, every provider for one (bench, shape, dtype, mode)."""
    nbytes = bench.bytes(shape, dtype, mode)
    tol = bench.tolerance[dtype]
    rows, thunks, built = {}, {}, {}
    for p in providers:
        row = rows[p.name] = _row(bench, shape, dtype, mode, p.name, nbytes)
        why = p.supports(shape, dtype) if p.supports else None
        if why:
            row.update(status="skipped", reason=why)
            continue
        fn = p.fn
        if p.compile:
            if p.name not in compiled:
                compiled[p.name] = torch.compile(p.fn, dynamic=False)
            fn = compiled[p.name]
        try:
            thunk, err = build_thunk(p, fn, inputs, mode, want)
        except BackendUnavailable as e:
            row.update(status="skipped", reason=str(e))
            continue
        except Exception as e:  # noqa: BLE001 - a crashing provider is a failed provider
            row.update(status="FAILED", reason=f"{type(e).__name__}: {e}"[:500])
            continue
        row["max_rel_err"] = err
        if not err <= tol:
            row.update(status="FAILED", reason=f"max relative error {err:.3g} > {tol:g}")
            continue
        peak, how = timing.peak_memory(thunk, cfg.device)
        row["peak_mib"] = None if peak is None else peak / 2**20
        row["peak_method"] = how
        thunks[p.name] = thunk
        built[p.name] = (p, fn)

    copy_row = None
    if cfg.device.type == "cpu" and thunks:
        copy, copy_bytes = roofline.copy_callable(nbytes, cfg.device)
        thunks[COPY] = copy
        copy_row = rows[COPY] = _row(bench, shape, dtype, mode, COPY, copy_bytes)
        copy_row["status"] = "roofline"
    if cfg.device.type == "cuda" and thunks:
        times = _time_cuda(bench, shape, dtype, mode, want, built, thunks, rows, cfg.device)
    else:
        times = timing.time_all(thunks, cfg.device, cfg.reps_or_default()) if thunks else {}
    del thunks, built

    for name, t in times.items():
        row = rows[name]
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, samples=t.samples)
        row["gbps"] = roofline.gbps(row["bytes"], t.median_ms)
        if bench.flops is not None and name != COPY:
            row["flops"] = bench.flops(shape, dtype, mode)
            row["tflops"] = row["flops"] / (t.median_ms * 1e-3) / 1e12
    # the fraction of the roofline: of the FLOP peak for a bench with a FLOP model, else of the
    # bandwidth (the copy timed with this case on CPU, the device's peak on CUDA)
    roof_gbps = copy_row["gbps"] if copy_row else roof.get("peak_gbps")
    peak_tflops = roof.get("peak_tflops", {}).get(dtype_name(dtype))
    for row in rows.values():
        if "gbps" in row and roof_gbps:
            row["frac_bandwidth"] = row["gbps"] / roof_gbps
        if "tflops" in row and peak_tflops:
            row["frac_flops"] = row["tflops"] / peak_tflops
        frac = row.get("frac_flops" if bench.flops is not None else "frac_bandwidth")
        if frac is not None:
            row["frac_roofline"] = frac
    for name, row in rows.items():
        if name.startswith("lmkernels-") and "median_ms" in row:
            for key, base in (("speedup_vs_torch", EAGER), ("speedup_vs_compile", COMPILE)):
                ratio = speedup(row, rows.get(base, {}))
                if ratio is not None:
                    row[key] = ratio
    return list(rows.values())


def speedup(ours: dict, base: dict) -> float | None:
    """base time / ours, both timed the same way: CUDA graph replays when both were captured,
    else plain launches (CUDA) or the CPU median."""
    for key in ("graph_ms", "launch_ms", "median_ms"):
        if key in ours and key in base:
            return base[key] / ours[key]
    return None


def _time_cuda(bench, shape, dtype, mode, want, built, thunks, rows, device) -> dict:
    """Time each provider over rotating input copies (timing.time_cuda_rotating); the row keeps
    both timings, ``median_ms`` is the graph's when it was captured."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    k = timing.rotation_count(bench.bytes(shape, dtype, mode), l2)
    copies = [bench.make_inputs(shape, dtype, device) for _ in range(k - 1)]
    times = {}
    for name, thunk in thunks.items():
        p, fn = built[name]
        ts = [thunk, *(build_thunk(p, fn, c, mode, want)[0] for c in copies)]
        res = timing.time_cuda_rotating(ts)
        row = rows[name]
        row.update(rotating_copies=k, launch_ms=res["launch"].median_ms)
        if "graph" in res:
            row.update(graph_ms=res["graph"].median_ms, timed_by="cuda graph replay")
            times[name] = res["graph"]
        else:
            row.update(timed_by="launches", graph_error=res.get("graph_error"))
            times[name] = res["launch"]
    return times


def _loadavg() -> float | None:
    """The 1-minute load average (other jobs on a shared machine make CPU timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run(benches: Sequence[Bench], cfg: Config, progress: bool = True, stream=None) -> dict:
    """Run ``benches`` under ``cfg``; returns the results document."""
    started = time.time()
    load_start = _loadavg()
    device = cfg.device
    malloc = "default"
    if device.type == "cpu" and cfg.malloc == "keep":
        malloc = timing.keep_freed_memory() or "default (not glibc)"
    plan = []
    for b in benches:
        dtypes = list(cfg.dtypes or b.dtypes_on(device))
        shapes = list(cfg.shapes or b.sweep(device, cfg.quick))
        modes = [m for m in (cfg.modes or b.modes) if m in b.modes]
        plan.append((b, dtypes, shapes, modes))
    bar = Progress(sum(len(d) * len(s) * len(m) for _, d, s, m in plan), stream, progress)
    dtypes_run = sorted({dtype_name(d) for _, ds, _, _ in plan for d in ds})
    roof = roofline.rooflines(device, dtypes_run, any(b.flops is not None for b, *_ in plan))

    results, skipped = [], []
    for b, dtypes, shapes, modes in plan:
        providers = [p for p in b.providers(device) if _match(p.name, cfg.providers)]
        for p in providers:
            if p.fn is None:
                skipped.append({"bench": b.name, "provider": p.name, "reason": p.reason})
        live = [p for p in providers if p.fn is not None]
        for dtype in dtypes:
            for shape in shapes:
                inputs = b.make_inputs(tuple(shape), dtype, device)
                want = oracle(b, inputs)
                compiled: dict = {}
                for mode in modes:
                    results += measure_case(
                        b, tuple(shape), dtype, mode, live, inputs, want, compiled, cfg, roof,
                    )  # fmt: skip
                    label = f"{b.name} {mode} {dtype_name(dtype)} {'x'.join(map(str, shape))}"
                    bar.step(label)
                if compiled:
                    del compiled
                    torch._dynamo.reset()  # a fresh compile per shape/dtype, no recompile limit
                del inputs, want

    return {
        "schema": "lmkernels-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {
            **roofline.machine_info(device),
            "malloc": malloc,
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        },
        "config": {
            "ops": [b.name for b in benches],
            "modes": list(cfg.modes or []) or None,
            "dtypes": [dtype_name(d) for d in cfg.dtypes] if cfg.dtypes else None,
            "providers": list(cfg.providers) if cfg.providers else None,
            "quick": cfg.quick,
            "reps": cfg.reps_or_default(),
            "device": str(device),
        },
        "roofline": roof,
        "skipped_providers": skipped,
        "results": results,
    }
