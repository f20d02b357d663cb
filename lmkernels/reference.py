"""Reference implementations: the math definition in plain PyTorch, upcast to fp32 (fp64 data
stays fp64). The ``reference`` backend, the conformance tests and the benchmarks all use these,
so the oracle and the baseline never drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(rows: int, cols: int, device: torch.device) -> Tensor:
    """Boolean (rows, cols) mask, True where column j > row i (top-left aligned)."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).triu(1)


def softmax_fwd(
    x: Tensor, dim: int, scale: float, log: bool, mask: Tensor | None, causal: bool
) -> Tensor:
    """softmax / log_softmax of ``scale * x (+ mask)`` along ``dim``, in fp32 (fp64 for fp64).

    With a mask or ``causal``, a row with no unmasked finite score gives zeros (not NaN);
    without them the result is exactly torch's (an all ``-inf`` row gives NaN).
    """
    z = x.to(_acc_dtype(x.dtype)) * scale
    masked = mask is not None or causal
    if mask is not None:
        if mask.dtype == torch.bool:
            z = z.masked_fill(mask, float("-inf"))
        else:
            z = z + mask.to(z.dtype)
    if causal:
        z = z.masked_fill(causal_mask(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    y = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    if masked:
        empty = (z == float("-inf")).all(dim, keepdim=True)
        y = y.masked_fill(empty, 0.0)
    return y.to(x.dtype)


def softmax_bwd(y: Tensor, dy: Tensor, dim: int, scale: float, log: bool) -> Tensor:
    """Gradient of :func:`softmax_fwd` with respect to ``x`` from its output ``y``."""
    acc = _acc_dtype(y.dtype)
    y32, dy32 = y.to(acc), dy.to(acc)
    if log:
        dx = dy32 - torch.exp(y32) * dy32.sum(dim, keepdim=True)
    else:
        dx = y32 * (dy32 - (dy32 * y32).sum(dim, keepdim=True))
    return (dx * scale).to(y.dtype)


def norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """layer_norm / rms_norm of each row of the 2-D ``x`` (plus ``residual``), as norm.h says.

    Returns ``(y, h, mean, rstd)``: ``h`` = ``x + residual`` rounded to the residual's dtype
    (empty without a residual), ``mean`` empty for rms; mean/rstd in the accumulation dtype.
    """
    acc = _acc_dtype(x.dtype)
    if residual is None:
        h, hs = x.new_empty(0), x.to(torch.float64)
    else:
        h = (x.to(acc) + residual.to(acc)).to(residual.dtype)
        hs = h.to(torch.float64)
    # Statistics and y in fp64 (more accurate than the contract's A, never less): fp32 sums
    # of rows with a large mean lose the digits of h - mean.
    if rms:
        mean = hs.new_empty(0)
        var = hs.pow(2).mean(-1)
        xhat = hs
    else:
        mean = hs.mean(-1)
        xhat = hs - mean[:, None]
        var = xhat.pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = xhat * rstd[:, None]
    if weight is not None:
        y = y * weight.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype), h, mean.to(acc), rstd.to(acc)


def norm_bwd(
    dy: Tensor,
    dh_out: Tensor | None,
    h: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dh, dw, db)`` of :func:`norm_fwd` from the saved ``h``, ``mean``, ``rstd``."""
    acc = rstd.dtype
    hs, dys = h.to(acc), dy.to(acc)
    xhat = (hs if rms else hs - mean[:, None]) * rstd[:, None]
    g = dys if weight is None else dys * weight.to(acc)
    c2 = (g * xhat).mean(-1, keepdim=True)
    c1 = 0 if rms else g.mean(-1, keepdim=True)
    dh = rstd[:, None] * (g - c1 - xhat * c2)
    if dh_out is not None:
        dh = dh + dh_out.to(acc)
    return dh.to(h.dtype), (dys * xhat).sum(0), dys.sum(0)


def check_indices(idx: Tensor, num_embeddings: int) -> None:
    """IndexError naming the first index outside [0, num_embeddings) (embedding.h's check)."""
    t = _first_bad(idx, num_embeddings)
    if t is not None:
        raise index_error(int(idx[t]), t, num_embeddings)


def index_error(value: int, t: int, num_embeddings: int) -> IndexError:
    """The error for the bad index ``value`` at flattened position ``t`` (every backend)."""
    return IndexError(
        f"index {value} (at position {t} of the flattened input) is out of range for "
        f"an embedding of {num_embeddings} rows"
    )


def _first_bad(idx: Tensor, limit: int) -> int | None:
    if limit > torch.iinfo(idx.dtype).max:  # (a wider limit would wrap in the comparison)
        bad = (idx < 0).nonzero()
    else:
        bad = ((idx < 0) | (idx >= limit)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def embedding_fwd(weight: Tensor, idx: Tensor) -> Tensor:
    """``weight[idx]`` for 1-D ``idx`` (checked first)."""
    check_indices(idx, weight.shape[0])
    return weight.index_select(0, idx.long())


def embedding_bwd(
    dy: Tensor,
    idx: Tensor,
    num_embeddings: int,
    padding_idx: int,
    scale_grad_by_freq: bool,
    grad_scale: float = 1.0,
) -> Tensor:
    """The gradient of :func:`embedding_fwd` for its table: the ``dy`` rows of each index summed
    in fp32 (fp64 for fp64) in index order (``index_add_``: in order on CPU), times the
    reciprocal of the index's count with ``scale_grad_by_freq`` (else ``grad_scale`` rounded to
    fp32), zero for ``padding_idx`` (>= 0) and for rows never looked up."""
    check_indices(idx, num_embeddings)
    idx = idx.long()
    acc = _acc_dtype(dy.dtype)
    dw = torch.zeros(num_embeddings, dy.shape[1], dtype=acc, device=dy.device)
    dw.index_add_(0, idx, dy.to(acc))
    if scale_grad_by_freq:  # times 1 / count, the reciprocal rounded to acc (embedding.h)
        counts = torch.bincount(idx, minlength=num_embeddings).clamp_(min=1)
        dw *= (1.0 / counts.to(torch.float64)).to(acc).unsqueeze(1)
    elif grad_scale != 1.0:
        dw *= torch.tensor(grad_scale, dtype=acc)
    if padding_idx >= 0:
        dw[padding_idx] = 0
    return dw.to(dy.dtype)


SINUSOID_POSITIONS = 2**31  # positions of the sinusoid lie in [0, 2^31) (embedding.h)


def sinusoid_inv_freq(dim: int, device: torch.device | str | None = None) -> Tensor:
    """``10000^(-2i / dim)`` for i < ceil(dim / 2) in fp64: the frequencies of the sinusoidal
    position encoding, computed here once so that every backend uses the same bits: always on
    the CPU (CUDA's fp64 pow differs in the last bit, which moves angles near 2^31 by an fp32
    ulp of the result), then moved to ``device``."""
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)
    return torch.pow(10000.0, -two_i / dim).to(device)


def sinusoid(pos: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """The sinusoidal encoding of 1-D ``pos`` as (len(pos), dim): sin(pos * f_i) in column 2i,
    cos(pos * f_i) in column 2i + 1, computed in fp64 and rounded once to ``dtype``."""
    angle = pos.to(torch.float64)[:, None] * sinusoid_inv_freq(dim, pos.device)
    pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[:, :dim]
    return pe.to(dtype)


def check_positions(pos: Tensor, pos_weight: Tensor | None) -> None:
    """IndexError naming the first position outside the learned table, or outside [0, 2^31)
    for the sinusoid."""
    t = _first_bad(pos, SINUSOID_POSITIONS if pos_weight is None else pos_weight.shape[0])
    if t is not None:
        raise position_error(int(pos[t]), t, pos_weight)


def position_error(value: int, t: int, pos_weight: Tensor | None) -> IndexError:
    """The error for the bad position ``value`` at flattened position ``t`` (every backend)."""
    where = (
        "the sinusoidal encoding's range [0, 2^31)"
        if pos_weight is None
        else f"a positional table of {pos_weight.shape[0]} rows"
    )
    return IndexError(
        f"position {value} (element {t} of the flattened positions) is out of range for {where}"
    )


def token_pos_fwd(tok_weight: Tensor, ids: Tensor, pos_weight: Tensor | None, pos: Tensor,
                  scale: float) -> Tensor:  # fmt: skip
    """``scale * tok_weight[ids] + P[pos]`` for 1-D ``ids`` and ``pos`` in fp32 (fp64 for fp64),
    rounded once; P is ``pos_weight`` or, when it is None, :func:`sinusoid` (exact in fp64,
    rounded to fp32). Indices are checked first (ids, then positions)."""
    check_indices(ids, tok_weight.shape[0])
    check_positions(pos, pos_weight)
    acc = _acc_dtype(tok_weight.dtype)
    e = tok_weight.index_select(0, ids.long()).to(acc)
    dim = tok_weight.shape[1]
    pe = sinusoid(pos, dim, acc) if pos_weight is None else pos_weight.index_select(0, pos.long())
    return (e * torch.tensor(scale, dtype=acc) + pe.to(acc)).to(tok_weight.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """NeoX / Hugging Face: ``cat(-x2, x1)`` of the two halves of the last dim."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_every_two(x: Tensor) -> Tensor:
    """GPT-J: ``(-x[2i + 1], x[2i])`` for each neighbouring pair of the last dim."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``x * cos + rot(x) * sin`` in fp32 (fp64 for fp64), rounded once to the promoted dtype of
    x, cos and sin; rot is :func:`rotate_every_two` if ``interleaved``, else
    :func:`rotate_half`. cos and sin broadcast to x."""
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    acc = _acc_dtype(out_dtype)
    x32, c32, s32 = x.to(acc), cos.to(acc), sin.to(acc)
    rot = rotate_every_two if interleaved else rotate_half
    return (x32 * c32 + rot(x32) * s32).to(out_dtype)


# ----------------------------------------------------------------------------------- attention


def attention_keep(lq: int, sk: int, window_left: int, window_right: int, bottom_right: bool,
                   device) -> Tensor | None:  # fmt: skip
    """Boolean (lq, sk): key j inside the window around query i's diagonal (attention.h), or
    None when both sides are unbounded."""
    if window_left < 0 and window_right < 0:
        return None
    i = torch.arange(lq, device=device)[:, None] + (sk - lq if bottom_right else 0)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(lq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        keep &= j >= i - window_left
    if window_right >= 0:
        keep &= j <= i + window_right
    return keep


def _attn_scores(q, k, mask, scale, keep):
    """Scores (B, Hq, L, S) in acc with the mask and window applied (-inf where excluded)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _attn_probs(s):
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(p), p)  # no key: zeros
    return p, lse


# ------------------------------------------------------------------ dropout RNG (lmk/philox.h)

_U32 = 0xFFFFFFFF


def _mulhilo32(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of the 64-bit product m * x for uint32 values held in int64 (the
    product is split in 16-bit halves so that nothing overflows int64)."""
    lo16 = m * (x & 0xFFFF)
    hi16 = m * (x >> 16)
    return (hi16 + (lo16 >> 16)) >> 16, (lo16 + ((hi16 & 0xFFFF) << 16)) & _U32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters (broadcast together) and a key:
    the four uint32 outputs as int64 tensors, bit for bit those of lmk/philox.h."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of dropout probability p (lmk/philox.h): round(p * 2^32), at most
    2^32 - 1; 0 keeps everything."""
    return min(round(float(p) * 2.0**32), _U32)


def dropout_scale(threshold: int) -> float:
    """The factor of the kept scores: 2^32 / (2^32 - threshold), the inverse keep probability."""
    return 2.0**32 / (2.0**32 - threshold)


def attention_dropout_keep(seed: int, threshold: int, bh: Tensor, rows: Tensor,
                           cols: Tensor) -> Tensor:  # fmt: skip
    """Boolean keep bits of the scores (bh, i, j) for int64 index tensors that broadcast
    together (bh = b * Hq + h of the op's view, i and j its query and key positions)."""
    lanes = philox4x32_10(cols >> 2, rows, bh, torch.zeros_like(cols), seed & _U32,
                          (seed >> 32) & _U32)  # fmt: skip
    lane = (cols & 3).expand(lanes[0].shape)
    r = torch.where(lane == 0, lanes[0], lanes[1])
    r = torch.where(lane == 2, lanes[2], r)
    r = torch.where(lane == 3, lanes[3], r)
    return r >= threshold


def _dropout_factor(seg, hq: int, lq: int, sk: int, threshold: int, seed: int, acc, device):
    """Z = keep * drop_scale (1, Hq, lq, sk) of one segment, or None without dropout."""
    if threshold == 0:
        return None
    b, r0, c0 = seg
    bh = (b * hq + torch.arange(hq, device=device)).view(1, hq, 1, 1)
    rows = (r0 + torch.arange(lq, device=device)).view(1, 1, lq, 1)
    cols = (c0 + torch.arange(sk, device=device)).view(1, 1, 1, sk)
    keep = attention_dropout_keep(seed, threshold, bh, rows, cols)
    return keep.to(acc) * dropout_scale(threshold)


def _segments(q, cu_q, cu_k):
    """(b, q rows, k rows, (b, first row, first key)) per sequence: the dense batch, or the
    varlen pieces of batch 0 (their positions in the packed view for the dropout RNG)."""
    if cu_q is None:
        return [(b, slice(None), slice(None), (b, 0, 0)) for b in range(q.shape[0])]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(0, slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1]), (0, cq[i], ck[i]))
            for i in range(len(cq) - 1)]  # fmt: skip


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                  window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
                  cu_q: Tensor | None = None, cu_k: Tensor | None = None, *,
                  drop_threshold: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """attention.h's forward: ``(out, lse)`` for 4-D (B, H, L, E) views (varlen: (1, H, total,
    E) with cu_q / cu_k), scores in fp32 (fp64 for fp64), the L x S matrix materialised;
    dropout by the lmk/philox.h keep bits when ``drop_threshold`` > 0."""
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    for b, rq, rk, seg in _segments(q, cu_q, cu_k):
        qs, ks, vs = q[b : b + 1, :, rq].to(acc), k[b : b + 1, :, rk].to(acc), v[b : b + 1, :, rk]
        lq, sk = qs.shape[2], ks.shape[2]
        if lq == 0:
            continue
        m = None if mask is None else mask[b : b + 1]
        keep = attention_keep(lq, sk, window_left, window_right, bottom_right, q.device)
        s = _attn_scores(qs, ks, m, scale, keep)
        p, ls = _attn_probs(s)
        z = _dropout_factor(seg, q.shape[1], lq, sk, drop_threshold, seed, acc, q.device)
        if z is not None:
            p = p * z
        group = q.shape[1] // k.shape[1]
        vv = vs.to(acc).repeat_interleave(group, dim=1) if group > 1 else vs.to(acc)
        out[b : b + 1, :, rq] = torch.matmul(p, vv).to(q.dtype)
        lse[b : b + 1, :, rq] = ls
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask: Tensor | None, scale: float, window_left: int = -1,
                  window_right: int = -1, bottom_right: bool = False, cu_q: Tensor | None = None,
                  cu_k: Tensor | None = None, *, drop_threshold: int = 0,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """attention.h's backward: ``(dq, dk, dv)`` from the forward's ``out`` and ``lse``."""
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    group = q.shape[1] // k.shape[1]
    hk = k.shape[1]
    for b, rq, rk, seg in _segments(q, cu_q, cu_k):
        qs, ks, vs = (t[b : b + 1, :, r].to(acc) for t, r in ((q, rq), (k, rk), (v, rk)))
        lq, sk = qs.shape[2], ks.shape[2]
        if lq == 0 or sk == 0:
            continue
        m = None if mask is None else mask[b : b + 1]
        keep = attention_keep(lq, sk, window_left, window_right, bottom_right, q.device)
        s = _attn_scores(qs, ks, m, scale, keep)
        ls = lse[b : b + 1, :, rq].to(acc)
        p = torch.exp(s - ls[..., None])
        p = torch.where(torch.isneginf(ls)[..., None], torch.zeros_like(p), p)
        do = dout[b : b + 1, :, rq].to(acc)
        d = (do * out[b : b + 1, :, rq].to(acc)).sum(-1, keepdim=True)
        vv = vs.repeat_interleave(group, dim=1) if group > 1 else vs
        kk = ks.repeat_interleave(group, dim=1) if group > 1 else ks
        dp = torch.matmul(do, vv.transpose(-1, -2))
        pz = p
        z = _dropout_factor(seg, q.shape[1], lq, sk, drop_threshold, seed, acc, q.device)
        if z is not None:
            dp, pz = dp * z, p * z
        ds = p * (dp - d)
        dq[b : b + 1, :, rq] = scale * torch.matmul(ds, kk)
        dkh = scale * torch.matmul(ds.transpose(-1, -2), qs)  # (1, Hq, S, E)
        dvh = torch.matmul(pz.transpose(-1, -2), do)
        dk[b : b + 1, :, rk] = dkh.view(1, hk, group, sk, -1).sum(2)
        dv[b : b + 1, :, rk] = dvh.view(1, hk, group, sk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    scale: Tensor | None,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss (accumulator dtype) and, with ``want_grad``, the gradient of
    ``scale[r] * loss[r]`` (the data type) of 2-D ``logits`` (rows, cols): the contract of
    csrc/include/lmk/cross_entropy.h. ``scale``: (rows,) or () in the accumulator dtype, or None
    (1). A target outside [0, cols) counts as ignored."""
    acc = _acc_dtype(logits.dtype)
    rows, cols = logits.shape
    x = logits.to(acc)
    cap = torch.tensor(softcap, dtype=acc).item()
    z = cap * torch.tanh(x / cap) if softcap > 0 else x
    t = target.long()
    valid = (t != ignore_index) & (t >= 0) & (t < cols)
    tc = torch.where(valid, t, 0)
    w = torch.ones(cols, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    eps = torch.tensor(label_smoothing, dtype=acc)
    zl = torch.tensor(z_loss, dtype=acc)
    # max-shifted by hand: torch.logsumexp special-cases an infinite max, where the contract
    # (and torch's log_softmax) gives NaN
    m = (z.amax(1, keepdim=True) if cols
         else torch.full((rows, 1), -torch.inf, dtype=acc, device=x.device))  # fmt: skip
    lse = (m + torch.log(torch.exp(z - m).sum(1, keepdim=True)))[:, 0]
    wt = w[tc] if cols else torch.zeros(rows, dtype=acc, device=x.device)
    zt = z.gather(1, tc[:, None])[:, 0] if cols else torch.zeros_like(wt)
    big_w, s = w.sum(), (z * w).sum(1)
    loss = (1 - eps) * wt * (lse - zt) + zl * lse * lse
    if label_smoothing != 0:  # (omitted at 0: a -inf logit would make it 0 * inf)
        loss = loss + eps / max(cols, 1) * (big_w * lse - s)
    loss = torch.where(valid, loss, torch.zeros((), dtype=acc))
    if not want_grad:
        return loss, None
    p = torch.exp(z - lse[:, None])
    coef = (1 - eps) * wt + eps * big_w / cols + 2 * zl * lse
    g = p * coef[:, None] - eps * w / cols
    pt = p.gather(1, tc[:, None])[:, 0]  # the target: its terms apart (see the contract)
    gt = (1 - eps) * wt * (pt - 1) + eps / cols * (big_w * pt - wt) + 2 * zl * lse * pt
    g.scatter_(1, tc[:, None], gt[:, None])
    if softcap > 0:
        g = g * (1 - (z / cap) ** 2)
    if scale is not None:
        g = g * (scale.to(acc)[:, None] if scale.dim() else scale.to(acc))
    g = torch.where(valid[:, None], g, torch.zeros((), dtype=acc))
    return loss, g.to(logits.dtype)
