# Triton softmax / log-softmax over the last dim of a row-major (rows, cols) view.
#
# Semantics: csrc/include/lmk/softmax.h (the contract shared by every backend).
#   forward   z_j = scale * x_j (+ float mask_j); z_j = -inf where masked out (bool mask, causal,
#             or past the row end); y = exp(z - max z) / sum exp(z - max z), or for log
#             y = z - max z - log sum; with a mask or causal a fully masked row gives y = 0
#             (log: -inf), never NaN; without them an all -inf row is NaN, as in torch.
#   backward  softmax:     dx = scale * y * (dy - sum(dy * y))
#             log_softmax: dx = scale * (dy - exp(y) * sum(dy))
# All arithmetic is fp32 (fp64 for fp64 data): loads are converted before any math, which is
# also what the interpreter needs (its bf16 arithmetic is wrong).
#
# Kernels, one program per row:
#   _softmax_fwd_kernel         the whole row is one register tile (cols <= SINGLE_TILE_MAX_COLS):
#                               read x once, write y once: 2 * rows * cols * itemsize bytes
#                               (+ the mask's bytes when present).
#   _softmax_fwd_looped_kernel  long rows: pass 1 streams the row in BLOCK chunks keeping a
#                               per-lane online (max, sum) pair, combined once at the end; pass 2
#                               re-reads x and writes y: 3 * rows * cols * itemsize bytes (the
#                               mask is read twice). With causal, both passes skip the loads of
#                               columns past the diagonal (pass 1 also stops its loop there).
#   _softmax_bwd_kernel         backward, whole row in registers: read y, dy; write dx.
#   _softmax_bwd_looped_kernel  backward for long rows: pass 1 reduces sum(dy*y) (or sum(dy)),
#                               pass 2 writes dx (pass 1 reads dy, and y for softmax).
#
# Limits and trade-offs:
#   * one program per row, so very short rows (cols < 32) leave most lanes idle;
#   * rows may hold up to 2^31 - 1 elements; rows * cols may exceed 2^31 (all offsets are int64);
#   * register use is bounded by the config heuristic (at most 16 elements per thread),
#     checked by the AOT report (aot_specs() + lmkernels.triton_kernels.aot.compile_report):
#     zero spills on sm_80 / sm_90 for every config the launchers can pick;
#   * the mask is read through an int64 per-row offset table, so any broadcast of a
#     (B, H, Q, K) mask over batch/head/query costs no copy; column stride is 0 or 1;
#   * bool masks are read as uint8 (a byte view, no copy); float masks are fp32 or x's dtype.
# The AOT report compiles the signatures without Triton's value specialisation (ints == 1,
# 16-byte divisibility); those specialised variants only remove instructions.
from __future__ import annotations

from itertools import product

import torch
import triton
import triton.language as tl

from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import RowConfig
from lmkernels.triton_kernels._common import cast_out as _cast_out

# Longest row served by the single-tile kernels; longer rows go to the looped kernels, which
# stream LOOPED_BLOCK elements per iteration. Both limits come from the AOT report: a 16384
# tile (32 elements/thread) spills with a float mask on sm_80, and so does a 4096-element
# looped chunk on 16 warps with a bool mask. Tests lower them to reach the looped path with
# small shapes in the interpreter.
SINGLE_TILE_MAX_COLS = 8192
LOOPED_BLOCK = 2048
MIN_BLOCK = 32


@triton.jit
def _load_z(
    x_row,  # pointer to x[row, 0]
    m_row,  # pointer to this row's mask row (see softmax_fwd), or None without mask
    mask_col_stride,  # 0 or 1
    q,  # query index of this row (causal), int64
    offs,  # int64 column indices of this chunk
    cols,
    scale,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # z = scale * x (+ float mask), -inf where masked out or past the row end.
    # fp64 data computes in fp64, everything else in fp32.
    ACC: tl.constexpr = tl.float64 if x_row.dtype.element_ty == tl.float64 else tl.float32
    valid = offs < cols
    if CAUSAL:
        valid = valid & (offs <= q)
    x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
    z = x * scale
    if HAS_MASK:
        m_offs = offs * mask_col_stride
        if MASK_IS_BOOL:
            mb = tl.load(m_row + m_offs, mask=valid, other=1)
            valid = valid & (mb == 0)
        else:
            mf = tl.load(m_row + m_offs, mask=valid, other=0.0).to(ACC)
            z = z + mf
    return tl.where(valid, z, -float("inf"))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # (rows, cols) input, fp32/fp16/bf16/fp64
    y_ptr,  # (rows, cols) output, x's dtype
    mask_ptr,  # mask storage: uint8 (bool, 1 = masked out) / fp32 / x's dtype; None without mask
    mask_off_ptr,  # (rows,) int64: element offset of each row's mask row; None without mask
    mask_col_stride,  # 0 (one mask value per row) or 1
    cols,
    causal_rows,  # row r is query r % causal_rows; column j masked when j > that
    scale,
    BLOCK: tl.constexpr,  # power of two >= cols
    LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * cols
    y_row = y_ptr + row * cols
    m_row = mask_ptr
    if HAS_MASK:
        m_row = mask_ptr + tl.load(mask_off_ptr + row)
    q = row
    if CAUSAL:
        q = row % causal_rows
    offs = tl.arange(0, BLOCK).to(tl.int64)
    z = _load_z(x_row, m_row, mask_col_stride, q, offs, cols, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL)
    m = tl.max(z, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp(z - m_safe)
    s = tl.sum(e, axis=0)
    # s >= 1 (the max contributes exp(0)) or NaN, except for a fully masked row: z == -inf
    # everywhere, e == 0, s == 0; there s = 1 makes y = 0 (softmax) and y = z = -inf (log).
    # Deciding this on s, not on m, keeps NaN rows NaN on the GPU, whose max ignores NaN.
    s_safe = tl.where(s == 0.0, 1.0, s)
    if not (HAS_MASK or CAUSAL):
        # no mask: an all -inf row is NaN, exactly as torch (-inf - -inf)
        s_safe = tl.where(m == -float("inf"), float("nan"), s_safe)
    if LOG:
        y = z - m_safe - tl.log(s_safe)
    else:
        y = e * (1.0 / s_safe)
    tl.store(y_row + offs, _cast_out(y, y_ptr.dtype.element_ty), mask=offs < cols)


@triton.jit
def _softmax_fwd_looped_kernel(
    x_ptr,  # (rows, cols) input, fp32/fp16/bf16/fp64
    y_ptr,  # (rows, cols) output, x's dtype
    mask_ptr,  # mask storage: uint8 (bool, 1 = masked out) / fp32 / x's dtype; None without mask
    mask_off_ptr,  # (rows,) int64: element offset of each row's mask row; None without mask
    mask_col_stride,  # 0 (one mask value per row) or 1
    cols,
    causal_rows,  # row r is query r % causal_rows; column j masked when j > that
    scale,
    BLOCK: tl.constexpr,  # chunk length, power of two
    LOG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # fp64 data accumulates in fp64, everything else in fp32
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * cols
    y_row = y_ptr + row * cols
    m_row = mask_ptr
    if HAS_MASK:
        m_row = mask_ptr + tl.load(mask_off_ptr + row)
    q = row
    n_live = tl.cast(cols, tl.int64)  # columns that can be unmasked
    if CAUSAL:
        q = row % causal_rows
        n_live = tl.minimum(n_live, q + 1)
    lanes = tl.arange(0, BLOCK).to(tl.int64)

    # pass 1: per-lane online max and rescaled sum
    m_vec = tl.full([BLOCK], -float("inf"), ACC)
    s_vec = tl.zeros([BLOCK], ACC)
    for start in range(0, n_live, BLOCK):
        offs = start + lanes
        z = _load_z(
            x_row, m_row, mask_col_stride, q, offs, cols, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL
        )
        m_new = tl.maximum(m_vec, z)
        m_new_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_new_safe) + tl.exp(z - m_new_safe)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_safe), axis=0)
    # fully masked row: s == 0 -> 1, so y = 0 (softmax) / -inf (log); see _softmax_fwd_kernel
    s_safe = tl.where(s == 0.0, 1.0, s)
    if not (HAS_MASK or CAUSAL):
        s_safe = tl.where(m == -float("inf"), float("nan"), s_safe)  # torch's NaN, see above
    inv = 1.0 / s_safe
    log_s = tl.log(s_safe)

    # pass 2: normalise and write
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        z = _load_z(
            x_row, m_row, mask_col_stride, q, offs, cols, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL
        )
        if LOG:
            y = z - m_safe - log_s
        else:
            y = tl.exp(z - m_safe) * inv
        tl.store(y_row + offs, _cast_out(y, y_ptr.dtype.element_ty), mask=offs < cols)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,  # (rows, cols) forward output, fp32/fp16/bf16/fp64
    dy_ptr,  # (rows, cols) gradient of y, y's dtype
    dx_ptr,  # (rows, cols) gradient of x (output), y's dtype
    cols,
    scale,
    BLOCK: tl.constexpr,  # power of two >= cols
    LOG: tl.constexpr,
):
    # fp64 data accumulates in fp64, everything else in fp32
    ACC: tl.constexpr = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < cols
    base = row * cols
    dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(ACC)
    if LOG:
        y = tl.load(y_ptr + base + offs, mask=valid, other=-float("inf")).to(ACC)
        dx = scale * (dy - tl.exp(y) * tl.sum(dy, axis=0))
    else:
        y = tl.load(y_ptr + base + offs, mask=valid, other=0.0).to(ACC)
        dx = scale * y * (dy - tl.sum(dy * y, axis=0))
    tl.store(dx_ptr + base + offs, _cast_out(dx, dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _softmax_bwd_looped_kernel(
    y_ptr,  # (rows, cols) forward output, fp32/fp16/bf16/fp64
    dy_ptr,  # (rows, cols) gradient of y, y's dtype
    dx_ptr,  # (rows, cols) gradient of x (output), y's dtype
    cols,
    scale,
    BLOCK: tl.constexpr,  # chunk length, power of two
    LOG: tl.constexpr,
):
    # fp64 data accumulates in fp64, everything else in fp32
    ACC: tl.constexpr = tl.float64 if y_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    base = row * cols
    # pass 1: per-lane partial sums of dy * y (softmax) or dy (log_softmax)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        valid = offs < cols
        dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(ACC)
        if LOG:
            acc += dy
        else:
            y = tl.load(y_ptr + base + offs, mask=valid, other=0.0).to(ACC)
            acc += dy * y
    total = tl.sum(acc, axis=0)
    # pass 2: write dx
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        valid = offs < cols
        dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(ACC)
        if LOG:
            y = tl.load(y_ptr + base + offs, mask=valid, other=-float("inf")).to(ACC)
            dx = scale * (dy - tl.exp(y) * total)
        else:
            y = tl.load(y_ptr + base + offs, mask=valid, other=0.0).to(ACC)
            dx = scale * y * (dy - total)
        tl.store(dx_ptr + base + offs, _cast_out(dx, dx_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


SoftmaxConfig = RowConfig


def _warps_for(block: int) -> int:
    # 8 elements per thread (one warp per 256 elements) up to 4096, then 16 warps (512 threads,
    # so at most 128 registers each): 8192 -> 16 elements per thread, the single-tile limit.
    return max(1, min(16, block // 256))


def softmax_config(cols: int, dtype: torch.dtype) -> SoftmaxConfig:
    """Launch config for rows of `cols` elements of `dtype` (shared by forward and backward)."""
    # dtype is part of the interface: fp64 needs twice the registers per element, and the
    # current limits leave room for it (see the AOT report)
    del dtype
    if cols <= SINGLE_TILE_MAX_COLS:
        block = max(MIN_BLOCK, triton.next_power_of_2(max(cols, 1)))
        return SoftmaxConfig(block, _warps_for(block), looped=False)
    return SoftmaxConfig(LOOPED_BLOCK, _warps_for(LOOPED_BLOCK), looped=True)


def _all_configs(dtype: torch.dtype) -> list[SoftmaxConfig]:
    # every config softmax_config can return for dtype
    out, block = [], MIN_BLOCK
    while block < SINGLE_TILE_MAX_COLS:
        out.append(softmax_config(block, dtype))
        block *= 2
    out.append(softmax_config(SINGLE_TILE_MAX_COLS, dtype))
    out.append(softmax_config(SINGLE_TILE_MAX_COLS + 1, dtype))
    return out


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def softmax_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    log: bool,
    mask: torch.Tensor | None,
    mask_row_offsets: torch.Tensor | None,
    mask_col_stride: int,
    causal: bool,
    causal_rows: int,
) -> None:
    """y = softmax(scale * x + mask) (or log_softmax) over the rows of x.

    x, y: (rows, cols) contiguous, fp32/fp16/bf16/fp64, same dtype and device; y is written.
    mask: None; a torch.bool tensor (True = masked out); or a float tensor (fp32 or x's dtype)
    added after scaling. Mask element (r, j) is the element at offset
    mask_row_offsets[r] + j * mask_col_stride from mask's first element (mask.data_ptr()), with
    mask_row_offsets an int64 tensor of length rows and mask_col_stride 0 or 1 (so any
    broadcast mask is served without a copy). causal: column j of row r is masked when
    j > r % causal_rows. With a mask or causal a fully masked row gives zeros; without them an
    all -inf row is NaN (torch). NaN propagates to its row. log=True only without mask/causal.
    """
    if log and (mask is not None or causal):
        # not part of the public API (softmax.h), so not in aot_specs() either
        raise ValueError("softmax_fwd: log=True is served without a mask and without causal")
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    cfg = softmax_config(cols, x.dtype)
    kernel = _softmax_fwd_looped_kernel if cfg.looped else _softmax_fwd_kernel
    has_mask = mask is not None
    is_bool = has_mask and mask.dtype == torch.bool
    if has_mask:
        mask_arg = mask.view(torch.uint8) if is_bool else mask
        off_arg = mask_row_offsets
    else:
        mask_arg, off_arg, mask_col_stride = None, None, 0
    kernel[(rows,)](
        x,
        y,
        mask_arg,
        off_arg,
        mask_col_stride,
        cols,
        max(int(causal_rows), 1),
        float(scale),
        BLOCK=cfg.block,
        LOG=bool(log),
        HAS_MASK=has_mask,
        MASK_IS_BOOL=is_bool,
        CAUSAL=bool(causal),
        num_warps=cfg.num_warps,
    )


def softmax_bwd(
    y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, scale: float, log: bool
) -> None:
    """dx from the forward output y and its gradient dy, all (rows, cols) contiguous, one dtype.

    softmax: dx = scale * y * (dy - sum(dy * y)); log_softmax: dx = scale * (dy - exp(y) * sum(dy)).
    """
    rows, cols = y.shape
    if rows == 0 or cols == 0:
        return
    cfg = softmax_config(cols, y.dtype)
    kernel = _softmax_bwd_looped_kernel if cfg.looped else _softmax_bwd_kernel
    kernel[(rows,)](
        y, dy, dx, cols, float(scale), BLOCK=cfg.block, LOG=bool(log), num_warps=cfg.num_warps
    )


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps) the launchers can pick
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_FLAGS = ("LOG", "HAS_MASK", "MASK_IS_BOOL", "CAUSAL")


def _fwd_spec(t: str, cfg: SoftmaxConfig, mask_ty: str | None, log: bool, causal: bool) -> dict:
    # mask_ty: None (no mask), "u8" (bool mask), "fp32" or t (float mask)
    has_mask = mask_ty is not None
    sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}"}
    sig["mask_ptr"] = f"*{mask_ty}" if has_mask else "constexpr"
    sig["mask_off_ptr"] = "*i64" if has_mask else "constexpr"
    sig.update(mask_col_stride="i32", cols="i32", causal_rows="i32", scale="fp32")
    sig.update(BLOCK="constexpr", **dict.fromkeys(_FLAGS, "constexpr"))
    const = dict(
        BLOCK=cfg.block, LOG=log, HAS_MASK=has_mask, MASK_IS_BOOL=mask_ty == "u8", CAUSAL=causal
    )
    if not has_mask:
        const.update(mask_ptr=None, mask_off_ptr=None)
    label = " ".join(
        filter(
            None,
            [
                t,
                str(cfg),
                "log" if log else "",
                f"mask:{mask_ty}" if has_mask else "",
                "causal" if causal else "",
            ],
        )
    )
    kernel = _softmax_fwd_looped_kernel if cfg.looped else _softmax_fwd_kernel
    return dict(
        kernel=kernel, signature=sig, constexprs=const, num_warps=cfg.num_warps, config=label
    )


def _bwd_spec(t: str, cfg: SoftmaxConfig, log: bool) -> dict:
    sig = {
        "y_ptr": f"*{t}",
        "dy_ptr": f"*{t}",
        "dx_ptr": f"*{t}",
        "cols": "i32",
        "scale": "fp32",
        "BLOCK": "constexpr",
        "LOG": "constexpr",
    }
    kernel = _softmax_bwd_looped_kernel if cfg.looped else _softmax_bwd_kernel
    return dict(
        kernel=kernel,
        signature=sig,
        constexprs=dict(BLOCK=cfg.block, LOG=log),
        num_warps=cfg.num_warps,
        config=f"{t} {cfg}{' log' if log else ''}",
    )


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) softmax_fwd / softmax_bwd can launch.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for the common case of 16-byte-aligned tensors and cols % 16 == 0
    (vectorised loads); the default gives the generic variants.
    """
    specs = []
    for dtype in _DTYPES:
        t = _TY[dtype]
        mask_tys = [None, "u8", "fp32"] + ([t] if t != "fp32" else [])
        for cfg in _all_configs(dtype):
            for mask_ty, causal in product(mask_tys, (False, True)):
                specs.append(_fwd_spec(t, cfg, mask_ty, False, causal))
            specs.append(_fwd_spec(t, cfg, None, True, False))  # log: never with mask/causal
            specs += [_bwd_spec(t, cfg, log) for log in (False, True)]
    return aot.aligned_variants(specs) if aligned else specs
