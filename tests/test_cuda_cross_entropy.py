"""The CUDA cross-entropy kernel (csrc/cuda/cross_entropy.cu) through ``lmkernels._cuda.
cross_entropy``, on a GPU, against ``lmkernels.reference.cross_entropy_rows``; and the argument
checks of the binding, which need only the built module.

The column counts sit on both sides of every block-size threshold of the kernel (128 threads up
to 2048 columns, 256 up to 8192, 512 up to 65536, 1024 beyond) and include odd ones (50257: rows
that start off a 16-byte boundary, so every row has scalar head and tail elements). Inputs live in
NaN-poisoned buffers (a read past the logical end, or of the gap of a row stride, shows up as
NaN) and outputs in sentinel-filled ones (a write outside the view is caught). Accuracy: the error
against an fp64 oracle (the reference run in fp64) is at most twice the fp32 reference's own
error plus a few units in the last place of the output dtype. Without a GPU the same tests run on
the CPU against a host emulation of the kernel (the last test).
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch

from lmkernels import reference
from lmkernels.ops._common import DTYPE_CODE

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the CUDA cross-entropy kernel needs one to run",
)

DEVICE = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
SENTINEL = 7.0
TAIL = 64  # poisoned / sentinel elements after every buffer
IGNORE = -100
# every block size of the kernel from both sides of its threshold, odd widths included
COLS = [1, 7, 1000, 2048, 2049, 8193, 32000, 50257, 65536, 70001, 131072]


def _dt(d):
    return str(d)[6:]


def _module():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    return _cuda


# ------------------------------------------------------------------ buffers and the wrapper


def _poisoned_buf(rows, cols, dtype, gen, stride=None, offset=0, std=3.0):
    """Random (rows, cols) logits in a NaN-filled buffer, row r at offset + r * stride; returns
    (view, buffer)."""
    stride = cols if stride is None else stride
    n = offset + (rows - 1) * stride + cols if rows else offset
    buf = torch.full((n + TAIL,), float("nan"), dtype=dtype, device=DEVICE)
    x = buf.as_strided((rows, cols), (stride, 1), offset)
    x.copy_((torch.randn(rows, cols, generator=gen, device=DEVICE) * std).to(dtype))
    return x, buf


def _poisoned(rows, cols, dtype, gen, stride=None, offset=0, std=3.0):
    return _poisoned_buf(rows, cols, dtype, gen, stride, offset, std)[0]


def _out(rows, cols, dtype, stride=None, offset=0):
    """A (rows, cols) output view into a sentinel-filled buffer; returns (view, buffer)."""
    stride = cols if stride is None else stride
    n = offset + (rows - 1) * stride + cols if rows else offset
    buf = torch.full((n + TAIL,), SENTINEL, dtype=dtype, device=DEVICE)
    return buf.as_strided((rows, cols), (stride, 1), offset), buf


def _untouched_outside(view, buf, what):
    rest = buf.clone()
    rest.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(SENTINEL)
    assert bool((rest == SENTINEL).all()), f"{what}: write outside the output view"


def _targets(rows, cols, gen, ignored=()):
    t = torch.randint(0, max(cols, 1), (rows,), generator=gen, device=DEVICE)
    for r, v in ignored:
        t[r] = v
    return t


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream():
    return torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0


def ce_call(logits, target, weight=None, scale=None, loss=None, grad=None, ignore_index=IGNORE,
            label_smoothing=0.0, softcap=0.0, z_loss=0.0):  # fmt: skip
    """_cuda.cross_entropy on tensors: logits / grad (rows, cols) with unit column stride,
    target int64 (rows,), weight fp32 (cols,), scale fp32 () or (rows,), loss fp32 (rows,)."""
    rows, cols = logits.shape
    _module().cross_entropy(
        logits=_ptr(logits),
        target=_ptr(target),
        weight=_ptr(weight),
        scale=_ptr(scale),
        loss=_ptr(loss),
        grad=_ptr(grad),
        dtype=DTYPE_CODE[logits.dtype],
        rows=rows,
        cols=cols,
        logits_row_stride=logits.stride(0),
        grad_row_stride=0 if grad is None else grad.stride(0),
        scale_stride=0 if scale is None or scale.dim() == 0 else 1,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        stream=_stream(),
    )
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ comparison


def _assert_close(ours, base, oracle, dtype, what, scale, ulps):
    """NaN/inf patterns equal to the oracle's; max error <= 2 * base error + ulps * eps(dtype) *
    scale."""
    a, b, o = ours.double(), base.double(), oracle.double()
    for name, pred in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = pred(a) != pred(o)
        assert not bool(diff.any()), f"{what}: {name} pattern differs at {int(diff.sum())} places"
    fin = torch.isfinite(o)
    if not bool(fin.any()):
        return
    err = float((a - o)[fin].abs().max())
    base_err = float((b - o)[fin].abs().max())
    bound = 2 * base_err + ulps * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (fp32 ref {base_err:.3g})"


def _max_finite(t):
    t = t.double()
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def _check(logits, target, weight=None, scale=None, ignore_index=IGNORE, eps=0.0, cap=0.0, zl=0.0,
           grad_stride=None, grad_offset=0, what=""):  # fmt: skip
    """Runs the kernel (loss and gradient) and compares both with the reference; returns them."""
    rows, cols = logits.shape
    loss, loss_buf = _out(rows, 1, F32)
    loss = loss[:, 0]
    grad, grad_buf = _out(rows, cols, logits.dtype, grad_stride, grad_offset)
    opts = dict(ignore_index=ignore_index, label_smoothing=eps, softcap=cap, z_loss=zl)
    ce_call(logits, target, weight, scale, loss, grad, **opts)
    _untouched_outside(loss, loss_buf, f"{what} loss")
    _untouched_outside(grad, grad_buf, f"{what} grad")

    args = (ignore_index, eps, cap, zl)
    base_l, base_g = reference.cross_entropy_rows(logits, target, weight, *args, scale, True)
    w64 = None if weight is None else weight.double()
    s64 = None if scale is None else scale.double()
    x64 = logits.double()
    ora_l, ora_g = reference.cross_entropy_rows(x64, target, w64, *args, s64, True)
    # the loss's rounding scales with lse and the logits (lse - z_t, W lse - S, lse^2)
    z64 = cap * torch.tanh(x64 / cap) if cap > 0 else x64
    lse = torch.logsumexp(z64, 1) if cols else torch.zeros(rows, dtype=torch.float64)
    loss_scale = max(1.0, _max_finite(ora_l), _max_finite(lse) * (1 + 2 * zl * _max_finite(lse)),
                     _max_finite(z64))  # fmt: skip
    _assert_close(loss, base_l, ora_l, F32, f"{what} loss", loss_scale, ulps=64)
    gscale = max(_max_finite(ora_g), 1e-30)
    _assert_close(grad, base_g, ora_g, logits.dtype, f"{what} grad", gscale, ulps=8)
    return loss, grad


# ------------------------------------------------------------------ the kernel on a GPU


@needs_gpu
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_matches_reference(dtype, cols):
    gen = torch.Generator(device=DEVICE).manual_seed(cols)
    rows = 5 if cols > 8192 else 33
    x = _poisoned(rows, cols, dtype, gen)
    _check(x, _targets(rows, cols, gen), what=f"{_dt(dtype)} {rows}x{cols}")
    one = _poisoned(1, cols, dtype, gen)
    _check(one, _targets(1, cols, gen), what=f"{_dt(dtype)} 1x{cols}")


# (weight, label smoothing, soft-cap, z-loss, scale: None / "scalar" / "rows")
OPTIONS = [
    (True, 0.0, 0.0, 0.0, None),
    (False, 0.1, 0.0, 0.0, "scalar"),
    (True, 0.1, 0.0, 0.0, "rows"),
    (False, 0.0, 30.0, 0.0, None),
    (False, 0.0, 0.0, 1e-4, "rows"),
    (True, 0.2, 15.0, 1e-3, "scalar"),
    (True, 1.0, 0.0, 0.0, "rows"),
]


@needs_gpu
@pytest.mark.parametrize("cols", [1000, 50257])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "w{}-eps{}-cap{}-z{}-{}".format(*o))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_options(dtype, opt, cols):
    use_w, eps, cap, zl, scale_kind = opt
    gen = torch.Generator(device=DEVICE).manual_seed(cols + 7)
    rows = 9
    x = _poisoned(rows, cols, dtype, gen, std=20.0 if cap else 3.0)
    t = _targets(rows, cols, gen, ignored=[(2, IGNORE)])
    w = torch.rand(cols, generator=gen, device=DEVICE) + 0.5 if use_w else None
    scale = None
    if scale_kind == "scalar":
        scale = torch.tensor(1.0 / rows, device=DEVICE)
    elif scale_kind == "rows":
        scale = torch.randn(rows, generator=gen, device=DEVICE)
    _check(x, t, w, scale, eps=eps, cap=cap, zl=zl, what=f"{_dt(dtype)} {opt} {cols}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_ignored_rows_and_out_of_range_targets(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    rows, cols = 8, 1000
    x = _poisoned(rows, cols, dtype, gen)
    # default ignore_index, negative, cols, far out of range (never dereferenced: a read at
    # 2^40 elements would fault), and a custom ignore_index that is also a valid class
    bad = [(0, IGNORE), (2, -1), (3, cols), (4, 1 << 40), (5, -(1 << 40)), (7, 5)]
    t = _targets(rows, cols, gen, ignored=bad)
    x[0].fill_(float("nan"))  # an ignored row is not read: NaN there changes nothing
    loss, grad = _check(x, t, ignore_index=5, eps=0.1, what=f"{_dt(dtype)} ignored")
    for r in (0, 2, 3, 4, 5, 7):
        assert float(loss[r]) == 0.0 and bool((grad[r] == 0).all()), f"row {r} not ignored"
    assert bool(torch.isfinite(loss).all())


@needs_gpu
@pytest.mark.parametrize("cols", [1000, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_row_strides_and_misaligned_rows(dtype, cols):
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    rows = 6
    # logits rows 3 elements apart beyond cols and one element into the buffer; the gradient at
    # the same offsets from a 16-byte boundary (vector stores) or at other ones (element stores)
    x = _poisoned(rows, cols, dtype, gen, stride=cols + 3, offset=1)
    t = _targets(rows, cols, gen, ignored=[(4, IGNORE)])
    w = torch.rand(cols, generator=gen, device=DEVICE) + 0.5
    tag = f"{_dt(dtype)} {cols} strided"
    _check(x, t, w, eps=0.1, grad_stride=cols + 3, grad_offset=1, what=f"{tag} same phase")
    _check(x, t, w, eps=0.1, grad_stride=cols + 1, grad_offset=2, what=f"{tag} other phase")
    _check(x, t, grad_stride=cols + 8, what=f"{tag} aligned grad")


@needs_gpu
@pytest.mark.parametrize("cols", [7, 1000, 50257, 70001])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_in_place_gradient_equals_out_of_place(dtype, cols):
    rows = 5
    # the same logits twice (rows one element apart beyond cols), one of them overwritten
    x = _poisoned(rows, cols, dtype, torch.Generator(device=DEVICE).manual_seed(cols), cols + 1)
    x_in, buf = _poisoned_buf(rows, cols, dtype, torch.Generator(device=DEVICE).manual_seed(cols),
                              cols + 1)  # fmt: skip
    gen = torch.Generator(device=DEVICE).manual_seed(cols + 1)
    t = _targets(rows, cols, gen, ignored=[(1, IGNORE)])
    w = torch.rand(cols, generator=gen, device=DEVICE) + 0.5
    scale = torch.randn(rows, generator=gen, device=DEVICE)
    opts = dict(label_smoothing=0.1, softcap=20.0, z_loss=1e-4)
    loss = torch.full((rows,), SENTINEL, device=DEVICE)
    grad, _ = _out(rows, cols, dtype)
    ce_call(x, t, w, scale, loss, grad, **opts)
    loss_in = torch.full((rows,), SENTINEL, device=DEVICE)
    ce_call(x_in, t, w, scale, loss_in, x_in, **opts)
    assert torch.equal(loss_in, loss)
    assert torch.equal(x_in, grad), "the in-place gradient differs from the out-of-place one"
    gaps = buf.clone()
    gaps.as_strided(x_in.shape, x_in.stride(), x_in.storage_offset()).fill_(float("nan"))
    assert bool(gaps.isnan().all()), "the in-place call wrote outside the logits view"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_loss_only_and_grad_only_calls(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    rows, cols = 7, 32000
    x = _poisoned(rows, cols, dtype, gen)
    t = _targets(rows, cols, gen, ignored=[(3, IGNORE)])
    opts = dict(label_smoothing=0.05, z_loss=1e-4)
    loss, grad = _check(x, t, eps=0.05, zl=1e-4, what=f"{_dt(dtype)} full")
    loss_only = torch.full((rows,), SENTINEL, device=DEVICE)
    ce_call(x, t, loss=loss_only, **opts)
    assert torch.equal(loss_only, loss)
    grad_only, buf = _out(rows, cols, dtype)
    ce_call(x, t, grad=grad_only, **opts)
    assert torch.equal(grad_only, grad)
    _untouched_outside(grad_only, buf, "grad-only")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_special_values(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    rows, cols = 6, 3000
    x = _poisoned(rows, cols, dtype, gen)
    t = _targets(rows, cols, gen)
    t[4] = 10
    x[0, 17] = float("nan")  # NaN: loss and gradient row NaN
    x[1, 5] = float("inf")  # +inf: NaN (exp(inf - inf))
    x[2, :100] = float("-inf")  # -inf logits: p = 0 there; the loss is +inf with smoothing
    x[3].fill_(float("-inf"))  # every logit -inf: lse = -inf, NaN
    x[4, 10] = float("-inf")  # the target's logit -inf: infinite loss
    x[5, 0] = 1e4  # a large logit: p = 1 there, exp underflows to 0 elsewhere
    t[2] = 500
    for eps in (0.0, 0.1):
        _check(x, t, eps=eps, what=f"{_dt(dtype)} special eps={eps}")
    _check(x, t, eps=0.1, cap=30.0, what=f"{_dt(dtype)} special capped")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_empty_shapes(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    # no rows: nothing is launched, even with null pointers
    ce_call(torch.empty(0, 100, dtype=dtype, device=DEVICE), torch.empty(0, dtype=torch.long,
            device=DEVICE), loss=torch.empty(0, device=DEVICE))  # fmt: skip
    # no columns: every target is out of range, so every row is ignored (loss 0)
    x = torch.empty(4, 0, dtype=dtype, device=DEVICE)
    t = torch.tensor([0, IGNORE, 3, -1], device=DEVICE)
    loss = torch.full((4,), SENTINEL, device=DEVICE)
    ce_call(x, t, loss=loss, grad=torch.empty(4, 0, dtype=dtype, device=DEVICE))
    assert bool((loss == 0).all())
    base, _ = reference.cross_entropy_rows(x, t, None, IGNORE, 0.0, 0.0, 0.0, None, False)
    assert torch.equal(loss, base)
    # every row ignored
    x = _poisoned(3, 50, dtype, gen)
    _check(x, torch.full((3,), IGNORE, device=DEVICE), what="all ignored")


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_dt)
def test_more_rows_than_the_grid(dtype, rows=(1 << 20) + 3):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    cols = 7
    x = _poisoned(rows, cols, dtype, gen)
    t = _targets(rows, cols, gen, ignored=[(rows - 1, IGNORE)])
    _check(x, t, eps=0.1, what=f"{_dt(dtype)} {rows} rows")


@needs_gpu
def test_offsets_past_2_31_elements():
    # row 1 starts 2^31 + 8 elements in: any 32-bit offset would wrap; the gradient in place
    stride, cols = (1 << 31) + 8, 1000
    need = (stride + cols + TAIL) * 2
    if torch.cuda.mem_get_info()[0] < need + (1 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    buf = torch.empty(stride + cols + TAIL, dtype=BF16, device=DEVICE)
    x = buf.as_strided((2, cols), (stride, 1))
    x.copy_(torch.randn(2, cols, generator=gen, device=DEVICE).to(BF16))
    x0 = x.clone()
    t = _targets(2, cols, gen)
    loss = torch.empty(2, device=DEVICE)
    ce_call(x, t, loss=loss, grad=x, label_smoothing=0.1)
    base_l, base_g = reference.cross_entropy_rows(x0, t, None, IGNORE, 0.1, 0.0, 0.0, None, True)
    torch.testing.assert_close(loss, base_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, base_g, rtol=0.02, atol=1e-3)
    del buf


@needs_gpu
def test_repeated_calls_are_bitwise_equal():
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    x = _poisoned(40, 50257, BF16, gen)
    t = _targets(40, 50257, gen)
    w = torch.rand(50257, generator=gen, device=DEVICE) + 0.5
    outs = []
    for _ in range(3):
        loss, _ = _out(40, 1, F32)
        grad, _ = _out(40, 50257, BF16)
        ce_call(x, t, w, loss=loss[:, 0], grad=grad, label_smoothing=0.1)
        outs.append((loss.clone(), grad.clone()))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


# ------------------------------------------------------------------ the binding's checks
#
# (arguments, the argument the ValueError must name). Validation happens before any CUDA call,
# so these run with or without a GPU.

_P = 256
_OK = dict(logits=_P, target=_P, weight=0, scale=0, loss=_P, grad=_P, dtype=0, rows=4, cols=8,
           logits_row_stride=8, grad_row_stride=8, scale_stride=0, ignore_index=IGNORE,
           label_smoothing=0.0, softcap=0.0, z_loss=0.0, stream=0)  # fmt: skip
_BAD = [
    (dict(dtype=3), "dtype"),  # F64
    (dict(dtype=4), "dtype"),
    (dict(dtype=-1), "dtype"),
    (dict(rows=-1), "rows"),
    (dict(cols=-2), "cols"),
    (dict(logits_row_stride=7), "logits_row_stride"),
    (dict(grad_row_stride=7), "grad_row_stride"),
    (dict(logits_row_stride=9, grad_row_stride=8), "grad_row_stride"),  # in place: same stride
    (dict(scale_stride=2), "scale_stride"),
    (dict(scale_stride=-1), "scale_stride"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(softcap=-1.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=float("nan")), "softcap"),
    (dict(z_loss=-1e-4), "z_loss"),
    (dict(z_loss=float("inf")), "z_loss"),
    (dict(z_loss=float("nan")), "z_loss"),
    (dict(loss=0, grad=0), "loss"),
    (dict(logits=0), "logits"),
    (dict(target=0), "target"),
    (dict(target=0, cols=0), "target"),  # rows without columns still read their targets
    (dict(target=_P + 4), "target"),  # int64: 8-byte aligned
    (dict(logits=_P + 2), "logits"),  # F32: 4-byte aligned
    (dict(dtype=1, logits=_P + 1, grad=_P + 1), "logits"),
    (dict(grad=_P + 2, logits=_P + 4), "grad"),
    (dict(weight=_P + 1), "weight"),
    (dict(scale=_P + 2), "scale"),
    (dict(loss=_P + 2), "loss"),
]


_BAD_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c, _ in _BAD]


@pytest.mark.parametrize("change,arg", _BAD, ids=_BAD_IDS)
def test_bad_arguments_name_the_argument(change, arg):
    _cuda = _module()
    with pytest.raises(ValueError, match=rf"lmkernels\._cuda\.cross_entropy: {arg}: "):
        _cuda.cross_entropy(**{**_OK, **change})


def test_empty_calls_launch_nothing_and_strides_of_one_row_are_free():
    _cuda = _module()
    # no rows, or no columns and no loss: returns before any CUDA call, even with null pointers
    _cuda.cross_entropy(**{**_OK, "rows": 0, "logits": 0, "target": 0, "loss": 0, "grad": 0})
    _cuda.cross_entropy(**{**_OK, "cols": 0, "logits": 0, "loss": 0, "grad": 0})
    if torch.cuda.is_available():
        return
    # one row: its stride is never used; a valid call reaches the launch, which finds no GPU
    for change in ({"rows": 1, "logits_row_stride": 0, "grad_row_stride": 0},
                   {"cols": 0, "logits": 0, "grad": 0},
                   {"grad": 0}, {"loss": 0}, {"weight": _P, "scale": _P, "scale_stride": 1},
                   {"label_smoothing": 1.0, "softcap": 30.0, "z_loss": 1e-4}):  # fmt: skip
        with pytest.raises(RuntimeError, match="cross_entropy.*no usable NVIDIA GPU"):
            _cuda.cross_entropy(**{**_OK, **change})


def test_listed_in_build_info():
    assert "cross_entropy" in _module().build_info()["ops"]


# ------------------------------------------------------------- the kernel on a CPU (no GPU)
#
# The emulation test compiles csrc/cuda/cross_entropy.cu as host C++ (g++, the CUDA headers) with
# the harness below standing in for its device primitives (LMK_CE_EMULATE): every block runs as
# cooperative fibers, one per thread, switching at barriers and shuffles; the grid is capped at
# 3 blocks so the grid-stride loop over rows runs too. The GPU tests above then run on CPU
# tensors, with the binding replaced by the emulated entry point (its argument checks are the
# tests above that need no GPU). LMKERNELS_EMULATE_CUDA=0 turns it off.

_EMU_SOURCE = r"""
// Host emulation of csrc/cuda/cross_entropy.cu (built by tests/test_cuda_cross_entropy.py): each
// block runs as cooperative fibers (ucontext), one per thread, in ascending or descending thread
// order; a fiber runs until it reaches a barrier or a shuffle. A shuffle completes when the 32
// lanes of its warp have arrived (with the same mask); a barrier when every thread has. Anything
// that can never complete aborts with a message.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define __launch_bounds__(...)

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int state = 0;  // 0 runnable, 1 at the barrier, 2 in a shuffle, 3 exited
  float in = 0.f, out = 0.f;
  int mask = 0;
};

std::vector<Fiber> g_f;
int g_n = 0, g_cur = 0, g_bar = 0, g_order = 0;
int g_arrived[32];
ucontext_t g_sched;
dim3 g_grid, g_block;
uint3 g_bidx;
std::function<void()> g_body;

[[noreturn]] void fail(const char* what) {
  fprintf(stderr, "EMU FAIL: %s (block %u)\n", what, g_bidx.x);
  fflush(stderr);
  abort();
}

void entry() {
  g_body();
  g_f[g_cur].state = 3;
}

void yield() { swapcontext(&g_f[g_cur].ctx, &g_sched); }

void run_block() {
  g_bar = 0;
  for (int& a : g_arrived) a = 0;
  for (int t = 0; t < g_n; ++t) {
    Fiber& f = g_f[t];
    if (f.stack.empty()) f.stack.resize(64 * 1024);
    f.state = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, entry, 0);
  }
  for (;;) {
    bool ran = false, done = true;
    for (int i = 0; i < g_n; ++i) {
      const int t = g_order == 0 ? i : g_n - 1 - i;
      if (g_f[t].state != 0) continue;
      g_cur = t;
      swapcontext(&g_sched, &g_f[t].ctx);
      ran = true;
    }
    for (int t = 0; t < g_n; ++t) done = done && g_f[t].state == 3;
    if (done) return;
    if (!ran) fail("deadlock: threads wait at a barrier or shuffle that cannot complete");
  }
}

template <class F>
void launch(dim3 grid, dim3 block, F body) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1) fail("block shape");
  g_grid = grid;
  g_block = block;
  g_n = static_cast<int>(block.x);
  if (static_cast<int>(g_f.size()) < g_n) g_f.resize(g_n);
  g_body = body;
  for (unsigned x = 0; x < grid.x; ++x) {
    g_bidx = uint3{x, 0, 0};
    run_block();
  }
}

uint3 tidx() { return uint3{static_cast<unsigned>(g_cur), 0, 0}; }

}  // namespace emu

#define threadIdx (::emu::tidx())
#define blockIdx (::emu::g_bidx)
#define gridDim (::emu::g_grid)

inline void block_sync() {
  if (++emu::g_bar == emu::g_n) {
    emu::g_bar = 0;
    for (int t = 0; t < emu::g_n; ++t) {
      if (emu::g_f[t].state == 1) emu::g_f[t].state = 0;
    }
  } else {
    emu::g_f[emu::g_cur].state = 1;
    emu::yield();
  }
}

inline float shfl_xor(float v, int m) {
  const int warp = emu::g_cur / 32, base = warp * 32;
  emu::Fiber& me = emu::g_f[emu::g_cur];
  me.in = v;
  me.mask = m;
  if (++emu::g_arrived[warp] == 32) {
    emu::g_arrived[warp] = 0;
    for (int l = 0; l < 32; ++l) {
      emu::Fiber& f = emu::g_f[base + l];
      if (f.mask != m) emu::fail("shfl_xor: lanes disagree on the mask");
      f.out = emu::g_f[base + (l ^ m)].in;
      if (f.state == 2) f.state = 0;
    }
  } else {
    me.state = 2;
    emu::yield();
  }
  return me.out;
}

inline float mul_rn(float a, float b) { return a * b; }  // g++ for x86-64 has no FMA here

#define LMK_CE_SHARED static
#define LMK_CE_LAUNCH(kernel, grid, block, stream, ...) \
  ::emu::launch(dim3(grid), dim3(block), [=] { kernel(__VA_ARGS__); })

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }

#define LMK_CE_EMULATE 1
#include CE_CU

extern "C" {

// pv: logits, target, weight, scale, loss, grad
// iv: dtype, rows, cols, logits_row_stride, grad_row_stride, scale_stride, ignore_index
int emu_cross_entropy(const uint64_t* pv, const int64_t* iv, double label_smoothing,
                      double softcap, double z_loss, int order) {
  emu::g_order = order;
  lmk::CrossEntropyParams p;
  p.logits = reinterpret_cast<const void*>(pv[0]);
  p.target = reinterpret_cast<const int64_t*>(pv[1]);
  p.weight = reinterpret_cast<const void*>(pv[2]);
  p.scale = reinterpret_cast<const void*>(pv[3]);
  p.loss = reinterpret_cast<void*>(pv[4]);
  p.grad = reinterpret_cast<void*>(pv[5]);
  p.dtype = static_cast<lmk::DType>(iv[0]);
  p.rows = iv[1];
  p.cols = iv[2];
  p.logits_row_stride = iv[3];
  p.grad_row_stride = iv[4];
  p.scale_stride = iv[5];
  p.ignore_index = iv[6];
  p.label_smoothing = label_smoothing;
  p.softcap = softcap;
  p.z_loss = z_loss;
  return static_cast<int>(lmk::cross_entropy_cuda(p, nullptr));
}
}
"""


def _emulated_module(tmp_dir):
    """A stand-in for lmkernels._cuda whose cross_entropy runs the emulated kernel."""
    import ctypes
    import types

    emu = cuda_emulation.build(
        tmp_dir, "cross_entropy", _EMU_SOURCE, "CE_CU", defines=("-DLMK_CE_MAX_BLOCKS=3",)
    )
    emu.emu_cross_entropy.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                      ctypes.POINTER(ctypes.c_int64), ctypes.c_double,
                                      ctypes.c_double, ctypes.c_double, ctypes.c_int]  # fmt: skip
    mod = types.ModuleType("lmkernels._cuda")
    mod.order = 0  # the emulation's thread order: 0 ascending, 1 descending

    def cross_entropy(**a):
        pv = [a[k] for k in ("logits", "target", "weight", "scale", "loss", "grad")]
        iv = [a[k] for k in ("dtype", "rows", "cols", "logits_row_stride", "grad_row_stride",
                             "scale_stride", "ignore_index")]  # fmt: skip
        rc = emu.emu_cross_entropy((ctypes.c_uint64 * 6)(*pv), (ctypes.c_int64 * 7)(*iv),
                                   a["label_smoothing"], a["softcap"], a["z_loss"],
                                   mod.order)  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"emulated cross_entropy: cudaError {rc}")

    mod.cross_entropy = cross_entropy
    return mod


def test_kernel_under_host_emulation(monkeypatch, tmp_path):
    import os
    import sys

    import lmkernels

    if os.environ.get("LMKERNELS_EMULATE_CUDA", "1") == "0":
        pytest.skip("LMKERNELS_EMULATE_CUDA=0: the CUDA cross-entropy kernel's host emulation "
                    "is turned off")  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this file's other tests run the CUDA kernel itself "
                    "(the host emulation is its stand-in on machines without one)")  # fmt: skip
    mod = _emulated_module(tmp_path)
    monkeypatch.setitem(sys.modules, "lmkernels._cuda", mod)
    monkeypatch.setattr(lmkernels, "_cuda", mod, raising=False)
    monkeypatch.setitem(globals(), "DEVICE", "cpu")
    # every block size (both sides of each threshold), odd widths, one and several rows
    for i, cols in enumerate([1, 7, 1000, 2049, 8193, 50257, 70001]):
        mod.order = i % 2
        test_matches_reference(DTYPES[i % 3], cols)
    mod.order = 1
    for j, opt in enumerate(OPTIONS):
        test_options(DTYPES[j % 3], opt, 1000 if j % 2 else 50257)
    for k, dtype in enumerate(DTYPES):
        mod.order = k % 2
        test_ignored_rows_and_out_of_range_targets(dtype)
        test_row_strides_and_misaligned_rows(dtype, 1000)
        test_in_place_gradient_equals_out_of_place(dtype, 1000)
        test_loss_only_and_grad_only_calls(dtype)
        test_special_values(dtype)
        test_empty_shapes(dtype)
        test_more_rows_than_the_grid(dtype, rows=11)  # 3 blocks, each over 3 or 4 rows
    test_in_place_gradient_equals_out_of_place(BF16, 50257)
    test_row_strides_and_misaligned_rows(F16, 50257)
