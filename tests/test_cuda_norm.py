"""The CUDA normalisation kernels (csrc/cuda/norm.cu) against lmkernels.reference, on a GPU.

Calls the launchers ``lmkernels.ops.norm._cuda_fwd`` / ``_cuda_bwd`` directly, so every kernel
shape is reached on purpose: the column counts below sit on both sides of each threshold of
norm.cu (warp-per-row cached <= 1024, 256-thread cached <= 4096, 512-thread cached <= 16384,
looped beyond; and the element-wise looped kernels for odd column counts and misaligned
pointers). Inputs live in NaN-poisoned buffers (a read past the end shows up as NaN) and outputs
in sentinel-filled ones (a write past the end is caught). Accuracy: the error against an fp64
oracle must stay within twice the fp32 reference's own error plus a few units in the last place
of the output dtype. dw/db must be bitwise reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmkernels import reference
from lmkernels.ops import norm as norm_ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA norm kernels need one to run"
)

DEVICE = "cuda"
_FWD = norm_ops._cuda_fwd  # fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms)
_BWD = norm_ops._cuda_bwd  # bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, rms)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (T, S): data dtype and residual-stream dtype
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)]
SENTINEL = 7.0
TAIL = 64  # poisoned / sentinel elements after every buffer

# Column counts: (cols, path) for 16-byte-aligned data; every threshold of norm.cu from both sides.
COLS = [
    8,  # warp cached, one pack
    1000,  # warp cached, last packs partly idle
    1024,  # warp cached, full
    1032,  # 256-thread cached
    4096,  # 256-thread cached, full
    4104,  # 512-thread cached
    16384,  # 512-thread cached, full
    16392,  # looped, vector packs
    65536,  # looped, vector packs
    1,  # element-wise (odd cols) looped, one warp per row
    3,
    127,
    1025,  # element-wise looped, 256 threads per row
    4097,  # element-wise looped, 1024 threads per row
    70001,
]
ROWS = [5, 130]  # a prime; three dw/db row blocks of 64, the last one partial


def _make(shape, dtype, gen, scale=1.0, shift=0.0, offset=0):
    """Random values in a NaN-poisoned buffer, starting `offset` elements into it."""
    n = math.prod(shape)
    buf = torch.full((n + offset + TAIL,), float("nan"), dtype=dtype, device=DEVICE)
    t = buf[offset : offset + n].view(shape)
    vals = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32) * scale + shift
    t.copy_(vals.to(dtype))
    return t


def _out(shape, dtype, offset=0):
    """An output view into a sentinel-filled buffer; returns (view, buffer tail)."""
    n = math.prod(shape)
    buf = torch.full((n + offset + TAIL,), SENTINEL, dtype=dtype, device=DEVICE)
    return buf[offset : offset + n].view(shape), buf[offset + n :]


def _check_tails(tails, what):
    for name, tail in tails:
        assert bool((tail == SENTINEL).all()), f"{what}: write past the end of {name}"


def _assert_close(ours, base, oracle, dtype, what, scale=None, ulps=8):
    """NaN/inf patterns equal to the oracle's; max error <= 2 * base error + ulps * eps(dtype)
    * scale (scale: max |oracle| unless given)."""
    a, b, o = ours.double(), base.double(), oracle.double()
    for name, pred in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = pred(a) != pred(o)
        assert not bool(diff.any()), f"{what}: {name} pattern differs at {int(diff.sum())} places"
    fin = torch.isfinite(o)
    if not bool(fin.any()):
        return
    err = float((a - o)[fin].abs().max())
    base_err = float((b - o)[fin].abs().max())
    if scale is None:
        scale = float(o[fin].abs().max())
    bound = 2 * base_err + ulps * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (fp32 ref {base_err:.3g})"


def _forward(x, res, w, b, eps, rms, offset=0):
    rows, cols = x.shape
    y, y_tail = _out((rows, cols), x.dtype, offset)
    tails = [("y", y_tail)]
    h = None
    if res is not None:
        h, h_tail = _out((rows, cols), res.dtype, offset)
        tails.append(("h", h_tail))
    mean = None
    if not rms:
        mean, m_tail = _out((rows,), F32)
        tails.append(("mean", m_tail))
    rstd, r_tail = _out((rows,), F32)
    tails.append(("rstd", r_tail))
    _FWD(x, res, w, b, y, h, mean, rstd, eps, rms)
    torch.cuda.synchronize()
    _check_tails(tails, "forward")
    return y, h, mean, rstd


def _backward(dy, dh_out, h, w, mean, rstd, rms, need_dw=True, need_db=True, offset=0):
    rows, cols = dy.shape
    dh, dh_tail = _out((rows, cols), h.dtype, offset)
    tails = [("dh", dh_tail)]
    dw = db = None
    if need_dw:
        dw, dw_tail = _out((cols,), F32)
        tails.append(("dw", dw_tail))
    if need_db:
        db, db_tail = _out((cols,), F32)
        tails.append(("db", db_tail))
    _BWD(dy, dh_out, h, w, None if rms else mean, rstd, dh, dw, db, rms)
    torch.cuda.synchronize()
    _check_tails(tails, "backward")
    return dh, dw, db


def _inputs(rows, cols, t, s, residual, weight, bias, grad_h, seed=0, offset=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = _make((rows, cols), t, gen, 2.0, 0.5, offset)
    res = _make((rows, cols), s, gen, 1.0, -0.25, offset) if residual else None
    w = _make((cols,), F32, gen, 0.5, 1.0) if weight else None
    b = _make((cols,), F32, gen, 0.5) if bias else None
    dy = _make((rows, cols), t, gen, 1.7, 0.3, offset)
    dh_out = _make((rows, cols), s, gen, 0.5, offset=offset) if residual and grad_h else None
    return x, res, w, b, dy, dh_out


def _f64(t):
    return None if t is None else t.double()


def _check_fwd_bwd(rows, cols, t, s, residual, weight, bias, rms, grad_h=True, offset=0,
                   eps=1e-5):  # fmt: skip
    x, res, w, b, dy, dh_out = _inputs(rows, cols, t, s, residual, weight, bias, grad_h,
                                       offset=offset)  # fmt: skip
    tag = f"{rows}x{cols} {t}/{s} res={residual} w={weight} b={bias} rms={rms} off={offset}"

    # forward: h exactly as the reference rounds it; y, mean, rstd against the fp64 oracle of
    # the stored h
    y, h, mean, rstd = _forward(x, res, w, b, eps, rms, offset)
    y_b, h_b, mean_b, rstd_b = reference.norm_fwd(x, res, w, b, eps, rms)
    if residual:
        assert h.dtype == s
        assert torch.equal(h, h_b), f"{tag}: h differs from x + residual rounded to S"
    hs = h if residual else x
    y_o, _, mean_o, rstd_o = reference.norm_fwd(hs.double(), None, _f64(w), _f64(b), eps, rms)
    _assert_close(y, y_b, y_o, t, f"{tag}: y")
    _assert_close(rstd, rstd_b, rstd_o, F32, f"{tag}: rstd")
    if not rms:
        _assert_close(mean, mean_b, mean_o, F32, f"{tag}: mean", scale=float(hs.abs().max()))

    # backward from the saved h and the kernel's own statistics
    dh, dw, db = _backward(dy, dh_out, hs, w, mean, rstd, rms, offset=offset)
    m_in = torch.empty(0, device=DEVICE) if rms else mean
    dh_b, dw_b, db_b = reference.norm_bwd(dy, dh_out, hs, w, m_in, rstd, rms)
    m_o = torch.empty(0, device=DEVICE, dtype=torch.float64) if rms else mean_o
    dh_o, dw_o, db_o = reference.norm_bwd(dy.double(), _f64(dh_out), hs.double(), _f64(w), m_o,
                                          rstd_o, rms)  # fmt: skip
    assert dh.dtype == hs.dtype
    # dh's rounding scales with rstd * |dy * w| (its exact value may be 0, e.g. for cols == 1)
    g = dy.double() * (1.0 if w is None else w.double())
    dh_scale = float((rstd_o[:, None] * g.abs()).max()) + float(dh_o.abs().max())
    _assert_close(dh, dh_b, dh_o, hs.dtype, f"{tag}: dh", scale=dh_scale)
    # dw/db are sums over rows: the floor scales with the sum of |terms|, and with the square
    # root of the number of row-block partials, which the contract adds one after another
    xhat = (hs.double() if rms else hs.double() - mean_o[:, None]) * rstd_o[:, None]
    chain = math.sqrt(-(-rows // norm_ops.ROWS_PER_BLOCK))
    dw_scale = float((dy.double().abs() * xhat.abs()).sum(0).max()) * chain
    db_scale = float(dy.double().abs().sum(0).max()) * chain
    _assert_close(dw, dw_b, dw_o, F32, f"{tag}: dw", scale=dw_scale)
    _assert_close(db, db_b, db_o, F32, f"{tag}: db", scale=db_scale)

    # repeated backward: bitwise identical
    dh2, dw2, db2 = _backward(dy, dh_out, hs, w, mean, rstd, rms, offset=offset)
    for name, a, a2 in (("dh", dh, dh2), ("dw", dw, dw2), ("db", db, db2)):
        assert torch.equal(a.view(-1).view(torch.uint8), a2.view(-1).view(torch.uint8)), (
            f"{tag}: repeated backward gives different {name} bits"
        )


def _params():
    out = []
    wb = [(True, True), (True, False), (False, False)]
    for i, cols in enumerate(COLS):
        for t, s in DTYPE_PAIRS:
            for residual in (False, True):
                if not residual and s != t:
                    continue  # S only matters with a residual
                for rms in (False, True):
                    weight, bias = wb[(i + rms + 2 * residual) % 3]
                    if rms:
                        bias = False
                    out.append(
                        pytest.param(
                            cols,
                            t,
                            s,
                            residual,
                            weight,
                            bias,
                            rms,
                            id=f"{cols}-{str(t)[6:]}-{str(s)[6:]}-"
                            f"{'res' if residual else 'nores'}-"
                            f"{'w' if weight else ''}{'b' if bias else ''}-"
                            f"{'rms' if rms else 'ln'}",
                        )  # fmt: skip
                    )
    return out


@pytest.mark.parametrize("cols,t,s,residual,weight,bias,rms", _params())
def test_matches_reference(cols, t, s, residual, weight, bias, rms):
    rows = ROWS[1] if cols <= 16392 else ROWS[0]
    _check_fwd_bwd(rows, cols, t, s, residual, weight, bias, rms)


@pytest.mark.parametrize("cols", [64, 1000, 2048, 8192, 65536])
@pytest.mark.parametrize("t,s", [(F32, F32), (BF16, F32)], ids=["f32", "bf16-f32"])
def test_misaligned_pointers_take_the_elementwise_path(cols, t, s):
    # cols a multiple of the vector width, but every tensor starts one element into its buffer
    _check_fwd_bwd(67, cols, t, s, True, True, True, False, offset=1)
    _check_fwd_bwd(67, cols, t, s, False, True, False, True, offset=1)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("rows", [1, 63, 64, 65, 200])
def test_row_counts_around_the_dw_db_row_blocks(rows, rms):
    _check_fwd_bwd(rows, 96, F32, F32, True, True, not rms, rms)
    _check_fwd_bwd(rows, 333, BF16, BF16, False, True, not rms, rms)


@pytest.mark.parametrize("grad_h", [False, True])
def test_backward_without_dh_out_and_partial_param_grads(grad_h):
    x, res, w, b, dy, dh_out = _inputs(70, 512, F16, F32, True, True, True, grad_h)
    y, h, mean, rstd = _forward(x, res, w, b, 1e-5, False)
    full = _backward(dy, dh_out, h, w, mean, rstd, False)
    only_db = _backward(dy, dh_out, h, w, mean, rstd, False, need_dw=False)
    only_dw = _backward(dy, dh_out, h, w, mean, rstd, False, need_db=False)
    neither = _backward(dy, dh_out, h, w, mean, rstd, False, need_dw=False, need_db=False)
    for other in (only_db, only_dw, neither):
        assert torch.equal(other[0], full[0])
    assert torch.equal(only_db[2], full[2])
    assert torch.equal(only_dw[1], full[1])


@pytest.mark.parametrize("cols", [40, 2000, 65536, 70001])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_nan_inf_stay_in_their_row(cols, rms):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x = _make((6, cols), F32, gen)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, :] = 0.0
    x[3, :] = 3.0
    x[4, 5] = -float("inf")
    w = _make((cols,), F32, gen, 0.5, 1.0)
    b = None if rms else _make((cols,), F32, gen)
    y, _, mean, rstd = _forward(x, None, w, b, 1e-5, rms)
    y_b, _, mean_b, rstd_b = reference.norm_fwd(x, None, w, b, 1e-5, rms)
    y_o, _, _, rstd_o = reference.norm_fwd(x.double(), None, w.double(), _f64(b), 1e-5, rms)
    _assert_close(y, y_b, y_o, F32, "special rows: y")
    _assert_close(rstd, rstd_b, rstd_o, F32, "special rows: rstd")
    assert bool(torch.isfinite(y[5]).all()), "a NaN/inf leaked into a clean row"
    dy = _make((6, cols), F32, gen)
    dh, _, _ = _backward(dy, None, x, w, mean, rstd, rms)
    assert bool(torch.isfinite(dh[[2, 3, 5]]).all()), "a NaN/inf leaked into a clean row's dh"


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_more_rows_than_the_grid_cap(rms):
    # 4 rows per block and at most 2^20 blocks: the warp-per-row kernels loop over further rows
    rows = (1 << 22) + 37
    _check_fwd_bwd(rows, 8, F32, F32, True, True, not rms, rms)


def test_zero_rows_backward_gives_zero_param_grads():
    from lmkernels import _cuda

    cols = 300
    dw, _ = _out((cols,), F32)
    db, _ = _out((cols,), F32)
    _cuda.norm_bwd(0, 0, 0, 0, 0, 0, 0, dw.data_ptr(), db.data_ptr(), 0, 0, 0, 0, cols, True,
                   torch.cuda.current_stream().cuda_stream)  # fmt: skip
    torch.cuda.synchronize()
    assert bool((dw == 0).all()) and bool((db == 0).all())


def test_offsets_beyond_2_31_elements():
    rows, cols = 32769, 65536  # rows * cols = 2^31 + 65536
    need = 4 * rows * cols * 2 + (1 << 30)  # x, y, dy, dh in fp16 plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(
            f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free"
        )
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn((rows, cols), generator=gen, device=DEVICE, dtype=F16)
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device=DEVICE)
    _FWD(x, None, None, None, y, None, None, rstd, 1e-6, True)
    last = slice(rows - 3, rows)
    y_b, _, _, rstd_b = reference.norm_fwd(x[last], None, None, None, 1e-6, True)
    assert torch.allclose(rstd[last], rstd_b, rtol=1e-5)
    assert torch.allclose(y[last].float(), y_b.float(), rtol=2e-3, atol=2e-3)
    del y
    dy = torch.randn((rows, cols), generator=gen, device=DEVICE, dtype=F16)
    dh = torch.empty_like(x)
    db = torch.empty(cols, device=DEVICE)
    _BWD(dy, None, x, None, None, rstd, dh, None, db, True)
    dh_b, _, _ = reference.norm_bwd(dy[last], None, x[last], None, None, rstd[last], True)
    assert torch.allclose(dh[last].float(), dh_b.float(), rtol=2e-3, atol=2e-3)
    db_ref = torch.zeros(cols, device=DEVICE, dtype=torch.float64)
    for r0 in range(0, rows, 4096):
        db_ref += dy[r0 : r0 + 4096].double().sum(0)
    assert torch.allclose(db.double(), db_ref, rtol=1e-4, atol=1e-2)
