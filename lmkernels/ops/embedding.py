"""Embedding lookup as torch.library custom ops: registration, dispatch, autograd.

``lmkernels::embedding_fwd(weight, idx, padding_idx, scale_grad_by_freq)`` gathers the rows
``weight[idx]`` of a 2-D table for a 1-D index vector (the two options only shape its
backward); ``lmkernels::embedding_bwd(dy, idx, num_embeddings, padding_idx,
scale_grad_by_freq)`` is the table's gradient, deterministic on every backend (the order of the
additions depends only on ``idx``). :func:`lmkernels.functional.embedding` validates arguments,
applies ``max_norm`` and flattens the indices before calling :func:`embedding`. The semantics,
shared by every backend, are in csrc/include/lmk/embedding.h.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmkernels import reference
from lmkernels.backends import Impl, dispatch
from lmkernels.ops._common import DTYPE_CODE, eager_call

# ------------------------------------------------------------------------------- launchers
# Every backend's launcher takes a (rows, dim) weight with contiguous rows, contiguous 1-D
# int32/int64 indices and a preallocated output:
#   fwd(weight, idx, out)                                 raises IndexError for a bad index
#   bwd(dy, idx, dw, padding_idx, scale_grad_by_freq)     padding_idx -1: none


def _cpu_fwd(weight, idx, out):
    torch.ops.lmkernels_cpu.embedding_fwd(weight, idx, out)


def _cpu_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq):
    torch.ops.lmkernels_cpu.embedding_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq)


def _reference_fwd(weight, idx, out):
    out.copy_(reference.embedding_fwd(weight, idx))


def _reference_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq):
    dw.copy_(reference.embedding_bwd(dy, idx, dw.shape[0], padding_idx, scale_grad_by_freq))


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
    status = torch.empty(1, dtype=torch.int64, device=idx.device)
    with torch.cuda.device(idx.device):
        _cuda.embedding_fwd(
            weight.data_ptr(), idx.data_ptr(), out.data_ptr(), status.data_ptr(),
            DTYPE_CODE[weight.dtype], idx.dtype == torch.int64, n, dim, rows, weight.stride(0),
            _stream(idx.device),
        )  # fmt: skip
    bad = int(status.item())  # the one synchronisation
    if bad >= 0:
        raise IndexError(
            f"index {int(idx[bad])} (at position {bad} of the flattened input) is out of range "
            f"for an embedding of {rows} rows"
        )


def _cuda_bwd(
    dy: Tensor, idx: Tensor, dw: Tensor, padding_idx: int, scale_grad_by_freq: bool
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
    seg_scale = None
    if scale_grad_by_freq:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        seg_scale = counts.to(torch.float64).reciprocal_().to(acc)
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


def _run_bwd(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq) -> Tensor:
    dw = torch.empty(num_embeddings, dy.shape[1], dtype=dy.dtype, device=dy.device)
    if idx.numel() == 0 or dy.shape[1] == 0:
        return dw.zero_()
    fn = dispatch("embedding backward", _BWD, dy.device, dy, idx)
    fn(dy.contiguous(), idx.contiguous(), dw, padding_idx, scale_grad_by_freq)
    return dw


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
    dy: Tensor, idx: Tensor, num_embeddings: int, padding_idx: int, scale_grad_by_freq: bool
) -> Tensor:
    return _run_bwd(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq)


@embedding_bwd.register_fake
def _(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq):
    return dy.new_empty(num_embeddings, dy.shape[1])


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    weight, idx, padding_idx, scale_grad_by_freq = inputs
    ctx.save_for_backward(idx)
    ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
    ctx.scale_grad_by_freq = scale_grad_by_freq


def _grads(ctx, dy, bwd):
    (idx,) = ctx.saved_tensors
    dw = bwd(dy, idx, ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq)
    return dw, None, None, None


embedding_fwd.register_autograd(
    lambda ctx, dy: _grads(ctx, dy, embedding_bwd), setup_context=_setup_context
)


class _EmbeddingEager(torch.autograd.Function):
    """The same forward and backward as the registered op, for plain eager calls."""

    @staticmethod
    def forward(ctx, weight, idx, padding_idx, scale_grad_by_freq):
        out = _run_fwd(weight, idx)
        _setup_context(ctx, (weight, idx, padding_idx, scale_grad_by_freq), out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _grads(ctx, dy, _run_bwd)


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
