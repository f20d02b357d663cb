"""Backend registry and selection.

Four backends serve every op with one contract (DESIGN.md §1): ``reference`` (plain PyTorch,
fp32 upcast, any device), ``cpu`` (C++ kernels, CPU tensors), ``triton`` (CUDA tensors; CPU
tensors too when ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++ kernels, CUDA tensors).

Selection, strongest first: ``with lmkernels.use_backend(name)`` -> env ``LMKERNELS_BACKEND`` ->
the per-device default order. An explicitly selected backend that cannot serve a call raises
:class:`BackendUnavailable` with the reason; in the default order the next backend is tried.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Until the cuda backend has been verified on a GPU, triton (interpreter-tested) comes first.
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lmkernels_backend", default=None
)


class BackendUnavailable(RuntimeError):
    """An explicitly selected backend cannot serve this call (the message says why)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every lmkernels op inside the block on backend ``name`` (``None``: automatic)."""
    token = _selected.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _selected.reset(token)


def remember_backend(ctx) -> None:
    """Record on an autograd ``ctx`` the backend that the forward's ``use_backend`` selected.

    Autograd runs the backward of CUDA tensors on its own device thread, where that block (a
    context variable) is not set; :func:`in_forward_backend` re-enters it there, so a backward
    runs on the forward's backend. (In a torch.compile'd graph the backward kernels dispatch
    when the graph runs: there ``LMKERNELS_BACKEND`` or the default order applies.)
    """
    ctx.lmk_backend = _selected.get()


def in_forward_backend(grads: Callable) -> Callable:
    """Wrap ``grads(ctx, *grad_outputs)`` to run under the backend :func:`remember_backend`
    saved on ``ctx``."""

    @functools.wraps(grads)
    def run(ctx, *args):
        with use_backend(getattr(ctx, "lmk_backend", None)):
            return grads(ctx, *args)

    return run


def selected_backend() -> str | None:
    """The explicitly requested backend (context manager, then LMKERNELS_BACKEND), or None."""
    name = _selected.get()
    if name is not None:
        return name
    env = os.environ.get("LMKERNELS_BACKEND", "").strip()
    if env and env != "auto":
        return _check_name(env)
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _module(name: str):
    """Import an optional module; returns (module, None) or (None, reason).

    Cached: asked on every dispatch, and an import that failed is not retried in-process.
    """
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
        return None, f"{name} cannot be imported ({type(e).__name__}: {e})"


def availability(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run ops on ``device_type`` tensors, else the reason."""
    _check_name(name)
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type}"
        return _module("lmkernels._C")[1]
    if name == "triton":
        _, why = _module("triton")
        if why:
            return why
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            if triton_interpreting():
                return None
            return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
        return f"triton does not run on {device_type} tensors"
    # cuda
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device_type}"
    _, why = _module("lmkernels._cuda")
    if why:
        return why + " (built only when nvcc is found and LMKERNELS_SKIP_CUDA is unset)"
    return None if torch.cuda.is_available() else "no CUDA device is available"


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``supports(*args)`` returns None when the backend can serve this call, else the reason;
    it is asked before running, so no backend ever returns a silently different answer.
    """

    fn: Callable
    supports: Callable[..., str | None] = field(default=lambda *a, **k: None)


def dispatch(op: str, impls: dict[str, Impl], device: torch.device, *args) -> Callable:
    """Pick the implementation of ``op`` for a call on ``device`` with ``args``."""
    explicit = selected_backend()
    if explicit is not None:
        reason = availability(explicit, device.type)
        if reason is None:
            impl = impls.get(explicit)
            if impl is None:
                reason = "the op has no implementation on this backend"
            else:
                reason = impl.supports(*args)
        if reason is not None:
            raise BackendUnavailable(f"lmkernels backend {explicit!r} cannot run {op}: {reason}")
        return impls[explicit].fn
    reasons = []
    for name in DEFAULT_ORDER.get(device.type, ("reference",)):
        impl = impls.get(name)
        if impl is None:
            continue
        reason = availability(name, device.type) or impl.supports(*args)
        if reason is None:
            return impl.fn
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable(f"no lmkernels backend can run {op}: " + "; ".join(reasons))


def info() -> dict:
    """Versions, devices and each backend's availability (with the reason when unavailable)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(_module("triton")[0], "__version__", None),
        "triton_interpret": triton_interpreting(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "selected": selected_backend(),
        "modules": {m: _module(f"lmkernels.{m}")[1] or "built" for m in ("_C", "_cuda")},
        "backends": {},
    }
    for name in BACKENDS:
        out["backends"][name] = {d: availability(name, d) or "available" for d in devices}
    cuda_mod, _ = _module("lmkernels._cuda")
    if cuda_mod is not None:
        out["cuda_module"] = cuda_mod.build_info()
    cpu_mod, _ = _module("lmkernels._C")
    if cpu_mod is not None:
        out["cpu_kernels"] = torch.ops.lmkernels_cpu.capability()
    return out
