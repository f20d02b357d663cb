"""The Triton cross-entropy launcher (lmkernels.triton_kernels.cross_entropy.cross_entropy_fwd)
called directly, against csrc/include/lmk/cross_entropy.h as lmkernels.reference computes it in
fp64 on the same (already rounded) inputs: fp32 / fp16 / bf16 logits; every option (class
weights, label smoothing, soft-cap, z-loss, per-row / scalar / strided scale); ignored and
out-of-range targets (never dereferenced), rows 0 / 1 / odd, cols 0 / 1 / 7 / 1000 / 3001, rows
strided wider than cols with NaN between them, in place (grad is logits), NaN and +inf rows,
-inf logits, loss-only and grad-only calls, a row offset past 2^31 elements, bad arguments; and
every launch is one of aot_specs().

On a machine without a GPU the kernel runs in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small and the chunk lengths are
lowered (small_blocks) to make rows of a few hundred columns loop over many chunks.

Accuracy. The loss is fp32 for every data type and is computed from inputs the fp64 oracle sees
exactly, so one bound serves all: a first-order error analysis of the kernel's fp32 arithmetic,
8 * 2^-24 times the magnitudes the roundings act on (|lse| + max|z| + log2(cols) + chunks for the
log-sum-exp, which every term multiplies). The gradient gets the same analysis per element plus
one rounding to the data type (one ulp of the exact value: fp32 noise may move the rounded
value to the exact value's other neighbour) and, below the normal range, the subnormal step
(and fp32's exp below 2^-126, accurate to 2^-126 only: that shows in bf16).
The suite's rule (lmkernels.testing.assert_accurate: at most 2x the error of the same formula
computed in the data type, here the reference run on the rounded inputs) is checked as well.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from launch_recorder import Recorder, spec_key

from conftest import device_for, free_ram_gib
from lmkernels import reference
from lmkernels.backends import availability
from lmkernels.testing import assert_accurate

_REASON = availability("triton", device_for("triton"))
if _REASON is not None:
    pytest.skip(f"triton unavailable: {_REASON}", allow_module_level=True)

from lmkernels.triton_kernels import cross_entropy as k  # noqa: E402

DEV = device_for("triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
U32 = 2.0**-24  # fp32 unit roundoff
# one unit in the last place of T (at 1)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SMALL_BLOCKS = (16, 64)
# (weight, label_smoothing, softcap, z_loss, scale): "row" = a (rows,) scale, "scalar" = ()
OPTIONS = {
    "plain": (False, 0.0, 0.0, 0.0, None),
    "weight_smooth": (True, 0.1, 0.0, 0.0, None),
    "softcap": (False, 0.0, 4.0, 0.0, "row"),
    "zloss_scalar": (False, 0.0, 0.0, 1e-3, "scalar"),
    "all": (True, 0.2, 3.0, 1e-2, "row"),
}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(k, "BLOCKS", SMALL_BLOCKS)
    assert k.cross_entropy_config(1000, torch.float32).block == 64


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _inputs(rows, cols, dtype, gen, option, ignore_index=-100):
    """Logits spread over a few units (so p ranges over many magnitudes), targets with one row
    ignored (odd rows > 2) and the option's weight / scale."""
    has_w, eps, cap, zl, scale_kind = OPTIONS[option]
    x = (torch.randn(rows, cols, generator=gen) * 3).to(dtype).to(DEV)
    t = torch.randint(0, max(cols, 1), (rows,), generator=gen).to(DEV)
    if rows > 2:
        t[1] = ignore_index
    w = (torch.rand(cols, generator=gen) * 2 + 0.1).to(DEV) if has_w else None
    scale = None
    if scale_kind == "row":
        scale = (torch.randn(rows, generator=gen) * 2).to(DEV)
    elif scale_kind == "scalar":
        scale = torch.tensor(0.37, device=DEV)
    return x, t, w, dict(ignore_index=ignore_index, label_smoothing=eps, softcap=cap,
                         z_loss=zl, scale=scale)  # fmt: skip


def _run(x, t, w, opts, want_loss=True, want_grad=True):
    loss = torch.full((x.shape[0],), 1234.5, device=DEV) if want_loss else None
    grad = torch.full_like(x, 1234.5) if want_grad else None
    k.cross_entropy_fwd(x, t, w, loss, grad, **opts)
    return loss, grad


def _oracle(x, t, w, opts, dtype=torch.float64):
    """reference.cross_entropy_rows on the same values in `dtype` (fp64: the exact answer; the
    data type: the 'torch in that precision' baseline), options rounded to fp32 as the kernel
    does."""
    sc = opts["scale"]
    return reference.cross_entropy_rows(
        x.to(dtype), t, None if w is None else w.to(dtype if dtype == torch.float64 else w.dtype),
        opts["ignore_index"], _f32(opts["label_smoothing"]), _f32(opts["softcap"]),
        _f32(opts["z_loss"]), None if sc is None else sc.to(torch.float64 if dtype ==
                                                           torch.float64 else torch.float32),
        True,
    )  # fmt: skip


def _bounds(x, t, w, opts, chunk):
    """Per-row loss and per-element gradient error bounds (see the module docstring)."""
    rows, cols = x.shape
    x = x.double()
    cap, eps, zl = _f32(opts["softcap"]), _f32(opts["label_smoothing"]), _f32(opts["z_loss"])
    z = cap * torch.tanh(x / cap) if cap > 0 else x
    ii = opts["ignore_index"]
    valid = (t != ii) & (t >= 0) & (t < cols)
    tc = torch.where(valid, t, 0)
    w64 = torch.ones(cols, dtype=torch.float64, device=x.device) if w is None else w.double()
    lse = torch.logsumexp(z, 1)
    wt = w64[tc]
    big_w, s_abs = w64.sum(), (z.abs() * w64).sum(1)
    # |lse| + max|z| + the roundings of the per-lane sums and of their combination
    a = lse.abs() + z.abs().amax(1) + math.log2(max(cols, 2)) + math.ceil(cols / chunk) + 4
    mag_loss = a * ((1 - eps) * wt + eps / cols * (big_w + s_abs) + zl * 3 * lse.abs())
    loss_bound = 8 * U32 * mag_loss
    sc = opts["scale"]
    ones = torch.ones(rows, dtype=torch.float64, device=x.device)
    sc = ones if sc is None else sc.double().expand(rows)
    p = torch.exp(z - lse[:, None])
    coef_p = (1 - eps) * wt + eps * big_w / cols + 2 * zl * lse
    onehot = torch.zeros_like(z).scatter_(1, tc[:, None], 1.0)
    terms = p * coef_p[:, None].abs() + eps / cols * w64 + onehot * ((1 - eps) * wt)[:, None]
    # the soft-cap's factor 1 - tanh^2 and (+ 1) its absolute error's scale
    d = (1 - (z / cap) ** 2).abs() + 1 if cap > 0 else torch.ones_like(z)
    grad_bound = 8 * U32 * sc.abs()[:, None] * terms * a[:, None] * d
    # an fp32 exp whose result is below the normal range (2^-126) is only accurate to a step of
    # that range (numpy's fp32 exp here, ex2.approx on the GPU): it matters for bf16 gradients
    grad_bound += 2.0**-125 * (sc * coef_p).abs()[:, None] * d
    return loss_bound, grad_bound


def _check(x, t, w, opts, loss, grad, what, chunk=64):
    """loss / grad (either may be None) against the fp64 oracle, with _bounds' margins, and the
    suite's 2x-torch rule."""
    dtype = x.dtype
    ref_loss, ref_grad = _oracle(x, t, w, opts)
    base_loss, base_grad = _oracle(x, t, w, opts, dtype)
    loss_bound, grad_bound = _bounds(x, t, w, opts, chunk)
    if loss is not None:
        assert loss.dtype == torch.float32 and loss.shape == (x.shape[0],), what
        err = (loss.double() - ref_loss).abs()
        bad = err > loss_bound
        assert not bad.any(), f"{what}: loss {err[bad].tolist()} > {loss_bound[bad].tolist()}"
        assert_accurate(loss, base_loss, ref_loss, torch.float32, what + " loss")
    if grad is not None:
        assert grad.dtype == dtype and grad.shape == x.shape, what
        tiny = torch.finfo(dtype).smallest_normal * EPS[dtype]  # the subnormals' step
        bound = grad_bound + EPS[dtype] * ref_grad.abs() + tiny
        err = (grad.double() - ref_grad).abs()
        bad = err > bound
        assert not bad.any(), (f"{what}: {int(bad.sum())} gradient elements off, worst "
                               f"{(err - bound).max().item():.3g}")  # fmt: skip
        assert_accurate(grad, base_grad, ref_grad, dtype, what + " grad")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# ------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(small_blocks, dtype, option):
    # cols 1 and 7 inside one chunk, 1000 and 3001 over 16 and 47 chunks of 64 ending mid-chunk;
    # rows 1 and 5 (one of them ignored)
    gen = torch.Generator().manual_seed(hash((option, str(dtype))) % 2**31)
    shapes = [(5, 7), (5, 1000)] if option != "all" else [(1, 1), (5, 7), (5, 1000), (3, 3001)]
    for rows, cols in shapes:
        x, t, w, opts = _inputs(rows, cols, dtype, gen, option)
        loss, grad = _run(x, t, w, opts)
        _check(x, t, w, opts, loss, grad, f"{option} {dtype} {rows}x{cols}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_default_blocks(dtype):
    # the shipped configs: 300 columns in one 1024 chunk, 5000 over two 4096 chunks
    gen = torch.Generator().manual_seed(5)
    for rows, cols in ((3, 300), (2, 5000)):
        x, t, w, opts = _inputs(rows, cols, dtype, gen, "all")
        loss, grad = _run(x, t, w, opts)
        _check(x, t, w, opts, loss, grad, f"default blocks {dtype} {rows}x{cols}", chunk=4096)


def test_large_logits_and_tiny_probabilities(small_blocks):
    # logits up to +-60: most p_c underflow to subnormal / zero gradients in fp16 / bf16
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        x = (torch.randn(3, 200, generator=gen) * 20).to(dtype).to(DEV)
        t = torch.tensor([3, 0, 199], device=DEV)
        opts = dict(ignore_index=-100, label_smoothing=0.0, softcap=0.0, z_loss=0.0, scale=None)
        loss, grad = _run(x, t, None, opts)
        _check(x, t, None, opts, loss, grad, f"large logits {dtype}")


# ---------------------------------------------------------------------- targets and rows


def test_ignored_and_out_of_range_targets_are_never_read(small_blocks):
    """Rows whose target is ignore_index (the default, and a custom one that is a valid class)
    or outside [0, cols) (including far outside: a read would fault) give loss 0 and gradient
    0, even when the row itself is NaN; the logits live in a NaN-filled buffer."""
    gen = torch.Generator().manual_seed(2)
    rows, cols = 9, 100
    for dtype in DTYPES:
        for ii in (-100, 3):
            buf = torch.full((rows * cols + 256,), float("nan"), dtype=dtype, device=DEV)
            x = buf[: rows * cols].view(rows, cols)
            x.copy_(torch.randn(rows, cols, generator=gen) * 2)
            t = torch.randint(0, cols, (rows,), generator=gen).to(DEV)
            t[t == ii] = 0
            bad = {1: ii, 2: cols, 4: -1, 5: 2**40, 7: -(2**40), 8: cols + 50}
            for r, v in bad.items():
                t[r] = v
            x[5] = float("nan")  # an ignored row's own logits: not read
            opts = dict(ignore_index=ii, label_smoothing=0.1, softcap=2.0, z_loss=1e-3,
                        scale=torch.rand(rows, generator=gen).to(DEV))  # fmt: skip
            w = torch.rand(cols, generator=gen).to(DEV) + 0.5
            loss, grad = _run(x, t, w, opts)
            ign = torch.tensor([r in bad for r in range(rows)], device=DEV)
            assert torch.all(loss[ign] == 0) and torch.all(grad[ign] == 0), (dtype, ii)
            keep = ~ign
            _check(x[keep], t[keep], w, dict(opts, scale=opts["scale"][keep]), loss[keep],
                   grad[keep], f"ignored rows {dtype} ii {ii}")  # fmt: skip


def test_rows_zero_one_odd_and_cols_zero(small_blocks):
    gen = torch.Generator().manual_seed(4)
    for rows in (1, 2, 9):
        x, t, w, opts = _inputs(rows, 70, torch.float32, gen, "all")
        loss, grad = _run(x, t, w, opts)
        _check(x, t, w, opts, loss, grad, f"rows {rows}")
    # rows == 0: nothing is launched
    x, t = torch.empty(0, 70), torch.empty(0, dtype=torch.int64)
    loss, grad = torch.empty(0), torch.empty(0, 70)
    k.cross_entropy_fwd(x, t, None, loss, grad, ignore_index=-100, label_smoothing=0.0,
                        softcap=0.0, z_loss=0.0, scale=None)  # fmt: skip
    # cols == 0: every target is out of range: loss 0 (written), as the reference
    x, t = torch.empty(3, 0), torch.tensor([0, -100, 5])
    loss = torch.full((3,), 7.0)
    k.cross_entropy_fwd(x, t, None, loss, torch.empty(3, 0), ignore_index=-100,
                        label_smoothing=0.1, softcap=0.0, z_loss=0.0, scale=None)  # fmt: skip
    ref_loss, _ = reference.cross_entropy_rows(x, t, None, -100, 0.1, 0.0, 0.0, None, False)
    assert torch.equal(loss, ref_loss) and torch.all(loss == 0)


# -------------------------------------------------------------------- layouts and aliasing


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_strided_rows_and_in_place(small_blocks, dtype):
    """Logits rows wider apart than cols (NaN between them), the gradient into a strided view
    (nothing written between its rows), and in place (grad is logits): bitwise equal to the
    out-of-place result."""
    gen = torch.Generator().manual_seed(6)
    rows, cols, pad = 5, 150, 13
    x0, t, w, opts = _inputs(rows, cols, dtype, gen, "all")
    wide = torch.full((rows, cols + pad), float("nan"), dtype=dtype, device=DEV)
    x = wide[:, 5 : 5 + cols]
    x.copy_(x0)
    gwide = torch.full((rows, cols + pad), 1234.5, dtype=dtype, device=DEV)
    g = gwide[:, 2 : 2 + cols]
    loss = torch.empty(rows, device=DEV)
    k.cross_entropy_fwd(x, t, w, loss, g, **opts)
    _check(x0, t, w, opts, loss, g, f"strided {dtype}")
    outside = torch.ones_like(gwide, dtype=torch.bool)
    outside[:, 2 : 2 + cols] = False
    assert torch.all(gwide[outside] == 1234.5), "written between the gradient's rows"

    ref_loss, ref_grad = _run(x0, t, w, opts)
    for xi in (x0.clone(), x):  # contiguous and strided, in place
        loss_i = torch.empty(rows, device=DEV)
        k.cross_entropy_fwd(xi, t, w, loss_i, xi, **opts)
        assert torch.equal(_bits(xi), _bits(ref_grad)), f"in place {dtype}: grad differs"
        assert torch.equal(loss_i, ref_loss), f"in place {dtype}: loss differs"
    assert torch.isnan(wide[:, :5]).all() and torch.isnan(wide[:, 5 + cols :]).all()


def test_loss_only_and_grad_only(small_blocks):
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        x, t, w, opts = _inputs(5, 200, dtype, gen, "all")
        x_before = x.clone()
        loss, grad = _run(x, t, w, opts)
        loss_only, none = _run(x, t, w, opts, want_grad=False)
        assert none is None and torch.equal(loss_only, loss)
        assert torch.equal(_bits(x), _bits(x_before)), "loss-only call wrote the logits"
        none, grad_only = _run(x, t, w, opts, want_loss=False)
        assert none is None and torch.equal(_bits(grad_only), _bits(grad))


def test_scale_forms(small_blocks):
    """scale None, () and (rows,) (also a strided view, with zero and negative values): the
    gradient is scaled per row, the loss never."""
    gen = torch.Generator().manual_seed(10)
    rows, cols = 5, 90
    x, t, w, opts = _inputs(rows, cols, torch.float32, gen, "weight_smooth")
    base = torch.randn(2 * rows, generator=gen).to(DEV)
    base[4] = 0.0  # row 2 of base[::2]
    for scale in (None, torch.tensor(-1.5, device=DEV), base[::2], base[:rows].contiguous()):
        o = dict(opts, scale=scale)
        loss, grad = _run(x, t, w, o)
        _check(x, t, w, o, loss, grad, f"scale {None if scale is None else scale.shape}")
        ref, _ = _run(x, t, w, opts, want_grad=False)
        assert torch.equal(loss, ref), "the loss depends on the scale"
    assert torch.all(_run(x, t, w, dict(opts, scale=base[::2]))[1][2] == 0)  # scale 0 row


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_nan_and_inf_rows_stay_in_their_row(small_blocks):
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        for option in ("plain", "all"):
            x, t, w, opts = _inputs(5, 130, dtype, gen, option)
            t[2] = 4
            x[2, 77] = float("nan")
            # +inf: inf - inf in the max-shifted sum, NaN (as torch); soft-capped, it is cap
            x[3, 5] = float("inf")
            capped = opts["softcap"] > 0
            loss, grad = _run(x, t, w, opts)
            for r in (2,) if capped else (2, 3):
                assert torch.isnan(loss[r]) and torch.isnan(grad[r]).all(), (dtype, option, r)
            keep = torch.tensor([0, 1, 3, 4] if capped else [0, 1, 4], device=DEV)
            sc = opts["scale"]
            o = dict(opts, scale=sc[keep] if sc is not None and sc.dim() else sc)
            _check(x[keep], t[keep], w, o, loss[keep], grad[keep], f"NaN row {dtype} {option}")


# (at eps == 0 the interpreter still evaluates the discarded 0 * inf smoothing term: numpy warns)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_minus_inf_logits_are_masked_classes(small_blocks):
    """A -inf logit (a masked vocabulary entry) has p = 0 and no gradient. Without smoothing the
    loss is finite, as torch's cross_entropy (the smoothing term is not evaluated at eps == 0);
    with smoothing it is +inf (the uniform target puts mass on the -inf class), as torch's."""
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(13)).to(DEV)
    x[:, 60:] = -float("inf")
    t = torch.tensor([5, 59, -100], device=DEV)
    for eps in (0.0, 0.1):
        opts = dict(ignore_index=-100, label_smoothing=eps, softcap=0.0, z_loss=0.0, scale=None)
        loss, grad = _run(x, t, None, opts)
        want = F.cross_entropy(x.double(), t, reduction="none", label_smoothing=eps)
        assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-6), (eps, loss, want)
        _, ref_grad = _oracle(x, t, None, opts)
        # no gradient through a -inf logit but the smoothing's -eps / cols (rows 0, 1; row 2
        # is ignored)
        assert torch.isfinite(grad).all() and torch.all(grad[:2, 60:] == -_f32(eps) / 100)
        assert torch.allclose(grad.double(), ref_grad, rtol=1e-5, atol=1e-7), eps


def test_row_offsets_past_2_31():
    """Row 2 of a (3, 16) fp16 view whose rows are 2^30 + 16 elements apart starts at element
    2^31 + 32: its offset only fits 64 bits. The storage is allocated, not touched (about
    3 pages of it are)."""
    if free_ram_gib() < 6:
        pytest.skip(f"needs ~4 GiB of free RAM (virtual), {free_ram_gib():.1f} GiB available")
    stride = 2**30 + 16
    buf = torch.empty(2 * stride + 16, dtype=torch.float16, device=DEV)
    x = buf.as_strided((3, 16), (stride, 1))
    x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(14)).half().to(DEV)
    x.copy_(x0)
    t = torch.tensor([1, 15, 7], device=DEV)
    opts = dict(ignore_index=-100, label_smoothing=0.1, softcap=0.0, z_loss=0.0, scale=None)
    ref_loss, ref_grad = _run(x0, t, None, opts)
    loss = torch.empty(3, device=DEV)
    k.cross_entropy_fwd(x, t, None, loss, x, **opts)  # in place, through the 64-bit offsets
    assert torch.equal(loss, ref_loss) and torch.equal(_bits(x.clone()), _bits(ref_grad))
    del buf


# --------------------------------------------------------------------------------- errors


def test_bad_arguments():
    x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    loss, grad = torch.empty(4), torch.empty(4, 10)
    ok = dict(ignore_index=-100, label_smoothing=0.0, softcap=0.0, z_loss=0.0, scale=None)

    def call(x=x, t=t, w=None, loss=loss, grad=grad, **kw):
        k.cross_entropy_fwd(x, t, w, loss, grad, **{**ok, **kw})

    cases = [
        (dict(x=x.double(), grad=grad.double()), "float64"),
        (dict(x=x[0]), "logits must be a 2-D"),
        (dict(x=x.t().contiguous().t()), "logits's rows must be contiguous"),
        (dict(x=x.as_strided((4, 10), (5, 1))), "logits's row stride"),
        (dict(t=t.int()), "target must be"),
        (dict(t=t[:3]), "target must be"),
        (dict(t=torch.arange(8)[::2]), "target must be contiguous"),
        (dict(w=torch.ones(10, dtype=torch.float16)), "weight must be"),
        (dict(w=torch.ones(9)), "weight must be"),
        (dict(loss=None, grad=None), "at least one of loss and grad"),
        (dict(loss=torch.empty(4, dtype=torch.float16)), "loss must be"),
        (dict(loss=torch.empty(8)[::2]), "loss must be contiguous"),
        (dict(grad=torch.empty(4, 10, dtype=torch.float16)), "grad must be"),
        (dict(grad=torch.empty(4, 11)), "grad must be"),
        (dict(grad=torch.empty(10, 4).t()), "grad's rows must be contiguous"),
        (dict(scale=torch.ones(3)), "scale must be"),
        (dict(scale=torch.ones(4, dtype=torch.float64)), "scale must be"),
        (dict(scale=1.0), "scale must be"),
        (dict(ignore_index=1.0), "ignore_index must be an int"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(label_smoothing=float("nan")), "label_smoothing"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("inf")), "softcap"),
        (dict(z_loss=-1e-4), "z_loss"),
        (dict(x=torch.empty(1, 2**30, device="meta"), t=t[:1]), "fewer than 2\\^30 columns"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    # in place needs grad to be logits with logits' strides
    wide = torch.randn(4, 12)
    with pytest.raises(ValueError, match="in place"):
        call(x=wide[:, :10], grad=wide.view(-1)[:40].view(4, 10))


# ------------------------------------------------------------------------------ AOT specs


def test_aot_specs_cover_every_launch(monkeypatch):
    """Every launch over dtypes, configs (cols 1, 300, 5000: each of BLOCKS), soft-cap on / off,
    optional weight / scale / loss / grad and ignore_index values is one of aot_specs(), and
    none is dead; cross_entropy_config's picks for any cols are listed."""
    specs = k.aot_specs()
    listed = {spec_key(s) for s in specs}
    assert len(listed) == len(specs) == 3 * len(k.BLOCKS) * 2
    seen: set = set()
    monkeypatch.setattr(k, "_cross_entropy_fwd_kernel",
                        Recorder(k._cross_entropy_fwd_kernel, seen))  # fmt: skip
    gen = torch.Generator().manual_seed(15)
    for dtype in DTYPES:
        for cols in (1, 300, 5000):
            for cap in (0.0, 2.0):
                x = torch.randn(2, cols, generator=gen).to(dtype).to(DEV)
                t = torch.tensor([0, cols - 1], device=DEV)
                opts = dict(ignore_index=-100, label_smoothing=0.1, softcap=cap, z_loss=0.0,
                            scale=torch.ones(2, device=DEV))  # fmt: skip
                w = torch.ones(cols, device=DEV)
                loss, grad = _run(x, t, w, opts)
                _check(x, t, w, opts, loss, grad, f"aot {dtype} {cols} {cap}", chunk=4096)
    # the other argument forms: recorded only (their values are tested above)
    monkeypatch.setattr(
        k,
        "_cross_entropy_fwd_kernel",
        Recorder(k._cross_entropy_fwd_kernel.kernel, seen, run=False),
    )
    x, t = torch.randn(3, 300, device=DEV), torch.tensor([0, 1, 2], device=DEV)
    for ii in (-100, 0, 299, 300, 2**40):
        for scale in (None, torch.tensor(2.0, device=DEV), torch.ones(6, device=DEV)[::2]):
            for want in ((True, False), (False, True)):
                _run(x, t, None, dict(ignore_index=ii, label_smoothing=0.0, softcap=0.0,
                                      z_loss=0.0, scale=scale), *want)  # fmt: skip
    assert seen == listed, (sorted(seen - listed)[:3], sorted(listed - seen)[:3])

    by_config = {(dict(s[2])["BLOCK"], s[3]) for s in listed}
    for cols in [*range(1, 5000, 7), 32768, 50257, 262144, 2**29]:
        cfg = k.cross_entropy_config(cols, torch.float32)
        assert cfg.looped and (cfg.block, cfg.num_warps) in by_config, cols
    assert len(k.aot_specs(aligned=True)) == len(specs)
