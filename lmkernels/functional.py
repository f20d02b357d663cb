"""Drop-in functions with the exact signatures and semantics of ``torch.nn.functional``.

Arguments are validated here, once, with errors that name the argument; the work is done by
the registered ops in :mod:`lmkernels.ops` on the selected backend.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from lmkernels.ops import softmax as _softmax_ops

__all__ = ["softmax", "log_softmax", "scaled_masked_softmax"]


def _check_float_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_dim(fn: str, dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if not lo <= dim <= hi:
        raise IndexError(
            f"{fn}: dim {dim} is out of range for a tensor of rank {ndim} "
            f"(expected to be in range of [{lo}, {hi}])"
        )
    return int(dim) % max(ndim, 1)


def _legacy_dim(name: str, ndim: int, stacklevel: int) -> int:
    # torch's implicit-dim rule (deprecated, warns): dim 0 for rank 0, 1 and 3, else dim 1.
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_common(
    fn: str, input: Tensor, dim: int | None, stacklevel: int, dtype: torch.dtype | None, log: bool
) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(input).__name__}")
    if dim is None:
        dim = _legacy_dim(fn.rsplit(".", 1)[-1], input.dim(), stacklevel + 1)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype}")
        input = input.to(dtype)
    _check_float_tensor(fn, "input", input)
    dim = _check_dim(fn, dim, input.dim())
    return _softmax_ops.softmax(input, dim, 1.0, log, None, False)


def softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    r"""Softmax along ``dim``, ``exp(x_i) / sum_j exp(x_j)``: ``torch.nn.functional.softmax``.

    Args:
        input: floating-point tensor of any shape (any strides).
        dim: the dimension to normalise over (``None``: torch's deprecated implicit choice).
        dtype: if given, ``input`` is cast to it first (e.g. softmax of fp16 data in fp32).

    Returns a tensor of ``input``'s shape and (cast) dtype. Accumulation is fp32 (fp64 for
    fp64). A row of all ``-inf`` gives NaN, exactly as in torch.
    """
    return _softmax_common("lmkernels.functional.softmax", input, dim, _stacklevel, dtype, False)


def log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    r"""``log(softmax(input, dim))`` computed stably, same as ``torch.nn.functional.log_softmax``.

    Arguments and result as for :func:`softmax`.
    """
    return _softmax_common("lmkernels.functional.log_softmax", input, dim, _stacklevel, dtype, True)


def scaled_masked_softmax(
    x: Tensor, mask: Tensor | None = None, scale: float = 1.0, causal: bool = False
) -> Tensor:
    r"""The fused attention-score softmax over the last dim: ``softmax(scale * x + mask)``.

    Args:
        x: scores, floating point, shape ``(..., L, S)`` (any rank >= 1; ``causal`` needs >= 2).
        mask: optional, broadcastable to ``x.shape``, on ``x``'s device. Either boolean, where
            **True means masked out** (the score is dropped), or floating point, added to the
            scaled scores (an additive bias; ``-inf`` drops the score). A float mask that
            requires grad receives one.
        scale: multiplies ``x`` before the mask is applied.
        causal: additionally mask key ``j > i`` for query ``i`` over the last two dims,
            top-left aligned (query 0 sees key 0 only)::

                 keys ->    x . . .
                 queries    x x . .
                    |       x x x .

    Returns ``x``'s shape and dtype. A row whose every score is masked gives **zeros** (and
    zero gradient), never NaN; this differs from ``torch.softmax`` over ``-inf`` scores,
    which gives NaN.
    """
    fn = "lmkernels.functional.scaled_masked_softmax"
    _check_float_tensor(fn, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got a 0-d tensor")
    if isinstance(scale, Tensor) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a Python number, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    if causal and x.dim() < 2:
        raise ValueError(f"{fn}: causal=True needs x of rank >= 2 (..., L, S), got {x.dim()}-d")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{fn}: mask must be a torch.Tensor or None, got {type(mask)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"{fn}: mask must be bool or floating point, got dtype {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"{fn}: mask is on {mask.device} but x is on {x.device}")
        try:
            ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{fn}: mask of shape {tuple(mask.shape)} is not broadcastable to x's shape "
                f"{tuple(x.shape)}"
            )
    return _softmax_ops.softmax(x, x.dim() - 1, float(scale), False, mask, causal)
