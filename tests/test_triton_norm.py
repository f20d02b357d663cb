"""The Triton norm launchers (lmkernels.triton_kernels.norm) called directly, for what the
conformance suite does not reach: the looped (long-row) kernels, forced with lowered single-tile
limits and 32-element chunks; column counts around and between the chunk sizes; out-of-bounds
reads (inputs with a NaN tail) and writes (outputs with a sentinel tail); NaN/inf rows; the exact
block order of the dw/db reduction; bitwise-repeatable backward.

Tolerance (one rule for every output, from how the value is computed): a value v computed in
fp32 from terms t_i (y = xhat * w + b; dh = rstd * (g - c1 - xhat * c2) + dh_out; dw = sum of
dy * xhat; ...) and then rounded to its dtype must satisfy

    |ours - ref| <= ulp_dtype(ref) + 1e-5 * sum_i |t_i|

1e-5 is fp32's relative tolerance (a few hundred ulp of fp32: the statistics are reductions
summed in a different order than torch's), taken relative to the terms because cancellation
makes the error relative to the terms, not to the result; one ulp of the output dtype covers a
final rounding that lands on the other side of a rounding boundary (for 16-bit outputs that ulp
dominates, so they are within one ulp of the reference's rounded value). h = x + residual is
rounded once from an exact fp32 sum, so it must be bitwise equal to the reference.
"""

import pytest
import torch
from torch import Tensor

from conftest import device_for
from lmkernels import reference
from lmkernels.backends import availability
from lmkernels.ops.norm import ROWS_PER_BLOCK
from lmkernels.testing import poison_tail

RTOL32 = 1e-5
SENTINEL = 12345.0
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def k():
    reason = availability("triton", device_for("triton"))
    if reason is not None:
        pytest.skip(f"triton unavailable: {reason}")
    from lmkernels.triton_kernels import norm

    return norm


@pytest.fixture
def looped(k, monkeypatch):
    """Every row longer than 64 goes through the looped kernels, in 32-element chunks."""
    monkeypatch.setattr(k, "FWD_SINGLE_TILE_MAX_COLS", 64)
    monkeypatch.setattr(k, "BWD_SINGLE_TILE_MAX_COLS", 64)
    monkeypatch.setattr(k, "LOOPED_BLOCK", 32)
    assert k.norm_fwd_config(65).looped and k.norm_bwd_config(65).looped
    assert not k.norm_fwd_config(64).looped
    return k


# ------------------------------------------------------------------------------------ helpers


def _out(shape, dtype, device) -> tuple[Tensor, Tensor]:
    """An output view at the start of a larger buffer whose tail holds SENTINEL."""
    n = torch.Size(shape).numel()
    buf = torch.full((n + 64,), SENTINEL, dtype=dtype, device=device)
    return buf[:n].view(shape), buf


def _untouched(buf: Tensor, view: Tensor, what: str) -> None:
    tail = buf[view.numel() :]
    assert torch.all(tail == SENTINEL), f"{what}: written past its end"


def _same(ours: Tensor, ref: Tensor, what: str) -> None:
    torch.testing.assert_close(
        ours, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _ulp(ref: Tensor) -> Tensor:
    """Spacing of ref's dtype just above |ref|, as fp64."""
    a = ref.abs()
    up = torch.nextafter(a, torch.full_like(a, float("inf")))
    return (up.double() - a.double()).nan_to_num(0.0, 0.0, 0.0)


def _check(ours: Tensor, ref: Tensor, terms: Tensor, what: str, exact: Tensor | None = None):
    """NaN/inf patterns equal; elsewhere |ours - ref| <= ulp(ref) + RTOL32 * terms.

    With ``exact`` (the fp64 value before rounding), also: where ours != ref, the exact value
    must lie within RTOL32 * terms of the rounding boundary between them, i.e. the two fp32
    computations merely straddled it. Catches a rounding other than to nearest (truncation is
    off by one ulp for half of the elements, with exact values far from any boundary)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    o, r = ours.double(), ref.double()
    for name, pred in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = pred(o) != pred(r)
        assert not bad.any(), f"{what}: {name} pattern differs at {bad.nonzero()[:5].tolist()}"
    fin = torch.isfinite(r)
    err = (o - r).abs()
    slack = RTOL32 * terms.double().abs()
    bound = _ulp(ref) + slack
    bad = fin & (err > bound)
    if exact is not None:
        bad |= fin & (o != r) & (((o + r) / 2 - exact).abs() > slack)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of bounds, e.g. at {list(i)}: ours "
            f"{o[i].item()!r}, ref {r[i].item()!r}, bound {bound[i].item():.3g}"
            + ("" if exact is None else f", exact {exact[i].item()!r}")
        )


def _inputs(rows, cols, t, s, rms, has_w, has_b, device, seed):
    """Poisoned-tail inputs of norm_fwd / norm_bwd: x, residual, weight, bias, dy, dh_out."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    # row means well away from zero (layer norm must subtract them), non-unit scales
    x = rnd(rows, cols, scale=1.5, shift=2.0) + rnd(rows, 1, scale=3.0)
    x = poison_tail(x.to(DT[t]).to(device))
    res = None if s is None else poison_tail(rnd(rows, cols, scale=0.7).to(DT[s]).to(device))
    w = poison_tail(rnd(cols, scale=0.5, shift=1.0).to(device)) if has_w else None
    b = poison_tail(rnd(cols, scale=0.3).to(device)) if has_b else None
    dy = poison_tail((rnd(rows, cols) * 1.7 + 0.3).to(DT[t]).to(device))
    dh_out = None if s is None else poison_tail(rnd(rows, cols, scale=0.5).to(DT[s]).to(device))
    return x, res, w, b, dy, dh_out


def _run_fwd(k, x, res, w, b, rms, eps=1e-5):
    rows, cols = x.shape
    dev = x.device
    y, y_buf = _out((rows, cols), x.dtype, dev)
    h, h_buf = _out((rows, cols), res.dtype, dev) if res is not None else (None, None)
    mean, mean_buf = (None, None) if rms else _out((rows,), torch.float32, dev)
    rstd, rstd_buf = _out((rows,), torch.float32, dev)
    k.norm_fwd(x, res, w, b, y, h, mean, rstd, eps, rms)
    for name, v, buf in (("y", y, y_buf), ("h", h, h_buf), ("mean", mean, mean_buf),
                         ("rstd", rstd, rstd_buf)):  # fmt: skip
        if v is not None:
            _untouched(buf, v, name)
    return y, h, mean, rstd


def _run_bwd(k, dy, dh_out, h, w, mean, rstd, rms, need_dw=True, need_db=True):
    rows, cols = dy.shape
    dev = dy.device
    dh, dh_buf = _out((rows, cols), h.dtype, dev)
    dw, dw_buf = _out((cols,), torch.float32, dev) if need_dw else (None, None)
    db, db_buf = _out((cols,), torch.float32, dev) if need_db else (None, None)
    k.norm_bwd(dy, dh_out, h, w, mean, rstd, dh, dw, db, rms)
    for name, v, buf in (("dh", dh, dh_buf), ("dw", dw, dw_buf), ("db", db, db_buf)):
        if v is not None:
            _untouched(buf, v, name)
    return dh, dw, db


def _check_all(k, rows, cols, t, s, rms, has_w, has_b, seed, device):
    tag = f"{t}/S={s} rms={rms} w={has_w} b={has_b} {rows}x{cols}"
    x, res, w, b, dy, dh_out = _inputs(rows, cols, t, s, rms, has_w, has_b, device, seed)
    y, h, mean, rstd = _run_fwd(k, x, res, w, b, rms)
    ry, rh, rmean, rrstd = reference.norm_fwd(x, res, w, b, 1e-5, rms)

    # fp64 terms of every output, from the reference's h as stored
    hs = (x if res is None else rh).double()
    mean64 = hs.new_zeros(rows) if rms else hs.mean(-1)
    xc = hs - mean64[:, None]
    rstd64 = 1 / (xc.pow(2).mean(-1) + 1e-5).sqrt()
    # the terms of xhat = (h - mean) * rstd: the subtraction cancels
    xterm = (hs.abs() + mean64.abs()[:, None]) * rstd64[:, None]
    w64 = hs.new_ones(cols) if w is None else w.double()
    b64 = hs.new_zeros(cols) if b is None else b.double()

    if res is not None:
        _same(h, rh, f"{tag}: h (x + residual, rounded once)")
    y64 = xc * rstd64[:, None] * w64 + b64
    _check(y, ry, xterm * w64.abs() + b64.abs(), f"{tag}: y", exact=y64)
    _check(rstd, rrstd, rstd64, f"{tag}: rstd")
    if not rms:
        _check(mean, rmean, hs.abs().mean(-1), f"{tag}: mean")

    hh = x if res is None else h
    dh, dw, db = _run_bwd(k, dy, dh_out, hh, w, mean, rstd, rms)
    rdh, rdw, rdb = reference.norm_bwd(dy, dh_out, hh, w, rmean, rrstd, rms)
    g = dy.double() * w64
    xhat = xc * rstd64[:, None]
    c1 = g.new_zeros(rows, 1) if rms else g.mean(-1, keepdim=True)
    c2 = (g * xhat).mean(-1, keepdim=True)
    dh64 = rstd64[:, None] * (g - c1 - xhat * c2)
    c1t = g.new_zeros(rows, 1) if rms else g.abs().mean(-1, keepdim=True)
    c2t = (g.abs() * xterm).mean(-1, keepdim=True)
    dterms = rstd64[:, None] * (g.abs() + c1t + xterm * c2t)
    if dh_out is not None:
        dh64 = dh64 + dh_out.double()
        dterms = dterms + dh_out.double().abs()
    _check(dh, rdh, dterms, f"{tag}: dh", exact=dh64)
    _check(dw, rdw, (dy.double().abs() * xterm).sum(0), f"{tag}: dw")
    _check(db, rdb, dy.double().abs().sum(0), f"{tag}: db")


# (T, S): S None = no residual
STREAMS = [("fp32", None), ("fp32", "fp32"), ("bf16", None), ("bf16", "bf16"), ("bf16", "fp32"),
           ("fp16", "fp16")]  # fmt: skip
AFFINE = [(True, True), (False, False), (True, False), (False, True)]  # (weight, bias)
# (rows, cols, LOOPED_BLOCK): few rows (the interpreter pays ~15 ms per program; the tests of
# the dw/db blocks below use more), cols on either side of the lowered limit (64) and of a
# chunk; the larger chunks keep the long rows cheap while still ending mid-chunk
TILE_SHAPES = [(5, 1, None), (5, 3, None), (4, 127, None), (3, 1000, None)]
LOOPED_SHAPES = [(5, 65, 32), (3, 127, 32), (3, 1000, 256), (2, 4097, 256)]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("stream", STREAMS, ids=lambda p: f"{p[0]}-S{p[1]}")
@pytest.mark.parametrize("path", ["tile", "looped"])
def test_fwd_bwd_against_reference(k, monkeypatch, path, stream, rms):
    if path == "looped":
        monkeypatch.setattr(k, "FWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "BWD_SINGLE_TILE_MAX_COLS", 64)
    shapes = LOOPED_SHAPES if path == "looped" else TILE_SHAPES
    t, s = stream
    for i, (rows, cols, block) in enumerate(shapes):
        if block is not None:
            monkeypatch.setattr(k, "LOOPED_BLOCK", block)
        # weight/bias presence rotates with the shape and the stream, so every combination
        # meets every path and kind
        has_w, has_b = AFFINE[(i + STREAMS.index(stream)) % len(AFFINE)]
        assert k.norm_fwd_config(cols).looped == (path == "looped" and cols > 64)
        _check_all(k, rows, cols, t, s, rms, has_w, has_b, seed=cols + rows, device=device_for(
            "triton"))  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["tile", "looped"])
def test_nan_and_inf_stay_in_their_row(k, monkeypatch, path):
    if path == "looped":
        monkeypatch.setattr(k, "FWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "BWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "LOOPED_BLOCK", 32)
    dev = device_for("triton")
    for rms in (False, True):
        x, res, w, b, dy, _ = _inputs(4, 100, "bf16", "fp32", rms, True, True, dev, seed=5)
        x[1, 7] = float("nan")
        x[2, 50] = float("inf")
        x[3, 99] = -float("inf")
        y, h, mean, rstd = _run_fwd(k, x, res, w, b, rms)
        ry, rh, rmean, rrstd = reference.norm_fwd(x, res, w, b, 1e-5, rms)
        assert torch.isfinite(y[0]).all() and torch.isfinite(rstd[0])
        inf = torch.full_like(ry, float("inf"), dtype=torch.float64)
        _check(y, ry, inf, f"rms={rms}: y")  # patterns only
        _same(h, rh, "h")
        _check(rstd, rrstd, inf[:, 0], f"rms={rms}: rstd")
        dh, dw, db = _run_bwd(k, dy, None, h, w, mean, rstd, rms)
        rdh, rdw, rdb = reference.norm_bwd(dy, None, h, w, rmean, rrstd, rms)
        assert torch.isfinite(dh[0]).all()
        _check(dh, rdh, inf.float(), f"rms={rms}: dh")
        _check(dw, rdw, inf[0], f"rms={rms}: dw")


@pytest.mark.parametrize("path", ["tile", "looped"])
def test_large_mean_keeps_the_std_digits(k, monkeypatch, path):
    """x = 100 + 0.01 * noise: summing x itself in fp32 leaves the mean (and so every centred
    value) off by up to half an ulp of 100, i.e. 4e-4 of the std; the kernels sum x - x[0]
    instead, so y stays within fp32's 1e-5 of the fp64 oracle."""
    if path == "looped":
        monkeypatch.setattr(k, "FWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "LOOPED_BLOCK", 128)
    g = torch.Generator().manual_seed(2)
    x = (100.0 + 0.01 * torch.randn(3, 1000, generator=g)).to(device_for("triton"))
    res = 0.001 * torch.randn(3, 1000, generator=g).to(x.device)
    for r in (None, res):
        y, h, mean, rstd = _run_fwd(k, x, r, None, None, False)
        h64 = (x if r is None else h).double()
        mean64 = h64.mean(-1, keepdim=True)
        rstd64 = 1 / ((h64 - mean64).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        y64 = (h64 - mean64) * rstd64
        assert (y.double() - y64).abs().max() <= 1e-5
        assert ((rstd.double() - rstd64[:, 0]) / rstd64[:, 0]).abs().max() <= 1e-5
        assert (mean.double() - mean64[:, 0]).abs().max() <= 1e-5 * 100


def _bits(t: Tensor) -> Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


@pytest.mark.parametrize("path", ["tile", "looped"])
def test_backward_is_bitwise_repeatable(k, monkeypatch, path):
    if path == "looped":
        monkeypatch.setattr(k, "BWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "LOOPED_BLOCK", 64)
    dev = device_for("triton")
    rows, cols = ROWS_PER_BLOCK + 3, 100  # two blocks, the last one partial
    x, res, w, b, dy, dh_out = _inputs(rows, cols, "bf16", "bf16", False, True, True, dev, 11)
    _, h, mean, rstd = _run_fwd(k, x, res, w, b, False)
    first = [_bits(t) for t in _run_bwd(k, dy, dh_out, h, w, mean, rstd, False)]
    again = [_bits(t) for t in _run_bwd(k, dy, dh_out, h, w, mean, rstd, False)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("path", ["tile", "looped"])
def test_dw_db_are_block_partials_added_in_block_order(k, monkeypatch, path):
    """norm.h: each block of ROWS_PER_BLOCK rows sums dy * xhat (dy) over its rows in row order,
    and the block partials are added in block order. The interpreter does plain fp32 numpy
    arithmetic (no FMA contraction), so the same additions in torch give the very same bits."""
    if device_for("triton") != "cpu":
        pytest.skip("bit-exact only in the interpreter (a GPU contracts mul + add into fma)")
    if path == "looped":
        monkeypatch.setattr(k, "BWD_SINGLE_TILE_MAX_COLS", 64)
        monkeypatch.setattr(k, "LOOPED_BLOCK", 32)
    rows, cols = ROWS_PER_BLOCK + 5, 80  # two blocks, the last one partial
    for rms in (False, True):
        x, _, w, _, dy, _ = _inputs(rows, cols, "fp16", None, rms, True, False, "cpu", 3)
        _, _, mean, rstd = _run_fwd(k, x, None, w, None, rms)
        _, dw, db = _run_bwd(k, dy, None, x, w, mean, rstd, rms)
        hs, dys = x.float(), dy.float()
        xhat = (hs if rms else hs - mean[:, None]) * rstd[:, None]
        want_dw = torch.zeros(cols)
        want_db = torch.zeros(cols)
        for r0 in range(0, rows, ROWS_PER_BLOCK):
            part_dw = torch.zeros(cols)
            part_db = torch.zeros(cols)
            for r in range(r0, min(r0 + ROWS_PER_BLOCK, rows)):
                part_dw = part_dw + dys[r] * xhat[r]
                part_db = part_db + dys[r]
            want_dw = want_dw + part_dw
            want_db = want_db + part_db
        assert torch.equal(_bits(dw), _bits(want_dw)), f"rms={rms}: dw"
        assert torch.equal(_bits(db), _bits(want_db)), f"rms={rms}: db"


@pytest.mark.parametrize("cols", [4096, 65536], ids=["tile", "looped"])
def test_offsets_past_2_31_elements(k, cols):
    """rows * cols > 2^31: the row offsets must be 64-bit (an int32 product would wrap and
    read/write the start of the tensor). ~17 GB of GPU memory; the interpreter would take
    hours, so this runs only on a GPU."""
    if device_for("triton") != "cuda":
        pytest.skip("needs a GPU: 2^31 elements are far too many for the Triton interpreter")
    rows = (1 << 31) // cols + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(cols, generator=g, device="cuda") + 0.5
    y, mean, rstd = torch.empty_like(x), torch.empty(rows, device="cuda"), torch.empty(
        rows, device="cuda")  # fmt: skip
    k.norm_fwd(x, None, w, None, y, None, mean, rstd, 1e-5, False)
    dy = torch.randn(rows, cols, generator=g, device="cuda", dtype=torch.bfloat16)
    dh, db = torch.empty_like(x), torch.empty(cols, device="cuda")
    k.norm_bwd(dy, None, x, w, mean, rstd, dh, None, db, False)
    for r in (0, rows - 1):
        ry, _, rmean, rrstd = reference.norm_fwd(x[r : r + 1], None, w, None, 1e-5, False)
        rdh, _, _ = reference.norm_bwd(dy[r : r + 1], None, x[r : r + 1], w, rmean, rrstd, False)
        xterm = (x[r].double().abs() + rmean.double().abs()) * rrstd.double()
        _check(y[r : r + 1], ry, xterm * w.double(), f"y row {r}")
        g64 = dy[r].double() * w.double()
        c = (g64.abs() * xterm).mean()
        dterms = rrstd.double() * (g64.abs() + g64.abs().mean() + xterm * c)
        _check(dh[r : r + 1], rdh, dterms[None], f"dh row {r}")
    want = sum(dy[i : i + 4096].float().sum(0) for i in range(0, rows, 4096))
    terms = sum(dy[i : i + 4096].float().abs().sum(0) for i in range(0, rows, 4096))
    _check(db, want, terms, "db")


def test_only_the_requested_parameter_gradients_are_written(looped):
    k = looped
    dev = device_for("triton")
    for cols in (50, 100):  # single tile, looped
        x, _, w, _, dy, _ = _inputs(5, cols, "fp32", None, False, True, False, dev, 7)
        _, _, mean, rstd = _run_fwd(k, x, None, w, None, False)
        full = _run_bwd(k, dy, None, x, w, mean, rstd, False)
        for need_dw, need_db in ((True, False), (False, True), (False, False)):
            dh, dw, db = _run_bwd(k, dy, None, x, w, mean, rstd, False, need_dw, need_db)
            assert torch.equal(dh, full[0])
            assert (dw is None or torch.equal(dw, full[1])) and (db is None or torch.equal(
                db, full[2]))  # fmt: skip


def test_unsupported_types_are_refused(k):
    x = torch.zeros(2, 8, dtype=torch.float16)
    y, rstd, mean = torch.empty_like(x), torch.empty(2), torch.empty(2)
    res16 = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual stream dtype"):
        k.norm_fwd(x, res16, None, None, y, torch.empty_like(res16), mean, rstd, 1e-5, False)
    with pytest.raises(ValueError, match="float64"):
        k.norm_fwd(x.double(), None, None, None, y.double(), None, mean, rstd, 1e-5, False)
    with pytest.raises(ValueError, match="weight must be float32"):
        k.norm_fwd(x, None, torch.ones(8, dtype=torch.float16), None, y, None, mean, rstd, 1e-5,
                   False)  # fmt: skip
    with pytest.raises(ValueError, match="mean must be None exactly for rms"):
        k.norm_fwd(x, None, None, None, y, None, mean, rstd, 1e-5, True)


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def test_aot_specs_cover_every_launchable_config(k):
    """Every (kernel, BLOCK, num_warps) the heuristics can pick, for every (T, S), is listed."""
    specs = k.aot_specs()
    listed = {(_name(s["kernel"]), s["constexprs"].get("BLOCK"), s["num_warps"]) for s in specs}
    for cols in [*range(1, 70), 127, 1000, 4096, 4097, 8191, 8192, 8193, 65536, 1 << 20]:
        f, b = k.norm_fwd_config(cols), k.norm_bwd_config(cols)
        fk = "_norm_fwd_looped_kernel" if f.looped else "_norm_fwd_kernel"
        assert (fk, f.block, f.num_warps) in listed, cols
        bks = ["_norm_bwd_stats_kernel", "_norm_bwd_looped_kernel"] if b.looped else [
            "_norm_bwd_kernel"]  # fmt: skip
        for bk in bks:
            assert (bk, b.block, b.num_warps) in listed, cols
    assert ("_norm_param_grad_kernel", k.PARAM_GRAD_BLOCK, k.PARAM_GRAD_WARPS) in listed
    # each kernel/config appears once per (T, S, residual, kind) combination
    fwd = [s for s in specs if _name(s["kernel"]) == "_norm_fwd_kernel"]
    types = {(s["signature"]["x_ptr"], s["signature"]["res_ptr"], s["constexprs"]["RMS"])
             for s in fwd}  # fmt: skip
    assert len(types) == 2 * 8
    assert len(k.aot_specs(aligned=True)) == len(specs)
