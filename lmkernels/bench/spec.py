"""The benchmark spec API: each op declares its benchmark once, and the CLI, the tests and
pytest-benchmark all run it from that declaration.

A spec module lives in :mod:`lmkernels.bench.specs` (one file per op family) and defines
``BENCHES``, a list of :class:`Bench`. A :class:`Bench` says which shapes and dtypes to sweep,
how to make inputs, how many bytes the op must move (the byte model behind GB/s and the
roofline), the fp32 oracle, and the providers (implementations) to compare::

    Bench(
        name="softmax",
        shapes=((4096, 1024), ...), quick_shapes=((64, 1024),),
        dtypes=(torch.float32, torch.bfloat16),
        make_inputs=make_inputs,      # (shape, dtype, device) -> Inputs
        bytes=bytes_moved,            # (shape, dtype, mode) -> int
        reference=lambda x: lmkernels.reference.softmax_fwd(x, -1, 1.0, False, None, False),
        providers=lambda device: standard_providers(device, ours=..., torch_fn=..., ...),
    )

Every provider's ``fn`` takes the same positional arguments (``Inputs.args``) and returns one
tensor, or a tuple of them (then ``Inputs.grad_out`` is a tuple of the same length); the
tensors in ``args`` that require grad are the ones differentiated in the ``bwd`` and
``fwdbwd`` modes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lmkernels import backends

MODES = ("fwd", "bwd", "fwdbwd")
DTYPE_NAMES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
Shape = tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def shape_str(shape: Shape) -> str:
    return "x".join(map(str, shape))


@dataclass
class Inputs:
    """What one (shape, dtype) measurement feeds every provider.

    ``args`` are passed positionally to each provider's ``fn``; tensors among them with
    ``requires_grad=True`` are differentiated. ``grad_out`` is the upstream gradient (``dy``).
    """

    args: tuple
    grad_out: Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    ``fn(*args) -> Tensor``. ``reason`` (with ``fn=None``) marks a provider that is unavailable
    here; it is reported as skipped with that reason, never dropped. ``backend`` selects an
    lmkernels backend (``lmkernels.use_backend``) around every call, the backward included.
    ``compile=True`` wraps ``fn`` in ``torch.compile(dynamic=False)`` once per shape and dtype.
    ``prepare(args) -> args`` adapts the inputs once, outside the timed region (e.g. a layout a
    peer library needs); differentiation is still with respect to the original ``args``.
    ``supports(shape, dtype)`` returns None or the reason this case is skipped.
    """

    name: str
    fn: Callable[..., Tensor] | None = None
    reason: str | None = None
    backend: str | None = None
    compile: bool = False
    prepare: Callable[[tuple], tuple] | None = None
    supports: Callable[[Shape, torch.dtype], str | None] | None = None


@dataclass(frozen=True)
class Bench:
    """The benchmark of one op (see the module docstring)."""

    name: str
    shapes: tuple[Shape, ...]
    quick_shapes: tuple[Shape, ...]
    dtypes: tuple[torch.dtype, ...]
    make_inputs: Callable[[Shape, torch.dtype, torch.device], Inputs]
    bytes: Callable[[Shape, torch.dtype, str], int]
    reference: Callable[..., Tensor]
    providers: Callable[[torch.device], list[Provider]]
    family: str = ""
    modes: tuple[str, ...] = MODES
    # The sweep on a CPU when ``shapes`` (model sizes, what a GPU runs) would take too long
    # there; None: ``shapes`` everywhere.
    cpu_shapes: tuple[Shape, ...] | None = None
    # The dtypes on a CPU when they differ from ``dtypes`` (e.g. no fp16 there); None: the same.
    cpu_dtypes: tuple[torch.dtype, ...] | None = None
    # Optional FLOP model (shape, dtype, mode) -> int for compute-bound ops: rows then report
    # TFLOP/s as well.
    flops: Callable[[Shape, torch.dtype, str], int] | None = None
    # Loose sanity tolerance per dtype for the correctness check before timing: the largest
    # |provider - fp32 reference| relative to the largest |reference| (a wrong axis, a missing
    # scale or a garbage output fails by orders of magnitude; rounding does not).
    tolerance: dict = field(
        default_factory=lambda: {
            torch.float32: 1e-3,
            torch.float64: 1e-6,
            torch.float16: 1e-2,
            torch.bfloat16: 5e-2,
        }
    )

    def sweep(self, device: torch.device, quick: bool = False) -> tuple[Shape, ...]:
        """The shapes a run on ``device`` measures by default."""
        if quick:
            return self.quick_shapes
        if device.type == "cpu" and self.cpu_shapes is not None:
            return self.cpu_shapes
        return self.shapes

    def dtypes_on(self, device: torch.device) -> tuple[torch.dtype, ...]:
        """The dtypes a run on ``device`` measures by default."""
        if device.type == "cpu" and self.cpu_dtypes is not None:
            return self.cpu_dtypes
        return self.dtypes


# ------------------------------------------------------------------------ standard providers

# Backends that the Triton interpreter would make "available" on CPU tensors: timing the
# interpreter says nothing about the kernels, so they are skipped on CPU.
_INTERPRETED = {"triton"}


def lmkernels_providers(device: torch.device, ours: Callable[..., Tensor]) -> list[Provider]:
    """``lmkernels-<backend>`` for every non-reference backend (skipped with the reason when
    the backend cannot run on ``device``)."""
    out = []
    for name in backends.BACKENDS:
        if name == "reference":
            continue
        why = backends.availability(name, device.type)
        if why is None and device.type == "cpu" and name in _INTERPRETED:
            why = "the Triton interpreter (TRITON_INTERPRET=1) is not benchmarked"
        pname = f"lmkernels-{name}"
        out.append(Provider(pname, reason=why) if why else Provider(pname, ours, backend=name))
    return out


def peer(name: str, module: str, device: torch.device, build: Callable[[], Provider]) -> Provider:
    """A third-party provider that runs on CUDA only: skipped with the reason when there is no
    GPU or ``module`` cannot be imported; ``build()`` makes it otherwise."""
    if device.type != "cuda":
        return Provider(name, reason="peer libraries are benchmarked on a CUDA device only")
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is a skip reason
        return Provider(name, reason=f"{module} cannot be imported ({type(e).__name__}: {e})")
    return build()


def standard_providers(
    device: torch.device,
    *,
    ours: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    torch_fn: Callable[..., Tensor],
    peers: Sequence[Provider] = (),
) -> list[Provider]:
    """ours per backend, ``reference``, ``torch`` (eager), ``torch.compile``, then peers."""
    return [
        *lmkernels_providers(device, ours),
        Provider("reference", reference),
        Provider("torch", torch_fn),
        Provider("torch.compile", torch_fn, compile=True),
        *peers,
    ]


# ------------------------------------------------------------------------------- discovery


def discover() -> list[Bench]:
    """Every ``BENCHES`` entry of every module in :mod:`lmkernels.bench.specs`, in name order."""
    from lmkernels.bench import specs

    out: list[Bench] = []
    for info in sorted(pkgutil.iter_modules(specs.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{specs.__name__}.{info.name}")
        for b in getattr(mod, "BENCHES", ()):
            out.append(b if b.family else replace(b, family=info.name))
    return out
