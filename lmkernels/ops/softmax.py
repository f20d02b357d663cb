"""The softmax family as torch.library custom ops: registration, dispatch, autograd.

``lmkernels::softmax_fwd(x, dim, scale, log, mask, causal)`` computes softmax (or log_softmax)
of ``scale * x`` plus an optional mask along ``dim``; ``lmkernels::softmax_bwd`` is its gradient
from the saved output. The public functions in :mod:`lmkernels.functional` validate arguments
and call these. Semantics (shared by every backend) are in csrc/include/lmk/softmax.h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import (
    DTYPE_CODE,
    FLOAT_DTYPES,
    as_rows,
    eager_call,
    eager_function,
    row_offsets,
    rowwise_empty,
)

# ------------------------------------------------------------------------------- launchers


def _cpu_fwd(x, y, scale, log, mask, offsets, col_stride, causal, causal_rows):
    torch.ops.lmkernels_cpu.softmax_fwd(
        x, y, scale, log, mask, offsets, col_stride, causal, causal_rows
    )


def _cpu_bwd(y, dy, dx, scale, log):
    torch.ops.lmkernels_cpu.softmax_bwd(y, dy, dx, scale, log)


def _triton_fwd(*args):
    from lmkernels.triton_kernels import softmax as k

    k.softmax_fwd(*args)


def _triton_bwd(*args):
    from lmkernels.triton_kernels import softmax as k

    k.softmax_bwd(*args)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _cuda_fwd(x, y, scale, log, mask, offsets, col_stride, causal, causal_rows):
    from lmkernels import _cuda

    with torch.cuda.device(x.device):
        _cuda.softmax_fwd(
            x.data_ptr(), y.data_ptr(), DTYPE_CODE[x.dtype], x.shape[0], x.shape[1],
            scale, log,
            0 if mask is None else mask.data_ptr(),
            DTYPE_CODE[torch.bool if mask is None else mask.dtype],
            0 if offsets is None else offsets.data_ptr(), col_stride,
            causal, causal_rows, _stream(x),
        )  # fmt: skip


def _cuda_bwd(y, dy, dx, scale, log):
    from lmkernels import _cuda

    with torch.cuda.device(y.device):
        _cuda.softmax_bwd(
            y.data_ptr(), dy.data_ptr(), dx.data_ptr(), DTYPE_CODE[y.dtype],
            y.shape[0], y.shape[1], scale, log, _stream(y),
        )  # fmt: skip


def _rowwise_fwd(launch):
    """Adapt a (rows, cols) launcher to the op: layout, mask broadcasting, empty tensors."""

    def fwd(x: Tensor, dim: int, scale: float, log: bool, mask: Tensor | None, causal: bool):
        y = rowwise_empty(x, dim)
        if x.numel() == 0:
            return y
        offsets, col_stride = None, 1
        if mask is not None:
            if mask.dtype not in (torch.bool, torch.float32, x.dtype):
                mask = mask.float()
            mask = mask.expand(x.shape)
            if mask.stride(-1) not in (0, 1):
                mask = mask.contiguous()
            offsets, col_stride = row_offsets(x.shape, mask.stride(), x.device), mask.stride(-1)
        causal_rows = x.shape[-2] if causal else 1
        launch(as_rows(x, dim), as_rows(y, dim), float(scale), log, mask, offsets, col_stride,
               causal, causal_rows)  # fmt: skip
        return y

    return fwd


def _rowwise_bwd(launch):
    def bwd(y: Tensor, dy: Tensor, dim: int, scale: float, log: bool):
        dx = rowwise_empty(y, dim)
        if y.numel() == 0:
            return dx
        launch(as_rows(y, dim), as_rows(dy.to(y.dtype), dim), as_rows(dx, dim), float(scale), log)
        return dx

    return bwd


def _reference_fwd(x, dim, scale, log, mask, causal):
    return rowwise_empty(x, dim).copy_(reference.softmax_fwd(x, dim, scale, log, mask, causal))


def _reference_bwd(y, dy, dim, scale, log):
    return rowwise_empty(y, dim).copy_(reference.softmax_bwd(y, dy, dim, scale, log))


def _dtypes(*allowed: torch.dtype):
    def supports(t: Tensor, *_):
        if t.dtype not in allowed:
            return f"dtype {t.dtype} is not supported (supported: {', '.join(map(str, allowed))})"
        return None

    return supports


_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FWD = {
    "reference": Impl(_reference_fwd),
    "cpu": Impl(_rowwise_fwd(_cpu_fwd), _dtypes(*FLOAT_DTYPES)),
    "triton": Impl(_rowwise_fwd(_triton_fwd), _dtypes(*FLOAT_DTYPES)),
    "cuda": Impl(_rowwise_fwd(_cuda_fwd), _dtypes(*_GPU_DTYPES)),
}
_BWD = {
    "reference": Impl(_reference_bwd),
    "cpu": Impl(_rowwise_bwd(_cpu_bwd), _dtypes(*FLOAT_DTYPES)),
    "triton": Impl(_rowwise_bwd(_triton_bwd), _dtypes(*FLOAT_DTYPES)),
    "cuda": Impl(_rowwise_bwd(_cuda_bwd), _dtypes(*_GPU_DTYPES)),
}

# ----------------------------------------------------------------------------- registered ops


def _run_fwd(x, dim, scale, log, mask, causal):
    fn = dispatch("softmax", _FWD, x.device, x, dim, scale, log, mask, causal)
    return fn(x, dim, scale, log, mask, causal)


def _run_bwd(y, dy, dim, scale, log):
    fn = dispatch("softmax backward", _BWD, y.device, y, dy, dim, scale, log)
    return fn(y, dy, dim, scale, log)


@torch.library.custom_op("lmkernels::softmax_fwd", mutates_args=())
def softmax_fwd(
    x: Tensor, dim: int, scale: float, log: bool, mask: Tensor | None, causal: bool
) -> Tensor:
    return _run_fwd(x, dim, scale, log, mask, causal)


@softmax_fwd.register_fake
def _(x, dim, scale, log, mask, causal):
    return rowwise_empty(x, dim)


@torch.library.custom_op("lmkernels::softmax_bwd", mutates_args=())
def softmax_bwd(y: Tensor, dy: Tensor, dim: int, scale: float, log: bool) -> Tensor:
    return _run_bwd(y, dy, dim, scale, log)


@softmax_bwd.register_fake
def _(y, dy, dim, scale, log):
    return rowwise_empty(y, dim)


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, dim, scale, log, mask, causal = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.scale, ctx.log = dim, scale, log
    ctx.mask_shape = None if mask is None else mask.shape


@in_forward_backend
def _grads(ctx, dy, bwd):
    (y,) = ctx.saved_tensors
    if not ctx.needs_input_grad[4]:
        return bwd(y, dy, ctx.dim, ctx.scale, ctx.log), None, None, None, None, None
    # An additive float mask that requires grad: d mask = dz (summed over broadcast dims),
    # where z = scale * x + mask, and dx = scale * dz.
    dz = bwd(y, dy, ctx.dim, 1.0, ctx.log)
    return dz * ctx.scale, None, None, None, dz.sum_to_size(ctx.mask_shape), None


softmax_fwd.register_autograd(lambda ctx, dy: _grads(ctx, dy, softmax_bwd),
                              setup_context=_setup_context)  # fmt: skip


_SoftmaxEager = eager_function("_SoftmaxEager", _run_fwd, _setup_context,
                               lambda ctx, dy: _grads(ctx, dy, _run_bwd))  # fmt: skip


# ------------------------------------------------------------------------------ entry point


def softmax(
    x: Tensor, dim: int, scale: float, log: bool, mask: Tensor | None, causal: bool
) -> Tensor:
    """softmax_fwd with autograd; the public functions call this with validated arguments.

    Plain eager calls run the backend directly (see :func:`eager_call`); everything else goes
    through the registered op.
    """
    if not eager_call(x, mask):
        return softmax_fwd(x, dim, scale, log, mask, causal)
    if torch.is_grad_enabled() and (x.requires_grad or (mask is not None and mask.requires_grad)):
        return _SoftmaxEager.apply(x, dim, scale, log, mask, causal)
    return _run_fwd(x, dim, scale, log, mask, causal)
