"""The Triton rotary launcher (lmkernels.triton_kernels.rotary.rotary) called directly: forward
and backward (the transposed map) against the fp64 formulas of rotary.h, for both layouts, both
table broadcasts ((2, 5, 3, d) x with (5, 1, d) tables; (2, 3, 5, d) with (5, d), also as a
column slice of a wider cache), d across the column tiles, fp32 / fp16 / bf16 x with tables of
x's type or fp32, in place (out is x); nothing is written past the output; every config the
launcher picks is listed by aot_specs().

On a machine without a GPU the kernel runs in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small.
"""

import pytest
import torch
from launch_recorder import Recorder, spec_key

from conftest import device_for
from lmkernels import reference
from lmkernels.backends import availability

_REASON = availability("triton", device_for("triton"))
if _REASON is not None:
    pytest.skip(f"triton unavailable: {_REASON}", allow_module_level=True)

from lmkernels.triton_kernels import rotary as k  # noqa: E402

DEV = device_for("triton")
# (x dtype, table dtype)
TYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
# one unit in the last place of T (at 1)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SENTINEL = 12345.0
DIMS = [2, 6, 40, 128]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _expected(x, cos, sin, interleaved, backward) -> torch.Tensor:
    """rotary.h's forward / backward in fp64 from the same (already rounded) inputs."""
    x, c, s = x.double(), cos.double(), sin.double()
    rot = reference.rotate_every_two if interleaved else reference.rotate_half
    if backward:  # the transpose of v -> rot(v) * s is u -> -rot(u * s)
        return x * c - rot(x * s)
    return reference.rotary(x, c, s, interleaved)


def _check(ours, x, cos, sin, interleaved, backward, what) -> None:
    """|ours - exact| <= the rounding to T (one ulp: fp32 math rounded once lands on the
    correctly rounded value or a neighbour) + a few fp32 roundings of the terms' magnitudes."""
    want = _expected(x, cos, sin, interleaved, backward)
    assert ours.dtype == x.dtype and ours.shape == x.shape, what
    assert torch.isfinite(ours).all(), what
    rot = reference.rotate_every_two if interleaved else reference.rotate_half
    xa, ca, sa = x.double().abs(), cos.double().abs(), sin.double().abs()
    mag = xa * ca + (rot(xa * sa) if backward else rot(xa) * sa).abs()
    err = (ours.double() - want).abs()
    tiny = torch.finfo(x.dtype).smallest_normal * EPS[x.dtype]  # the subnormals' ulp
    bound = EPS[x.dtype] * want.abs() + 2.0**-22 * mag + tiny
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} off, worst {(err - bound).max().item()}"


def _out_buffer(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous output at the start of a larger buffer whose tail holds SENTINEL."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 64,), SENTINEL, dtype=dtype, device=DEV)
    return buf[:n].view(shape), buf


def _case(layout, d, x_dtype, cs_dtype, gen):
    """x and its tables; independent random cos / sin, so that a swapped lo / hi shows."""
    if layout == "heads_broadcast":  # (batch, seq, heads, d) with (seq, 1, d)
        xs, ts = (2, 5, 3, d), (5, 1, d)
        cos = torch.randn(ts, generator=gen)
        sin = torch.randn(ts, generator=gen)
    else:  # (batch, heads, seq, d) with (seq, d), cos a column slice of a wider cache
        xs = (2, 3, 5, d)
        cache = torch.randn(5, d + 4, generator=gen).to(cs_dtype).to(DEV)
        x = torch.randn(xs, generator=gen).to(x_dtype).to(DEV)
        return x, cache[:, 2 : 2 + d], torch.randn(5, d, generator=gen).to(cs_dtype).to(DEV)
    x = torch.randn(xs, generator=gen).to(x_dtype).to(DEV)
    cos, sin = cos.to(cs_dtype).to(DEV), sin.to(cs_dtype).to(DEV)
    return x, cos, sin


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("layout", ["heads_broadcast", "seq_table"])
def test_forward_and_backward(d, layout):
    gen = torch.Generator().manual_seed(d + (1000 if layout == "seq_table" else 0))
    for x_dtype, cs_dtype in TYPES:
        x, cos, sin = _case(layout, d, x_dtype, cs_dtype, gen)
        if layout == "seq_table":
            assert cos.stride(0) == d + 4  # read through the offsets, not copied
        for interleaved in (False, True):
            for backward in (False, True):
                what = f"{x_dtype} cs {cs_dtype} d {d} {layout} il {interleaved} bwd {backward}"
                out, buf = _out_buffer(x.shape, x_dtype)
                k.rotary(x, cos, sin, out, interleaved, backward)
                _check(out, x, cos, sin, interleaved, backward, what)
                assert torch.all(buf[out.numel() :] == SENTINEL), what + ": written past out"


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_in_place(interleaved, backward):
    gen = torch.Generator().manual_seed(7)
    for x_dtype, cs_dtype in (TYPES[0], TYPES[4]):  # fp32; bf16 x with fp32 tables
        for d in (6, 128):
            x, cos, sin = _case("heads_broadcast", d, x_dtype, cs_dtype, gen)
            x0 = x.clone()
            k.rotary(x, cos, sin, x, interleaved, backward)
            what = f"in place {x_dtype} cs {cs_dtype} d {d}"
            _check(x, x0, cos, sin, interleaved, backward, what)
            out = torch.empty_like(x0)
            k.rotary(x0, cos, sin, out, interleaved, backward)
            assert torch.equal(_bits(x), _bits(out)), what + ": differs from out of place"


def test_backward_is_the_adjoint():
    # <forward(u), v> == <u, backward(v)> (fp32, independent tables)
    gen = torch.Generator().manual_seed(3)
    for interleaved in (False, True):
        u, cos, sin = _case("seq_table", 40, torch.float32, torch.float32, gen)
        v = torch.randn(u.shape, generator=gen).to(DEV)
        fu, bv = torch.empty_like(u), torch.empty_like(v)
        k.rotary(u, cos, sin, fu, interleaved, False)
        k.rotary(v, cos, sin, bv, interleaved, True)
        lhs, rhs = (fu.double() * v.double()).sum(), (u.double() * bv.double()).sum()
        assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + 1), (interleaved, lhs, rhs)


def test_rounding_is_to_nearest_even():
    # bf16 x times an fp32 cos of 1 + 2^-8 + 2^-9 (sin 0): 0.75 of a bf16 ulp above 1, which
    # rounds to 1 + 2^-7 (round-to-nearest-even), where the interpreter's cast would truncate
    xb = torch.tensor([[1.0, -1.0]], dtype=torch.bfloat16, device=DEV)
    cos = torch.full((1, 2), 1.0 + 2.0**-8 + 2.0**-9, device=DEV)
    sin = torch.zeros(1, 2, device=DEV)
    for interleaved in (False, True):
        for backward in (False, True):
            out = torch.empty_like(xb)
            k.rotary(xb, cos, sin, out, interleaved, backward)
            assert out.float().tolist() == [[1.0 + 2.0**-7, -1.0 - 2.0**-7]], out


def test_errors_and_empty():
    x = torch.randn(2, 4, device=DEV)
    cs = torch.randn(2, 4, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        k.rotary(x.double(), cs.double(), cs.double(), x.double(), False, False)
    with pytest.raises(ValueError, match="even"):
        k.rotary(x[:, :3], cs[:, :3], cs[:, :3], torch.empty(2, 3, device=DEV), False, False)
    with pytest.raises(ValueError, match="cos and sin"):
        k.rotary(x.half(), cs.half(), cs, torch.empty_like(x.half()), False, False)
    e = torch.empty(0, 3, 4, device=DEV)
    k.rotary(e, cs[:1], cs[:1], e, False, False)


# --------------------------------------------------------------------------------- AOT specs


def test_aot_specs_cover_every_launch(monkeypatch):
    """Every launch (types, constexprs, num_warps) over dtypes, layouts, directions and d is one
    of aot_specs(), none is dead; and every config the launcher picks for any d is listed."""
    specs = k.aot_specs()
    listed = {spec_key(s) for s in specs}
    assert len(listed) == len(specs) <= 24
    seen: set = set()
    monkeypatch.setattr(k, "_rotary_kernel", Recorder(k._rotary_kernel, seen))
    gen = torch.Generator().manual_seed(11)
    for d in (2, 66):
        for x_dtype, cs_dtype in TYPES:
            x, cos, sin = _case("seq_table", d, x_dtype, cs_dtype, gen)
            for interleaved in (False, True):
                for backward in (False, True):
                    out = torch.empty_like(x)
                    k.rotary(x, cos, sin, out, interleaved, backward)
                    _check(out, x, cos, sin, interleaved, backward, f"d {d}")
    assert seen == listed, (sorted(seen - listed)[:3], sorted(listed - seen)[:3])

    by_config = {(dict(s[2])["ROWS"], dict(s[2])["BLOCK"], s[3]) for s in listed}
    for d in [*range(2, 1100, 2), 4096, 65536, 1 << 20]:
        cfg = k.rotary_config(d)
        assert (cfg.rows, cfg.block, cfg.num_warps) in by_config, d
    assert len(k.aot_specs(aligned=True)) == len(specs)
