"""Rotary position embedding as torch.library custom ops: registration, dispatch, autograd.

``lmkernels::rotary(x, cos, sin, interleaved)`` is ``x * cos + rot(x) * sin`` (rot: rotate_half,
or rotate_every_two when interleaved) for x of shape (..., d) and cos / sin broadcastable to x;
its backward is the transposed map of dy (the gradient for x; cos and sin get none: the public
function sends calls that need one to the reference composite). The kernels see x as (rows, d)
and read cos / sin through one element offset per row (lmk/rotary.h), so broadcast tables
(e.g. over heads) are never materialised. ``lmkernels::rotary_`` is the in-place form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import eager_call, eager_function, row_offsets

# ------------------------------------------------------------------------------- launchers
# Every backend's launcher takes x and a preallocated contiguous out of x's shape (..., d) (out
# may be x itself when x is contiguous), cos / sin broadcastable to x, and whether to apply the
# forward or the transposed (backward) map.


def _table(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """cos / sin for the kernels: a tensor with unit column stride and the element offset of the
    row that each row of x reads (lmk/rotary.h); broadcast dims are never materialised."""
    d = x.shape[-1]
    if t.shape[-1] != d or (t.stride(-1) != 1 and d > 1):
        t = t.broadcast_to((*t.shape[:-1], d)).contiguous()
    e = t.broadcast_to(x.shape)
    return t, row_offsets(e.shape, e.stride(), x.device)


def _cpu(x, cos, sin, out, interleaved, backward):
    d = x.shape[-1]
    (cos_t, cos_off), (sin_t, sin_off) = _table(cos, x), _table(sin, x)
    torch.ops.lmkernels_cpu.rotary(x.reshape(-1, d), out.view(-1, d), cos_t, sin_t, cos_off,
                                   sin_off, interleaved, backward)  # fmt: skip


# cuda: one thread per rotated pair (csrc/cuda/rotary.cu); the tables go to the kernel as they
# are when they have x's dtype (or fp32 for 16-bit x), else converted (exactly, except fp64
# tables for fp32 x) to that dtype first; broadcast dims are never materialised (_table).
def _cuda_rotary(x, cos, sin, out, interleaved, backward):
    from lmkernels import _cuda
    from lmkernels.ops._common import DTYPE_CODE

    d = x.shape[-1]
    if x.numel() == 0 or d == 0:
        return
    if x.dtype == cos.dtype == sin.dtype:
        cs = x.dtype
    elif x.dtype in (torch.float16, torch.bfloat16):
        cs = torch.float32
    else:
        cs = x.dtype
    x = x.contiguous()  # no copy when out is x (out is contiguous)
    (cos_t, cos_off), (sin_t, sin_off) = _table(cos.to(cs), x), _table(sin.to(cs), x)
    with torch.cuda.device(x.device):
        _cuda.rotary(
            x.data_ptr(), out.data_ptr(), cos_t.data_ptr(), sin_t.data_ptr(), cos_off.data_ptr(),
            sin_off.data_ptr(), DTYPE_CODE[x.dtype], DTYPE_CODE[cs], x.numel() // d, d,
            bool(interleaved), bool(backward), torch.cuda.current_stream(x.device).cuda_stream,
        )  # fmt: skip


def _reference(x, cos, sin, out, interleaved, backward):
    if backward:  # the transpose of v -> rot(v) * s is u -> -rot(u * s)
        rot = reference.rotate_every_two if interleaved else reference.rotate_half
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x32 = x.to(acc)
        out.copy_(x32 * cos.to(acc) - rot(x32 * sin.to(acc)))
    else:
        out.copy_(reference.rotary(x, cos, sin, interleaved))


def _triton(*args):
    from lmkernels.triton_kernels import rotary as k

    k.rotary(*args)


def _triton_supports(x: Tensor, *_) -> str | None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not supported (supported: float32, float16, bfloat16)"
    return None


_IMPLS = {
    "reference": Impl(_reference),
    "cpu": Impl(_cpu),
    "triton": Impl(_triton, _triton_supports),
    "cuda": Impl(_cuda_rotary),
}


def _run(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, backward: bool,
         out: Tensor | None = None) -> Tensor:  # fmt: skip
    """The rotary map (or its transpose) of x into out (new, contiguous, x's dtype if None)."""
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    if x.numel():
        fn = dispatch("rotary", _IMPLS, x.device, x, cos, sin)
        fn(x, cos, sin, out, interleaved, backward)
    return out


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("lmkernels::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    return _run(x, cos, sin, interleaved, False)


@rotary.register_fake
def _(x, cos, sin, interleaved):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lmkernels::rotary_bwd", mutates_args=())
def rotary_bwd(dy: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    return _run(dy, cos, sin, interleaved, True)


@rotary_bwd.register_fake
def _(dy, cos, sin, interleaved):
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


@torch.library.custom_op("lmkernels::rotary_", mutates_args=("x",))
def rotary_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> None:
    _run(x, cos, sin, interleaved, False, out=x)


@rotary_.register_fake
def _(x, cos, sin, interleaved):
    return None


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


@in_forward_backend
def _grads(ctx, dy, bwd):
    cos, sin = ctx.saved_tensors
    return bwd(dy, cos, sin, ctx.interleaved), None, None, None


rotary.register_autograd(lambda ctx, dy: _grads(ctx, dy, rotary_bwd), setup_context=_setup_context)


_RotaryEager = eager_function(
    "_RotaryEager",
    lambda x, cos, sin, interleaved: _run(x, cos, sin, interleaved, False),
    _setup_context,
    lambda ctx, dy: _grads(ctx, dy, lambda *a: _run(*a, True)),
)


# ------------------------------------------------------------------------------ entry point


def apply(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inplace: bool) -> Tensor:
    """The rotary map of x (see the module docstring), with autograd into x; in place into x
    when ``inplace`` (x contiguous, not requiring grad: checked by the public function)."""
    if inplace:
        if eager_call(x, cos, sin):
            _run(x, cos, sin, interleaved, False, out=x)
        else:
            rotary_(x, cos, sin, interleaved)
        return x
    if not eager_call(x, cos, sin):
        return rotary(x, cos, sin, interleaved)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryEager.apply(x, cos, sin, interleaved)
    return _run(x, cos, sin, interleaved, False)
