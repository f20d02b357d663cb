"""The conformance suite's machinery, for lmkernels' own ops and for kernels of your own.

An op registers :class:`Case` objects once; :func:`check_case` runs one case on one backend
and dtype: forward and backward (random non-unit ``grad_output``) against an fp64 oracle, under
the accuracy rule below, with the NaN/Inf pattern required to match exactly.

Accuracy rule (DESIGN.md §5). With ``oracle`` = the case's torch function on fp64 copies of the
inputs and ``baseline`` = the same torch function run in the tested dtype:

    max|ours - oracle|  <=  2 * max|baseline - oracle|  +  k * ulp(dtype) * max|oracle|

with k = 1 for fp16/bf16, where torch's own error is well above rounding noise, and k = 4 for
fp32, where torch's error is itself at the noise level of summation order (a few ulp of the
largest value). fp64 has no more precise oracle, so fp64 results are compared with
``torch.testing.assert_close`` and its default fp64 tolerances instead. Forward results of
normalisation ops (``elementwise=True``) must additionally be, element by element, within
torch.testing's default tolerance for the dtype or within twice torch's own error at that
element (:func:`assert_elementwise`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Case:
    """One conformance case of one op.

    ``make(dtype, device, generator)`` returns ``(args, kwargs)``; tensors among ``args`` that
    are floating point and ``requires_grad`` get gradients checked. ``ours`` is the lmkernels
    function, ``torch_fn`` the plain-torch definition (used for the oracle and the baseline).
    """

    op: str
    name: str
    make: Callable[[torch.dtype, torch.device, torch.Generator], tuple[tuple, dict]]
    ours: Callable
    torch_fn: Callable
    dtypes: Sequence[torch.dtype] = ALL_DTYPES
    backward: bool = True
    elementwise: bool = True  # a normalisation op: also check element-wise tolerances
    small: bool = True  # cheap enough for the Triton interpreter
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return f"{self.op}:{self.name}"


_REGISTRY: dict[str, Case] = {}


def register(*cases: Case) -> None:
    for c in cases:
        if c.id in _REGISTRY:
            raise ValueError(f"conformance case {c.id} registered twice")
        _REGISTRY[c.id] = c


def cases(op: str | None = None) -> list[Case]:
    return [c for c in _REGISTRY.values() if op is None or c.op == op]


_ULP_FLOOR = {torch.float32: 4}


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _to64(obj):
    if isinstance(obj, Tensor) and obj.dtype.is_floating_point:
        return obj.detach().to(torch.float64).requires_grad_(obj.requires_grad)
    return obj


def _clone(obj):
    if isinstance(obj, Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    return obj


def _grad_inputs(args) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor) and a.requires_grad]


def _run(fn, args, kwargs, grad_out_seed: int | None, gen_device: torch.device,
         go_dtype: torch.dtype):  # fmt: skip
    out = fn(*args, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    grads = []
    if grad_out_seed is not None:
        diff, gos = [], []
        for i, o in enumerate(outs):
            if not o.requires_grad:
                continue
            g = torch.Generator(device=gen_device).manual_seed(grad_out_seed + 1000 * i)
            # non-unit, non-uniform grad_output; made non-contiguous via a transposed buffer
            go = torch.randn(o.shape[::-1], generator=g, device=o.device)
            go = go.permute(tuple(reversed(range(o.dim()))))
            # rounded to the tested dtype first, so the oracle sees the very same values
            diff.append(o)
            gos.append((go * 1.7 + 0.3).to(go_dtype).to(o.dtype))
        ins = _grad_inputs(args)
        if ins and diff:
            grads = list(torch.autograd.grad(diff, ins, gos, allow_unused=True))
    return outs, grads


def max_err(a: Tensor, oracle: Tensor, what: str) -> float:
    """Max abs error of ``a`` against ``oracle`` after checking NaN/±Inf patterns match."""
    a64, o64 = a.detach().to(torch.float64), oracle.detach().to(torch.float64)
    if a64.shape != o64.shape:
        raise AssertionError(f"{what}: shape {tuple(a64.shape)} != expected {tuple(o64.shape)}")
    for name, pred in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        pa, po = pred(a64), pred(o64)
        if not torch.equal(pa, po):
            n = int((pa != po).sum())
            raise AssertionError(f"{what}: {name} pattern differs from the oracle at {n} places")
    finite = torch.isfinite(o64)
    if not finite.any():
        return 0.0
    return float((a64[finite] - o64[finite]).abs().max())


def assert_accurate(ours: Tensor, baseline: Tensor, oracle: Tensor, dtype: torch.dtype,
                    what: str) -> None:  # fmt: skip
    """The 2x rule of the module docstring (fp64: torch's default fp64 tolerances)."""
    e_ours = max_err(ours, oracle, what)
    if dtype == torch.float64:
        torch.testing.assert_close(ours.to(oracle.dtype), oracle, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")  # fmt: skip
        return
    e_base = max_err(baseline, oracle, what + " (torch baseline)") if baseline is not None else 0
    o = oracle.detach()
    scale = float(o[torch.isfinite(o)].abs().max()) if torch.isfinite(o).any() else 0.0
    k = _ULP_FLOOR.get(dtype, 1)
    bound = 2 * e_base + k * ulp(dtype) * scale
    if e_ours > bound:
        raise AssertionError(
            f"{what}: max error {e_ours:.3g} > bound {bound:.3g} "
            f"(torch {dtype} error {e_base:.3g}, oracle scale {scale:.3g})"
        )


def assert_elementwise(ours: Tensor, baseline: Tensor, oracle: Tensor, what: str) -> None:
    """Per element: within torch.testing's default tolerance for the dtype, or within twice
    torch's own error at that element (long fp32 reductions exceed the default in torch too).
    Catches relative errors in small values that a max-abs bound cannot see."""
    rtol, atol = _TOLS[ours.dtype]
    o = oracle.detach().to(torch.float64)
    finite = torch.isfinite(o)
    err = (ours.detach().to(torch.float64) - o).abs()[finite]
    base_err = (baseline.detach().to(torch.float64) - o).abs()[finite]
    allowed = torch.maximum(atol + rtol * o.abs()[finite], 2 * base_err)
    bad = err > allowed
    if bad.any():
        i = int(bad.nonzero()[0])
        value = float(o[finite][i])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements beyond the element-wise bound; e.g. error "
            f"{float(err[i]):.3g} > {float(allowed[i]):.3g} at oracle value {value:.4g}"
        )


# torch.testing.assert_close's default (rtol, atol) per dtype
_TOLS = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def check_case(case: Case, dtype: torch.dtype, device: torch.device | str = "cpu",
               seed: int = 0) -> None:  # fmt: skip
    """Run ``case`` on the current backend (see :func:`lmkernels.use_backend`) and assert it
    matches the oracle in value, NaN/Inf pattern, gradients, dtype and shape."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    args, kwargs = case.make(dtype, device, gen)
    go_seed = seed + 1 if case.backward else None

    def run(fn, inputs):
        return _run(fn, inputs, kwargs, go_seed, device, dtype)

    outs, grads = run(case.ours, [_clone(a) for a in args])
    ref_outs, ref_grads = run(case.torch_fn, [_to64(a) for a in args])
    base_outs, base_grads = run(case.torch_fn, [_clone(a) for a in args])

    if len(outs) != len(base_outs):
        raise AssertionError(f"{case.id}: {len(outs)} outputs, torch gives {len(base_outs)}")
    # The coarser of the tested dtype and the output dtype sets the floor (e.g. dtype= casts).
    coarse = max(dtype, *(o.dtype for o in outs), key=lambda d: torch.finfo(d).eps)
    for i, (out, ref_out, base_out) in enumerate(zip(outs, ref_outs, base_outs, strict=True)):
        what = f"{case.id} forward{f' output {i}' if len(outs) > 1 else ''} [{dtype}]"
        if out.dtype != base_out.dtype:
            raise AssertionError(f"{what}: output dtype {out.dtype}, torch gives {base_out.dtype}")
        floor = max(dtype, out.dtype, key=lambda d: torch.finfo(d).eps)
        assert_accurate(out, base_out, ref_out, floor, what)
        if case.elementwise:
            assert_elementwise(out, base_out, ref_out, what)
    for i, (g, rg, bg) in enumerate(zip(grads, ref_grads, base_grads, strict=True)):
        if (g is None) != (rg is None):
            raise AssertionError(f"{case.id}: gradient {i} is {g} but torch gives {rg}")
        if g is None:
            continue
        if g.dtype != bg.dtype:
            raise AssertionError(f"{case.id}: gradient {i} dtype {g.dtype}, torch {bg.dtype}")
        floor = max(coarse, g.dtype, key=lambda d: torch.finfo(d).eps)  # e.g. a bf16 weight
        assert_accurate(g, bg, rg, floor, f"{case.id} grad[{i}] [{dtype}]")


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def check_deterministic(case: Case, dtype: torch.dtype, device="cpu", runs: int = 3,
                        threads: tuple[int, ...] = ()) -> None:  # fmt: skip
    """Repeated forward and backward on the same inputs must be bitwise identical; with
    ``threads``, run i uses ``threads[i % len(threads)]`` torch threads (the bits must not
    depend on the thread count either)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    args, kwargs = case.make(dtype, device, gen)
    first = None
    old_threads = torch.get_num_threads()
    for i in range(runs):
        if threads:
            torch.set_num_threads(threads[i % len(threads)])
        try:
            outs, grads = _run(case.ours, [_clone(a) for a in args], kwargs,
                               1 if case.backward else None, device, dtype)  # fmt: skip
        finally:
            torch.set_num_threads(old_threads)
        flat = outs + [g for g in grads if g is not None]
        if first is None:
            first = flat
            continue
        for a, b in zip(first, flat, strict=True):
            if not torch.equal(_bits(a), _bits(b)):
                raise AssertionError(f"{case.id}: repeated run is not bitwise identical")


def poison_tail(t: Tensor, extra: int = 64) -> Tensor:
    """A contiguous copy of ``t`` that lives in a larger buffer whose tail is NaN.

    A kernel that reads past ``t``'s logical end picks up NaN, which the accuracy check then
    reports (out-of-bounds loads are silent in the Triton interpreter and on GPUs).
    """
    buf = torch.full((t.numel() + extra,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[: t.numel()].view(t.shape)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


# ------------------------------------------------------------------------- several processes


def _rank_entry(rank: int, world: int, store: str, backend: str, fn, args) -> None:
    import datetime
    import os
    import sys

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # Done: leave without interpreter finalisation, where gloo's worker threads can still hold
    # tensors and abort the process (SIGABRT, "terminate called without an active exception";
    # seen here about once in ten runs before this line).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, *args, world: int = 2, timeout: float = 240.0,
              backend: str = "gloo") -> None:  # fmt: skip
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a process group
    (``gloo`` over loopback, one thread each; ``nccl``: one GPU per rank).

    Returns when every rank has finished; re-raises the first failure with that rank's
    traceback; kills the ranks still running after ``timeout`` seconds and raises
    ``TimeoutError`` (a hung collective fails instead of hanging). ``fn`` must be a
    module-level function of an importable module: the processes import it again. They
    inherit the environment (``TRITON_INTERPRET`` included)."""
    import os
    import tempfile
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_backend_available(backend):
        raise RuntimeError(f"run_ranks: torch.distributed backend {backend!r} is not available")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_rank_entry, args=(world, store, backend, fn, args),
                                 nprocs=world, join=False, start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
