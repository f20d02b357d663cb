"""Conformance cases of attention (registered once, run on every backend).

scaled_dot_product_attention against torch's own function wherever torch gives a defined
answer: L != S, L or S = 1, odd lengths, head dims 16 to 256 and Ev != E, causal with L < S and
L > S, boolean and additive masks of several broadcast shapes, GQA and MQA groups, broadcast
heads, q/k/v as strided views of a fused QKV projection, a NaN-poisoned tail. Where torch gives
NaN (fully masked rows) or has no such option (sliding window, varlen) the torch function is
the same math written in torch ops (`torch_attention`): rows without keys give zeros. Dropout
cases pass a seed; their oracle applies the keep bits of lmk/philox.h
(`reference.attention_dropout_keep`) to the probabilities in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels import reference
from lmkernels.testing import Case, poison_tail, register


def _generator(drop_seed):
    return torch.Generator().manual_seed(drop_seed)


def dropout_factor(dropout_p, drop_seed, bh, rows, cols, dtype):
    """keep * inverse keep probability for the scores (bh, rows, cols) (int64 index tensors
    that broadcast), the key drawn as the functional API draws it from a seeded generator."""
    seed = int(LF._dropout_seed("test", _generator(drop_seed))) & (2**64 - 1)
    threshold = reference.dropout_threshold(dropout_p)
    keep = reference.attention_dropout_keep(seed, threshold, bh, rows, cols)
    return keep.to(dtype) * reference.dropout_scale(threshold)


def torch_attention(q, k, v, keep=None, scale=None, enable_gqa=False, drop=None):
    """softmax(scale * q k^T, masked by ``keep``) v in torch ops, rows without keys -> zeros;
    ``drop``: a factor of the probabilities (dropout)."""
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    empty = torch.isneginf(lse)
    p = torch.exp(torch.where(empty, torch.zeros_like(s), s - lse))
    p = torch.where(empty, torch.zeros_like(p), p)
    return torch.matmul(p if drop is None else p * drop, v)


def _band(lq, sk, left, right, offset, device):
    i = torch.arange(lq, device=device)[:, None] + offset
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(lq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def torch_sdpa_window(q, k, v, window, is_causal=False, enable_gqa=False):
    left, right = window
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    keep = _band(q.shape[-2], k.shape[-2], left, right, 0, q.device)
    return torch_attention(q, k, v, keep, enable_gqa=enable_gqa)


def sdpa_dropout(q, k, v, attn_mask=None, *, dropout_p, drop_seed, **kw):
    return LF.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
                                           generator=_generator(drop_seed), **kw)  # fmt: skip


def torch_sdpa_dropout(q, k, v, attn_mask=None, *, dropout_p, drop_seed, is_causal=False,
                       enable_gqa=False, window=(-1, -1)):  # fmt: skip
    """4-D (B, H, L, E) inputs; dropout bits of the (B, H, L, S) score grid."""
    b, h, lq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    left, right = window
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    keep = _band(lq, sk, left, right, 0, q.device)
    if attn_mask is not None:
        keep = keep & attn_mask
    bh = torch.arange(b * h, device=q.device).view(b, h, 1, 1)
    rows = torch.arange(lq, device=q.device).view(1, 1, lq, 1)
    cols = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
    drop = dropout_factor(dropout_p, drop_seed, bh, rows, cols, q.dtype)
    return torch_attention(q, k, v, keep, enable_gqa=enable_gqa, drop=drop)


def torch_sdpa_fp32_mask(q, k, v, attn_mask):
    """torch with an fp32 additive mask; for fp64 q the mask widened first (torch 2.13 gives
    wrong results for an fp32 mask on fp64 q when L != S: measured 2.4 off)."""
    if q.dtype == torch.float64:
        attn_mask = attn_mask.to(torch.float64)
    elif q.is_cuda and q.dtype != attn_mask.dtype:
        # torch's CUDA kernels refuse an fp32 mask on 16-bit q, which its CPU path (and every
        # lmkernels backend) takes: run torch on the CPU
        args = (t.cpu() for t in (q, k, v, attn_mask))
        return torch_sdpa_fp32_mask(*args).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def torch_sdpa_masked(q, k, v, attn_mask, enable_gqa=False):
    return torch_attention(q, k, v, attn_mask, enable_gqa=enable_gqa)


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window=None, dropout_p=0.0,
                 drop_seed=None):  # fmt: skip
    """Per sequence: bottom-right aligned causal / window, in torch ops; dropout bits of the
    packed positions."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1)
        ks, vs = k[ck[b] : ck[b + 1]].transpose(0, 1), v[ck[b] : ck[b + 1]].transpose(0, 1)
        lq, sk = qs.shape[1], ks.shape[1]
        keep = _band(lq, sk, left, right, sk - lq, q.device)
        drop = None
        if dropout_p > 0:
            bh = torch.arange(qs.shape[0], device=q.device).view(-1, 1, 1)
            rows = (cq[b] + torch.arange(lq, device=q.device)).view(1, -1, 1)
            cols = (ck[b] + torch.arange(sk, device=q.device)).view(1, 1, -1)
            drop = dropout_factor(dropout_p, drop_seed, bh, rows, cols, q.dtype)
        outs.append(torch_attention(qs, ks, vs, keep, enable_gqa=True,
                                    drop=drop).transpose(0, 1))  # fmt: skip
    return torch.cat(outs, 0)


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()


def _case(name, b, hq, hk, lq, sk, e, ev=None, *, torch_fn=F.scaled_dot_product_attention,
          mask=None, mask_shape=None, qkv_view=False, poison=False, small=True, backward=True,
          **kwargs):  # fmt: skip
    ev = e if ev is None else ev
    ours = LF.scaled_dot_product_attention
    if "dropout_p" in kwargs:
        ours, torch_fn = sdpa_dropout, torch_sdpa_dropout

    def make(dtype, device, gen):
        if qkv_view:  # views of a fused (b, l, 3, h, e) projection
            qkv = torch.randn(b, lq, 3, hq, e, generator=gen, device=device).to(dtype)
            q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
        else:
            q = _rand((b, hq, lq, e), dtype, device, gen)
            k = _rand((b, hk, sk, e), dtype, device, gen)
            v = _rand((b, hk, sk, ev), dtype, device, gen)
        if poison:
            q, k, v = (poison_tail(t) for t in (q, k, v))
        kw = dict(kwargs)
        args = (q, k, v)
        if mask == "bool":
            kw["attn_mask"] = torch.rand(mask_shape, generator=gen, device=device) > 0.3
        elif mask == "additive":  # positional: the oracle gets it in fp64 like q
            args += (torch.randn(mask_shape, generator=gen, device=device).to(dtype),)
        elif mask == "additive_fp32":  # torch takes fp32 masks for every query dtype
            kw["attn_mask"] = torch.randn(mask_shape, generator=gen, device=device)
        elif mask == "empty_rows":  # every other query row sees no key
            m = torch.rand(mask_shape, generator=gen, device=device) > 0.3
            m[..., ::2, :] = False
            kw["attn_mask"] = m
        return args, kw

    return Case("attention", name, make, ours, torch_fn, elementwise=False, small=small,
                backward=backward)  # fmt: skip


def varlen_dropout(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, drop_seed, **kw):
    return LF.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p,
                               generator=_generator(drop_seed), **kw)  # fmt: skip


def _varlen_case(name, lens_q, lens_k, hq, hk, e, ev=None, small=True, **kwargs):
    ev = e if ev is None else ev

    def make(dtype, device, gen):
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32,
                            device=device)  # fmt: skip
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32,
                            device=device)  # fmt: skip
        q = _rand((sum(lens_q), hq, e), dtype, device, gen)
        k = _rand((sum(lens_k), hk, e), dtype, device, gen)
        v = _rand((sum(lens_k), hk, ev), dtype, device, gen)
        return (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)), dict(kwargs)

    ours = varlen_dropout if "dropout_p" in kwargs else LF.varlen_attention
    return Case("varlen_attention", name, make, ours, torch_varlen, elementwise=False,
                small=small)  # fmt: skip


register(
    _case("basic", 2, 3, 3, 17, 17, 16),
    _case("l_ne_s", 1, 2, 2, 5, 33, 32),
    _case("l_1", 2, 2, 2, 1, 20, 16),
    # S = 1: dq is exactly 0 in exact arithmetic but not with D = rowsum(dO * O) from the
    # rounded O (the flash backward's definition, attention.h), so forward only; S = 2 checks
    # the backward
    _case("s_1", 1, 2, 2, 9, 1, 16, backward=False),
    _case("l_s_1", 1, 1, 1, 1, 1, 8, backward=False),
    _case("s_2", 1, 2, 2, 9, 2, 16),
    _case("odd_77", 1, 2, 2, 77, 77, 32),
    _case("odd_129_s_1000", 1, 1, 1, 129, 1000, 16, small=False),
    _case("l_1000", 1, 2, 2, 1000, 1000, 64, small=False, is_causal=True),
    _case("head_dim_64", 1, 2, 2, 33, 40, 64),
    _case("head_dim_80", 1, 2, 2, 17, 17, 80),
    _case("head_dim_96", 1, 1, 1, 17, 21, 96),
    _case("head_dim_128", 1, 2, 2, 17, 17, 128),
    _case("head_dim_256", 1, 1, 1, 9, 13, 256),
    _case("ev_ne_e", 2, 2, 2, 11, 13, 32, 48),
    _case("causal", 2, 2, 2, 33, 33, 16, is_causal=True),
    _case("causal_l_lt_s", 1, 2, 2, 9, 40, 16, is_causal=True),
    _case("causal_l_gt_s", 1, 2, 2, 40, 9, 16, is_causal=True),  # rows past S see all keys
    _case("bool_mask_ls", 2, 2, 2, 12, 19, 16, mask="bool", mask_shape=(12, 19)),
    _case("bool_mask_b11s", 2, 2, 2, 12, 19, 16, mask="bool", mask_shape=(2, 1, 1, 19)),
    _case("bool_mask_full", 2, 2, 2, 12, 19, 16, mask="bool", mask_shape=(2, 2, 12, 19)),
    _case("additive_mask_ls", 2, 2, 2, 12, 19, 16, mask="additive", mask_shape=(12, 19)),
    _case("additive_mask_1h1s", 2, 2, 2, 12, 19, 16, mask="additive", mask_shape=(1, 2, 1, 19)),
    _case(
        "additive_mask_fp32",
        1,
        2,
        2,
        12,
        19,
        16,
        mask="additive_fp32",
        mask_shape=(12, 19),
        torch_fn=torch_sdpa_fp32_mask,
    ),  # fmt: skip
    _case(
        "fully_masked_rows",
        2,
        2,
        2,
        12,
        19,
        16,
        mask="empty_rows",
        mask_shape=(2, 1, 12, 19),
        torch_fn=torch_sdpa_masked,
    ),  # fmt: skip
    _case("gqa_4_2", 2, 4, 2, 13, 17, 16, enable_gqa=True),
    _case("mqa_4_1", 1, 4, 1, 13, 17, 32, enable_gqa=True, is_causal=True),
    _case("gqa_mask", 1, 4, 2, 13, 17, 16, enable_gqa=True, mask="bool", mask_shape=(13, 17)),
    _case("broadcast_kv_heads", 2, 3, 1, 7, 9, 16),
    _case("fused_qkv_views", 2, 3, 3, 15, 15, 16, qkv_view=True, is_causal=True),
    _case("poisoned_tails", 1, 2, 2, 17, 23, 16, poison=True),
    _case("window", 1, 2, 2, 40, 40, 16, window=(5, 3), torch_fn=torch_sdpa_window),
    _case(
        "window_causal_gqa",
        1,
        4,
        2,
        33,
        33,
        16,
        window=(6, -1),
        is_causal=True,
        enable_gqa=True,
        torch_fn=torch_sdpa_window,
    ),  # fmt: skip
    _varlen_case("varlen", [5, 9, 3], [7, 9, 4], 2, 2, 16),
    _varlen_case("varlen_lengths_0_1", [0, 1, 6, 0], [3, 1, 8, 0], 4, 2, 16, causal=True),
    _varlen_case("varlen_causal_gqa", [9, 17], [17, 9], 4, 1, 32, causal=True),
    _varlen_case("varlen_window", [20, 13], [20, 16], 2, 2, 16, window=(4, 2)),
    _varlen_case("varlen_ev", [7, 3], [5, 8], 2, 2, 16, 24),
    _case(
        "additive_mask_fp32_ls_s",
        2,
        2,
        2,
        9,
        33,
        32,
        mask="additive_fp32",
        mask_shape=(2, 1, 9, 33),
        torch_fn=torch_sdpa_fp32_mask,
    ),  # fmt: skip
    _case("dropout", 2, 3, 3, 17, 19, 16, dropout_p=0.2, drop_seed=1),
    _case("dropout_odd_77_80", 1, 2, 2, 77, 70, 80, dropout_p=0.1, drop_seed=2),
    _case(
        "dropout_causal_gqa",
        1,
        4,
        2,
        33,
        40,
        32,
        dropout_p=0.3,
        drop_seed=3,
        is_causal=True,
        enable_gqa=True,
    ),  # fmt: skip
    _case(
        "dropout_bool_mask_window",
        2,
        2,
        2,
        24,
        24,
        16,
        dropout_p=0.5,
        drop_seed=4,
        mask="bool",
        mask_shape=(2, 1, 24, 24),
        window=(6, 2),
    ),  # fmt: skip
    _case("dropout_head_dim_128", 1, 2, 2, 19, 37, 128, dropout_p=0.25, drop_seed=5),
    _case("dropout_l_600", 1, 2, 2, 600, 600, 64, dropout_p=0.15, drop_seed=6, small=False),
    _varlen_case(
        "varlen_dropout", [5, 9, 0, 3], [7, 9, 2, 4], 2, 2, 16, dropout_p=0.3, drop_seed=7
    ),  # fmt: skip
    _varlen_case(
        "varlen_dropout_causal_gqa",
        [9, 17],
        [17, 9],
        4,
        2,
        32,
        causal=True,
        dropout_p=0.2,
        drop_seed=8,
    ),  # fmt: skip
)
