"""The Triton attention launchers (lmkernels.triton_kernels.attention) called directly, as the
ops layer calls them: forward (out, lse) and backward (dq, dk, dv) against reference.attention_*
on fp64 copies (the oracle). fp32 must match to 1e-5 of the largest oracle value; fp16 / bf16
follow lmkernels.testing's 2x rule against torch's own attention in that dtype (matmul and
softmax in fp16 / bf16, the same mask). Shapes cover L != S, L or S = 1, odd lengths, head dims
16, 20, 40, 80, 96 / 192 and Ev != E, causal (top-left and bottom-right, L < S and L > S), a
window, bool and additive masks (of T, and fp32 on fp16 / bf16 data) with broadcast strides,
fully masked rows (zeros, lse -inf, zero gradients), GQA, dropout (the kernels' Philox against
the reference's bits; forward and backward with the reference's keep bits, dense and packed;
seeds), packed variable-length batches with empty and one-token sequences, NaN rows,
non-contiguous and unaligned tensors (the padded-copy path, bitwise equal to the direct one),
determinism, the launchers' ValueErrors, and that aot_specs() lists every launch.

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1): most cases run with small tiles (SMALL_TILES) so
that a 40-key sequence spans several blocks (skipped, edge and interior ones); a few run with the
module's own tiles.
"""

import dataclasses

import launch_recorder
import pytest
import torch
import triton
import triton.language as tl
from launch_recorder import Recorder, kernel_name, spec_key, spec_keys

from conftest import device_for
from lmkernels import reference
from lmkernels.backends import availability
from lmkernels.ops.attention import AttnOptions
from lmkernels.testing import max_err

_REASON = availability("triton", device_for("triton"))
if _REASON is not None:
    pytest.skip(f"triton unavailable: {_REASON}", allow_module_level=True)

from lmkernels.triton_kernels import attention as A  # noqa: E402

DEV = device_for("triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DT_IDS = ("fp32", "fp16", "bf16")
SENTINEL = 1234.0


@pytest.fixture
def small_tiles(monkeypatch):
    """16 / 32-row tiles for every kernel, so short sequences span several blocks."""
    tiles = {}
    for key in A._TILES:
        tiles[key] = {"fwd": (16, 32, 4), "dkdv": (16, 32, 4), "dq": (32, 16, 4)}[key[0]]
    monkeypatch.setattr(A, "_TILES", tiles)
    monkeypatch.setattr(A, "_DROPOUT_TILES", {})


# ------------------------------------------------------------------------------------ helpers


def _blhd(b, h, n, d, dtype, fill=None):
    """A (b, h, n, d) view of (b, n, h, d) memory, as the ops layer allocates outputs."""
    t = torch.empty(b, n, h, d, dtype=dtype, device=DEV).transpose(1, 2)
    if fill is not None:
        t.fill_(fill)
    return t


def _make(b, hq, hk, length, s, e, ev, dtype, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEV)

    return rnd(b, hq, length, e), rnd(b, hk, s, e), rnd(b, hk, s, ev)


def _opts(e, cu_q=None, cu_k=None, **kw):
    return AttnOptions(scale=e**-0.5, cu_q=cu_q, cu_k=cu_k, **kw)


def _ours_fwd(q, k, v, mask, opts, arch=None):
    b, hq, length, _ = q.shape
    out = _blhd(b, hq, length, v.shape[-1], q.dtype, SENTINEL)
    lse = torch.full((b, hq, length), SENTINEL, device=DEV)
    A.attention_fwd(q, k, v, mask, out, lse, opts, arch=arch)
    return out, lse


def _ours_bwd(dout, q, k, v, out, lse, mask, opts, arch=None):
    dq = _blhd(*q.shape, q.dtype, SENTINEL)
    dk = _blhd(*k.shape, k.dtype, SENTINEL)
    dv = _blhd(*v.shape, v.dtype, SENTINEL)
    A.attention_bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, opts, arch=arch)
    return dq, dk, dv


def _ref_args(opts):
    return (opts.scale, opts.window_left, opts.window_right, opts.bottom_right, opts.cu_q,
            opts.cu_k)  # fmt: skip


def _drop_kw(opts):
    return dict(drop_threshold=opts.drop_threshold, seed=opts.seed)


def _oracle(q, k, v, mask, dout, opts):
    """reference forward and backward on fp64 copies."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out, lse = reference.attention_fwd(q64, k64, v64, m64, *_ref_args(opts), **_drop_kw(opts))
    grads = reference.attention_bwd(do64, q64, k64, v64, out, lse, m64, *_ref_args(opts),
                                    **_drop_kw(opts))  # fmt: skip
    return out, lse, grads


def _torch_math(q, k, v, mask, dout, opts):
    """torch's own attention in q's dtype (matmul, softmax, matmul; rows without keys give
    zeros; an fp32 mask on 16-bit data promotes the scores and softmax to fp32, as torch does;
    dropout multiplies the probabilities by the reference's keep * scale in q's dtype) with
    autograd: the baseline of the 2x rule."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs = []
    for b, rq, rk, seg in reference._segments(q, opts.cu_q, opts.cu_k):
        qs, ks, vs = q[b : b + 1, :, rq], k[b : b + 1, :, rk], v[b : b + 1, :, rk]
        ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        s = torch.matmul(qs, ks.transpose(-1, -2)) * opts.scale
        if mask is not None:
            m = mask[b : b + 1]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        keep = reference.attention_keep(s.shape[2], s.shape[3], opts.window_left,
                                        opts.window_right, opts.bottom_right, DEV)  # fmt: skip
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        p = s
        if s.shape[-1]:  # rows without keys: zeros (their scores replaced first: no NaN grads)
            empty = torch.isneginf(s).all(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
        z = reference._dropout_factor(seg, q.shape[1], s.shape[2], s.shape[3],
                                      opts.drop_threshold, opts.seed, q.dtype, DEV)  # fmt: skip
        p = p.to(q.dtype) if z is None else p.to(q.dtype) * z
        outs.append((b, rq, torch.matmul(p, vs)))
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=DEV)
    for b, rq, o in outs:
        out[b : b + 1, :, rq] = o
    grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v), strict=True)]
    return out.detach(), grads


def _absmax(*ts) -> float:
    vals = [float(t[torch.isfinite(t)].abs().max()) for t in ts if torch.isfinite(t).any()]
    return max(vals, default=0.0)


def _assert_close(ours, oracle, bases, dtype, what, scale):
    """max |ours - oracle| <= 2 * (the larger error of the baselines: torch's own attention in
    dtype, the fp32 reference) + 1e-5 (fp32) or 1 ulp (fp16 / bf16) of scale (max |oracle|; for
    a gradient the largest of dq, dk, dv: with S = 1, dq and dk cancel to rounding noise): the 2x
    rule of lmkernels.testing. NaN / Inf patterns must match exactly."""
    err = max_err(ours, oracle, what)
    base = max(max_err(b, oracle, f"{what} (baseline)") for b in bases)
    rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    bound = 2 * base + rel * scale
    assert err <= bound, (
        f"{what}: max error {err:.3g} > {bound:.3g} (baseline {base:.3g}, scale {scale:.3g})"
    )


def _check(q, k, v, mask, opts, what, gen):
    """Forward and backward of ours against the oracle; returns ours (out, lse, grads)."""
    dtype = q.dtype
    out, lse = _ours_fwd(q, k, v, mask, opts)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEV)
    r_out, r_lse, r_grads = _oracle(q, k, v, mask, dout, opts)
    t_out, t_grads = _torch_math(q, k, v, mask, dout, opts)
    f_out, f_lse = reference.attention_fwd(q, k, v, mask, *_ref_args(opts), **_drop_kw(opts))
    f_grads = reference.attention_bwd(dout, q, k, v, f_out, f_lse, mask, *_ref_args(opts),
                                      **_drop_kw(opts))  # fmt: skip
    _assert_close(out, r_out, (t_out, f_out), dtype, what + " out", _absmax(r_out))
    # lse is fp32 for every T: within fp32 noise of the fp64 one (rows without keys: -inf)
    err = max_err(lse, r_lse, what + " lse")
    finite = r_lse[torch.isfinite(r_lse)]
    assert err <= 1e-5 * max(1.0, float(finite.abs().max()) if finite.numel() else 0.0), what
    grads = _ours_bwd(dout, q, k, v, out, lse, mask, opts)
    for name, g, r, tg, fg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads, f_grads,
                                  strict=True):  # fmt: skip
        assert g.dtype == dtype and g.shape == r.shape, name
        _assert_close(g, r, (tg, fg), dtype, f"{what} {name}", _absmax(*r_grads))
    return out, lse, grads


# (B, Hq, Hk, L, S, E, Ev, options, mask): mask None, "bool" (broadcast over batch and heads,
# with fully masked rows and columns) or "add" (broadcast over heads, -inf entries and finite
# biases, fully masked rows)
CASES = {
    "plain": (2, 2, 2, 17, 33, 16, 16, {}, None),
    "l_gt_s_gqa2_e40": (1, 2, 1, 33, 17, 40, 24, {}, None),
    "l1": (1, 2, 2, 1, 33, 16, 16, {}, None),
    "s1": (1, 2, 2, 17, 1, 16, 16, {}, None),
    "causal_l_lt_s": (1, 2, 2, 17, 40, 16, 16, {"window_right": 0}, None),
    "causal_l_gt_s": (1, 2, 2, 40, 17, 16, 8, {"window_right": 0}, None),
    "causal_br_l_lt_s": (
        1,
        2,
        2,
        17,
        40,
        16,
        16,
        {"window_right": 0, "bottom_right": True},
        None,
    ),  # fmt: skip
    "causal_br_l_gt_s": (
        1,
        2,
        2,
        40,
        17,
        16,
        16,
        {"window_right": 0, "bottom_right": True},
        None,
    ),  # fmt: skip
    "window_e80": (1, 2, 2, 33, 40, 80, 80, {"window_left": 5, "window_right": 3}, None),
    "window_br_left_only": (
        1,
        2,
        1,
        40,
        33,
        16,
        16,
        {"window_left": 7, "bottom_right": True},
        None,
    ),  # fmt: skip
    "bool_mask": (2, 2, 1, 17, 40, 16, 16, {}, "bool"),
    "add_mask_causal": (2, 4, 2, 33, 17, 16, 16, {"window_right": 0}, "add"),
    "gqa4_e20_ev5": (1, 4, 1, 33, 40, 20, 5, {"window_right": 0}, None),
    "e96_ev192": (1, 2, 2, 17, 20, 96, 192, {"window_right": 2}, "bool"),
    "add32_mask_window": (2, 2, 1, 17, 40, 16, 16, {"window_left": 9}, "add32"),
}


def _mask(kind, b, hq, length, s, dtype, gen):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(1, 1, length, s, generator=gen) > 0.3
        m[0, 0, 1] = False  # a fully masked row
        m[0, 0, :, 2] = False  # a key nobody sees
        return m.to(DEV).expand(b, hq, length, s)
    m = torch.randn(b, 1, length, s, generator=gen) * 2
    if kind == "add32":  # fp32 values that fp16 / bf16 cannot hold: the kernels must not round
        m += 300.0
        dtype = torch.float32
    m[torch.rand(b, 1, length, s, generator=gen) > 0.7] = float("-inf")
    m[:, :, 3] = float("-inf")  # fully masked rows
    return m.to(dtype).to(DEV).expand(b, hq, length, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, small_tiles):
    b, hq, hk, length, s, e, ev, kw, mask_kind = CASES[case]
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    q, k, v = _make(b, hq, hk, length, s, e, ev, dtype, gen)
    mask = _mask(mask_kind, b, hq, length, s, dtype, gen)
    out, lse, (dq, dk, dv) = _check(q, k, v, mask, _opts(e, **kw), f"{case} {dtype}", gen)
    if case == "causal_br_l_gt_s":  # the first L - S rows see no key
        assert torch.all(out[:, :, : length - s] == 0) and torch.all(dq[:, :, : length - s] == 0)
        assert torch.all(torch.isneginf(lse[:, :, : length - s]))
    if mask_kind == "bool":
        assert torch.all(out[:, :, 1] == 0) and torch.all(torch.isneginf(lse[:, :, 1]))
        assert torch.all(dq[:, :, 1] == 0)
        if kw.get("window_right") is None:
            assert torch.all(dk[:, :, 2] == 0) and torch.all(dv[:, :, 2] == 0)
    if mask_kind in ("add", "add32"):
        assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
        assert torch.all(dq[:, :, 3] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("e", [16, 80, 192])
def test_module_tiles(e, dtype):
    """The module's own configs (one block of 32..128 rows here) for the three head buckets."""
    gen = torch.Generator().manual_seed(e)
    q, k, v = _make(2, 2, 1, 33, 40, e, e, dtype, gen)
    _check(q, k, v, None, _opts(e, window_right=0, bottom_right=True), f"e{e} {dtype}", gen)


VARLEN = {  # (query lengths, key lengths, options)
    "plain": ([0, 1, 17, 5, 0, 23], [3, 1, 20, 0, 0, 37], {}),
    "causal_br": ([4, 1, 17, 0, 23], [9, 0, 20, 2, 37], {"window_right": 0, "bottom_right": True}),
    "window": ([1, 17, 23], [1, 20, 37], {"window_left": 3, "window_right": 5}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen(case, dtype, small_tiles):
    lq, lk, kw = VARLEN[case]
    gen = torch.Generator().manual_seed(7)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32).to(DEV)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32).to(DEV)
    q, k, v = _make(1, 4, 2, sum(lq), sum(lk), 16, 24, dtype, gen)
    max_q = max(lq) if case != "window" else 0  # 0: the launcher bounds the grid by the total
    opts = _opts(16, cu_q, cu_k, max_q=max_q, max_k=max(lk), **kw)
    out, lse, (dq, dk, dv) = _check(q, k, v, None, opts, f"varlen {case} {dtype}", gen)
    if case == "plain":  # sequence 3 has 5 queries and no key
        rows = slice(18, 23)
        assert torch.all(out[:, :, rows] == 0) and torch.all(torch.isneginf(lse[:, :, rows]))
        assert torch.all(dq[:, :, rows] == 0)


# ------------------------------------------------------------------------------------ dropout


@triton.jit
def _philox_kernel(c_ptr, out_ptr, seed_lo, seed_hi, N: tl.constexpr):
    o = tl.arange(0, N) * 4
    c0 = tl.load(c_ptr + o).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + o + 1).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + o + 2).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + o + 3).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = A._philox4x32_10(c0, c1, c2, c3, A._u32(seed_lo), A._u32(seed_hi))
    tl.store(out_ptr + o, x0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + o + 1, x1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + o + 2, x2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + o + 3, x3.to(tl.int32, bitcast=True))


@triton.jit
def _keep_kernel(out_ptr, seed_lo, seed_hi, thr, bh, r0, c0, BM: tl.constexpr, BN: tl.constexpr):
    keep = A._drop_keep(seed_lo, seed_hi, thr, bh, r0 + tl.arange(0, BM), c0, BN, False)
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], keep.to(tl.int8))


SEEDS = (0, 1, 2**63 + 5, 2**64 - 1, 0x0123456789ABCDEF)


def _i32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 values -> int32 tensor with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_matches_reference(seed):
    """The kernels' Philox4x32-10 gives reference.philox4x32_10's bits, for counters across
    the whole uint32 range (0, 2^31 - 1, 2^31, 2^32 - 1 and random ones) and 64-bit keys."""
    gen = torch.Generator().manual_seed(seed & 0xFFFF)
    c = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64)
    c[0], c[1] = 0, 2**32 - 1
    c[2] = torch.tensor([2**31, 2**31 - 1, 2**31 + 1, 1])
    out = torch.empty(64, 4, dtype=torch.int32, device=DEV)
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    _philox_kernel[(1,)](_i32_bits(c).to(DEV), out, A._i32(lo), A._i32(hi), N=64)
    ref = torch.stack(reference.philox4x32_10(*c.unbind(1), lo, hi), 1)
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("seed", SEEDS[2:])
@pytest.mark.parametrize("where", [(0, 0, 0), (2**31 - 40, 2**31 - 70, 2**31 - 1), (5, 3, 77)])
def test_dropout_keep_bits(seed, where):
    """_drop_keep's (rows x keys) tile is reference.attention_dropout_keep's, key groups not
    aligned to 4 and positions near 2^31 included; thresholds 1 (keeps all but the zeros) and
    2^32 - 1 (drops all but the maxima) too."""
    r0, c0, bh = where
    for p, thr in ((0.3, reference.dropout_threshold(0.3)), (0, 1), (1, 2**32 - 1)):
        out = torch.empty(16, 32, dtype=torch.int8, device=DEV)
        _keep_kernel[(1,)](out, A._i32(seed & 0xFFFFFFFF), A._i32(seed >> 32), A._i32(thr), bh,
                           r0, c0, BM=16, BN=32)  # fmt: skip
        ref = reference.attention_dropout_keep(
            seed, thr, torch.tensor(bh), torch.arange(r0, r0 + 16)[:, None],
            torch.arange(c0, c0 + 32)[None, :])  # fmt: skip
        assert torch.equal(out.cpu().bool(), ref), (p, thr)


# (B, Hq, Hk, L, S, E, Ev, options, mask, seed)
DROPOUT_CASES = {
    "causal_gqa": (2, 4, 2, 17, 77, 16, 16, {"window_right": 0}, None, 2**63 + 5),
    "window_e80": (1, 2, 2, 17, 77, 80, 80, {"window_left": 5, "window_right": 3}, None, 0),
    "bool_causal_br": (2, 2, 1, 33, 17, 16, 24,
                       {"window_right": 0, "bottom_right": True}, "bool", 2**64 - 1),
    "add_mask": (1, 2, 2, 17, 40, 16, 16, {}, "add", 12345),
    "add32_mask": (2, 2, 1, 17, 40, 16, 16, {"window_left": 9}, "add32", 2**40 + 3),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_matches_reference(case, dtype, small_tiles):
    """Forward and backward with dropout p = 0.3 against the reference's (the same keep bits):
    fp32 to 1e-5, fp16 / bf16 by the 2x rule."""
    b, hq, hk, length, s, e, ev, kw, mask_kind, seed = DROPOUT_CASES[case]
    gen = torch.Generator().manual_seed(100 + list(DROPOUT_CASES).index(case))
    q, k, v = _make(b, hq, hk, length, s, e, ev, dtype, gen)
    mask = _mask(mask_kind, b, hq, length, s, dtype, gen)
    opts = _opts(e, dropout_p=0.3, seed=seed, **kw)
    _check(q, k, v, mask, opts, f"dropout {case} {dtype}", gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dropout_varlen(dtype, small_tiles):
    """Packed sequences: the keep bits of packed positions (i = cu_q[seq] + row, j = cu_k[seq] +
    key, b = 0), sequences starting off a multiple of 4."""
    lq, lk = [3, 1, 17, 0, 23], [9, 0, 21, 2, 37]
    gen = torch.Generator().manual_seed(11)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32).to(DEV)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32).to(DEV)
    q, k, v = _make(1, 4, 2, sum(lq), sum(lk), 16, 24, dtype, gen)
    opts = _opts(16, cu_q, cu_k, max_q=max(lq), max_k=max(lk), window_right=0,
                 bottom_right=True, dropout_p=0.2, seed=2**63 + 5)  # fmt: skip
    _check(q, k, v, None, opts, f"dropout varlen {dtype}", gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dropout_seed(dtype, small_tiles):
    """The same seed gives the same bits (forward and backward), another seed other ones, and
    dropout changes the result (p = 0.5)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = _make(1, 2, 2, 17, 40, 16, 16, dtype, gen)
    dout = torch.randn(1, 2, 17, 16, generator=gen).to(dtype).to(DEV)
    runs = []
    for seed in (2**63 + 5, 2**63 + 5, 2**63 + 6, None):
        kw = {} if seed is None else dict(dropout_p=0.5, seed=seed)
        opts = _opts(16, **kw)
        out, lse = _ours_fwd(q, k, v, None, opts)
        runs.append((out, lse, *_ours_bwd(dout, q, k, v, out, lse, None, opts)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    for other in runs[2:]:
        assert torch.equal(runs[0][1], other[1])  # lse is the undropped one
        assert not torch.equal(runs[0][0], other[0])
        assert all(not torch.equal(a, b) for a, b in zip(runs[0][2:], other[2:], strict=True))


def test_fully_masked_everything(small_tiles):
    """A mask with no True: zeros, lse -inf, zero gradients, never NaN; S == 0 likewise."""
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        q, k, v = _make(1, 2, 2, 17, 20, 16, 16, dtype, gen)
        mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=DEV).expand(1, 2, 17, 20)
        out, lse = _ours_fwd(q, k, v, mask, _opts(16))
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        dq, dk, dv = _ours_bwd(torch.randn_like(out), q, k, v, out, lse, mask, _opts(16))
        assert all(torch.all(g == 0) for g in (dq, dk, dv))
        q0, k0, v0 = _make(1, 2, 2, 5, 0, 16, 16, dtype, gen)
        out, lse = _ours_fwd(q0, k0, v0, None, _opts(16))
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        dq, dk, dv = _ours_bwd(torch.randn_like(out), q0, k0, v0, out, lse, None, _opts(16))
        assert torch.all(dq == 0) and dk.numel() == 0
        # no queries: nothing forward; dk, dv are zeros
        q0, k0, v0 = _make(1, 2, 2, 0, 7, 16, 16, dtype, gen)
        out, lse = _ours_fwd(q0, k0, v0, None, _opts(16))
        dq, dk, dv = _ours_bwd(out, q0, k0, v0, out, lse, None, _opts(16))
        assert torch.all(dk == 0) and torch.all(dv == 0)


def test_nan_row_stays_in_its_row(small_tiles):
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        q, k, v = _make(1, 2, 2, 17, 20, 16, 16, dtype, gen)
        q[0, 1, 5, 3] = float("nan")
        out, lse = _ours_fwd(q, k, v, None, _opts(16, window_right=0))
        assert torch.isnan(out[0, 1, 5]).all() and torch.isnan(lse[0, 1, 5])
        assert torch.isfinite(out[0, 1, torch.arange(17) != 5]).all()
        assert torch.isfinite(out[0, 0]).all() and torch.isfinite(lse[0, 0]).all()


def _wide(shape, dtype):
    """(an unaligned view of shape, columns 1 .. d of SENTINEL-filled memory, that memory)"""
    buf = torch.full((*shape[:-1], shape[-1] + 3), SENTINEL, dtype=dtype, device=DEV)
    return buf[..., 1 : 1 + shape[-1]], buf


def _untouched(buf, d):
    return bool(torch.all(buf[..., 0] == SENTINEL) and torch.all(buf[..., 1 + d :] == SENTINEL))


def _strided(t, layout):
    """t's values in a non-contiguous view: 'blhd' (the (B, L, H, D) memory layout, aligned) or
    'slice' (a column slice of a wider buffer: unaligned start and odd row strides)."""
    b, h, n, d = t.shape
    if layout == "blhd":
        view = torch.empty(b, n, h, d, dtype=t.dtype, device=DEV).transpose(1, 2)
    else:
        view = _wide(t.shape, t.dtype)[0]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_layouts_and_determinism(dtype, small_tiles):
    """Non-contiguous and unaligned q / k / v / dout, and unaligned outputs (a padded aligned
    copy, scratch outputs copied back): bitwise the contiguous results; nothing is written
    outside the output views; a repeated backward gives the same bits."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = _make(2, 4, 2, 33, 40, 40, 24, dtype, gen)
    mask = _mask("add", 2, 4, 33, 40, dtype, gen)
    opts = _opts(40, window_left=9, window_right=0, bottom_right=True)
    out, lse = _ours_fwd(q, k, v, mask, opts)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEV)
    grads = _ours_bwd(dout, q, k, v, out, lse, mask, opts)
    again = _ours_bwd(dout, q, k, v, out, lse, mask, opts)
    for g, h in zip(grads, again, strict=True):
        assert torch.equal(g, h), "the backward is not deterministic"
    for layout in ("blhd", "slice"):
        qs, ks, vs, dos = (_strided(t, layout) for t in (q, k, v, dout))
        if layout == "slice":
            o2, o_buf = _wide(out.shape, dtype)
            gs, g_bufs = zip(*(_wide(t.shape, dtype) for t in (q, k, v)), strict=True)
        else:
            o2, gs = _blhd(2, 4, 33, 24, dtype), [_strided(t, layout) for t in (q, k, v)]
        lse2 = torch.empty_like(lse)
        A.attention_fwd(qs, ks, vs, mask, o2, lse2, opts)
        assert torch.equal(o2, out) and torch.equal(lse2, lse), layout
        A.attention_bwd(dos, qs, ks, vs, o2, lse2, mask, *gs, opts)
        for g, h in zip(gs, grads, strict=True):
            assert torch.equal(g, h), layout
        if layout == "slice":
            assert _untouched(o_buf, 24), "written outside out"
            for g, buf in zip(gs, g_bufs, strict=True):
                assert _untouched(buf, g.shape[-1]), "written outside a gradient"


def test_launcher_errors():
    q, k, v = _make(1, 4, 2, 5, 6, 16, 8, torch.float32, torch.Generator().manual_seed(0))
    with torch.device(DEV):  # every tensor below on q's device (a GPU where one runs)
        out, lse = torch.empty(1, 4, 5, 8), torch.empty(1, 4, 5)
        opts = _opts(16)

        def bad(match, q=q, k=k, v=v, mask=None, out=out, lse=lse, opts=opts):
            with pytest.raises(ValueError, match="attention_fwd: " + match):
                A.attention_fwd(q, k, v, mask, out, lse, opts)

        bad("dtype torch.float64", q=q.double(), k=k.double(), v=v.double(), out=out.double())
        bad("k must be", k=k.half())
        bad("Hq .4. must be a multiple of Hk .3.", k=torch.randn(1, 3, 6, 16),
            v=torch.randn(1, 3, 6, 8))  # fmt: skip
        bad("k must be", k=torch.randn(1, 2, 6, 15))
        bad("head dims", q=torch.randn(1, 4, 5, 300), k=torch.randn(1, 2, 6, 300))
        bad("q.s last dim must be contiguous", q=torch.randn(1, 4, 16, 5).transpose(2, 3))
        bad("out must be", out=torch.empty(1, 4, 5, 9))
        bad("lse must be", lse=torch.empty(1, 4, 5, dtype=torch.float16))
        bad("lse must be contiguous", lse=torch.empty(1, 5, 4).transpose(1, 2))
        bad("mask must be bool, torch.float32 or float32",
            mask=torch.zeros(1, 4, 5, 6, dtype=torch.int32))  # fmt: skip
        bad("mask must be bool, torch.float16 or float32", q=q.half(), k=k.half(), v=v.half(),
            out=out.half(), mask=torch.zeros(1, 4, 5, 6, dtype=torch.float64))  # fmt: skip
        bad("seed must be in", opts=_opts(16, dropout_p=0.1, seed=1 << 64))
        bad("mask must be a", mask=torch.zeros(1, 4, 5, 5, dtype=torch.bool))
        cu = torch.tensor([0, 5], dtype=torch.int32)
        bad("cu_q and cu_k must be given together", opts=_opts(16, cu_q=cu))
        bad("cu_q must be a non-empty 1-D int32", opts=_opts(16, cu_q=cu.long(), cu_k=cu))
        bad("a mask is only for dense", mask=torch.ones(1, 4, 5, 6, dtype=torch.bool),
            opts=_opts(16, cu_q=cu, cu_k=torch.tensor([0, 6], dtype=torch.int32)))  # fmt: skip
        bad("a packed .varlen. batch has B == 1", q=q.expand(2, 4, 5, 16), k=k.expand(2, 2, 6, 16),
            v=v.expand(2, 2, 6, 8), out=torch.empty(2, 4, 5, 8), lse=torch.empty(2, 4, 5),
            opts=_opts(16, cu_q=cu, cu_k=torch.tensor([0, 6], dtype=torch.int32)))  # fmt: skip
        with pytest.raises(ValueError, match="attention_bwd: dq must be"):
            A.attention_bwd(out, q, k, v, out, lse, None, torch.empty(1, 4, 5, 8),
                            torch.empty_like(k), torch.empty_like(v), opts)  # fmt: skip
        with pytest.raises(ValueError, match="attention_config: kernel"):
            A.attention_config("bwd", 64, torch.float16)
        with pytest.raises(ValueError, match="attention_config: arch"):
            A.attention_config("fwd", 64, torch.float16, arch=75)


# --------------------------------------------------------------------------------- AOT specs

# aot_specs(): 144 distinct launches per arch (80, 86, 90). A launch whose config differs
# between archs in num_stages (sm_90's 4 for the 16-bit forward at d128 / d256, the 99 KB GPUs'
# 2 or 1 in _SM86_STAGES) is one spec per distinct config, naming the archs that pick it: 223
# specs, and 144 x 3 = 432 (spec, arch) compiles in the AOT report.
N_SPECS = 223
N_COMPILES = 432


def _every_config(arch):
    """{(kernel, head dim, dtype, masked, dropout): attention_config(...)} over every bucket."""
    out = {}
    for kernel in A.KERNELS:
        for d in A.HEAD_BUCKETS:
            for dtype in DTYPES:
                for masked in (False, True):
                    for drop in (False, True):
                        key = (kernel, d, dtype, masked, drop)
                        out[key] = A.attention_config(kernel, d, dtype, arch, masked, drop)
    return out


def test_sm90_configs_differ_only_where_intended():
    """sm_90 takes sm_80's tiles everywhere; only the 16-bit forward at d128 and d256
    pipelines its K/V loop 4 stages deep (sm_80: 3)."""
    c80, c90 = _every_config(80), _every_config(90)
    deeper = {k for k in c80 if k[0] == "fwd" and k[2] != torch.float32 and k[1] > 64}
    assert len(deeper) == 16
    for key, c in c80.items():
        assert c.num_stages == 3, key
        if key in deeper:
            assert c90[key] == A.AttnConfig(c.block_m, c.block_n, c.block_d, c.num_warps, 4)
        else:
            assert c90[key] == c, key


def test_sm86_configs_differ_only_where_intended():
    """The 99 KB GPUs take sm_80's tiles everywhere, with fewer pipeline stages exactly where
    sm_80's program needs more than 99 KB of shared memory (the AOT report checks the limit):
    every d256 variant, the unmasked 16-bit forward at d128, the masked 16-bit d64 forward with
    dropout code."""
    c80, c86 = _every_config(80), _every_config(86)
    fewer = {k for k, c in c86.items() if c != c80[k]}
    want = {k for k in c80 if k[0] != "pre" and k[1] == 256}
    want |= {("fwd", 128, t, False, dr) for t in (torch.float16, torch.bfloat16)
             for dr in (False, True)}  # fmt: skip
    want |= {("fwd", 64, t, True, True) for t in (torch.float16, torch.bfloat16)}
    assert fewer == want
    for key in fewer:
        c = c80[key]
        assert c86[key] == dataclasses.replace(c, num_stages=c86[key].num_stages), key
        assert c86[key].num_stages < c.num_stages, key


def test_config_arch(monkeypatch):
    """The launchers' table follows the compute capability: 9.x -> sm_90's; the 99 KB GPUs
    (8.6, 8.9, 12.x, and those before 8.0) -> the sm_86 one; else sm_80's."""
    assert A.config_arch(torch.device("cpu")) == 80
    for cap, arch in (((8, 0), 80), ((8, 6), 86), ((8, 7), 80), ((8, 9), 86), ((9, 0), 90),
                      ((10, 0), 80), ((12, 0), 86), ((12, 1), 86), ((7, 5), 86)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, cap=cap: cap)
        assert A.config_arch(torch.device("cuda", 0)) == arch, cap


class _Capture:
    """Stands in for a kernel: records each launch's options, launches nothing."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((self.name, kw["num_warps"], kw.get("num_stages"), kw["BLOCK_M"]))

        return launch


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_num_stages_reaches_the_launch(monkeypatch, arch):
    """Every launch passes its config's num_stages (sm_90's 4 for the d128 16-bit forward,
    the 99 KB GPUs' 2)."""
    calls = []
    for name in ("_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"):  # fmt: skip
        monkeypatch.setattr(A, name, _Capture(name, calls))
    q, k, v = _make(1, 2, 1, 5, 4, 128, 128, torch.float16, torch.Generator().manual_seed(3))
    out, lse = _ours_fwd(q, k, v, None, _opts(128), arch)
    _ours_bwd(out, q, k, v, out, lse, None, _opts(128), arch)
    want = {"_attn_fwd_kernel": A.attention_config("fwd", 128, torch.float16, arch),
            "_attn_bwd_pre_kernel": A.attention_config("pre", 128, torch.float16, arch),
            "_attn_bwd_dkdv_kernel": A.attention_config("dkdv", 128, torch.float16, arch),
            "_attn_bwd_dq_kernel": A.attention_config("dq", 128, torch.float16, arch)}  # fmt: skip
    assert calls == [(n, c.num_warps, c.num_stages, c.block_m) for n, c in want.items()]
    assert calls[0][2] == {80: 3, 86: 2, 90: 4}[arch]


def _record_launches(monkeypatch, arch: int, run: bool) -> set:
    """The keys of every launch attention_fwd / attention_bwd make with the ``arch`` configs
    over head buckets, dtypes, mask kinds, dropout, windows and varlen (run: launch the
    kernels too, else only record)."""
    monkeypatch.setitem(launch_recorder._TY, torch.uint8, "u8")  # bool masks are read as u8
    seen: set = set()
    with monkeypatch.context() as mp:
        for name in ("_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel"):  # fmt: skip
            mp.setattr(A, name, Recorder(getattr(A, name), seen, run))
        gen = torch.Generator().manual_seed(9)
        for dtype in DTYPES:
            for e, ev in ((16, 8), (72, 128), (129, 256)):  # one per head bucket
                q, k, v = _make(1, 2, 1, 5, 4, e, ev, dtype, gen)
                for mask_kind in (None, "bool", "add", "add32"):
                    mask = _mask(mask_kind, 1, 2, 5, 4, dtype, gen)
                    for p in (0.0, 0.25):
                        opts = _opts(e, window_right=0, dropout_p=p, seed=2**64 - 1)
                        out, lse = _ours_fwd(q, k, v, mask, opts, arch)
                        _ours_bwd(out, q, k, v, out, lse, mask, opts, arch)
                cu = torch.tensor([0, 1, 5], dtype=torch.int32, device=DEV)
                cu_k = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEV)
                for p in (0.0, 0.25):
                    opts = _opts(e, cu, cu_k, max_q=2, max_k=2, window_left=1, bottom_right=True,
                                 dropout_p=p, seed=2**63 + 5)  # fmt: skip
                    out, lse = _ours_fwd(q, k, v, None, opts, arch)
                    _ours_bwd(out, q, k, v, out, lse, None, opts, arch)
    return seen


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_aot_specs_cover_every_launch(monkeypatch, arch):
    """Every launch on ``arch`` (types, constexprs, num_warps, num_stages) over head dims,
    dtypes, mask kinds, windows and varlen is one of aot_specs() for that arch, and none of
    those is dead; every config the heuristic picks for any head dim, dtype and arch is
    listed for that arch."""
    specs = A.aot_specs()
    assert len({spec_key(s) for s in specs}) == len(specs) == N_SPECS
    # (spec, arch) pairs: what the AOT report compiles; an arch's own configs replace sm_80's
    assert sum(len(s["archs"]) for s in specs) == N_COMPILES
    assert all(s["archs"] and set(s["archs"]) <= set(A.ARCHS) for s in specs)
    listed = spec_keys(specs, arch)
    # the interpreter ignores num_stages: where an arch's configs differ from sm_80's in nothing
    # else, its launches compute what sm_80's do, so they are recorded without running them
    tiles = [{k: dataclasses.replace(c, num_stages=3) for k, c in _every_config(a).items()}
             for a in (80, arch)]  # fmt: skip
    seen = _record_launches(monkeypatch, arch, run=arch == 80 or tiles[0] != tiles[1])
    assert seen == listed, (sorted(seen - listed)[:2], sorted(listed - seen)[:2])

    def masked(s):
        return dict(s[2]).get("MASK", 0) != 0

    for dtype in DTYPES:  # DROPOUT=0 variants only where a no-dropout launch picks them
        for kind in (0, 1, 2, 3):
            assert A.dropout_variant(dtype, kind, 5) == 1
            paired = dtype != torch.float32 and kind < 2
            assert A.dropout_variant(dtype, kind, 0) == (0 if paired else 1)

    by_config = {(s[0], dict(s[2])["BLOCK_M"], dict(s[2]).get("BLOCK_N"), dict(s[2])["BLOCK_D"],
                  s[3], s[4], masked(s), dict(s[2]).get("DROPOUT", 0)) for s in listed}  # fmt: skip
    names = {"fwd": "_attn_fwd_kernel", "pre": "_attn_bwd_pre_kernel",
             "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}  # fmt: skip
    for d in range(1, 257):
        for dtype in DTYPES:
            for kernel, name in names.items():
                for mask in (False, True) if kernel != "pre" else (False,):
                    for kind in ((1, 2, 3) if mask else (0,)) if kernel != "pre" else (0,):
                        if kind == 3 and dtype == torch.float32:
                            continue
                        drops = {A.dropout_variant(dtype, kind, t) for t in (0, 1)}
                        for drop in drops if kernel != "pre" else (0,):
                            c = A.attention_config(kernel, d, dtype, arch, mask, drop == 1)
                            bn = None if kernel == "pre" else c.block_n
                            assert (name, c.block_m, bn, c.block_d, c.num_warps, c.num_stages,
                                    mask, drop) in by_config  # fmt: skip
    assert len(A.aot_specs(aligned=True)) == len(specs)
    assert all(kernel_name(s["kernel"]) in names.values() for s in specs)
