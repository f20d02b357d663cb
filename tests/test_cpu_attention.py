"""The CPU flash-attention kernels (torch.ops.lmkernels_cpu.attention_fwd / _bwd) against the
reference (lmkernels.reference.attention_fwd / _bwd): shapes, windows, masks, GQA, varlen,
strided views, 16-bit dtypes, fp32 masks on 16-bit data, dropout, special rows, determinism and
argument errors."""

import os
import subprocess
import sys

import pytest
import torch

import lmkernels  # noqa: F401  (loads the lmkernels_cpu library)
from lmkernels import reference

OPS = torch.ops.lmkernels_cpu


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blhd(b, h, length, d, like, dtype=None):
    """(b, h, length, d) view of a (b, length, h, d) tensor, as the registered ops allocate."""
    return torch.empty(b, length, h, d, dtype=dtype or like.dtype).transpose(1, 2)


def _drop_args(seed, thr):
    """The op's dropout arguments: the 64-bit seed as an int64 bit pattern, the threshold and
    the scale."""
    return (seed - 2**64 if seed >= 2**63 else seed), thr, reference.dropout_scale(thr)


def run_fwd(q, k, v, mask=None, scale=None, wl=-1, wr=-1, br=False, cu_q=None, cu_k=None,
            max_q=0, max_k=0, seed=0, thr=0):  # fmt: skip
    b, hq, length, e = q.shape
    scale = e**-0.5 if scale is None else scale
    out = _blhd(b, hq, length, v.shape[-1], q)
    lse = torch.empty(b, hq, length, dtype=_acc(q.dtype))
    OPS.attention_fwd(q, k, v, mask, out, lse, scale, wl, wr, br, cu_q, cu_k, max_q, max_k,
                      *_drop_args(seed, thr))  # fmt: skip
    return out, lse


def run_bwd(do, q, k, v, out, lse, mask=None, scale=None, wl=-1, wr=-1, br=False, cu_q=None,
            cu_k=None, max_q=0, max_k=0, seed=0, thr=0):  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = _blhd(*q.shape, q), _blhd(*k.shape, k), _blhd(*v.shape, v)
    OPS.attention_bwd(do, q, k, v, out, lse, mask, dq, dk, dv, scale, wl, wr, br, cu_q, cu_k,
                      max_q, max_k, *_drop_args(seed, thr))  # fmt: skip
    return dq, dk, dv


def ref_all(q, k, v, do, mask=None, scale=None, wl=-1, wr=-1, br=False, cu_q=None, cu_k=None,
            seed=0, thr=0):  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    d = dict(drop_threshold=thr, seed=seed)
    out, lse = reference.attention_fwd(q, k, v, mask, scale, wl, wr, br, cu_q, cu_k, **d)
    grads = reference.attention_bwd(do, q, k, v, out, lse, mask, scale, wl, wr, br, cu_q, cu_k,
                                    **d)  # fmt: skip
    return out, lse, grads


def make(b, hq, hk, length, s, e, ev, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, e, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk, s, e, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, s, ev, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(b, hq, length, ev, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def check_fp64(q, k, v, do, tol=1e-12, **kw):
    out, lse = run_fwd(q, k, v, **kw)
    grads = run_bwd(do, q, k, v, out, lse, **kw)
    names = ("mask", "scale", "wl", "wr", "br", "cu_q", "cu_k", "seed", "thr")
    rkw = {n: kw[n] for n in names if n in kw}
    r_out, r_lse, r_grads = ref_all(q, k, v, do, **rkw)
    torch.testing.assert_close(out, r_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, r_lse, atol=tol, rtol=tol)
    for name, a, r in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
        torch.testing.assert_close(a, r, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    return out, lse, grads


# ------------------------------------------------------------------------------ fp64: exact math

SHAPES = [  # b, hq, hk, L, S, E, Ev
    (1, 1, 1, 1, 1, 16, 16),
    (1, 2, 2, 1, 77, 64, 64),
    (2, 2, 1, 77, 1, 64, 64),
    (1, 2, 2, 17, 129, 80, 80),
    (2, 1, 1, 129, 17, 96, 96),
    (1, 2, 2, 77, 77, 128, 128),
    (1, 1, 1, 65, 70, 256, 256),
    (1, 2, 2, 33, 47, 64, 16),
    (1, 2, 2, 47, 33, 24, 40),
    (1, 1, 1, 130, 200, 7, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp64_shapes(shape):
    check_fp64(*make(*shape))


WINDOWS = [(-1, 0, False), (-1, 0, True), (5, 0, False), (16, 3, True), (0, -1, False),
           (3, 70, False), (-1, 2, False), (40, 0, True), (0, 0, False)]  # fmt: skip


@pytest.mark.parametrize("wl,wr,br", WINDOWS)
@pytest.mark.parametrize("ls", [(77, 129), (129, 77), (1, 65), (100, 100)])
def test_fp64_windows(wl, wr, br, ls):
    check_fp64(*make(2, 2, 1, ls[0], ls[1], 32, 24), wl=wl, wr=wr, br=br)


@pytest.mark.parametrize("hq,hk", [(4, 1), (4, 2), (4, 4)])
def test_fp64_gqa(hq, hk):
    check_fp64(*make(2, hq, hk, 70, 90, 32, 48), wl=-1, wr=0, br=True)


def test_fp64_masks_with_broadcast_strides():
    b, hq, hk, length, s = 2, 4, 2, 67, 80
    q, k, v, do = make(b, hq, hk, length, s, 32, 32)
    g = torch.Generator().manual_seed(1)
    # bool, broadcast over heads (zero head stride)
    bm = (torch.rand(b, 1, length, s, generator=g) > 0.3).expand(b, hq, length, s)
    check_fp64(q, k, v, do, mask=bm)
    check_fp64(q, k, v, do, mask=bm, wl=10, wr=0)
    # additive with -inf entries, broadcast over the batch and heads
    am = torch.randn(1, 1, length, s, generator=g, dtype=torch.float64)
    am = am.masked_fill(torch.rand(1, 1, length, s, generator=g) < 0.2, float("-inf"))
    check_fp64(q, k, v, do, mask=am.expand(b, hq, length, s))
    # a per-row bias broadcast over the keys (zero key stride), and a transposed view
    rm = torch.randn(b, hq, length, 1, generator=g, dtype=torch.float64).expand(b, hq, length, s)
    check_fp64(q, k, v, do, mask=rm)
    tm = torch.randn(b, hq, s, length, generator=g, dtype=torch.float64).transpose(2, 3)
    check_fp64(q, k, v, do, mask=tm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fully_masked_rows(dtype):
    b, hq, length, s = 1, 2, 40, 70
    q, k, v, do = make(b, hq, hq, length, s, 16, 16, dtype)
    mask = torch.rand(b, hq, length, s, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[:, :, 3] = False
    mask[:, 1, 30:] = False
    out, lse = run_fwd(q, k, v, mask=mask)
    dq, dk, dv = run_bwd(do, q, k, v, out, lse, mask=mask)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[:, :, 3] == 0).all() and (out[:, 1, 30:] == 0).all()
    assert (lse[:, :, 3] == float("-inf")).all() and (lse[:, 1, 30:] == float("-inf")).all()
    assert (dq[:, :, 3] == 0).all() and (dq[:, 1, 30:] == 0).all()
    assert torch.isfinite(lse[:, 0, :3]).all()
    # no key at all: S = 0, or a window that leaves row 0 empty (bottom-right, L > S)
    out, lse = run_fwd(q, k[:, :, :0], v[:, :, :0])
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = run_bwd(do, q, k[:, :, :0], v[:, :, :0], out, lse)
    assert (dq == 0).all() and dk.numel() == 0
    out, lse = run_fwd(q, k[:, :, :20], v[:, :, :20], wl=-1, wr=0, br=True)
    assert (out[:, :, :20] == 0).all() and (lse[:, :, :20] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, 20:]).all()
    # no queries: dk = dv = 0
    dq, dk, dv = run_bwd(do[:, :, :0], q[:, :, :0], k, v, out[:, :, :0], lse[:, :, :0])
    assert (dk == 0).all() and (dv == 0).all()


def test_nan_stays_in_its_row():
    q, k, v, do = make(1, 1, 1, 20, 30, 16, 16, torch.float32)
    q[0, 0, 5, 3] = float("nan")
    out, lse = run_fwd(q, k, v)
    assert torch.isnan(out[0, 0, 5]).all() and torch.isnan(lse[0, 0, 5])
    rows = torch.arange(20) != 5
    assert torch.isfinite(out[0, 0, rows]).all() and torch.isfinite(lse[0, 0, rows]).all()


# ------------------------------------------------------------------------------ varlen


def _varlen(lq, lk, hq, hk, e, ev, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    # the packed (total, H, D) layout, viewed as (1, H, total, D)
    q = torch.randn(tq, hq, e, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, hk, e, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, hk, ev, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(tq, hq, ev, generator=g, dtype=torch.float64).to(dtype)
    q4, k4, v4, do4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v, do))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    return q4, k4, v4, do4, cu_q, cu_k, max(lq), max(lk)


@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (6, 2)])
def test_varlen_fp64(wl, wr):
    lq, lk = [3, 0, 1, 17, 70, 5, 1], [5, 2, 0, 17, 90, 1, 1]
    q, k, v, do, cu_q, cu_k, mq, mk = _varlen(lq, lk, 4, 2, 32, 16)
    check_fp64(q, k, v, do, wl=wl, wr=wr, br=True, cu_q=cu_q, cu_k=cu_k, max_q=mq, max_k=mk)
    check_fp64(q, k, v, do, wl=wl, wr=wr, br=False, cu_q=cu_q, cu_k=cu_k, max_q=mq + 9,
               max_k=mk)  # fmt: skip


def test_varlen_fp32_and_bf16():
    lq, lk = [64, 0, 1, 129], [64, 3, 1, 100]
    q, k, v, do, cu_q, cu_k, mq, mk = _varlen(lq, lk, 2, 2, 64, 64, torch.float32)
    kw = dict(wl=-1, wr=0, br=True, cu_q=cu_q, cu_k=cu_k)
    out, lse = run_fwd(q, k, v, max_q=mq, max_k=mk, **kw)
    grads = run_bwd(do, q, k, v, out, lse, max_q=mq, max_k=mk, **kw)
    r_out, r_lse, r_grads = ref_all(*(t.double() for t in (q, k, v, do)), **kw)
    _close(out, r_out, 1e-5)
    _close(lse, r_lse, 1e-5)
    for a, r in zip(grads, r_grads, strict=True):
        _close(a, r, 1e-5)
    qb, kb, vb, dob = (t.bfloat16() for t in (q, k, v, do))
    out, lse = run_fwd(qb, kb, vb, max_q=mq, max_k=mk, **kw)
    r_out, r_lse, _ = ref_all(*(t.float() for t in (qb, kb, vb, dob)), **kw)
    _close_ulps(out, r_out)


# ------------------------------------------------------------------------------ fp32, 16-bit


def _close(a, r, rtol):
    r = r.to(torch.float64)
    a = a.to(torch.float64)
    fin = torch.isfinite(r)
    assert torch.equal(fin, torch.isfinite(a)) and torch.equal(a[~fin], r[~fin])
    # absolute slack relative to the largest value, and at least to the O(1) inputs (a gradient
    # that cancels to ~0 in the reference is ~1e-7 here)
    scale = max(r[fin].abs().max().item() if fin.any() else 1.0, 1.0)
    torch.testing.assert_close(a[fin], r[fin], rtol=rtol, atol=rtol * scale)


def _close_ulps(a, r, ulps=2.0):
    """a (16-bit) within `ulps` of its dtype's ulps of r (fp32), plus a little absolute slack
    (1e-3 of the largest value) for elements near zero after cancellation."""
    eps = torch.finfo(a.dtype).eps
    a, r = a.double(), r.double()
    err = (a - r).abs()
    bound = ulps * eps * r.abs() + 1e-3 * r.abs().max()
    assert (err <= bound).all(), f"max err {err.max().item()}, worst ratio {(err / bound).max()}"


@pytest.mark.parametrize(
    "wl,wr,br", [(-1, -1, False), (-1, 0, False), (-1, 0, True), (9, 4, False)]
)
@pytest.mark.parametrize("ls", [(77, 129), (129, 70), (1, 17), (200, 200)])
def test_fp32(wl, wr, br, ls):
    q, k, v, do = make(2, 4, 2, ls[0], ls[1], 64, 80, torch.float32)
    out, lse = run_fwd(q, k, v, wl=wl, wr=wr, br=br)
    grads = run_bwd(do, q, k, v, out, lse, wl=wl, wr=wr, br=br)
    r_out, r_lse, r_grads = ref_all(*(t.double() for t in (q, k, v, do)), wl=wl, wr=wr, br=br)
    _close(out, r_out, 1e-5)
    _close(lse, r_lse, 1e-5)
    for a, r in zip(grads, r_grads, strict=True):
        _close(a, r, 1e-5)


def test_fp32_masks_and_large_scores():
    b, hq, length, s = 2, 2, 90, 110
    q, k, v, do = make(b, hq, hq, length, s, 32, 32, torch.float32)
    g = torch.Generator().manual_seed(5)
    am = (4 * torch.randn(b, 1, length, s, generator=g)).expand(b, hq, length, s)
    bm = torch.rand(1, hq, 1, s, generator=g).expand(b, hq, length, s) > 0.4
    for mask, scale in ((am, 0.5), (bm, 1.5)):
        out, lse = run_fwd(q, k, v, mask=mask, scale=scale)
        grads = run_bwd(do, q, k, v, out, lse, mask=mask, scale=scale)
        dbl = [t.double() for t in (q, k, v, do)]
        m64 = mask if mask.dtype == torch.bool else mask.double()
        r_out, r_lse, r_grads = ref_all(*dbl, mask=m64, scale=scale)
        _close(out, r_out, 2e-5)
        _close(lse, r_lse, 2e-5)
        for a, r in zip(grads, r_grads, strict=True):
            _close(a, r, 5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wl,wr,br", [(-1, -1, False), (-1, 0, True), (20, 0, False)])
def test_16bit(dtype, wl, wr, br):
    q, k, v, do = make(2, 4, 2, 77, 130, 64, 48, dtype)
    mask = torch.randn(2, 1, 77, 130, generator=torch.Generator().manual_seed(6)).to(dtype)
    mask = mask.expand(2, 4, 77, 130)
    for m in (None, mask):
        kw = dict(mask=m, wl=wl, wr=wr, br=br)
        out, lse = run_fwd(q, k, v, **kw)
        grads = run_bwd(do, q, k, v, out, lse, **kw)
        f32 = [t.float() for t in (q, k, v, do)]
        r_out, r_lse = reference.attention_fwd(*f32[:3], m, 0.125, wl, wr, br)
        _close_ulps(out, r_out)
        _close(lse, r_lse, 1e-5)
        # the gradients from the same stored out / lse (D = rowsum(dO * out as stored))
        r_grads = reference.attention_bwd(f32[3], *f32[:3], out.float(), lse, m, 0.125, wl, wr,
                                          br)  # fmt: skip
        for a, r in zip(grads, r_grads, strict=True):
            _close_ulps(a, r)


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_qkv_views(dtype):
    b, length, h, e = 2, 45, 4, 32
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, length, 3, h, e, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, E) strided views
    do = torch.randn(b, length, h, e, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = run_fwd(q, k, v, wl=-1, wr=0)
    grads = run_bwd(do, q, k, v, out, lse, wl=-1, wr=0)
    c_out, c_lse = run_fwd(*(t.contiguous() for t in (q, k, v)), wl=-1, wr=0)
    c_grads = run_bwd(*(t.contiguous() for t in (do, q, k, v, out)), lse, wl=-1, wr=0)
    assert torch.equal(out, c_out) and torch.equal(lse, c_lse)
    for a, c in zip(grads, c_grads, strict=True):
        assert torch.equal(a, c)
    if dtype == torch.float64:
        check_fp64(q, k, v, do, wl=-1, wr=0)


# ------------------------------------------------------------------------------ determinism


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("b,hk", [(1, 1), (2, 2), (3, 2), (2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(b, hk, dtype):
    """Bitwise equal across calls and thread counts (which may change the backward's schedule:
    per head when the (batch, kv head) pairs share well over the threads, split otherwise:
    b = hk = 1 is split on 2 threads, per head on 1)."""
    q, k, v, do = make(b, 2 * hk, hk, 150, 170, 64, 64, dtype)

    def run():
        out, lse = run_fwd(q, k, v, wl=-1, wr=0)
        return (out, lse, *run_bwd(do, q, k, v, out, lse, wl=-1, wr=0))

    first = run()
    for res in (run(), _with_threads(1, run), _with_threads(2, run)):
        for a, c in zip(first, res, strict=True):
            assert torch.equal(a, c)


def test_portable_build_matches():
    """The baseline (non-AVX2) kernels, selected by ATEN_CPU_CAPABILITY=default."""
    code = """if True:
        import torch, lmkernels
        from test_cpu_attention import check_fp64, make, run_fwd, ref_all, _close
        assert torch.ops.lmkernels_cpu.capability() == "DEFAULT"
        check_fp64(*make(2, 4, 2, 77, 90, 40, 24), wl=-1, wr=0, br=True)
        q, k, v, do = make(2, 2, 1, 70, 65, 64, 64, torch.float32)
        out, lse = run_fwd(q, k, v, wl=5, wr=3)
        r_out, r_lse, _ = ref_all(*(t.double() for t in (q, k, v, do)), wl=5, wr=3)
        _close(out, r_out, 1e-5)
        _close(lse, r_lse, 1e-5)
    """
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    here = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------------------------------ errors


def _bad_fwd_cases():
    q, k, v, _ = make(2, 4, 2, 8, 9, 16, 16, torch.float32)
    out = torch.empty(2, 4, 8, 16)
    lse = torch.empty(2, 4, 8)
    base = dict(q=q, k=k, v=v, mask=None, out=out, lse=lse, cu_q=None, cu_k=None, mq=0, mk=0)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    q1, k1, v1, _ = make(1, 2, 2, 8, 9, 16, 16, torch.float32)
    vl = dict(q=q1, k=k1, v=v1, out=torch.empty(1, 2, 8, 16), lse=torch.empty(1, 2, 8))
    cuk = torch.tensor([0, 9], dtype=torch.int32)
    return [
        (dict(q=q[0]), "q must be 4-D"),
        (dict(q=q.int()), "q must be float32"),
        (dict(k=k.double()), "k must have q's dtype"),
        (dict(k=torch.randn(2, 3, 9, 16)), "multiple of k's heads"),
        (dict(k=torch.randn(2, 2, 9, 8)), "k must have shape"),
        (dict(v=torch.randn(2, 2, 10, 16)), "v must have shape"),
        (dict(q=torch.randn(2, 4, 16, 8).transpose(2, 3)), "q must have a contiguous last dim"),
        (dict(out=torch.empty(2, 4, 8, 15)), "out must have shape"),
        (dict(out=torch.empty(2, 4, 1, 16).expand(2, 4, 8, 16)), "out must not overlap"),
        (dict(lse=torch.empty(2, 4, 8, dtype=torch.float64)), "lse must be"),
        (dict(lse=torch.empty(2, 4, 9)), "lse must be a contiguous"),
        (dict(mask=torch.ones(2, 4, 8, 8, dtype=torch.bool)), "mask must have shape"),
        (dict(cu_q=cu), "cu_q and cu_k must be given together"),
        (dict(cu_q=cu, cu_k=cuk, mq=8, mk=9), "B == 1"),
        (dict(vl, cu_q=cu.long(), cu_k=cuk, mq=8, mk=9), "cu_q must be int32"),
        (dict(vl, cu_q=torch.tensor([0, 7], dtype=torch.int32), cu_k=cuk, mq=8, mk=9),
         "cu_q must end at"),
        (dict(vl, cu_q=torch.tensor([0, 9, 8], dtype=torch.int32),
              cu_k=torch.tensor([0, 4, 9], dtype=torch.int32), mq=9, mk=9),
         "cu_q must be non-decreasing"),
        (dict(vl, cu_q=cu, cu_k=torch.tensor([0, 4, 9], dtype=torch.int32), mq=8, mk=9),
         "cu_q has 2 offsets but cu_k has 3"),
        (dict(vl, cu_q=cu, cu_k=cuk, mq=7, mk=9), "max_q must be at least"),
        (dict(vl, cu_q=cu, cu_k=cuk, mq=8, mk=2), "max_k must be at least"),
        (dict(vl, mask=torch.ones(1, 2, 8, 9, dtype=torch.bool), cu_q=cu, cu_k=cuk, mq=8, mk=9),
         "mask is not supported"),
    ], base  # fmt: skip


def test_bad_arguments_name_the_argument():
    cases, base = _bad_fwd_cases()
    for change, msg in cases:
        a = dict(base, **change)
        with pytest.raises(RuntimeError, match=msg):
            OPS.attention_fwd(a["q"], a["k"], a["v"], a["mask"], a["out"], a["lse"], 0.25, -1,
                              -1, False, a["cu_q"], a["cu_k"], a["mq"], a["mk"])  # fmt: skip
    q, k, v, do = make(2, 4, 2, 8, 9, 16, 16, torch.float32)
    out, lse = run_fwd(q, k, v)
    good = dict(do=do, out=out, dq=torch.empty_like(q), dk=torch.empty_like(k),
                dv=torch.empty_like(v))  # fmt: skip
    for change, msg in [
        (dict(do=do.double()), "dout must have q's dtype"),
        (dict(do=do[:, :, :7]), "dout must have shape"),
        (dict(dq=torch.empty(2, 4, 8, 17)), "dq must have shape"),
        (dict(dk=torch.empty_like(v[:, :1])), "dk must have shape"),
        (dict(dv=torch.empty_like(v).bfloat16()), "dv must have q's dtype"),
        (dict(dk=torch.empty(2, 1, 9, 16).expand(2, 2, 9, 16)), "dk must not overlap"),
        (dict(out=out.double()), "out must have q's dtype"),
    ]:
        a = dict(good, **change)
        with pytest.raises(RuntimeError, match=msg):
            OPS.attention_bwd(a["do"], q, k, v, a["out"], lse, None, a["dq"], a["dk"], a["dv"],
                              0.25, -1, -1, False, None, None, 0, 0)  # fmt: skip


def test_bad_mask_dtype_names_mask():
    """A mask must be bool, q's dtype, or fp32 on fp16 / bf16 data (TypeError naming mask)."""
    for qd, md in ((torch.float32, torch.float64), (torch.bfloat16, torch.float16),
                   (torch.float16, torch.bfloat16), (torch.float64, torch.float32),
                   (torch.float32, torch.int32)):  # fmt: skip
        q, k, v, do = make(1, 2, 2, 8, 9, 16, 16, qd)
        mask = torch.zeros(1, 2, 8, 9, dtype=md)
        with pytest.raises(TypeError, match="mask must be bool, q's dtype"):
            run_fwd(q, k, v, mask=mask)
        out, lse = run_fwd(q, k, v)
        with pytest.raises(TypeError, match="mask must be bool, q's dtype"):
            run_bwd(do, q, k, v, out, lse, mask=mask)


def test_bad_dropout_arguments():
    q, k, v, _ = make(1, 2, 2, 8, 9, 16, 16, torch.float32)
    out, lse = torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8)
    for thr, sc, msg in ((2**32, 1.0, "drop_threshold must be in"),
                         (-1, 1.0, "drop_threshold must be in"),
                         (2**31, float("inf"), "drop_scale must be finite"),
                         (2**31, 0.5, "drop_scale must be finite")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            OPS.attention_fwd(q, k, v, None, out, lse, 0.25, -1, -1, False, None, None, 0, 0, 1,
                              thr, sc)  # fmt: skip


# ------------------------------------------------------------------------------ fp32 masks on
# 16-bit data: added in fp32, unrounded


def _fine_mask(b, hq, length, s, seed):
    """An fp32 mask whose values (1000 + a fraction) change when rounded to fp16 or bf16."""
    g = torch.Generator().manual_seed(seed)
    m = 1000.0 + 3.0 * torch.rand(b, 1, length, s, generator=g)
    m = m.masked_fill(torch.rand(b, 1, length, s, generator=g) < 0.1, float("-inf"))
    return m.expand(b, hq, length, s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wl,wr,br", [(-1, -1, False), (-1, 0, True)])
def test_fp32_mask_on_16bit(dtype, wl, wr, br):
    q, k, v, do = make(2, 4, 2, 77, 130, 64, 48, dtype)
    mask = _fine_mask(2, 4, 77, 130, 8)
    kw = dict(mask=mask, wl=wl, wr=wr, br=br)
    out, lse = run_fwd(q, k, v, **kw)
    grads = run_bwd(do, q, k, v, out, lse, **kw)
    f32 = [t.float() for t in (q, k, v, do)]
    r_out, r_lse = reference.attention_fwd(*f32[:3], mask, 0.125, wl, wr, br)
    _close_ulps(out, r_out)
    assert (lse - r_lse).abs().max() < 1e-3  # lse ~ 1000: a few fp32 ulps
    r_grads = reference.attention_bwd(f32[3], *f32[:3], out.float(), lse, mask, 0.125, wl, wr,
                                      br)  # fmt: skip
    for a, r in zip(grads, r_grads, strict=True):
        _close_ulps(a, r)
    # the mask rounded to the data's dtype gives a clearly different answer
    w_out, w_lse = reference.attention_fwd(*f32[:3], mask.to(dtype), 0.125, wl, wr, br)
    assert (w_out - r_out).abs().max() > 0.1
    assert (w_lse - r_lse).abs().max() > 0.05
    # and so does the kernel given the rounded mask
    o16, _ = run_fwd(q, k, v, **dict(kw, mask=mask.to(dtype)))
    assert (o16.float() - out.float()).abs().max() > 0.1


# ------------------------------------------------------------------------------ dropout

P_DROP = 0.3
THR = reference.dropout_threshold(P_DROP)
SEED_HI = 2**63 + 0x1234_5678_9ABC  # uses all 64 bits (the op gets a negative int64)


@pytest.mark.parametrize("shape", SHAPES[1:7], ids=lambda s: "x".join(map(str, s)))
def test_dropout_fp64_shapes(shape):
    check_fp64(*make(*shape), seed=SEED_HI, thr=THR)


@pytest.mark.parametrize("wl,wr,br", [(-1, 0, False), (-1, 0, True), (16, 3, True), (3, 70, False)])
@pytest.mark.parametrize("hq,hk", [(2, 1), (4, 4)])
def test_dropout_fp64_windows_gqa(wl, wr, br, hq, hk):
    check_fp64(*make(2, hq, hk, 100, 129, 32, 24), wl=wl, wr=wr, br=br, seed=7, thr=THR)


def test_dropout_fp64_masks():
    b, hq, length, s = 2, 2, 67, 110
    q, k, v, do = make(b, hq, 1, length, s, 32, 32)
    g = torch.Generator().manual_seed(11)
    bm = (torch.rand(b, 1, length, s, generator=g) > 0.3).expand(b, hq, length, s)
    am = torch.randn(b, hq, length, s, generator=g, dtype=torch.float64)
    for mask in (bm, am):
        check_fp64(q, k, v, do, mask=mask, seed=123, thr=reference.dropout_threshold(0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_special_rows_and_extreme_rates(dtype):
    """Rows with no key stay 0 (never NaN) with dropout; the extreme thresholds 1 and 2^32 - 1
    (scale 2^32) match the reference."""
    q, k, v, do = make(1, 2, 2, 40, 70, 16, 16, dtype)
    mask = torch.rand(1, 2, 40, 70, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[:, :, 3] = False
    out, lse = run_fwd(q, k, v, mask=mask, seed=SEED_HI, thr=THR)
    grads = run_bwd(do, q, k, v, out, lse, mask=mask, seed=SEED_HI, thr=THR)
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    assert (out[:, :, 3] == 0).all() and (grads[0][:, :, 3] == 0).all()
    if dtype == torch.float64:
        for thr in (1, 2**32 - 1):
            check_fp64(q, k, v, do, mask=mask, seed=SEED_HI, thr=thr)
        out, _ = run_fwd(q, k, v, mask=mask, seed=SEED_HI, thr=2**32 - 1)
        assert (out == 0).float().mean() > 0.9  # almost every probability dropped


@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (6, 2)])
def test_dropout_varlen_fp64(wl, wr):
    """Packed positions: sequence b's keep bits are those of rows cu_q[b] + i, keys cu_k[b] + j
    of batch 0 (cu_k not a multiple of 4, so the 4-key groups straddle sequences)."""
    lq, lk = [3, 0, 1, 17, 70, 5, 1], [5, 2, 0, 17, 110, 1, 1]
    q, k, v, do, cu_q, cu_k, mq, mk = _varlen(lq, lk, 4, 2, 32, 16)
    check_fp64(q, k, v, do, wl=wl, wr=wr, br=True, cu_q=cu_q, cu_k=cu_k, max_q=mq, max_k=mk,
               seed=SEED_HI, thr=THR)  # fmt: skip


def _keep_pattern(seed, thr, b, hq, length, s, cu_q=None, cu_k=None):
    """The dropout factor Z of every score, from the op: v = identity (S = Ev) and all scores
    equal, so out[b, h, i, j] = Z / n_visible, with the window (-1, 0) restricting the keys."""
    e = 16
    q = torch.zeros(b, hq, length, e, dtype=torch.float64)
    k = torch.zeros(b, hq, s, e, dtype=torch.float64)
    v = torch.eye(s, dtype=torch.float64).expand(b, hq, s, s)
    out, _ = run_fwd(q, k, v, wl=-1, wr=-1, seed=seed, thr=thr, cu_q=cu_q, cu_k=cu_k,
                     max_q=length, max_k=s)  # fmt: skip
    return out * s  # Z (exact: s a power of 2)


@pytest.mark.parametrize("seed", [0, 5, SEED_HI, 2**64 - 1])
def test_dropout_keep_bits_match_reference(seed):
    b, hq, length, s = 2, 3, 50, 256
    z = _keep_pattern(seed, THR, b, hq, length, s)
    bh = torch.arange(b * hq).view(b, hq, 1, 1)
    rows = torch.arange(length).view(1, 1, length, 1)
    cols = torch.arange(s).view(1, 1, 1, s)
    keep = reference.attention_dropout_keep(seed, THR, bh, rows, cols)
    assert torch.equal(z != 0, keep)
    assert torch.equal(z[keep], torch.full_like(z[keep], reference.dropout_scale(THR)))
    frac = 1.0 - keep.double().mean().item()
    assert abs(frac - P_DROP) < 0.02, frac


def test_dropout_keep_bits_varlen_packed_positions():
    lq, lk = [7, 33, 10], [5, 64, 59]  # total keys 128; sequence 1 starts at key 5
    cu_q = torch.tensor([0, 7, 40, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 69, 128], dtype=torch.int32)
    hq, s = 2, 128
    # one packed batch; every sequence's v rows are identity rows of the packed key index
    q = torch.zeros(1, hq, 50, 16, dtype=torch.float64)
    k = torch.zeros(1, hq, s, 16, dtype=torch.float64)
    v = torch.eye(s, dtype=torch.float64).expand(1, hq, s, s)
    out, _ = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max(lq), max_k=max(lk), seed=SEED_HI,
                     thr=THR)  # fmt: skip
    bh = torch.arange(hq).view(hq, 1, 1)
    for seq in range(3):
        r0, r1, c0, c1 = cu_q[seq], cu_q[seq + 1], cu_k[seq], cu_k[seq + 1]
        rows = torch.arange(r0, r1).view(1, -1, 1)
        cols = torch.arange(c0, c1).view(1, 1, -1)
        keep = reference.attention_dropout_keep(SEED_HI, THR, bh, rows, cols)
        got = out[0, :, r0:r1, c0:c1]
        assert torch.equal(got != 0, keep), seq
        assert (out[0, :, r0:r1, :c0] == 0).all() and (out[0, :, r0:r1, c1:] == 0).all()


def test_dropout_fp32():
    b, hq, hk, length, s = 2, 4, 2, 129, 200
    q, k, v, do = make(b, hq, hk, length, s, 64, 80, torch.float32)
    for wl, wr, br in ((-1, -1, False), (-1, 0, True), (9, 4, False)):
        kw = dict(wl=wl, wr=wr, br=br, seed=SEED_HI, thr=THR)
        out, lse = run_fwd(q, k, v, **kw)
        grads = run_bwd(do, q, k, v, out, lse, **kw)
        r_out, r_lse, r_grads = ref_all(*(t.double() for t in (q, k, v, do)), **kw)
        _close(out, r_out, 1e-5)
        _close(lse, r_lse, 1e-5)
        for a, r in zip(grads, r_grads, strict=True):
            _close(a, r, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wl,wr,br", [(-1, -1, False), (-1, 0, True)])
def test_dropout_16bit(dtype, wl, wr, br):
    q, k, v, do = make(2, 4, 2, 77, 130, 64, 48, dtype)
    d = dict(drop_threshold=THR, seed=SEED_HI)
    for m in (None, _fine_mask(2, 4, 77, 130, 9)):
        kw = dict(mask=m, wl=wl, wr=wr, br=br, seed=SEED_HI, thr=THR)
        out, lse = run_fwd(q, k, v, **kw)
        grads = run_bwd(do, q, k, v, out, lse, **kw)
        f32 = [t.float() for t in (q, k, v, do)]
        r_out, r_lse = reference.attention_fwd(*f32[:3], m, 0.125, wl, wr, br, **d)
        _close_ulps(out, r_out)
        _close(lse, r_lse, 1e-5)
        r_grads = reference.attention_bwd(f32[3], *f32[:3], out.float(), lse, m, 0.125, wl, wr,
                                          br, **d)  # fmt: skip
        for a, r in zip(grads, r_grads, strict=True):
            _close_ulps(a, r)


def test_dropout_deterministic_and_seeded():
    """Bitwise repeatable for a seed across calls and thread counts (both backward schedules);
    different seeds, or no dropout, give different results."""
    res = {}
    for b, hk in ((1, 1), (2, 8)):
        q, k, v, do = make(b, 2 * hk, hk, 150, 170, 64, 64, torch.float32)

        def run(seed, q=q, k=k, v=v, do=do):
            out, lse = run_fwd(q, k, v, wl=-1, wr=0, seed=seed, thr=THR)
            return (out, lse, *run_bwd(do, q, k, v, out, lse, wl=-1, wr=0, seed=seed, thr=THR))

        first = run(SEED_HI)
        for again in (run(SEED_HI), _with_threads(1, lambda: run(SEED_HI)),
                      _with_threads(2, lambda: run(SEED_HI))):  # fmt: skip
            for a, c in zip(first, again, strict=True):
                assert torch.equal(a, c)
        other = run(SEED_HI + 1)
        assert torch.equal(first[1], other[1])  # lse is the undropped one
        for i in (0, 2, 3, 4):
            assert not torch.equal(first[i], other[i])
        res[b] = first
    assert res[1][0].abs().sum() > 0


def test_dropout_off_is_unchanged():
    """threshold 0 ignores the seed: the same bits as a call without the dropout arguments."""
    q, k, v, do = make(2, 2, 1, 70, 90, 32, 32, torch.float32)
    out, lse = run_fwd(q, k, v, wl=-1, wr=0, seed=SEED_HI, thr=0)
    OPS.attention_fwd(q, k, v, None, o2 := torch.empty_like(out), l2 := torch.empty_like(lse),
                      32**-0.5, -1, 0, False, None, None, 0, 0)  # fmt: skip
    assert torch.equal(out, o2) and torch.equal(lse, l2)


def test_dropout_portable_build_matches():
    """The baseline (non-AVX2) kernels draw the same keep bits (scalar Philox)."""
    code = """if True:
        import torch, lmkernels
        from test_cpu_attention import check_fp64, make, _varlen, THR, SEED_HI
        assert torch.ops.lmkernels_cpu.capability() == "DEFAULT"
        check_fp64(*make(2, 4, 2, 77, 130, 40, 24), wl=-1, wr=0, br=True, seed=SEED_HI, thr=THR)
        q, k, v, do, cu_q, cu_k, mq, mk = _varlen([3, 17, 70], [5, 17, 110], 2, 1, 16, 16)
        check_fp64(q, k, v, do, cu_q=cu_q, cu_k=cu_k, max_q=mq, max_k=mk, seed=9, thr=THR)
    """
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    here = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------------------------------ through the op


def test_sdpa_dropout_and_fp32_mask_on_cpu_backend():
    """lmkernels.functional.scaled_dot_product_attention on the cpu backend: dropout (the seed
    drawn from the generator, any 64-bit value) and an fp32 mask on bf16 data match the
    reference backend, forward and backward; an fp16 mask on bf16 data is refused."""
    import lmkernels.functional as LF
    from lmkernels.backends import use_backend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 32, generator=g) for _ in range(3))
    mask = _fine_mask(2, 4, 70, 70, 12)
    cases = [(q, k, v, None, 0.25), (*(t.bfloat16() for t in (q, k, v)), mask, 0.2)]
    for qq, kk, vv, m, p in cases:
        res = {}
        for backend in ("cpu", "reference"):
            x = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
            with use_backend(backend):
                out = LF.scaled_dot_product_attention(
                    *x, attn_mask=m, dropout_p=p, generator=torch.Generator().manual_seed(3)
                )
                out.backward(torch.ones_like(out))
            res[backend] = (out, *(t.grad for t in x))
        for a, r in zip(res["cpu"], res["reference"], strict=True):
            if a.dtype == torch.float32:
                _close(a, r, 1e-5)
            else:
                _close_ulps(a, r.float(), ulps=4.0)
        with use_backend("cpu"):  # dropout took place
            plain = LF.scaled_dot_product_attention(qq, kk, vv, attn_mask=m)
        assert (plain.float() - res["cpu"][0].float()).abs().max() > 0.1
    # what the public functions let through but the kernels do not take is refused up front
    from lmkernels.ops.attention import AttnOptions, _cpu_supports

    opts = AttnOptions(0.25, dropout_p=0.5, seed=2**64 - 1)
    b16 = [t.bfloat16() for t in (q, k, v)]
    assert _cpu_supports(*b16, mask, opts) is None
    assert _cpu_supports(q, k, v, mask, opts) is None
    assert "float16 mask on torch.bfloat16" in _cpu_supports(*b16, mask.half(), opts)
    assert "float32 mask on torch.float64" in _cpu_supports(*(t.double() for t in (q, k, v)),
                                                            mask, opts)  # fmt: skip
