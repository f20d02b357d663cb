"""The CUDA rotary kernel (csrc/cuda/rotary.cu) through its launcher
``lmkernels.ops.rotary._cuda_rotary``, on a GPU; and the argument checks of the
``lmkernels._cuda.rotary`` binding, which need only the built module.

Forward: ``reference.rotary`` (fp32 math, fp64 for fp64, rounded once) within an ulp or so of
the output dtype (the kernel may fuse its products into FMAs); backward: the transposed map
``dy * cos - rot(dy * sin)`` in the same precision. Every dtype, rotate_half and interleaved,
tables of x's shape, broadcast over batch and heads, column slices of wider tables, fp32 tables
for 16-bit x, in place (out is x), and sentinel-filled output buffers (a write past the end is
caught).
"""

from __future__ import annotations

import pytest
import torch

from lmkernels import reference

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA rotary kernel needs one to run"
)

DEVICE = "cuda"
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [F32, F16, BF16, F64]
SENTINEL = 7.0
TAIL = 64  # sentinel elements after every output buffer
# (atol, rtol): a couple of ulps of the output dtype (values are O(1))
_TOL = {F32: (2e-6, 2e-6), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2), F64: (1e-13, 1e-13)}


def _cuda_module():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    return _cuda


def _launcher():
    _cuda_module()
    from lmkernels.ops.rotary import _cuda_rotary

    return _cuda_rotary


def _acc(dtype):
    return F64 if dtype == F64 else F32


def _want(x, cos, sin, interleaved, backward):
    """The contract in fp32 (fp64 for fp64), rounded once to x's dtype."""
    acc = _acc(x.dtype)
    x32, c32, s32 = x.to(acc), cos.to(acc), sin.to(acc)
    if backward:
        rot = reference.rotate_every_two if interleaved else reference.rotate_half
        return (x32 * c32 - rot(x32 * s32)).to(x.dtype)
    return reference.rotary(x32, c32, s32, interleaved).to(x.dtype)


def _tables(shape, dtype, layout, gen):
    """cos / sin for x of `shape` (b, s, nh, d): of x's shape ("full"), (s, 1, d) broadcast over
    batch and heads ("broadcast"), (1, s, 1, d) column slices of a wider table ("column_slice")."""
    b, s, nh, d = shape
    pos = torch.randn(s, 1, generator=gen, device=DEVICE) * 10

    def make(fn):
        if layout == "full":
            ang = torch.randn(shape, generator=gen, device=DEVICE) * 3
            return fn(ang).to(dtype)
        ang = pos * torch.rand(1, d, generator=gen, device=DEVICE)
        if layout == "broadcast":
            return fn(ang).to(dtype).view(s, 1, d)
        wide = torch.zeros(s, d + 6, device=DEVICE, dtype=dtype)
        wide[:, 3 : 3 + d] = fn(ang).to(dtype)
        return wide[:, 3 : 3 + d].view(1, s, 1, d)

    return make(torch.cos), make(torch.sin)


def _out(shape, dtype):
    n = 1
    for v in shape:
        n *= v
    buf = torch.full((n + TAIL,), SENTINEL, dtype=dtype, device=DEVICE)
    return buf[:n].view(shape), buf[n:]


def _check(ours, want, what):
    atol, rtol = _TOL[want.dtype]
    torch.testing.assert_close(ours, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("layout", ["full", "broadcast", "column_slice"])
@pytest.mark.parametrize("d", [2, 6, 64, 130])
def test_matches_the_contract(dtype, interleaved, backward, layout, d):
    run = _launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(d)
    shape = (2, 7, 3, d)
    x = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    cos, sin = _tables(shape, dtype, layout, gen)
    out, tail = _out(shape, dtype)
    run(x, cos, sin, out, interleaved, backward)
    _check(out, _want(x, cos, sin, interleaved, backward), f"{dtype} {layout} d={d}")
    assert torch.all(tail == SENTINEL), "wrote past the end of out"


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_fp32_tables_with_16_bit_x(dtype, interleaved, backward):
    run = _launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    shape = (3, 5, 4, 32)
    x = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    cos, sin = _tables(shape, F32, "broadcast", gen)
    out, tail = _out(shape, dtype)
    run(x, cos, sin, out, interleaved, backward)
    # the fp32 tables are used as they are, not rounded to x's dtype first
    _check(out, _want(x, cos, sin, interleaved, backward), f"{dtype} with fp32 tables")
    assert torch.all(tail == SENTINEL)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_in_place(dtype, interleaved, backward):
    run = _launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    shape = (2, 9, 2, 48)
    x = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    cos, sin = _tables(shape, dtype, "broadcast", gen)
    want = _want(x, cos, sin, interleaved, backward)
    y = x.clone()
    run(y, cos, sin, y, interleaved, backward)
    _check(y, want, f"{dtype} in place")


@needs_gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_backward_is_the_transpose_of_the_forward(interleaved):
    """<dy, R x> == <R^T dy, x> in fp64: the backward is the exact transpose."""
    run = _launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    shape = (2, 6, 3, 16)
    x = torch.randn(shape, generator=gen, device=DEVICE, dtype=F64)
    dy = torch.randn(shape, generator=gen, device=DEVICE, dtype=F64)
    cos, sin = _tables(shape, F64, "full", gen)  # independent cos / sin: not a pure rotation
    fx, bdy = torch.empty_like(x), torch.empty_like(dy)
    run(x, cos, sin, fx, interleaved, False)
    run(dy, cos, sin, bdy, interleaved, True)
    torch.testing.assert_close((dy * fx).sum(), (bdy * x).sum(), atol=1e-10, rtol=1e-12)


@needs_gpu
def test_many_rows_and_empty_input():
    run = _launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    shape = (4, 2048, 8, 64)  # 2^22 pairs over 2^16 rows
    x = torch.randn(shape, generator=gen, device=DEVICE)
    cos, sin = _tables(shape, F32, "broadcast", gen)
    out = torch.empty_like(x)
    run(x, cos, sin, out, False, False)
    _check(out, _want(x, cos, sin, False, False), "many rows")
    e = torch.empty(0, 3, 8, device=DEVICE)
    c = torch.ones(3, 8, device=DEVICE)
    run(e, c, c, e, False, False)  # nothing to do


# --------------------------------------------------------------- bindings (no GPU needed)

_P = 256  # a fake device pointer: validation passes, the launch itself needs a GPU
_OK = dict(x=_P, out=_P, cos=_P, sin=_P, cos_off=_P, sin_off=_P, dtype=0, cs_dtype=0, rows=4,
           d=8, interleaved=False, backward=False, stream=0)  # fmt: skip
_BAD = [
    (dict(dtype=4, cs_dtype=4), "dtype"),  # Bool
    (dict(dtype=9), "dtype"),
    (dict(cs_dtype=1), "cs_dtype"),  # F16 tables for F32 data
    (dict(dtype=3), "cs_dtype"),  # F32 tables for F64 data
    (dict(dtype=1, cs_dtype=2), "cs_dtype"),
    (dict(dtype=2, cs_dtype=3), "cs_dtype"),
    (dict(rows=-1), "rows"),
    (dict(d=-2), "d"),
    (dict(d=7), "d"),  # odd
    (dict(x=0), "x"),
    (dict(out=0), "out"),
    (dict(cos=0), "cos"),
    (dict(sin=0), "sin"),
    (dict(cos_off=0), "cos_off"),
    (dict(sin_off=0), "sin_off"),
    (dict(x=_P + 2), "x"),  # not 4-byte aligned for fp32
    (dict(out=_P + 1, dtype=1, cs_dtype=1), "out"),
    (dict(sin=_P + 2, dtype=1, cs_dtype=0), "sin"),  # fp32 tables for fp16 data
    (dict(cos_off=_P + 4), "cos_off"),
]


_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c, _ in _BAD]


@pytest.mark.parametrize("change,arg", _BAD, ids=_IDS)
def test_bad_arguments_name_the_argument(change, arg):
    _cuda = _cuda_module()
    with pytest.raises(ValueError, match=rf"lmkernels\._cuda\.rotary: {arg}: "):
        _cuda.rotary(**{**_OK, **change})


def test_empty_calls_launch_nothing_and_no_gpu_is_a_clear_error():
    _cuda = _cuda_module()
    nulls = dict(x=0, out=0, cos=0, sin=0, cos_off=0, sin_off=0)
    _cuda.rotary(**{**_OK, **nulls, "rows": 0})  # nothing to do: no CUDA call
    _cuda.rotary(**{**_OK, **nulls, "d": 0})
    for dtype, cs in ((1, 0), (2, 0), (1, 1), (2, 2), (3, 3)):  # accepted dtype pairs
        _cuda.rotary(**{**_OK, **nulls, "rows": 0, "dtype": dtype, "cs_dtype": cs})
    assert "rotary" in _cuda.build_info()["ops"]
    if torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="rotary.*no usable NVIDIA GPU"):
        _cuda.rotary(**_OK)
    with pytest.raises(RuntimeError, match="rotary.*no usable NVIDIA GPU"):
        _cuda.rotary(**{**_OK, "dtype": 2, "cs_dtype": 0, "interleaved": True, "backward": True})
