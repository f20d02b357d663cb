"""Fused attention as torch.library custom ops: registration, dispatch, autograd.

``lmkernels::attention_fwd(q, k, v, mask, scale, window_left, window_right, bottom_right, cu_q,
cu_k, max_q, max_k, dropout_p, seed)`` returns ``(out, lse)`` for q (B, Hq, L, E), k (B, Hk, S,
E), v (B, Hk, S, Ev) strided views (last dim contiguous), an optional (B, Hq, L, S) boolean or
additive mask view (broadcast dims with zero strides; additive of q's dtype or fp32), a window
around the diagonal (causal: window_right = 0), for packed variable-length batches int32 row
offsets cu_q / cu_k (the tensors are then (1, H, total, E) views), and dropout with probability
dropout_p drawn by the counter-based RNG of lmk/philox.h from seed (a 0-dim int64 CPU tensor, or
None without dropout). ``lmkernels::attention_bwd`` returns ``(dq, dk, dv)`` from the
forward's out and lse. The semantics, shared by every backend, are in
csrc/include/lmk/attention.h. Outputs use the (B, L, H, D) memory layout: a (B, H, L, D) view of
it, which is also the (total, H, D) packed layout of a variable-length batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import eager_call, eager_function


@dataclass(frozen=True)
class AttnOptions:
    """Everything but the tensors: the softmax scale, the window (-1: unbounded; causal is
    window_right = 0), its alignment (top-left, or bottom-right: the diagonal of query i at key
    i + S_b - L_b), and for a packed variable-length batch the int32 row offsets (B + 1 each,
    on the tensors' device) with the largest lengths."""

    scale: float
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    cu_q: Tensor | None = None
    cu_k: Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    dropout_p: float = 0.0
    seed: int = 0  # the dropout RNG's 64-bit key (lmk/philox.h), as an int in [0, 2^64)

    @property
    def drop_threshold(self) -> int:
        """uint32: a score is dropped with probability drop_threshold / 2^32 (0: no dropout)."""
        return reference.dropout_threshold(self.dropout_p) if self.dropout_p > 0 else 0

    @property
    def drop_scale(self) -> float:
        """The factor of the kept scores, 2^32 / (2^32 - drop_threshold)."""
        return reference.dropout_scale(self.drop_threshold)


# ------------------------------------------------------------------------------- launchers
# Every backend's launcher takes strided 4-D views whose last dim is contiguous:
#   fwd(q, k, v, mask, out, lse, opts)
#       q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), mask None or (B, Hq, L, S) of bool,
#       q's dtype or (fp16 / bf16 data) fp32, out (B, Hq, L, Ev) of q's dtype, lse (B, Hq, L)
#       contiguous fp32 (fp64 for fp64), both preallocated and overwritten
#   bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, opts)
#       dout like out; dq / dk / dv like q / k / v (their own strides), overwritten
# opts: AttnOptions (dropout: opts.seed, drop_threshold, drop_scale). Varlen: B == 1, L / S are
# the packed totals, opts.cu_q / cu_k set.


def _reference_fwd(q, k, v, mask, out, lse, o: AttnOptions):
    res, ls = reference.attention_fwd(q, k, v, mask, o.scale, o.window_left, o.window_right,
                                      o.bottom_right, o.cu_q, o.cu_k,
                                      drop_threshold=o.drop_threshold, seed=o.seed)  # fmt: skip
    out.copy_(res)
    lse.copy_(ls)


def _reference_bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, o: AttnOptions):
    grads = reference.attention_bwd(dout, q, k, v, out, lse, mask, o.scale, o.window_left,
                                    o.window_right, o.bottom_right, o.cu_q, o.cu_k,
                                    drop_threshold=o.drop_threshold, seed=o.seed)  # fmt: skip
    for dst, src in zip((dq, dk, dv), grads, strict=True):
        dst.copy_(src)


def _cpu_seed(o: AttnOptions) -> int:
    """The 64-bit seed as the int64 bit pattern the op's `int` argument carries."""
    return o.seed - 2**64 if o.seed >= 2**63 else o.seed


def _cpu_fwd(q, k, v, mask, out, lse, o: AttnOptions):
    torch.ops.lmkernels_cpu.attention_fwd(
        q, k, v, mask, out, lse, o.scale, o.window_left, o.window_right, o.bottom_right, o.cu_q,
        o.cu_k, o.max_q, o.max_k, _cpu_seed(o), o.drop_threshold, o.drop_scale,
    )  # fmt: skip


def _cpu_bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, o: AttnOptions):
    torch.ops.lmkernels_cpu.attention_bwd(
        dout, q, k, v, out, lse, mask, dq, dk, dv, o.scale, o.window_left, o.window_right,
        o.bottom_right, o.cu_q, o.cu_k, o.max_q, o.max_k, _cpu_seed(o), o.drop_threshold,
        o.drop_scale,
    )  # fmt: skip


def _triton_fwd(*args):
    from lmkernels.triton_kernels import attention as k

    k.attention_fwd(*args)


def _triton_bwd(*args):
    from lmkernels.triton_kernels import attention as k

    k.attention_bwd(*args)


# --- cuda launchers (begin)
# csrc/cuda/attention.cu through lmkernels._cuda: tensor-core flash forward for fp16 / bf16 (head
# dims padded to 64 / 128 / 256), an fp32 SIMT forward, and a deterministic FA2-style backward
# (D = rowsum(dO * O) into an fp32 workspace, then dk / dv per key block, dq per query block).
# E and Ev up to 256; fp64 is not supported (the binding raises ValueError). Dropout (lmk/philox.h
# keep bits) and bool, q-dtype or fp32 masks (fp32 on 16-bit data added unrounded) are served.


def _cuda_geometry(q, k, v, o: AttnOptions) -> tuple[int, int, int, int, int, int, int]:
    """(B, Hq, Hk, L, S, E, Ev) as the kernels take them: for a packed varlen batch B is the
    number of sequences and L / S the longest lengths (from the offsets when not given)."""
    b, hq, length, e = q.shape
    hk, s, ev = k.shape[1], k.shape[2], v.shape[-1]
    if o.cu_q is not None:
        b = o.cu_q.numel() - 1
        length, s = o.max_q, o.max_k
        if b > 0 and (length <= 0 or s <= 0):  # not given: the longest sequences (one sync)
            length = int((o.cu_q[1:] - o.cu_q[:-1]).max()) if length <= 0 else length
            s = int((o.cu_k[1:] - o.cu_k[:-1]).max()) if s <= 0 else s
    return b, hq, hk, length, s, e, ev


def _cuda_mask(mask, dtype_code):
    """(pointer, dtype code, 4 element strides) of an optional mask view."""
    from lmkernels.ops._common import DTYPE_CODE

    if mask is None:
        return 0, dtype_code, [0, 0, 0, 0]
    return mask.data_ptr(), DTYPE_CODE[mask.dtype], list(mask.stride())


def _cuda_ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_dropout(o: AttnOptions) -> tuple[int, int, float]:
    """(seed as an unsigned 64-bit int, drop_threshold, drop_scale) for the kernels."""
    threshold = o.drop_threshold
    seed = int(o.seed) & 0xFFFFFFFFFFFFFFFF if threshold else 0
    return seed, int(threshold), float(o.drop_scale) if threshold else 1.0


def _cuda_fwd(q, k, v, mask, out, lse, o: AttnOptions):
    from lmkernels import _cuda
    from lmkernels.ops._common import DTYPE_CODE

    b, hq, hk, length, s, e, ev = _cuda_geometry(q, k, v, o)
    code = DTYPE_CODE[q.dtype]
    m_ptr, m_code, m_strides = _cuda_mask(mask, code)
    with torch.cuda.device(q.device):
        _cuda.attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), m_ptr,
            code, m_code, list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]),
            list(out.stride()[:3]), m_strides, b, hq, hk, length, s, e, ev, float(o.scale),
            int(o.window_left), int(o.window_right), bool(o.bottom_right), _cuda_ptr(o.cu_q),
            _cuda_ptr(o.cu_k), *_cuda_dropout(o), torch.cuda.current_stream(q.device).cuda_stream,
        )  # fmt: skip


def _cuda_bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, o: AttnOptions):
    from lmkernels import _cuda
    from lmkernels.ops._common import DTYPE_CODE

    b, hq, hk, length, s, e, ev = _cuda_geometry(q, k, v, o)
    code = DTYPE_CODE[q.dtype]
    m_ptr, m_code, m_strides = _cuda_mask(mask, code)
    workspace = torch.empty(max(lse.numel(), 1), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _cuda.attention_bwd(
            dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            lse.data_ptr(), m_ptr, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            workspace.data_ptr(), code, m_code, list(dout.stride()[:3]), list(q.stride()[:3]),
            list(k.stride()[:3]), list(v.stride()[:3]), list(out.stride()[:3]),
            list(dq.stride()[:3]), list(dk.stride()[:3]), list(dv.stride()[:3]), m_strides, b, hq,
            hk, length, s, e, ev, float(o.scale), int(o.window_left), int(o.window_right),
            bool(o.bottom_right), _cuda_ptr(o.cu_q), _cuda_ptr(o.cu_k), *_cuda_dropout(o),
            torch.cuda.current_stream(q.device).cuda_stream,
        )  # fmt: skip


# --- cuda launchers (end)


GPU_MAX_HEAD_DIM = 256  # the largest head dim of the triton and cuda kernels


def _mask_support(q: Tensor, mask: Tensor | None) -> str | None:
    # every kernel: bool masks, additive masks of q's dtype, fp32 masks on fp16 / bf16 data
    if mask is None or mask.dtype in (torch.bool, q.dtype):
        return None
    if mask.dtype == torch.float32 and q.dtype in (torch.float16, torch.bfloat16):
        return None
    return f"a {mask.dtype} mask on {q.dtype} data is not supported"


def _cpu_supports(q: Tensor, k: Tensor, v: Tensor, mask, opts: AttnOptions) -> str | None:
    return _mask_support(q, mask)


def _gpu_supports(q: Tensor, k: Tensor, v: Tensor, mask, opts: AttnOptions) -> str | None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not supported (supported: float32, float16, bfloat16)"
    if max(q.shape[-1], v.shape[-1]) > GPU_MAX_HEAD_DIM:
        return (f"head dim {max(q.shape[-1], v.shape[-1])} is above the supported maximum "
                f"{GPU_MAX_HEAD_DIM}")  # fmt: skip
    return _mask_support(q, mask)


_FWD = {
    "reference": Impl(_reference_fwd),
    "cpu": Impl(_cpu_fwd, _cpu_supports),
    "triton": Impl(_triton_fwd, _gpu_supports),
    "cuda": Impl(_cuda_fwd, _gpu_supports),
}
_BWD = {
    "reference": Impl(_reference_bwd),
    "cpu": Impl(_cpu_bwd, _cpu_supports),
    "triton": Impl(_triton_bwd, _gpu_supports),
    "cuda": Impl(_cuda_bwd, _gpu_supports),
}

# ----------------------------------------------------------------------------- registered ops


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blhd(b: int, h: int, length: int, d: int, like: Tensor) -> Tensor:
    """An uninitialised (b, h, length, d) tensor in the (b, length, h, d) memory layout."""
    return like.new_empty(b, length, h, d).transpose(1, 2)


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _options(scale, window_left, window_right, bottom_right, cu_q, cu_k, max_q, max_k,
             dropout_p, seed):  # fmt: skip
    """AttnOptions from the registered ops' arguments (seed: a 0-dim int64 tensor or None)."""
    key = 0 if seed is None else int(seed) & 0xFFFFFFFFFFFFFFFF
    return AttnOptions(scale, window_left, window_right, bottom_right, cu_q, cu_k, max_q, max_k,
                       dropout_p if seed is not None else 0.0, key)  # fmt: skip


def _run_fwd(q, k, v, mask, opts: AttnOptions) -> tuple[Tensor, Tensor]:
    b, hq, length, _ = q.shape
    out = _blhd(b, hq, length, v.shape[-1], q)
    lse = torch.empty(b, hq, length, dtype=_acc(q.dtype), device=q.device)
    if q.numel() == 0 and length == 0:
        return out, lse
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    fn = dispatch("attention", _FWD, q.device, q, k, v, mask, opts)
    fn(q, k, v, mask, out, lse, opts)
    return out, lse


def _run_bwd(dout, q, k, v, out, lse, mask, opts: AttnOptions):
    dq = _blhd(*q.shape, q)
    dk = _blhd(*k.shape, k)
    dv = _blhd(*v.shape, v)
    fn = dispatch("attention backward", _BWD, q.device, q, k, v, mask, opts)
    fn(_last_contiguous(dout), _last_contiguous(q), _last_contiguous(k), _last_contiguous(v),
       out, lse, mask, dq, dk, dv, opts)  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("lmkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    opts = _options(scale, window_left, window_right, bottom_right, cu_q, cu_k, max_q, max_k,
                    dropout_p, seed)  # fmt: skip
    return _run_fwd(q, k, v, mask, opts)


@attention_fwd.register_fake
def _(q, k, v, mask, scale, window_left, window_right, bottom_right, cu_q, cu_k, max_q, max_k,
      dropout_p, seed):  # fmt: skip
    b, hq, length, _ = q.shape
    out = _blhd(b, hq, length, v.shape[-1], q)
    return out, q.new_empty(b, hq, length, dtype=_acc(q.dtype))


@torch.library.custom_op("lmkernels::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    max_q: int,
    max_k: int,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = _options(scale, window_left, window_right, bottom_right, cu_q, cu_k, max_q, max_k,
                    dropout_p, seed)  # fmt: skip
    return _run_bwd(dout, q, k, v, out, lse, mask, opts)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, scale, window_left, window_right, bottom_right, cu_q, cu_k,
      max_q, max_k, dropout_p, seed):  # fmt: skip
    return _blhd(*q.shape, q), _blhd(*k.shape, k), _blhd(*v.shape, v)


# ------------------------------------------------------------------------------------ autograd

_NON_TENSOR = 10  # the op's arguments after q, k, v, mask


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    q, k, v, mask, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, rest[4], rest[5], rest[9])
    ctx.rest = rest
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero lse gradient; dout None is handled in _grads


@in_forward_backend
def _grads(ctx, dout, dlse, bwd):
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    scale, wl, wr, br, _, _, max_q, max_k, dropout_p, _ = ctx.rest
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, mask, scale, wl, wr, br, cu_q, cu_k, max_q, max_k,
                     dropout_p, seed)  # fmt: skip
    return dq, dk, dv, None, *([None] * _NON_TENSOR)


def _bwd_eager(dout, q, k, v, out, lse, mask, *rest):
    return _run_bwd(dout, q, k, v, out, lse, mask, _options(*rest))


attention_fwd.register_autograd(
    lambda ctx, dout, dlse: _grads(ctx, dout, dlse, attention_bwd), setup_context=_setup_context
)


_AttentionEager = eager_function(
    "_AttentionEager",
    lambda q, k, v, mask, *rest: _run_fwd(q, k, v, mask, _options(*rest)),
    _setup_context,
    lambda ctx, dout, dlse: _grads(ctx, dout, dlse, _bwd_eager),
)


# ------------------------------------------------------------------------------ entry point


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: AttnOptions,
              seed: Tensor | None = None) -> Tensor:  # fmt: skip
    """The attention output (B, Hq, L, Ev) with autograd into q, k and v (not into the mask).

    Arguments as the launchers take them (validated by the public functions); with
    ``opts.dropout_p`` > 0, ``seed`` is the RNG key as a 0-dim int64 CPU tensor (opts.seed is
    not read). Plain eager calls run the backend directly
    (:func:`lmkernels.ops._common.eager_call`); everything else goes through the registered ops.
    """
    if opts.dropout_p <= 0:
        seed = None
    args = (q, k, v, mask, opts.scale, opts.window_left, opts.window_right, opts.bottom_right,
            opts.cu_q, opts.cu_k, opts.max_q, opts.max_k, float(opts.dropout_p), seed)  # fmt: skip
    if not eager_call(q, k, v, mask, opts.cu_q, opts.cu_k, seed):
        return attention_fwd(*args)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionEager.apply(*args)[0]
    return _run_fwd(q, k, v, mask, _options(*args[4:]))[0]
