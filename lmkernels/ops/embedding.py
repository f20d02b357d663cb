"""Embedding lookup as torch.library custom ops: registration, dispatch, autograd.

``lmkernels::embedding_fwd(weight, idx, padding_idx, scale_grad_by_freq)`` gathers the rows
``weight[idx]`` of a 2-D table for a 1-D index vector (the two options only shape its
backward); ``lmkernels::embedding_bwd(dy, idx, num_embeddings, padding_idx,
scale_grad_by_freq, grad_scale)`` is the table's gradient, deterministic on every backend (the
order of the additions depends only on ``idx``). :func:`lmkernels.functional.embedding`
validates arguments, applies ``max_norm`` and flattens the indices before calling
:func:`embedding`.

``lmkernels::token_pos_fwd(tok_weight, ids, pos_weight, pos, scale, padding_idx)`` is the fused
input layer ``scale * tok_weight[ids] + P[pos]`` (P the learned ``pos_weight`` or, for None,
the sinusoid); its backward is ``embedding_bwd`` once per table.
:func:`lmkernels.functional.token_positional_embedding` validates and flattens, then calls
:func:`token_positional`. The semantics, shared by every backend, are in
csrc/include/lmk/embedding.h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import DTYPE_CODE, eager_call, eager_function

# ------------------------------------------------------------------------------- launchers
# Every backend's launcher takes a (rows, dim) weight with contiguous rows, contiguous 1-D
# int32/int64 indices and a preallocated output:
#   fwd(weight, idx, out)                                 raises IndexError for a bad index
#   bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale)     padding_idx -1: none
# and the fused token + positional forward (tables with contiguous rows, ids and pos contiguous
# 1-D int32/int64, pos_weight None for the sinusoid, inv_freq its fp64 frequencies, else None):
#   tp_fwd(tok_weight, ids, pos_weight, pos, inv_freq, scale, out)   IndexError for a bad index


def _cpu_fwd(weight, idx, out):
    torch.ops.lmkernels_cpu.embedding_fwd(weight, idx, out)


def _cpu_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale):
    torch.ops.lmkernels_cpu.embedding_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale)


def _cpu_tp_fwd(tok_weight, ids, pos_weight, pos, inv_freq, scale, out):
    torch.ops.lmkernels_cpu.token_pos_fwd(tok_weight, ids, pos_weight, pos, inv_freq, scale, out)


def _reference_fwd(weight, idx, out):
    out.copy_(reference.embedding_fwd(weight, idx))


def _reference_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale):
    dw.copy_(
        reference.embedding_bwd(dy, idx, dw.shape[0], padding_idx, scale_grad_by_freq, grad_scale)
    )


def _reference_tp_fwd(tok_weight, ids, pos_weight, pos, inv_freq, scale, out):
    out.copy_(reference.token_pos_fwd(tok_weight, ids, pos_weight, pos, scale))


# cuda: an index-check kernel, then the gather (one synchronisation to read the check back);
# backward sorts the tokens by row with torch (stable), cuts one segment per distinct row and
# sums each in token order in fp32 (csrc/cuda/embedding.cu), the reciprocal scale computed here.
_INDEX_DTYPES = (torch.int32, torch.int64)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check_index_dtype(idx: Tensor) -> None:
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"embedding indices must be int32 or int64, got {idx.dtype}")


def _cuda_fwd(weight: Tensor, idx: Tensor, out: Tensor) -> None:
    """``out[t] = weight[idx[t]]``; IndexError for an index outside [0, rows)."""
    from lmkernels import _cuda

    _check_index_dtype(idx)
    n = idx.shape[0]
    if n == 0:
        return
    rows, dim = weight.shape
    if rows == 0:  # every index is bad (and an empty CUDA tensor's data pointer is null)
        reference.check_indices(idx, rows)
    status = torch.empty(1, dtype=torch.int64, device=idx.device)
    with torch.cuda.device(idx.device):
        _cuda.embedding_fwd(
            weight.data_ptr(), idx.data_ptr(), out.data_ptr(), status.data_ptr(),
            DTYPE_CODE[weight.dtype], idx.dtype == torch.int64, n, dim, rows, weight.stride(0),
            _stream(idx.device),
        )  # fmt: skip
    bad = int(status.item())  # the one synchronisation
    if bad >= 0:
        raise reference.index_error(int(idx[bad]), bad, rows)


def _cuda_tp_fwd(
    tok_weight: Tensor,
    ids: Tensor,
    pos_weight: Tensor | None,
    pos: Tensor,
    inv_freq: Tensor | None,
    scale: float,
    out: Tensor,
) -> None:
    """The fused token + positional forward (embedding.h); IndexError for a bad id or position."""
    from lmkernels import _cuda

    _check_index_dtype(ids)
    _check_index_dtype(pos)
    n = ids.shape[0]
    if n == 0:
        return
    rows, dim = tok_weight.shape
    if rows == 0 or (pos_weight is not None and pos_weight.shape[0] == 0):
        # every id or every position is bad (and an empty CUDA tensor's data pointer is null,
        # which the module reads as "no table"): the reference's checks, in its order
        reference.check_indices(ids, rows)
        reference.check_positions(pos, pos_weight)
    if pos_weight is None:
        num_pos, pos_ptr, pos_stride = reference.SINUSOID_POSITIONS, 0, 0
        freq_ptr = inv_freq.data_ptr()
    else:
        num_pos, pos_ptr, pos_stride = (
            pos_weight.shape[0],
            pos_weight.data_ptr(),
            pos_weight.stride(0),
        )
        freq_ptr = 0
    status = torch.empty(1, dtype=torch.int64, device=ids.device)
    with torch.cuda.device(ids.device):
        _cuda.token_pos_fwd(
            tok_weight.data_ptr(), ids.data_ptr(), pos_ptr, pos.data_ptr(), freq_ptr,
            out.data_ptr(), status.data_ptr(), DTYPE_CODE[tok_weight.dtype],
            ids.dtype == torch.int64, pos.dtype == torch.int64, n, dim, rows,
            tok_weight.stride(0), num_pos, pos_stride, float(scale), _stream(ids.device),
        )  # fmt: skip
    bad = int(status.item())  # the one synchronisation
    if 0 <= bad < n:
        raise reference.index_error(int(ids[bad]), bad, rows)
    if bad >= n:
        raise reference.position_error(int(pos[bad - n]), bad - n, pos_weight)


def _cuda_bwd(
    dy: Tensor,
    idx: Tensor,
    dw: Tensor,
    padding_idx: int,
    scale_grad_by_freq: bool,
    grad_scale: float,
) -> None:
    """``dw`` = the deterministic embedding gradient (csrc/include/lmk/embedding.h)."""
    from lmkernels import _cuda

    _check_index_dtype(idx)
    dw.zero_()
    n, dim = dy.shape
    if n == 0 or dim == 0:
        return
    # tokens grouped by row, each row's tokens in increasing position
    sorted_idx, order = torch.sort(idx.long(), stable=True)
    seg_rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    nseg = seg_rows.shape[0]
    seg_offsets = torch.zeros(nseg + 1, dtype=torch.int64, device=dy.device)
    torch.cumsum(counts, 0, out=seg_offsets[1:])
    seg_scale = None  # the kernel's per-segment scale: 1 / count, or grad_scale
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    if scale_grad_by_freq:
        seg_scale = counts.to(torch.float64).reciprocal_().to(acc)
    elif grad_scale != 1.0:
        seg_scale = torch.full((nseg,), grad_scale, dtype=acc, device=dy.device)
    with torch.cuda.device(dy.device):
        _cuda.embedding_bwd(
            dy.data_ptr(), dw.data_ptr(), order.data_ptr(), seg_offsets.data_ptr(),
            seg_rows.data_ptr(), 0 if seg_scale is None else seg_scale.data_ptr(),
            DTYPE_CODE[dy.dtype], nseg, n, dim, dw.shape[0], max(int(padding_idx), -1),
            _stream(dy.device),
        )  # fmt: skip


def _triton_fwd(*args):
    from lmkernels.triton_kernels import embedding as k

    k.embedding_fwd(*args)


def _triton_bwd(*args):
    from lmkernels.triton_kernels import embedding as k

    k.embedding_bwd(*args)


def _triton_tp_fwd(*args):
    from lmkernels.triton_kernels import embedding as k

    k.token_pos_fwd(*args)


def _triton_supports(t: Tensor, *_) -> str | None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {t.dtype} is not supported (supported: float32, float16, bfloat16)"
    return None


_FWD = {
    "reference": Impl(_reference_fwd),
    "cpu": Impl(_cpu_fwd),
    "triton": Impl(_triton_fwd, _triton_supports),
    "cuda": Impl(_cuda_fwd),
}
_BWD = {
    "reference": Impl(_reference_bwd),
    "cpu": Impl(_cpu_bwd),
    "triton": Impl(_triton_bwd, _triton_supports),
    "cuda": Impl(_cuda_bwd),
}
_TP_FWD = {
    "reference": Impl(_reference_tp_fwd),
    "cpu": Impl(_cpu_tp_fwd),
    "triton": Impl(_triton_tp_fwd, _triton_supports),
    "cuda": Impl(_cuda_tp_fwd),
}

# ----------------------------------------------------------------------------- registered ops


def _rows(weight: Tensor) -> Tensor:
    return weight if weight.shape[1] <= 1 or weight.stride(1) == 1 else weight.contiguous()


def _run_fwd(weight: Tensor, idx: Tensor) -> Tensor:
    out = torch.empty(idx.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    if idx.numel() and weight.shape[1]:
        fn = dispatch("embedding", _FWD, weight.device, weight, idx)
        fn(_rows(weight), idx.contiguous(), out)
    elif idx.numel():  # zero columns: only the index check
        reference.check_indices(idx, weight.shape[0])
    return out


def _run_bwd(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq, grad_scale=1.0) -> Tensor:
    dw = torch.empty(num_embeddings, dy.shape[1], dtype=dy.dtype, device=dy.device)
    if idx.numel() == 0 or dy.shape[1] == 0:
        return dw.zero_()
    fn = dispatch("embedding backward", _BWD, dy.device, dy, idx)
    fn(dy.contiguous(), idx.contiguous(), dw, padding_idx, scale_grad_by_freq, grad_scale)
    return dw


_INV_FREQ: dict[tuple[int, torch.device], Tensor] = {}


def _inv_freq(dim: int, device: torch.device) -> Tensor:
    """The sinusoid's fp64 frequencies for ``dim`` (cached per dim and device)."""
    key = (dim, device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = reference.sinusoid_inv_freq(dim, device)
    return _INV_FREQ[key]


def _run_tp_fwd(tok_weight, ids, pos_weight, pos, scale) -> Tensor:
    dim = tok_weight.shape[1]
    out = torch.empty(ids.shape[0], dim, dtype=tok_weight.dtype, device=tok_weight.device)
    if ids.numel() and dim:
        fn = dispatch("token_positional_embedding", _TP_FWD, tok_weight.device, tok_weight, ids)
        freq = _inv_freq(dim, tok_weight.device) if pos_weight is None else None
        pw = None if pos_weight is None else _rows(pos_weight)
        if pos.dtype != ids.dtype:  # one index type per kernel (int32 widens exactly)
            ids, pos = ids.long(), pos.long()
        fn(_rows(tok_weight), ids.contiguous(), pw, pos.contiguous(), freq, scale, out)
    elif ids.numel():  # zero columns: only the index checks
        reference.check_indices(ids, tok_weight.shape[0])
        reference.check_positions(pos, pos_weight)
    return out


@torch.library.custom_op("lmkernels::embedding_fwd", mutates_args=())
def embedding_fwd(
    weight: Tensor, idx: Tensor, padding_idx: int, scale_grad_by_freq: bool
) -> Tensor:
    # (padding_idx and scale_grad_by_freq shape only the backward; they are arguments here so
    # that the registered autograd has them)
    return _run_fwd(weight, idx)


@embedding_fwd.register_fake
def _(weight, idx, padding_idx, scale_grad_by_freq):
    return weight.new_empty(idx.shape[0], weight.shape[1])


@torch.library.custom_op("lmkernels::embedding_bwd", mutates_args=())
def embedding_bwd(
    dy: Tensor,
    idx: Tensor,
    num_embeddings: int,
    padding_idx: int,
    scale_grad_by_freq: bool,
    grad_scale: float = 1.0,
) -> Tensor:
    return _run_bwd(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq, grad_scale)


@embedding_bwd.register_fake
def _(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq, grad_scale=1.0):
    return dy.new_empty(num_embeddings, dy.shape[1])


@torch.library.custom_op("lmkernels::token_pos_fwd", mutates_args=())
def token_pos_fwd(
    tok_weight: Tensor,
    ids: Tensor,
    pos_weight: Tensor | None,
    pos: Tensor,
    scale: float,
    padding_idx: int,
) -> Tensor:
    # (padding_idx shapes only the backward)
    return _run_tp_fwd(tok_weight, ids, pos_weight, pos, scale)


@token_pos_fwd.register_fake
def _(tok_weight, ids, pos_weight, pos, scale, padding_idx):
    return tok_weight.new_empty(ids.shape[0], tok_weight.shape[1])


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    weight, idx, padding_idx, scale_grad_by_freq = inputs
    ctx.save_for_backward(idx)
    ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
    ctx.scale_grad_by_freq = scale_grad_by_freq


@in_forward_backend
def _grads(ctx, dy, bwd):
    (idx,) = ctx.saved_tensors
    dw = bwd(dy, idx, ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq)
    return dw, None, None, None


embedding_fwd.register_autograd(
    lambda ctx, dy: _grads(ctx, dy, embedding_bwd), setup_context=_setup_context
)


def _tp_setup_context(ctx, inputs, output):
    remember_backend(ctx)
    tok_weight, ids, pos_weight, pos, scale, padding_idx = inputs
    ctx.save_for_backward(ids, pos)
    ctx.num_tok = tok_weight.shape[0]
    ctx.num_pos = None if pos_weight is None else pos_weight.shape[0]
    ctx.scale, ctx.padding_idx = scale, padding_idx


@in_forward_backend
def _tp_grads(ctx, dy, bwd):
    ids, pos = ctx.saved_tensors
    d_tok = d_pos = None
    if ctx.needs_input_grad[0]:
        d_tok = bwd(dy, ids, ctx.num_tok, ctx.padding_idx, False, ctx.scale)
    if ctx.num_pos is not None and ctx.needs_input_grad[2]:
        d_pos = bwd(dy, pos, ctx.num_pos, -1, False, 1.0)
    return d_tok, None, d_pos, None, None, None


token_pos_fwd.register_autograd(
    lambda ctx, dy: _tp_grads(ctx, dy, embedding_bwd), setup_context=_tp_setup_context
)


_TokenPosEager = eager_function(
    "_TokenPosEager",
    lambda tok_weight, ids, pos_weight, pos, scale, padding_idx: _run_tp_fwd(
        tok_weight, ids, pos_weight, pos, scale
    ),
    _tp_setup_context,
    lambda ctx, dy: _tp_grads(ctx, dy, _run_bwd),
)


_EmbeddingEager = eager_function(
    "_EmbeddingEager",
    lambda weight, idx, padding_idx, scale_grad_by_freq: _run_fwd(weight, idx),
    _setup_context,
    lambda ctx, dy: _grads(ctx, dy, _run_bwd),
)


# ------------------------------------------------------------------------------ entry point


def embedding(weight: Tensor, idx: Tensor, padding_idx: int, scale_grad_by_freq: bool) -> Tensor:
    """``weight[idx]`` as (len(idx), dim), with autograd into ``weight``.

    ``weight``: (num_embeddings, dim) floating; ``idx``: 1-D int32/int64; ``padding_idx``: a
    row that receives no gradient, or -1. The public function calls this with validated
    arguments. Plain eager calls run the backend directly (see
    :func:`lmkernels.ops._common.eager_call`); everything else goes through the registered ops.
    """
    if not eager_call(weight, idx):
        return embedding_fwd(weight, idx, padding_idx, scale_grad_by_freq)
    if torch.is_grad_enabled() and weight.requires_grad:
        return _EmbeddingEager.apply(weight, idx, padding_idx, scale_grad_by_freq)
    return _run_fwd(weight, idx)


def token_positional(
    tok_weight: Tensor,
    ids: Tensor,
    pos_weight: Tensor | None,
    pos: Tensor,
    scale: float,
    padding_idx: int,
) -> Tensor:
    """``scale * tok_weight[ids] + P[pos]`` as (len(ids), dim), with autograd into both tables.

    ``ids`` and ``pos``: 1-D int32/int64 of one length; ``pos_weight``: the learned table
    (same dtype, device and dim as ``tok_weight``) or None for the sinusoid; ``padding_idx``: a
    token row that receives no gradient, or -1. The public function calls this with validated
    arguments.
    """
    if not eager_call(tok_weight, ids, pos_weight, pos):
        return token_pos_fwd(tok_weight, ids, pos_weight, pos, scale, padding_idx)
    wants_grad = tok_weight.requires_grad or (pos_weight is not None and pos_weight.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        return _TokenPosEager.apply(tok_weight, ids, pos_weight, pos, scale, padding_idx)
    return _run_tp_fwd(tok_weight, ids, pos_weight, pos, scale)
