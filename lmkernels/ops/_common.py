"""Helpers shared by the op modules: output layouts, kernel dtype codes, row-wise launches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# lmk::DType in csrc/include/lmk/common.h
DTYPE_CODE = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.bool: 4,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def rowwise_empty(like: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor shaped like ``like`` whose ``dim`` is innermost in memory.

    Every backend (and every fake implementation) returns this layout, so fake and real
    results agree in strides, and a row-wise kernel writes it as a contiguous (rows, cols).
    """
    dtype = dtype or like.dtype
    if like.dim() == 0:
        return torch.empty((), dtype=dtype, device=like.device)
    dim %= like.dim()
    if dim == like.dim() - 1:  # the common case, without the stride arithmetic
        return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
    order = [d for d in range(like.dim()) if d != dim] + [dim]
    strides = [0] * like.dim()
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(like.shape[d], 1)
    return torch.empty_strided(like.shape, strides, dtype=dtype, device=like.device)


def as_rows(t: Tensor, dim: int) -> Tensor:
    """``t`` as a contiguous (rows, cols) matrix whose rows run along ``dim``.

    A view when ``t`` has the :func:`rowwise_empty` layout (so kernels can write through it),
    otherwise a contiguous copy. ``t`` must not be empty.
    """
    if t.dim() == 0:
        return t.reshape(1, 1)
    if dim % t.dim() != t.dim() - 1:
        t = t.movedim(dim, -1)
    return t.contiguous().view(-1, t.shape[-1])


def row_offsets(shape: torch.Size, strides: tuple[int, ...], device: torch.device) -> Tensor:
    """Element offsets of each row of a tensor with ``strides`` broadcast to ``shape``.

    Rows enumerate ``shape[:-1]`` in row-major order; offsets are int64 (no 2^31 limit).
    """
    off = torch.zeros((), dtype=torch.int64, device=device)
    for size, stride in zip(shape[:-1], strides[:-1], strict=True):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64, device=device) * stride
    return off.reshape(-1)


def eager_call(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` may run its backend directly, skipping the torch.library op.

    The registered op is what torch.compile, jit tracing, fake tensors, torch function and
    dispatch modes, functorch transforms (vmap, grad) and tensor subclasses must see. A plain
    eager call on plain tensors runs the same backend function without the op's ~70 µs of
    Python machinery (and an autograd.Function instead of the op's autograd wrapper).
    """
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter disables __torch_function__: a plain tensor


def eager_function(name: str, run: Callable, setup_context: Callable,
                   backward: Callable) -> type:  # fmt: skip
    """The autograd.Function of an op's plain eager calls: the same forward and backward as
    its registered op (see :func:`eager_call`), without the custom-op machinery. Its forward
    runs ``run(*args)`` then ``setup_context(ctx, args, out)``; its backward is
    ``backward(ctx, *grad_outputs)``, once differentiable. ``name`` names the class (and so
    the ``grad_fn``: ``<name>Backward``)."""

    def forward(ctx, *args):
        out = run(*args)
        setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Plain eager calls of {name.strip('_')}: the registered op's forward and "
                   "backward without the custom-op machinery.",
        "forward": staticmethod(forward),
        "backward": staticmethod(once_differentiable(bwd)),
    })  # fmt: skip
