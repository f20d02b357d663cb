"""Drop-in functions with the exact signatures and semantics of ``torch.nn.functional``.

Arguments are validated here, once, with errors that name the argument; the work is done by
the registered ops in :mod:`lmkernels.ops` on the selected backend.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from lmkernels import distributed as _distributed
from lmkernels import reference as _reference
from lmkernels.ops import attention as _attention_ops
from lmkernels.ops import cross_entropy as _ce_ops
from lmkernels.ops import embedding as _embedding_ops
from lmkernels.ops import norm as _norm_ops
from lmkernels.ops import rotary as _rotary_ops
from lmkernels.ops import softmax as _softmax_ops

__all__ = [
    "softmax",
    "log_softmax",
    "scaled_masked_softmax",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "embedding",
    "token_positional_embedding",
    "apply_rotary",
    "scaled_dot_product_attention",
    "varlen_attention",
    "cross_entropy",
    "linear_cross_entropy",
    "perplexity",
]


def _check_float_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target``."""
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


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
        if not _broadcasts_to(mask.shape, x.shape):
            raise ValueError(
                f"{fn}: mask of shape {tuple(mask.shape)} is not broadcastable to x's shape "
                f"{tuple(x.shape)}"
            )
    return _softmax_ops.softmax(x, x.dim() - 1, float(scale), False, mask, causal)


# ------------------------------------------------------------------------------ normalisation

_HALF = (torch.float16, torch.bfloat16)


def _normalized(fn: str, input: Tensor, normalized_shape: object) -> tuple[tuple[int, ...], int]:
    """normalized_shape as a tuple, checked against input's trailing dims, and its row count."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(
            f"{fn}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    if not shape:
        raise ValueError(f"{fn}: normalized_shape must have at least one element, got []")
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise ValueError(
            f"{fn}: normalized_shape {list(shape)} does not match the trailing dims of input of "
            f"shape {list(input.shape)} (expected input of shape [*, {', '.join(map(str, shape))}])"
        )
    return shape, math.prod(input.shape[: input.dim() - k])


def _check_param(fn: str, name: str, p: object, shape: tuple, input: Tensor) -> Tensor | None:
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(
            f"{fn}: {name} must have shape normalized_shape {list(shape)}, got {list(p.shape)}"
        )
    if p.device != input.device:
        raise ValueError(f"{fn}: {name} is on {p.device} but input is on {input.device}")
    return p


def _check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}: eps must be a Python number, got {type(eps).__name__}")
    return float(eps)


def _layer_norm_params(fn, input, shape, weight, bias):
    """torch's dtype rule: weight and bias have input's dtype, or (16-bit input) are both fp32."""
    weight = _check_param(fn, "weight", weight, shape, input)
    bias = _check_param(fn, "bias", bias, shape, input)
    given = [(n, p) for n, p in (("weight", weight), ("bias", bias)) if p is not None]
    dtypes = {p.dtype for _, p in given}
    ok = dtypes <= {input.dtype} or (input.dtype in _HALF and dtypes == {torch.float32})
    if not ok:
        got = ", ".join(f"{n} {p.dtype}" for n, p in given)
        raise TypeError(
            f"{fn}: weight and bias must have input's dtype {input.dtype}"
            + (" or both be torch.float32" if input.dtype in _HALF else "")
            + f", got {got}"
        )
    return weight, bias


def _as_param(p: Tensor | None, data: torch.dtype) -> Tensor | None:
    """weight / bias as the op takes them: 1-D, of the data's or the accumulation dtype (each
    skipped torch call saves microseconds of dispatch on the eager path)."""
    if p is None:
        return None
    if p.dim() != 1:
        p = p.reshape(-1)
    acc = _norm_ops.acc_dtype(data)
    return p if p.dtype == data or p.dtype == acc else p.to(acc)


def _as_rows(input: Tensor, rows: int, cols: int) -> Tensor:
    """input as (rows, cols): itself when it already is, else a view (or copy) reshaped."""
    return input if input.dim() == 2 and input.shape[1] == cols else input.reshape(rows, cols)


def _like_input(y: Tensor, input: Tensor) -> Tensor:
    return y if y.shape == input.shape else y.view(input.shape)


def _rms_eps(eps: object, fn: str, dtype: torch.dtype) -> float:
    # torch's default: the machine epsilon of the accumulation type (fp32 for 16-bit data)
    return torch.finfo(_norm_ops.acc_dtype(dtype)).eps if eps is None else _check_eps(fn, eps)


def layer_norm(
    input: Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer normalisation over the trailing ``normalized_shape`` dims:
    ``torch.nn.functional.layer_norm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, per group of
    the last ``len(normalized_shape)`` dims. ``weight`` / ``bias`` (shape ``normalized_shape``)
    have ``input``'s dtype or, for fp16/bf16 input, are both fp32. Statistics and the affine
    transform are computed in fp32 (fp64 for fp64) and rounded once to ``input``'s dtype.
    """
    fn = "lmkernels.functional.layer_norm"
    _check_float_tensor(fn, "input", input)
    shape, rows = _normalized(fn, input, normalized_shape)
    weight, bias = _layer_norm_params(fn, input, shape, weight, bias)
    eps = _check_eps(fn, eps)
    x = _as_rows(input, rows, math.prod(shape))
    y, _ = _norm_ops.norm(x, None, _as_param(weight, x.dtype), _as_param(bias, x.dtype), eps, False)
    return _like_input(y, input)


def rms_norm(
    input: Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    r"""RMS normalisation over the trailing ``normalized_shape`` dims:
    ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 (fp64 for fp64) and rounded
    once to ``input``'s dtype (the output dtype, whatever ``weight``'s dtype). ``eps=None``
    means torch's default, the machine epsilon of fp32 (of fp64 for fp64 input).
    """
    fn = "lmkernels.functional.rms_norm"
    _check_float_tensor(fn, "input", input)
    shape, rows = _normalized(fn, input, normalized_shape)
    weight = _check_param(fn, "weight", weight, shape, input)
    eps = _rms_eps(eps, fn, input.dtype)
    x = _as_rows(input, rows, math.prod(shape))
    y, _ = _norm_ops.norm(x, None, _as_param(weight, x.dtype), None, eps, True)
    return _like_input(y, input)


def _add_norm(fn, x, residual, normalized_shape, weight, bias, eps, residual_in_fp32, rms):
    _check_float_tensor(fn, "x", x)
    _check_float_tensor(fn, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"{fn}: residual must have x's shape {list(x.shape)}, got {list(residual.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(f"{fn}: residual is on {residual.device} but x is on {x.device}")
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"{fn}: residual_in_fp32 must be a bool, got {type(residual_in_fp32)}")
    shape, rows = _normalized(fn, x, normalized_shape)
    weight = _check_param(fn, "weight", weight, shape, x)
    bias = _check_param(fn, "bias", bias, shape, x)
    # The sum's dtype S: torch's promotion of x + residual, at least fp32 if asked.
    stream = torch.promote_types(x.dtype, residual.dtype)
    if residual_in_fp32:
        stream = torch.promote_types(stream, torch.float32)
    # Kernels take S = T or (T 16-bit, S = fp32); otherwise x is upcast to S (exactly).
    native = stream == x.dtype or (x.dtype in _HALF and stream == torch.float32)
    data = x.dtype if native else stream
    cols = math.prod(shape)
    y, h = _norm_ops.norm(
        x.reshape(rows, cols).to(data), residual.reshape(rows, cols).to(stream),
        _as_param(weight, data), _as_param(bias, data), eps, rms,
    )  # fmt: skip
    return y.to(x.dtype).view(x.shape), h.view(x.shape)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Fused pre-norm residual step: ``h = x + residual; return layer_norm(h), h`` in one pass.

    Args:
        x, residual: same shape (``[*, *normalized_shape]``) and device, floating point.
        weight, bias: optional, shape ``normalized_shape``, any floating dtype.
        residual_in_fp32: keep the residual stream ``h`` in fp32 even for fp16/bf16 ``x``.

    Returns ``(normed, h)``. ``h`` is exactly torch's ``x + residual`` (its promoted dtype, or
    at least fp32 with ``residual_in_fp32``); ``normed`` is ``layer_norm`` of ``h`` as stored,
    computed in fp32 (fp64 for fp64) and rounded once to ``x``'s dtype. Gradients flow back
    through both outputs to ``x``, ``residual``, ``weight`` and ``bias``.
    """
    fn = "lmkernels.functional.add_layer_norm"
    eps = _check_eps(fn, eps)
    return _add_norm(fn, x, residual, normalized_shape, weight, bias, eps, residual_in_fp32, False)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: Tensor | None = None,
    eps: float | None = None,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Fused pre-norm residual step: ``h = x + residual; return rms_norm(h), h`` in one pass.

    As :func:`add_layer_norm`, with ``rms_norm`` (``eps=None``: fp32's machine epsilon, fp64's
    for fp64 data, as ``torch.nn.functional.rms_norm``).
    """
    fn = "lmkernels.functional.add_rms_norm"
    if isinstance(x, Tensor):
        eps = _rms_eps(eps, fn, x.dtype)
    return _add_norm(fn, x, residual, normalized_shape, weight, None, eps, residual_in_fp32, True)


# ------------------------------------------------------------------------------ embedding


def _padding_row(fn: str, padding_idx: object, rows: int) -> int:
    """``padding_idx`` (None, or an int in [-rows, rows)) as a row in [0, rows), or -1."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise TypeError(f"{fn}: padding_idx must be an int or None, got {padding_idx!r}")
    if not -rows <= padding_idx < rows:
        raise ValueError(
            f"{fn}: padding_idx must be within num_embeddings {rows} (in [{-rows}, {rows})), "
            f"got {padding_idx}"
        )
    return int(padding_idx) % rows


def _check_indices(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: {name} must hold int32 or int64 indices, got dtype {t.dtype}")
    return t


def _check_table(fn: str, name: str, t: object) -> Tensor:
    _check_float_tensor(fn, name, t)
    if t.dim() != 2:
        raise ValueError(
            f"{fn}: {name} must be 2-D (num_embeddings, embedding_dim), got shape {list(t.shape)}"
        )
    return t


def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    r"""Row lookup ``weight[input]``: ``torch.nn.functional.embedding``.

    ``input``: int32 or int64 indices of any shape; the result has shape
    ``(*input.shape, embedding_dim)`` and ``weight``'s dtype. An index outside
    ``[0, num_embeddings)`` raises ``IndexError`` naming it (nothing is written). The gradient of
    ``weight`` is deterministic: each row's contributions are added in fp32 (fp64 for fp64) in
    index order; ``padding_idx`` (negative counts from the end) gets none, and
    ``scale_grad_by_freq`` divides a row's gradient by its count in ``input``. ``max_norm``
    renormalises the looked-up rows of ``weight`` in place first, with torch's own
    ``torch.embedding_renorm_`` (so exactly as torch does). ``sparse=True`` (a sparse gradient)
    is served by ``torch.nn.functional.embedding`` itself: no kernel here produces sparse
    gradients.
    """
    fn = "lmkernels.functional.embedding"
    _check_indices(fn, "input", input)
    _check_table(fn, "weight", weight)
    if type(weight) is not torch.nn.Parameter and _distributed.is_dtensor(weight):
        if any(p.is_shard() and p.dim == 0 for p in weight.placements):  # the vocabulary
            return _distributed.dtensor_embedding(input, weight, padding_idx, max_norm,
                                                  norm_type, scale_grad_by_freq)  # fmt: skip
        if not _distributed.is_dtensor(input):  # indices given as a plain tensor: replicated
            input = _distributed.replicate_like(input, weight)
    if input.device != weight.device:
        raise ValueError(f"{fn}: input is on {input.device} but weight is on {weight.device}")
    pad = _padding_row(fn, padding_idx, weight.shape[0])
    if not isinstance(scale_grad_by_freq, bool):
        raise TypeError(f"{fn}: scale_grad_by_freq must be a bool, got {scale_grad_by_freq!r}")
    if sparse:
        return torch.nn.functional.embedding(
            input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, input.contiguous(), max_norm, norm_type)
    out = _embedding_ops.embedding(weight, input.reshape(-1), pad, scale_grad_by_freq)
    return out.view(*input.shape, weight.shape[1])


def token_positional_embedding(
    ids: Tensor,
    token_weight: Tensor,
    positions: Tensor | None = None,
    pos_weight: Tensor | None = None,
    *,
    sinusoidal: bool = False,
    scale: float = 1.0,
    padding_idx: int | None = None,
) -> Tensor:
    r"""The input layer of a transformer in one pass: ``scale * token_weight[ids] + P[positions]``.

    ``ids``: int32/int64 token ids of any shape; the result has shape
    ``(*ids.shape, embedding_dim)`` and ``token_weight``'s dtype, computed in fp32 (fp64 for
    fp64) and rounded once. ``positions``: int32/int64, broadcastable to ``ids`` (e.g. (seq,)
    or (batch, seq)); by default ``0 .. seq-1`` along the last dim of ``ids`` (0 for a scalar).
    ``P`` is either the learned table ``pos_weight`` (same dtype, device and embedding_dim as
    ``token_weight``; gradients flow into it) or, with ``sinusoidal=True`` and no
    ``pos_weight``, the sinusoidal encoding PE(p, 2i) = sin(p / 10000^(2i/d)),
    PE(p, 2i+1) = cos(p / 10000^(2i/d)) computed on the fly, never stored (angles formed and
    reduced in fp64, so large positions stay accurate; positions must lie in [0, 2^31)).
    Exactly one of the two must be given. ``scale`` multiplies the token rows only (e.g.
    ``sqrt(d_model)``) and their gradient. ``padding_idx`` (negative counts from the end) is a
    token row that receives no gradient, as in :func:`embedding`; its output is its row as
    stored, and its position still receives gradient. Token ids or positions out of range raise
    ``IndexError`` naming the value (nothing is written). The backward is two deterministic
    embedding backwards (see :func:`embedding`).
    """
    fn = "lmkernels.functional.token_positional_embedding"
    _check_indices(fn, "ids", ids)
    _check_table(fn, "token_weight", token_weight)
    if ids.device != token_weight.device:
        raise ValueError(
            f"{fn}: ids is on {ids.device} but token_weight is on {token_weight.device}"
        )
    if not isinstance(sinusoidal, bool):
        raise TypeError(f"{fn}: sinusoidal must be a bool, got {sinusoidal!r}")
    if sinusoidal == (pos_weight is not None):
        raise ValueError(
            f"{fn}: give exactly one positional encoding: pos_weight (a learned table) or "
            f"sinusoidal=True (got pos_weight={'a tensor' if pos_weight is not None else None}, "
            f"sinusoidal={sinusoidal})"
        )
    dim = token_weight.shape[1]
    if pos_weight is not None:
        _check_table(fn, "pos_weight", pos_weight)
        if pos_weight.dtype != token_weight.dtype:
            raise TypeError(f"{fn}: pos_weight has dtype {pos_weight.dtype} but token_weight "
                            f"has {token_weight.dtype}; they must match")  # fmt: skip
        if pos_weight.device != token_weight.device:
            raise ValueError(f"{fn}: pos_weight is on {pos_weight.device} but token_weight is "
                             f"on {token_weight.device}")  # fmt: skip
        if pos_weight.shape[1] != dim:
            raise ValueError(f"{fn}: pos_weight has embedding_dim {pos_weight.shape[1]} but "
                             f"token_weight has {dim}")  # fmt: skip
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number, got {scale!r}")
    pad = _padding_row(fn, padding_idx, token_weight.shape[0])
    if positions is None:
        seq = ids.shape[-1] if ids.dim() else 1
        positions = torch.arange(seq, device=ids.device).view(ids.shape[-1:])
    else:
        _check_indices(fn, "positions", positions)
        if positions.device != ids.device:
            raise ValueError(f"{fn}: positions is on {positions.device} but ids is on {ids.device}")
        if not _broadcasts_to(positions.shape, ids.shape):
            raise ValueError(f"{fn}: positions of shape {list(positions.shape)} do not broadcast "
                             f"to ids' shape {list(ids.shape)}")  # fmt: skip
    pos = positions.expand(ids.shape).reshape(-1)
    out = _embedding_ops.token_positional(
        token_weight, ids.reshape(-1), pos_weight, pos, float(scale), pad
    )
    return out.view(*ids.shape, dim)


# ------------------------------------------------------------------------------ rotary


def apply_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False
) -> Tensor:
    r"""Rotary position embedding: ``x * cos + rot(x) * sin``.

    ``rot`` is the NeoX / Hugging Face ``rotate_half`` (``cat(-x2, x1)`` of the two halves of
    the last dim), or GPT-J's ``rotate_every_two`` when ``interleaved``. ``x``: (..., head_dim)
    with an even head_dim, in any layout (e.g. (batch, seq, heads, head_dim) with ``cos`` of
    shape (seq, 1, head_dim), or (batch, heads, seq, head_dim) with (seq, head_dim)); ``cos`` /
    ``sin`` broadcast to ``x`` and are never expanded in memory. The result has torch's
    promoted dtype of the three (computed in fp32, fp64 for fp64, rounded once). ``inplace``
    writes into ``x`` (contiguous, already of the result dtype, not requiring grad) and returns
    it. Gradients flow to ``x``; when ``cos`` or ``sin`` require grad the call runs the
    differentiable reference formula instead (tables usually do not).
    """
    fn = "lmkernels.functional.apply_rotary"
    _check_float_tensor(fn, "x", x)
    _check_float_tensor(fn, "cos", cos)
    _check_float_tensor(fn, "sin", sin)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{fn}: x's last dim (head_dim) must be even, got shape {list(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
        if not _broadcasts_to(t.shape, x.shape):
            raise ValueError(
                f"{fn}: {name} of shape {list(t.shape)} does not broadcast to x's shape "
                f"{list(x.shape)}"
            )
    for name, v in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    grad = torch.is_grad_enabled()
    if grad and (cos.requires_grad or sin.requires_grad):
        if inplace:
            raise ValueError(f"{fn}: inplace=True cannot give cos / sin gradients")
        from lmkernels import reference

        return reference.rotary(x, cos, sin, interleaved)
    if inplace:
        if x.dtype != dtype or not x.is_contiguous() or (grad and x.requires_grad):
            raise ValueError(
                f"{fn}: inplace=True needs x contiguous, of the result dtype {dtype} and not "
                f"requiring grad (x: {x.dtype}, contiguous={x.is_contiguous()}, "
                f"requires_grad={x.requires_grad})"
            )
    cos, sin = cos.to(dtype), sin.to(dtype)  # no-ops unless a table has a narrower dtype
    return _rotary_ops.apply(x.to(dtype), cos, sin, interleaved, inplace)


# ------------------------------------------------------------------------------ attention


def _check_window(fn: str, window: object) -> tuple[int, int]:
    """``window`` (None, or (left, right) with -1 for an unbounded side) as two ints."""
    if window is None:
        return -1, -1
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    ok = ok and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)
    if not ok or any(w < -1 for w in window):
        raise ValueError(f"{fn}: window must be None or (left, right) with ints >= -1 (-1: "
                         f"unbounded), got {window!r}")  # fmt: skip
    return int(window[0]), int(window[1])


def _check_scale(fn: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {scale!r}")
    return float(scale)


def _check_qkv(fn: str, query, key, value, min_dim: int) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_float_tensor(fn, name, t)
        if t.dim() < min_dim:
            raise ValueError(f"{fn}: {name} must have at least {min_dim} dims, got shape "
                             f"{list(t.shape)}")  # fmt: skip
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but query has {query.dtype}; "
                            "they must match")  # fmt: skip
        if t.device != query.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but query is on {query.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{fn}: key's last dim (E = {key.shape[-1]}) must equal query's "
                         f"({query.shape[-1]})")  # fmt: skip


def _autocast_lower(*ts):
    """torch.autocast's lower-precision policy (that of torch's scaled_dot_product_attention on
    every device): inside an autocast region of the first tensor's device, its fp32 / fp16 /
    bf16 tensors in the autocast dtype (fp64 ones and everything else as they are)."""
    first = ts[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return ts
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in ts)  # fmt: skip


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _check_dropout(fn: str, dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a real number, got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1], got {dropout_p}")


def _all_dropped(q: Tensor, k: Tensor, v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """dropout_p = 1 drops every probability (the kernels' threshold stops short of 2^32): zeros
    of ``shape``, with zero gradients for q, k and v (empty sums keep them in the graph)."""
    return v.new_zeros(shape) + (q[:0].sum() + k[:0].sum() + v[:0].sum()).to(v.dtype)


def _composite_attention(q, k, v, mask, scale, window_left, window_right, dropout_p, seed):
    """Attention in differentiable torch ops (the L x S scores in memory), for additive masks
    that require grad (no kernel returns the mask's gradient). Dropout draws the kernels' keep
    bits (lmk/philox.h). Rows without keys give zeros."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    keep = _reference.attention_keep(q.shape[2], k.shape[2], window_left,
                                                   window_right, False, q.device)  # fmt: skip
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    empty = torch.isneginf(lse)
    p = torch.exp(torch.where(empty, torch.zeros_like(s), s - lse))
    p = torch.where(empty, torch.zeros_like(p), p)
    if dropout_p > 0:
        b, h, length, sk = p.shape
        threshold = _reference.dropout_threshold(dropout_p)
        bh = torch.arange(b * h, device=q.device).view(b, h, 1, 1)
        rows = torch.arange(length, device=q.device).view(1, 1, length, 1)
        cols = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        keep = _reference.attention_dropout_keep(int(seed) & (2**64 - 1), threshold, bh, rows,
                                                 cols)  # fmt: skip
        p = p * (keep.to(acc) * _reference.dropout_scale(threshold))
    return torch.matmul(p, v.to(acc)).to(q.dtype)


def _dropout_seed(fn: str, generator: object) -> Tensor:
    """A fresh 64-bit dropout key as a 0-dim int64 CPU tensor, drawn from ``generator`` (torch's
    default CPU generator when None, so torch.manual_seed makes dropout repeatable)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")  # fmt: skip
    device = "cpu" if generator is None else generator.device
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device,
                         generator=generator)  # fmt: skip
    return seed.cpu()


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``torch.nn.functional.scaled_dot_product_attention`` (same signature and semantics),
    computed flash-style: memory O(L), never the L x S score matrix.

    ``query`` (..., Hq, L, E), ``key`` (..., Hk, S, E), ``value`` (..., Hk, S, Ev); leading dims
    broadcast; heads broadcast too, or with ``enable_gqa`` each group of Hq / Hk query heads
    shares one key/value head. ``attn_mask``: boolean (True = take part) or an additive mask of
    query's dtype or float32 (added in fp32, unrounded), broadcastable to (..., Hq, L, S), never
    expanded in memory. ``is_causal``:
    key j takes part for query i iff j <= i (top-left aligned, as torch; not together with
    ``attn_mask``). ``scale`` defaults to 1/sqrt(E). ``window=(left, right)`` (an lmkernels
    extension, -1 = unbounded) keeps the keys i - left <= j <= i + right (sliding-window
    attention; with ``is_causal`` the right side is 0).

    A query row whose keys are all masked gives zeros and zero gradients, never NaN (as torch
    2.13 does; older torch versions gave NaN). The output has the (..., L, Hq, Ev) memory
    layout of torch's flash kernels.

    ``dropout_p`` drops each attention probability independently inside the kernels (memory
    stays O(L)) and scales the kept ones by the inverse keep probability. Its random bits come
    from a counter-based generator (Philox4x32-10, lmk/philox.h) keyed by a 64-bit seed drawn
    from ``generator`` (an lmkernels extension; default: torch's default CPU generator, so
    ``torch.manual_seed`` makes a call repeatable); every backend draws the same bits for the
    same seed, and the backward redraws them instead of storing a mask. The probability is
    quantised to multiples of 2^-32. Additive masks that require grad and ``dropout_p = 1`` run a
    composite of torch ops that materialises the scores.
    """
    fn = "lmkernels.functional.scaled_dot_product_attention"
    query, key, value, attn_mask = _autocast_lower(query, key, value, attn_mask)
    _check_qkv(fn, query, key, value, 2)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{fn}: key has {key.shape[-2]} keys (S) but value has "
                         f"{value.shape[-2]}")  # fmt: skip
    _check_dropout(fn, dropout_p)
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: attn_mask must be None when is_causal=True (as in torch)")
    wl, wr = _check_window(fn, window)
    if is_causal:
        wr = 0 if wr < 0 else min(wr, 0)
    length, e = query.shape[-2], query.shape[-1]
    sk, ev = key.shape[-2], value.shape[-1]
    sc = _check_scale(fn, scale, e)
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    if value.dim() >= 3 and value.shape[-3] != hk and enable_gqa:
        raise ValueError(f"{fn}: key has {hk} heads but value has {value.shape[-3]}")
    q4, k4, v4 = (
        t.reshape((1,) * max(0, 3 - t.dim()) + tuple(t.shape)) for t in (query, key, value)
    )
    batch_q, batch_k, batch_v = q4.shape[:-3], k4.shape[:-3], v4.shape[:-3]
    try:
        batch = torch.broadcast_shapes(batch_q, batch_k, batch_v)
        if not enable_gqa:
            hq = torch.broadcast_shapes((hq,), (hk,), (v4.shape[-3],))[0]
            hk = hq
    except RuntimeError as err:
        raise ValueError(
            f"{fn}: the batch and head dims of query {list(query.shape)}, key "
            f"{list(key.shape)} and value {list(value.shape)} do not broadcast"
        ) from err
    if enable_gqa and (hk == 0 or hq % hk):
        raise ValueError(f"{fn}: with enable_gqa, query's heads ({hq}) must be a multiple of "
                         f"key's ({hk})")  # fmt: skip
    nb = math.prod(batch)
    q4 = q4.expand(*batch, hq, length, e).reshape(nb, hq, length, e)
    k4 = k4.expand(*batch, hk, sk, e).reshape(nb, hk, sk, e)
    v4 = v4.expand(*batch, hk, sk, ev).reshape(nb, hk, sk, ev)
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{fn}: attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")  # fmt: skip
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"{fn}: attn_mask must be bool, float32 or query's dtype "
                            f"{query.dtype}, got {attn_mask.dtype}")  # fmt: skip
        if attn_mask.device != query.device:
            raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on "
                             f"{query.device}")  # fmt: skip
        full = (*batch, hq, length, sk)
        if not _broadcasts_to(attn_mask.shape, full):
            raise ValueError(f"{fn}: attn_mask of shape {list(attn_mask.shape)} does not "
                             f"broadcast to {list(full)}")  # fmt: skip
        mask = attn_mask.expand(full).reshape(nb, hq, length, sk)
    out_shape = (*batch, hq, length, ev)
    # an fp32 mask on fp64 data widens exactly (the kernels take masks of bool, the data's
    # dtype, or fp32 on 16-bit data)
    if mask is not None and mask.dtype == torch.float32 and query.dtype == torch.float64:
        mask = mask.to(torch.float64)
    seed = _dropout_seed(fn, generator) if dropout_p > 0 else None
    if dropout_p >= 1:
        return _all_dropped(query, key, value, out_shape)
    if mask is not None and mask.requires_grad:
        out = _composite_attention(q4, k4, v4, mask, sc, wl, wr, float(dropout_p), seed)
        return out.reshape(out_shape)
    opts = _attention_ops.AttnOptions(sc, wl, wr, dropout_p=float(dropout_p))
    return _attention_ops.attention(q4, k4, v4, mask, opts, seed).reshape(out_shape)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Attention over a packed batch of variable-length sequences, no padding stored.

    ``q`` (total_q, Hq, E), ``k`` (total_k, Hk, E), ``v`` (total_k, Hk, Ev) with Hq a multiple of
    Hk (GQA / MQA); sequence b holds query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` and key
    rows ``cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`` (int32, non-decreasing, starting at 0 and
    ending at the totals; sequences of length 0 are allowed). ``max_seqlen_q`` / ``_k`` must be
    at least the longest sequence. ``causal`` and ``window=(left, right)`` (-1 = unbounded) are
    aligned bottom-right, as in FlashAttention: query i of a sequence with Lb queries and Sb keys
    sits on key i + Sb - Lb. ``scale`` defaults to 1/sqrt(E). ``dropout_p`` and ``generator``
    as in :func:`scaled_dot_product_attention` (the random bits are those of the packed
    positions). Returns (total_q, Hq, Ev); a query with no key gives zeros.
    """
    fn = "lmkernels.functional.varlen_attention"
    _check_qkv(fn, q, k, v, 3)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total, heads, head_dim), got shape "
                             f"{list(t.shape)}")  # fmt: skip
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{fn}: k {list(k.shape)} and v {list(v.shape)} must agree in "
                         "(total_k, heads)")  # fmt: skip
    hq, hk = q.shape[1], k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"{fn}: q's heads ({hq}) must be a multiple of k's ({hk})")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {causal!r}")
    wl, wr = _check_window(fn, window)
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    sc = _check_scale(fn, scale, q.shape[-1])
    _check_dropout(fn, dropout_p)
    lens = []
    sides = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
             ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k))  # fmt: skip
    for name, cu, total, mx in sides:
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise TypeError(f"{fn}: {name} must be a 1-D int32 tensor")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} is on {cu.device} but q is on {q.device}")
        if cu.numel() < 1:
            raise ValueError(f"{fn}: {name} must hold at least one offset")
        host = cu.tolist()
        steps = [b - a for a, b in zip(host[:-1], host[1:], strict=True)]
        if host[0] != 0 or host[-1] != total or any(d < 0 for d in steps):
            raise ValueError(f"{fn}: {name} must be non-decreasing from 0 to {total}, got "
                             f"{host[:8]}{'...' if len(host) > 8 else ''}")  # fmt: skip
        longest = max(steps, default=0)
        if isinstance(mx, bool) or not isinstance(mx, numbers.Integral) or mx < longest:
            raise ValueError(f"{fn}: max_seqlen for {name} must be an int >= the longest "
                             f"sequence ({longest}), got {mx!r}")  # fmt: skip
        lens.append(len(host))
    if lens[0] != lens[1]:
        raise ValueError(f"{fn}: cu_seqlens_q has {lens[0]} offsets but cu_seqlens_k has "
                         f"{lens[1]}")  # fmt: skip
    if dropout_p >= 1:
        return _all_dropped(q, k, v, (q.shape[0], hq, v.shape[-1]))
    seed = _dropout_seed(fn, generator) if dropout_p > 0 else None
    opts = _attention_ops.AttnOptions(sc, wl, wr, True, cu_seqlens_q.contiguous(),
                                      cu_seqlens_k.contiguous(), int(max_seqlen_q),
                                      int(max_seqlen_k), float(dropout_p))  # fmt: skip
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = _attention_ops.attention(q4, k4, v4, None, opts, seed)  # (1, Hq, total, Ev)
    return out.squeeze(0).transpose(0, 1)


# ---------------------------------------------------------------------------- cross-entropy


def _check_reduction(fn: str, reduction: object, size_average=None, reduce=None) -> str:
    if size_average is not None or reduce is not None:  # torch's legacy arguments (it warns)
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _ce_ops.REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_ce_ops.REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_number(fn: str, name: str, v: object, lo: float, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= float(v) <= hi:
        raise ValueError(f"{fn}: {name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _check_int(fn: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    return int(v)


def _class_targets(fn: str, target: object, shape: tuple[int, ...], device) -> Tensor:
    """``target`` as a flat int64 tensor, checked against the expected ``shape``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype == torch.bool or target.dtype.is_floating_point or target.is_complex():
        raise TypeError(f"{fn}: target must hold class indices (an integer dtype) or, for "
                        f"cross_entropy, class probabilities of input's shape; got dtype "
                        f"{target.dtype} and shape {tuple(target.shape)}")  # fmt: skip
    if tuple(target.shape) != shape:
        raise ValueError(f"{fn}: target must have shape {shape} for these inputs, got "
                         f"{tuple(target.shape)}")  # fmt: skip
    if target.device != device:
        raise ValueError(f"{fn}: target is on {target.device}, input on {device}")
    return target.reshape(-1).long().contiguous()


def _class_weight(fn: str, name: str, w: object, classes: int, input: Tensor) -> Tensor | None:
    if w is None:
        return None
    w = _check_float_tensor(fn, name, w)
    if w.dim() != 1 or w.shape[0] != classes:
        raise ValueError(f"{fn}: {name} must be a 1-D tensor of {classes} class weights, got "
                         f"shape {tuple(w.shape)}")  # fmt: skip
    if w.device != input.device:
        raise ValueError(f"{fn}: {name} is on {w.device}, input on {input.device}")
    return w.to(_ce_ops.acc_dtype(input.dtype))


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """``torch.nn.functional.cross_entropy``: class-index targets on (C,), (N, C) or (N, C, d1,
    ...) inputs with class weights, ignore_index, label smoothing and every reduction, the loss
    and (for 'mean' / 'sum') the gradient computed in one pass over the logits. A target that
    is neither ignore_index nor a class raises IndexError (on a GPU too: one flag read back,
    no device assert). Class-probability targets (floating, input's shape) are served by
    torch's own implementation (the reference path).

    ``inplace_backward=True`` writes the gradient over ``input`` (saving its memory; ``input``
    is marked modified, so autograd rejects a later use of its old value); only plain eager
    calls on inputs whose classes are contiguous take it, others compute out of place."""
    fn = "cross_entropy"
    input = _check_float_tensor(fn, "input", input)
    reduction = _check_reduction(fn, reduction, size_average, reduce)
    eps = _check_number(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
    ignore_index = _check_int(fn, "ignore_index", ignore_index)
    if input.dim() == 0:
        raise ValueError(f"{fn}: input must have at least 1 dimension (the classes), got 0-D")
    if isinstance(target, Tensor) and target.dtype.is_floating_point:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(f"{fn}: class-probability targets must have input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")  # fmt: skip
        return torch.nn.functional.cross_entropy(input, target, weight, None, ignore_index,
                                                 None, reduction, eps)  # fmt: skip
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if type(input) is not Tensor and _distributed.is_dtensor(input):
        _class_targets(fn, target, shape, input.device)  # (checks only)
        _class_weight(fn, "weight", weight, classes, input)
        return _distributed.dtensor_cross_entropy(input, target, weight, ignore_index, reduction,
                                                  eps)  # fmt: skip
    t = _class_targets(fn, target, shape, input.device)
    w = _class_weight(fn, "weight", weight, classes, input)
    if input.dim() == 1:
        rows = input.unsqueeze(0)
    elif input.dim() == 2:
        rows = input
    else:
        rows = input.movedim(1, -1).reshape(-1, classes)
    inplace = inplace_backward and input.dim() <= 2  # rows is input or a view of it
    if classes > 1 and rows.stride(1) != 1 or rows.shape[0] > 1 and rows.stride(0) < classes:
        rows, inplace = rows.contiguous(), False
    if inplace:  # (the one-row view of a 1-D input is made inside, see _CrossEntropyInplace)
        rows = input
    loss = _ce_ops.cross_entropy_rows(rows, t, w, ignore_index, eps, 0.0, 0.0, reduction,
                                      inplace)  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(shape)
    # torch.autocast runs cross_entropy in fp32 (a 16-bit input is upcast, the loss is fp32):
    # the loss here is already the fp32 accumulation, so only its dtype follows
    low = input.dtype in (torch.float16, torch.bfloat16)
    if low and torch.is_autocast_enabled(input.device.type):
        return loss
    return loss.to(input.dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``cross_entropy(linear(hidden, weight, bias), target, ...)`` without the (tokens, vocab)
    logits: the tokens run in chunks of ``chunk_size`` (default: about 2^24 logits per chunk),
    whose logits exist only while the chunk is processed; gradients for hidden, weight and
    bias. ``hidden``: (..., H); ``weight``: (V, H); ``bias``: (V,); ``target``: hidden's leading
    shape, class indices. Options as :func:`cross_entropy` (``class_weight`` is its
    ``weight``), plus ``z_loss`` (adds z_loss * logsumexp(logits)^2 per token not ignored) and
    ``softcap`` (the logits become softcap * tanh(logits / softcap) first)."""
    fn = "linear_cross_entropy"
    hidden = _check_float_tensor(fn, "hidden", hidden)
    weight = _check_float_tensor(fn, "weight", weight)
    reduction = _check_reduction(fn, reduction)
    eps = _check_number(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
    zl = _check_number(fn, "z_loss", z_loss, 0.0)
    cap = 0.0 if softcap is None else _check_number(fn, "softcap", softcap, 0.0)
    if softcap is not None and cap == 0.0:
        raise ValueError(f"{fn}: softcap must be positive (or None), got {softcap!r}")
    ignore_index = _check_int(fn, "ignore_index", ignore_index)
    if chunk_size is not None and (_check_int(fn, "chunk_size", chunk_size) < 1):
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must be (..., H), got a 0-D tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: weight must be (V, H) with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")  # fmt: skip
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise ValueError(f"{fn}: {name} must have hidden's dtype {hidden.dtype} and device "
                             f"{hidden.device}, got {t.dtype} on {t.device}")  # fmt: skip
    if bias is not None:
        bias = _check_float_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")  # fmt: skip
    shape = tuple(hidden.shape[:-1])
    t = _class_targets(fn, target, shape, hidden.device)
    cw = _class_weight(fn, "class_weight", class_weight, weight.shape[0], hidden)
    h = hidden.reshape(-1, hidden.shape[-1])
    loss = _ce_ops.linear_cross_entropy_rows(h, weight, bias, t, cw, ignore_index, eps, cap, zl,
                                             reduction, chunk_size)  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(shape)
    return loss.to(hidden.dtype)


def perplexity(
    input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """exp of the mean cross-entropy over the targets that are not ignored (the per-token
    perplexity of a language model), with :func:`cross_entropy`'s arguments; differentiable.
    NaN when every target is ignored."""
    return torch.exp(cross_entropy(input, target, weight, ignore_index=ignore_index).float())
