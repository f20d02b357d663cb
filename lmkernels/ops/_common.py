"""Helpers shared by the op modules: output layouts, kernel dtype codes, row-wise launches."""

from __future__ import annotations

import torch
from torch import Tensor

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
    m = t.movedim(dim, -1) if t.dim() else t.reshape(1)
    return m.contiguous().view(-1, m.shape[-1])


def row_offsets(shape: torch.Size, strides: tuple[int, ...], device: torch.device) -> Tensor:
    """Element offsets of each row of a tensor with ``strides`` broadcast to ``shape``.

    Rows enumerate ``shape[:-1]`` in row-major order; offsets are int64 (no 2^31 limit).
    """
    off = torch.zeros((), dtype=torch.int64, device=device)
    for size, stride in zip(shape[:-1], strides[:-1], strict=True):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64, device=device) * stride
    return off.reshape(-1)
