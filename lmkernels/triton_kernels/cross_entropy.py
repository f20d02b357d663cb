# Triton cross-entropy over the rows of a (rows, cols) logits view: per-row loss and, in the
# same call, the gradient of scale_r * loss_r (the fused forward + backward of a language-model
# loss: the logits are never normalised into a separate tensor).
#
# Semantics: csrc/include/lmk/cross_entropy.h (the contract shared by every backend). Per row r
# with target t, weights w (all ones without a weight), eps = label smoothing:
#   ignored (t == ignore_index or t outside [0, cols)): loss 0, gradient row 0, no logit read
#   z_c  = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c
#   lse  = log sum_c exp(z_c),  W = sum_c w_c,  S = sum_c w_c z_c
#   loss = (1 - eps) w_t (lse - z_t) + (eps / cols) (W lse - S) + z_loss lse^2
#   grad_c = scale_r * (p_c ((1 - eps) w_t + eps W / cols + 2 z_loss lse)
#            - (1 - eps) w_t [c == t] - eps w_c / cols) * (softcap > 0 ? 1 - tanh^2 : 1)
#   with p_c = exp(z_c - lse); the gradient is rounded once to the data type (cast_out).
# With eps == 0 the smoothing term is not evaluated (as in the reference), so a row with a -inf
# logit (a masked vocabulary entry) has the finite loss torch gives, where 0 * (W lse - S) with
# S = -inf would be NaN. A +inf logit makes its row NaN (the max-shifted sum is inf - inf), as
# torch's log_softmax and the contract.
# All arithmetic is fp32: loads are converted before any math (the interpreter's bf16
# arithmetic is wrong, and fp32 is the right accumulator on the GPU too). Data types: fp32,
# fp16, bf16 (no fp64: the op layer sends fp64 to the other backends).
#
# Kernel: _cross_entropy_fwd_kernel, one program per row, streaming the row in BLOCK chunks.
#   pass 1  reads the row once: per-lane online max and rescaled sum of exp (combined across
#           lanes once, after the loop, as softmax's looped kernel), the per-lane sums of w_c z_c
#           and w_c (label smoothing only: the weight loads are predicated off when eps == 0);
#           z_t and w_t are two scalar loads, made only when the target is valid.
#   pass 2  (only when a gradient is wanted) re-reads the row, recomputes z_c and p_c and writes
#           the gradient. A gradient row is written only after every logit of it has been read
#           (pass 1) and each element is read before it is written (pass 2), so grad may be
#           the logits tensor itself (the in-place backward).
#   Traffic: loss only: rows * cols * itemsize bytes; with the gradient 3x that (read, re-read,
#   write). An ignored row reads nothing and (with a gradient) writes zeros.
#
# Variants. BLOCK (3 configs, cross_entropy_config) and SOFTCAP are the only constexprs:
#   * SOFTCAP compiles the tanh (libdevice on the GPU, ~20 instructions and a few registers per
#     element, in both passes); a kernel without it carries none of that code;
#   * label smoothing, z-loss and the soft-cap value are fp32 runtime arguments: z-loss is a few
#     scalar flops per row, smoothing one multiply-add per element plus weight loads that are
#     predicated off (no memory traffic) when eps == 0;
#   * the weight, the scale, the loss output and the gradient output are runtime flags
#     (has_weight, has_scale, write_loss, write_grad, ints 0 / 1) with an fp32 placeholder
#     pointer for an absent tensor: an absent input is a predicated-off load, an absent loss a
#     predicated-off store, no gradient a second loop of zero trips. They cost a predicate each,
#     where constexprs would multiply the variants by 16.
#   So aot_specs() lists 3 dtypes x 3 configs x 2 SOFTCAP = 18 specs.
#
# Limits and trade-offs:
#   * one program per row: a short vocabulary (cols << 256) leaves most lanes idle;
#   * cols < 2^30 (column offsets are int32 within a row); the row offset row * row_stride is
#     int64, so rows * cols may exceed 2^31; row strides (logits, grad) must be < 2^31;
#   * per-lane state is 4 fp32 values per element a thread holds (max, sum, sum w z, sum w):
#     the configs keep 8 elements per thread, checked by the AOT report (aot_specs() +
#     lmkernels.triton_kernels.aot.compile_report): zero spills on sm_80 / sm_90;
#   * the targets are not validated here (the op layer does it): an out-of-range target is
#     simply an ignored row, never dereferenced.
# Every int argument may be 1, which the JIT specialises into a constexpr; the kernel only uses
# them in ways that work for both (tl.cast, comparisons with a tensor on the left). The AOT
# report compiles the signatures without that value specialisation (ints == 1, 16-byte
# divisibility); those specialised variants only remove instructions.
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import INTERPRET as _INTERPRET
from lmkernels.triton_kernels._common import RowConfig, mul_rn
from lmkernels.triton_kernels._common import cast_out as _cast_out

# The chunk lengths the launcher picks from: the smallest that holds the row, else the largest
# (long rows loop over it). 8 elements per thread in every config (one warp per 256 elements):
# 4096 on 16 warps streams a 256k vocabulary in 64 chunks, and stays spill-free with the
# soft-cap (AOT report). Tests lower them to reach many chunks with small shapes.
BLOCKS = (256, 1024, 4096)
MAX_COLS = 1 << 30


@triton.jit
def _tanh(u):
    # tanh on fp32. GPU: libdevice (within 2 ulp). The interpreter has no libdevice: there it
    # is (1 - e) / (1 + e), e = exp(-2|u|), in fp64 (relative error < 2^-40 for |u| >= 2^-12,
    # so the fp32 result is the rounded tanh or a neighbour), and u itself below 2^-12 (where
    # tanh(u) = u (1 - u^2 / 3 + ...) rounds to u). NaN stays NaN, +-inf gives +-1.
    if _INTERPRET:
        a = tl.abs(u).to(tl.float64)
        e = tl.exp(-2.0 * a)
        th = ((1.0 - e) / (1.0 + e)).to(tl.float32)
        th = tl.where(u < 0, -th, th)
        th = tl.where(tl.abs(u) < 0.000244140625, u, th)
    else:
        th = libdevice.tanh(u)
    return th


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,  # (rows, cols) logits, fp32/fp16/bf16, rows x_stride elements apart
    target_ptr,  # (rows,) int64
    weight_ptr,  # (cols,) fp32 class weights (has_weight), else a placeholder never read
    scale_ptr,  # fp32 gradient scale read at row * scale_stride (has_scale), else a placeholder
    loss_ptr,  # (rows,) fp32 output (write_loss), else a placeholder never written
    grad_ptr,  # (rows, cols) x's dtype output, rows grad_stride apart (write_grad; may be x_ptr)
    x_stride,
    grad_stride,
    scale_stride,  # 0 (one scale for every row) or the stride of a (rows,) scale
    cols,
    ignore_index,  # in [0, cols), or -1 (the launcher maps any other value to -1)
    has_weight,  # ints 0 / 1: which optional tensors are present
    has_scale,
    write_loss,
    write_grad,
    eps,  # label smoothing, fp32
    softcap,  # fp32, > 0 (read only with SOFTCAP)
    z_loss,  # fp32
    BLOCK: tl.constexpr,  # chunk length, power of two
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    g_row = grad_ptr + row * grad_stride
    lanes = tl.arange(0, BLOCK)  # int32: offsets within a row (cols < 2^30)
    cols_f = tl.cast(cols, tl.float32)
    inv_cap = 1.0 / softcap

    t = tl.load(target_ptr + row)
    valid = (t != ignore_index) & (t >= 0) & (t < cols)
    t32 = tl.where(valid, t, 0).to(tl.int32)  # a safe index; the loads below are masked anyway
    # an ignored row reads no logit: pass 1 runs no chunk and pass 2 loads nothing
    n_read = tl.where(valid, cols, 0)
    smooth = eps != 0.0
    # the weights enter the loop only for the smoothing sums: predicated off otherwise
    load_w = smooth & (has_weight != 0)

    # pass 1: per-lane online max / rescaled sum of exp(z), and the smoothing sums
    m_vec = tl.full([BLOCK], -float("inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    sz_vec = tl.zeros([BLOCK], tl.float32)  # sum w_c z_c
    sw_vec = tl.zeros([BLOCK], tl.float32)  # sum w_c
    for start in range(0, n_read, BLOCK):
        offs = start + lanes
        inb = offs < cols
        z = tl.load(x_row + offs, mask=inb, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = mul_rn(softcap, _tanh(z * inv_cap))
        # w = 1 for every column without a weight (or without smoothing, where the sums are
        # unused); 0 past the row end, where z = 0, so w z = 0 there
        w = tl.load(weight_ptr + offs, mask=inb & load_w, other=1.0)
        w = tl.where(inb, w, 0.0)
        sz_vec += w * z
        sw_vec += w
        z = tl.where(inb, z, -float("inf"))
        m_new = tl.maximum(m_vec, z)
        m_new_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_new_safe) + tl.exp(z - m_new_safe)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    # A NaN logit makes its lane's sum NaN (on the GPU the max ignores NaN, the exp does not),
    # so lse, the loss and every p_c of the row are NaN. An ignored row ran no chunk: its sum
    # is taken as 1, so that nothing below is inf or NaN (its outputs are zeros anyway).
    s = tl.where(valid, tl.sum(s_vec * tl.exp(m_vec - m_safe), axis=0), 1.0)
    lse = m_safe + tl.log(s)
    big_w = tl.sum(sw_vec, axis=0)
    s_wz = tl.sum(sz_vec, axis=0)

    zt = tl.load(x_row + t32, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        zt = mul_rn(softcap, _tanh(zt * inv_cap))
    wt = tl.load(weight_ptr + t32, mask=valid & (has_weight != 0), other=1.0)
    loss = (1.0 - eps) * wt * (lse - zt) + z_loss * lse * lse
    # eps == 0: no smoothing term at all (see the header: 0 * (W lse - S) may be NaN)
    loss += tl.where(smooth, eps / cols_f * (big_w * lse - s_wz), 0.0)
    loss = tl.where(valid, loss, 0.0)
    # (row >= 0: a tensor on the left of the flag, which may be a specialised constexpr 1)
    tl.store(loss_ptr + row, loss, mask=(row >= 0) & (write_loss != 0))

    # pass 2: the gradient, chunk by chunk (no chunk when no gradient is wanted)
    sc = tl.load(scale_ptr + row * scale_stride, mask=valid & (has_scale != 0), other=1.0)
    coef_p = sc * ((1.0 - eps) * wt + eps * big_w / cols_f + 2.0 * z_loss * lse)
    coef_t = sc * ((1.0 - eps) * wt)
    coef_w = sc * (eps / cols_f)
    coef_z = sc * (2.0 * z_loss * lse)
    n_write = cols * write_grad
    for start in range(0, n_write, BLOCK):
        offs = start + lanes
        inb = offs < cols
        z = tl.load(x_row + offs, mask=inb & valid, other=0.0).to(tl.float32)
        if SOFTCAP:
            th = _tanh(z * inv_cap)
            z = mul_rn(softcap, th)
        p = tl.exp(z - lse)
        w = tl.load(weight_ptr + offs, mask=inb & load_w, other=1.0)
        g = p * coef_p - coef_w * w
        # the target's terms apart: nothing cancels when p_t is near 1 (see the header)
        g_t = (p - 1.0) * coef_t + (p * big_w - w) * coef_w + p * coef_z
        g = tl.where(offs == t32, g_t, g)
        if SOFTCAP:
            g = g * (1.0 - th * th)
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + offs, _cast_out(g, grad_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


CrossEntropyConfig = RowConfig


def cross_entropy_config(cols: int, dtype: torch.dtype) -> CrossEntropyConfig:
    """Launch config for rows of `cols` logits of `dtype`: the smallest of BLOCKS that holds the
    row, else the largest (the row loops over it), on one warp per 256 elements."""
    # dtype is part of the interface (as softmax_config's): every dtype fits the same configs
    del dtype
    block = next((b for b in BLOCKS if cols <= b), BLOCKS[-1])
    return CrossEntropyConfig(block, max(1, min(16, block // 256)), looped=True)


def _all_configs(dtype: torch.dtype) -> list[CrossEntropyConfig]:
    # every config cross_entropy_config can return for dtype
    return [cross_entropy_config(b, dtype) for b in BLOCKS]


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLACEHOLDER: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    # one fp32 element per device standing for an absent weight / scale / loss: the kernel's
    # loads from it and its store to it are predicated off, so every call has one signature
    if device not in _PLACEHOLDER:
        _PLACEHOLDER[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _PLACEHOLDER[device]


def _check_rows_tensor(name: str, t, rows: int, cols: int, dtype: torch.dtype, device) -> None:
    # a (rows, cols) tensor of dtype whose rows are contiguous and do not overlap
    fn = "cross_entropy_fwd"
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be a 2-D (rows, cols) tensor")
    if tuple(t.shape) != (rows, cols) or t.dtype != dtype:
        raise ValueError(f"{fn}: {name} must be ({rows}, {cols}) of {dtype}, got "
                         f"{tuple(t.shape)} of {t.dtype}")  # fmt: skip
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, logits on {device}")
    if cols > 1 and t.stride(1) != 1:
        raise ValueError(f"{fn}: {name}'s rows must be contiguous (stride(1) == 1)")
    if rows > 1 and not cols <= t.stride(0) < 2**31:
        raise ValueError(f"{fn}: {name}'s row stride must be in [cols, 2^31), got {t.stride(0)}")


def _check_vector(name: str, t, n: int, dtype: torch.dtype, device) -> None:
    # a contiguous (n,) tensor of dtype
    fn = "cross_entropy_fwd"
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or t.dtype != dtype:
        got = f"{tuple(t.shape)} of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be ({n},) of {dtype}, got {got}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, logits on {device}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{fn}: {name} must be contiguous")


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    loss: torch.Tensor | None,
    grad: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    scale: torch.Tensor | None,
) -> None:
    """Per-row cross-entropy loss and / or its gradient (csrc/include/lmk/cross_entropy.h).

    logits: (rows, cols) fp32/fp16/bf16 with contiguous rows (stride(1) == 1) and any row stride
    in [cols, 2^31); cols < 2^30. target: contiguous (rows,) int64; a target equal to
    ignore_index or outside [0, cols) is an ignored row (loss 0, gradient 0, its logits are not
    read). weight: None or contiguous (cols,) fp32. loss: None or contiguous (rows,) fp32,
    written. grad: None or (rows, cols) of logits' dtype, rows contiguous, written with the
    gradient of scale_r * loss_r; it may be logits itself (in place, same row stride), but must
    not otherwise overlap it. At least one of loss / grad. scale: None (1), or an fp32 tensor of
    shape () (every row) or (rows,), read on the device (no host sync). label_smoothing in
    [0, 1], softcap >= 0 (0: off), z_loss >= 0, all finite.
    """
    fn = "cross_entropy_fwd"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a 2-D (rows, cols) tensor")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"{fn}: logits dtype {logits.dtype} is not supported "
                         "(float32, float16, bfloat16)")  # fmt: skip
    rows, cols = logits.shape
    dev = logits.device
    if cols >= MAX_COLS:
        raise ValueError(f"{fn}: logits must have fewer than 2^30 columns, got {cols}")
    _check_rows_tensor("logits", logits, rows, cols, logits.dtype, dev)
    _check_vector("target", target, rows, torch.int64, dev)
    if weight is not None:
        _check_vector("weight", weight, cols, torch.float32, dev)
    if loss is None and grad is None:
        raise ValueError(f"{fn}: at least one of loss and grad must be given")
    if loss is not None:
        _check_vector("loss", loss, rows, torch.float32, dev)
    if grad is not None:
        _check_rows_tensor("grad", grad, rows, cols, logits.dtype, dev)
        if grad.data_ptr() == logits.data_ptr() and grad.stride() != logits.stride():
            raise ValueError(f"{fn}: grad written in place over logits must have its strides")
    if scale is not None:
        if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32
                or tuple(scale.shape) not in ((), (rows,))):  # fmt: skip
            raise ValueError(f"{fn}: scale must be None or an fp32 tensor of shape () or "
                             f"({rows},)")  # fmt: skip
        if scale.device != dev:
            raise ValueError(f"{fn}: scale is on {scale.device}, logits on {dev}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, v, lo, hi in (("label_smoothing", label_smoothing, 0.0, 1.0),
                            ("softcap", softcap, 0.0, float("inf")),
                            ("z_loss", z_loss, 0.0, float("inf"))):  # fmt: skip
        if not (isinstance(v, (int, float)) and lo <= v <= hi and v != float("inf")):
            raise ValueError(f"{fn}: {name} must be a finite float in [{lo}, {hi}], got {v!r}")

    if rows == 0:
        return
    if cols == 0:
        # no class: every target is out of range, every row ignored (and grad has no element)
        if loss is not None:
            loss.zero_()
        return
    ph = _placeholder(dev)
    cfg = cross_entropy_config(cols, logits.dtype)
    # an ignore_index outside [0, cols) changes nothing (such targets are ignored anyway):
    # -1 keeps the argument an i32 whatever the caller's value
    ii = ignore_index if 0 <= ignore_index < cols else -1
    scale_stride = 0 if scale is None or scale.dim() == 0 or rows == 1 else scale.stride(0)
    if scale_stride >= 2**31:
        raise ValueError(f"{fn}: scale's stride must be below 2^31")

    def f32(v: float) -> float:
        # the fp32 value the kernel computes with (the contract's rounding to A, made here so
        # that the interpreter and the GPU see the same number)
        return float(torch.tensor(float(v), dtype=torch.float32))

    g = logits if grad is None else grad  # never written without write_grad
    _cross_entropy_fwd_kernel[(rows,)](
        logits,
        target,
        ph if weight is None else weight,
        ph if scale is None else scale,
        ph if loss is None else loss,
        g,
        logits.stride(0) if rows > 1 else cols,
        g.stride(0) if rows > 1 else cols,
        scale_stride,
        cols,
        ii,
        int(weight is not None),
        int(scale is not None),
        int(loss is not None),
        int(grad is not None),
        f32(label_smoothing),
        f32(softcap if softcap > 0 else 1.0),
        f32(z_loss),
        BLOCK=cfg.block,
        SOFTCAP=softcap > 0,
        num_warps=cfg.num_warps,
    )


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps) the launcher can pick
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _spec(t: str, cfg: CrossEntropyConfig, softcap: bool) -> dict:
    sig = {
        "x_ptr": f"*{t}",
        "target_ptr": "*i64",
        "weight_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "grad_ptr": f"*{t}",
        **dict.fromkeys(("x_stride", "grad_stride", "scale_stride", "cols", "ignore_index",
                         "has_weight", "has_scale", "write_loss", "write_grad"), "i32"),
        **dict.fromkeys(("eps", "softcap", "z_loss"), "fp32"),
        "BLOCK": "constexpr",
        "SOFTCAP": "constexpr",
    }  # fmt: skip
    return dict(
        kernel=_cross_entropy_fwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK=cfg.block, SOFTCAP=softcap),
        num_warps=cfg.num_warps,
        config=f"{t} {cfg}{' softcap' if softcap else ''}",
    )


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) cross_entropy_fwd can launch.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for the common case of 16-byte-aligned tensors and cols % 16 == 0
    (vectorised loads); the default gives the generic variants.
    """
    specs = [
        _spec(_TY[dtype], cfg, softcap)
        for dtype in _DTYPES
        for cfg in _all_configs(dtype)
        for softcap in (False, True)
    ]
    if aligned:
        aot.aligned_variants(specs)
        for spec in specs:  # the row strides are 16-divisible in that common case too
            spec["divisible_by_16"] += ("x_stride", "grad_stride")
    return specs
