"""The normalisation family (layer_norm, rms_norm, each with an optional fused residual add) as
torch.library custom ops: registration, dispatch, autograd.

``lmkernels::norm_fwd(x, residual, weight, bias, eps, rms)`` normalises each row of the 2-D
``x`` (plus ``residual``) and returns ``(y, h, mean, rstd)``; ``lmkernels::norm_bwd`` is its
gradient from the saved ``h``, ``mean`` and ``rstd``. The public functions in
:mod:`lmkernels.functional` validate arguments, flatten ``normalized_shape`` into the columns and
convert weight and bias to the accumulation type before calling :func:`norm`. The semantics,
shared by every backend, are in csrc/include/lmk/norm.h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import DTYPE_CODE, FLOAT_DTYPES, eager_call, eager_function

ROWS_PER_BLOCK = 64  # lmk::kNormRowsPerBlock: rows per dw/db partial sum (norm.h)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """A in norm.h: the accumulation type of weight, bias, mean, rstd, dw and db."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contig(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


# ------------------------------------------------------------------------------- launchers
# Every backend's launcher takes 2-D contiguous tensors and preallocated outputs:
#   fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms)      residual/h/weight/bias/mean
#                                                                    may be None (see norm.h)
#   bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms)         dh_out/weight/mean/dw/db
#                                                                    may be None
# weight / bias have the accumulation dtype or x's (dy's) dtype. The cpu op widens 16-bit ones
# itself (no conversion call on the eager path); the other launchers are wrapped in _acc_fwd /
# _acc_bwd, which convert them first.


def _acc(p: Tensor | None, like: Tensor) -> Tensor | None:
    acc = acc_dtype(like.dtype)
    return p if p is None or p.dtype == acc else p.to(acc)


def _acc_fwd(launch):
    def run(x, residual, weight, bias, *rest):
        launch(x, residual, _acc(weight, x), _acc(bias, x), *rest)

    return run


def _acc_bwd(launch):
    def run(dy, dh_out, h, weight, *rest):
        launch(dy, dh_out, h, _acc(weight, dy), *rest)

    return run


def _cpu_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms):
    torch.ops.lmkernels_cpu.norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms)


def _cpu_bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms):
    torch.ops.lmkernels_cpu.norm_bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms)


def _triton_fwd(*args):
    from lmkernels.triton_kernels import norm as k

    k.norm_fwd(*args)


def _triton_bwd(*args):
    from lmkernels.triton_kernels import norm as k

    k.norm_bwd(*args)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms):
    from lmkernels import _cuda

    stream_dtype = x.dtype if residual is None else residual.dtype
    with torch.cuda.device(x.device):
        _cuda.norm_fwd(
            x.data_ptr(), _ptr(residual), _ptr(weight), _ptr(bias), y.data_ptr(), _ptr(h),
            _ptr(mean), rstd.data_ptr(), DTYPE_CODE[x.dtype], DTYPE_CODE[stream_dtype],
            x.shape[0], x.shape[1], eps, rms, torch.cuda.current_stream(x.device).cuda_stream,
        )  # fmt: skip


def _cuda_bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms):
    from lmkernels import _cuda

    rows, cols = dy.shape
    # dw and db partial sums, one row of each per block of ROWS_PER_BLOCK rows
    blocks = (rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    work = torch.empty(2 * blocks * cols, dtype=rstd.dtype, device=dy.device)
    with torch.cuda.device(dy.device):
        _cuda.norm_bwd(
            dy.data_ptr(), _ptr(dh_out), h.data_ptr(), _ptr(weight), _ptr(mean),
            rstd.data_ptr(), dh.data_ptr(), _ptr(dw), _ptr(db), work.data_ptr(),
            DTYPE_CODE[dy.dtype], DTYPE_CODE[h.dtype], rows, cols, rms,
            torch.cuda.current_stream(dy.device).cuda_stream,
        )  # fmt: skip


def _reference_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms):
    outs = reference.norm_fwd(x, residual, weight, bias, eps, rms)
    for dst, src in zip((y, h, mean, rstd), outs, strict=True):
        if dst is not None:
            dst.copy_(src)


def _reference_bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms):
    outs = reference.norm_bwd(dy, dh_out, h, weight, mean, rstd, rms)
    for dst, src in zip((dh, dw, db), outs, strict=True):
        if dst is not None:
            dst.copy_(src)


def _supports(t: Tensor, *_) -> str | None:
    if t.dtype not in _GPU_DTYPES:
        return f"dtype {t.dtype} is not supported (supported: float32, float16, bfloat16)"
    return None


_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FWD = {
    "reference": Impl(_acc_fwd(_reference_fwd)),
    "cpu": Impl(_cpu_fwd),
    "triton": Impl(_acc_fwd(_triton_fwd), _supports),
    "cuda": Impl(_acc_fwd(_cuda_fwd), _supports),
}
_BWD = {
    "reference": Impl(_acc_bwd(_reference_bwd)),
    "cpu": Impl(_cpu_bwd),
    "triton": Impl(_acc_bwd(_triton_bwd), _supports),
    "cuda": Impl(_acc_bwd(_cuda_bwd), _supports),
}
assert set(DTYPE_CODE) >= set(FLOAT_DTYPES)

# ----------------------------------------------------------------------------- registered ops


def _fwd_outputs(x: Tensor, residual: Tensor | None, rms: bool):
    rows = x.shape[0]
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = _empty(x) if residual is None else torch.empty_like(residual)
    mean = _empty(x, acc) if rms else torch.empty(rows, dtype=acc, device=x.device)
    rstd = torch.empty(rows, dtype=acc, device=x.device)
    return y, h, mean, rstd


def _run_fwd(x, residual, weight, bias, eps, rms):
    y, h, mean, rstd = _fwd_outputs(x, residual, rms)
    if x.numel():
        fn = dispatch("norm", _FWD, x.device, x, residual, weight, bias, eps, rms)
        res = _contig(residual)
        fn(_contig(x), res, _contig(weight), _contig(bias), y, None if res is None else h,
           None if rms else mean, rstd, float(eps), rms)  # fmt: skip
    return y, h, mean, rstd


def _bwd_outputs(h: Tensor, weight: Tensor | None, need_dw: bool, need_db: bool):
    cols = h.shape[1]
    acc = acc_dtype(h.dtype)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    dw = torch.empty(cols, dtype=acc, device=h.device) if need_dw else _empty(h, acc)
    db = torch.empty(cols, dtype=acc, device=h.device) if need_db else _empty(h, acc)
    return dh, dw, db


def _run_bwd(dy, dh_out, h, weight, mean, rstd, rms, need_dw, need_db):
    dh, dw, db = _bwd_outputs(h, weight, need_dw, need_db)
    if h.shape[0] == 0:  # no rows: zero parameter gradients
        dw.zero_()
        db.zero_()
    elif h.numel():
        fn = dispatch("norm backward", _BWD, h.device, dy, dh_out, h, weight, mean, rstd, rms)
        fn(_contig(dy), _contig(dh_out), _contig(h),
           _contig(weight), None if rms else mean, rstd, dh, dw if need_dw else None,
           db if need_db else None, rms)  # fmt: skip
    return dh, dw, db


@torch.library.custom_op("lmkernels::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run_fwd(x, residual, weight, bias, eps, rms)


@norm_fwd.register_fake
def _(x, residual, weight, bias, eps, rms):
    return _fwd_outputs(x, residual, rms)


@torch.library.custom_op("lmkernels::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    dh_out: Tensor | None,
    h: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_bwd(dy, dh_out, h, weight, mean, rstd, rms, need_dw, need_db)


@norm_bwd.register_fake
def _(dy, dh_out, h, weight, mean, rstd, rms, need_dw, need_db):
    return _bwd_outputs(h, weight, need_dw, need_db)


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, residual, weight, bias, eps, rms = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.rms, ctx.has_residual, ctx.x_dtype = rms, residual is not None, x.dtype
    ctx.mark_non_differentiable(mean, rstd)
    if residual is None:
        ctx.mark_non_differentiable(h)
    # no zero tensors for the gradients of mean, rstd (and h); _grads takes dy / dh_out None
    ctx.set_materialize_grads(False)


@in_forward_backend
def _grads(ctx, dy, dh_out, bwd):
    h, weight, mean, rstd = ctx.saved_tensors
    need_dw, need_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    if dy is None:
        dy = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device)
    dh, dw, db = bwd(dy, dh_out if ctx.has_residual else None, h, weight, mean, rstd, ctx.rms,
                     need_dw, need_db)  # fmt: skip
    dx = dh.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dres = dh if ctx.has_residual and ctx.needs_input_grad[1] else None
    return dx, dres, dw if need_dw else None, db if need_db else None, None, None


norm_fwd.register_autograd(
    lambda ctx, dy, dh_out, _dmean, _drstd: _grads(ctx, dy, dh_out, norm_bwd),
    setup_context=_setup_context,
)


_NormEager = eager_function(
    "_NormEager",
    _run_fwd,
    _setup_context,
    lambda ctx, dy, dh_out, _dmean, _drstd: _grads(ctx, dy, dh_out, _run_bwd),
)


# ------------------------------------------------------------------------------ entry point


def norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, h)`` of norm_fwd with autograd (h is empty without a residual).

    ``x``: (rows, cols) of dtype T; ``residual``: (rows, cols) of the stream dtype S (norm.h);
    ``weight`` / ``bias``: (cols,) of the accumulation dtype or of T (their gradients are
    computed in the accumulation dtype; autograd rounds them to T). The public functions call
    this with validated arguments. Plain eager calls run the backend directly (see
    :func:`lmkernels.ops._common.eager_call`); everything else goes through the registered op.
    """
    if not eager_call(x, residual, weight, bias):
        y, h, _, _ = norm_fwd(x, residual, weight, bias, eps, rms)
    elif torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias)
    ):
        y, h, _, _ = _NormEager.apply(x, residual, weight, bias, eps, rms)
    else:
        y, h, _, _ = _run_fwd(x, residual, weight, bias, eps, rms)
    return y, h
