"""The Triton embedding launchers (lmkernels.triton_kernels.embedding) called directly: the
forward is bitwise ``weight[idx]`` for every dtype, index type, row stride and dim (across the
config boundaries and the column tiles), writes nothing past its output and nothing at all for a
bad index; the backward is bitwise the in-order fp32 sum of embedding.h (a Python loop adding
the dy rows in token order, scaled, rounded once), with repeated indices, padding_idx,
scale_grad_by_freq, grad_scale, a segment far longer than the unrolled loop, and repeat calls;
the fused token + positional forward is bitwise the reference with a learned table (the same two
fp32 roundings, scale * tok and + pe, then round-to-nearest-even to T), bitwise a numpy
transcription of embedding.h's sinusoid_pair with the sinusoid (the interpreter rounds every
fp32 / fp64 operation as numpy does), and within a few fp32 ulp of the exact sinusoid (the fp64
reference rounded once); every config the launchers pick is listed by aot_specs().

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small.
"""

import numpy as np
import pytest
import torch
from launch_recorder import Recorder, kernel_name, spec_key

from conftest import device_for
from lmkernels import reference
from lmkernels.backends import availability

_REASON = availability("triton", device_for("triton"))
if _REASON is not None:
    pytest.skip(f"triton unavailable: {_REASON}", allow_module_level=True)

from lmkernels.triton_kernels import embedding as k  # noqa: E402

DEV = device_for("triton")
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {2: torch.int16, 4: torch.int32}
SENTINEL = 12345.0
# dims around the vector widths and the 128-column config boundary, and one split into column
# tiles (the other boundaries: test_aot_specs_cover_every_launch)
DIMS = [1, 3, 127, 130, 1030]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()])


def _same_bits(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    diff = _bits(ours) != _bits(ref)
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ, first at " + str(
        diff.nonzero()[0].tolist()
    )


def _out(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An output view at the start of a larger buffer whose tail holds SENTINEL."""
    n = shape[0] * shape[1]
    buf = torch.full((n + 64,), SENTINEL, dtype=dtype, device=DEV)
    return buf[:n].view(shape), buf


def _weight(rows, dim, dtype, layout, gen) -> torch.Tensor:
    if layout == "column_slice":  # rows dim + 5 elements apart
        w = torch.randn(rows, dim + 5, generator=gen).to(dtype).to(DEV)
        return w[:, 2 : 2 + dim]
    return torch.randn(rows, dim, generator=gen).to(dtype).to(DEV)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_forward_is_the_gather(dim, layout):
    gen = torch.Generator().manual_seed(dim)
    rows, n = 23, 37  # n is no multiple of any config's tokens per program
    for name, dtype in DT.items():
        w = _weight(rows, dim, dtype, layout, gen)
        assert layout == "contiguous" or w.stride(0) == dim + 5
        for idx_dtype in (torch.int32, torch.int64):
            idx = torch.randint(0, rows, (n,), generator=gen).to(idx_dtype).to(DEV)
            idx[:2] = torch.tensor([0, rows - 1])  # the first and the last row
            out, buf = _out((n, dim), dtype)
            k.embedding_fwd(w, idx, out)
            _same_bits(out, w[idx.long()], f"{name} {idx_dtype} dim {dim} {layout}")
            assert torch.all(buf[out.numel() :] == SENTINEL), "written past the output's end"


def test_forward_copies_the_bits():
    # NaN payloads, infinities, signed zeros and subnormals are copied, never converted
    vals = torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800000, 0x80000000, 0x00000001, 0x3F800000],
                        dtype=torch.int64).to(torch.int32)  # fmt: skip
    w = vals.view(torch.float32).reshape(3, 2).to(DEV)
    idx = torch.tensor([2, 0, 1, 0], device=DEV)
    out = torch.empty(4, 2, device=DEV)
    k.embedding_fwd(w, idx, out)
    _same_bits(out, w[idx], "fp32 special values")
    w16 = torch.tensor([0x7E01, -0x0001, 0x7C00, -0x8000, 0x0001, 0x3C00],
                       dtype=torch.int16).view(torch.float16).reshape(3, 2).to(DEV)  # fmt: skip
    out16 = torch.empty(4, 2, dtype=torch.float16, device=DEV)
    k.embedding_fwd(w16, idx.int(), out16)
    _same_bits(out16, w16[idx], "fp16 special values")


@pytest.mark.parametrize("bad", [-1, 23, 1 << 40])
def test_out_of_range_index_raises_and_writes_nothing(bad):
    w = torch.randn(23, 5, device=DEV)
    idx_dtypes = (torch.int64,) if bad >= 1 << 31 else (torch.int32, torch.int64)
    for idx_dtype in idx_dtypes:
        idx = torch.tensor([3, 0, 22, bad, 4, bad], dtype=idx_dtype, device=DEV)
        out = torch.full((6, 5), SENTINEL, device=DEV)
        msg = rf"index {bad} \(at position 3 of the flattened input\) is out of range for an "
        with pytest.raises(IndexError, match=msg + "embedding of 23 rows"):
            k.embedding_fwd(w, idx, out)
        assert torch.all(out == SENTINEL), "a failed call wrote its output"


def test_empty_and_unsupported():
    w = torch.randn(4, 3, device=DEV)
    out = torch.full((0, 3), SENTINEL, device=DEV)
    k.embedding_fwd(w, torch.zeros(0, dtype=torch.int64, device=DEV), out)
    dw = torch.full((4, 3), SENTINEL, device=DEV)
    k.embedding_bwd(out, torch.zeros(0, dtype=torch.int64, device=DEV), dw, -1, False)
    assert torch.all(dw == 0), "an empty backward must still zero dw"
    with pytest.raises(ValueError, match="float64"):
        k.embedding_fwd(w.double(), torch.zeros(1, dtype=torch.int64, device=DEV),
                        torch.empty(1, 3, dtype=torch.float64, device=DEV))  # fmt: skip
    with pytest.raises(ValueError, match="int32 or int64"):
        k.embedding_fwd(w, torch.zeros(1, dtype=torch.int16, device=DEV), torch.empty(1, 3))


# ----------------------------------------------------------------------------------- backward


def _loop_bwd(dy, idx, rows, padding_idx, scale_grad_by_freq, grad_scale=1.0) -> torch.Tensor:
    """embedding.h's backward, literally: per row, its tokens' dy rows added in increasing t in
    fp32, times fp32(1 / count) with scale_grad_by_freq (else times fp32(grad_scale) unless it
    is 1), rounded once to dy's dtype."""
    d = dy.float().cpu().numpy()
    ids = idx.long().cpu().tolist()
    out = np.zeros((rows, d.shape[1]), dtype=np.float32)
    for v in sorted(set(ids)):
        if v == padding_idx:
            continue
        toks = [t for t, i in enumerate(ids) if i == v]
        acc = d[toks[0]].copy()
        for t in toks[1:]:
            acc = acc + d[t]  # fp32 + fp32, rounded to fp32
        if scale_grad_by_freq:
            acc = acc * np.float32(1.0 / len(toks))
        elif grad_scale != 1.0:
            acc = acc * np.float32(grad_scale)
        out[v] = acc
    return torch.from_numpy(out).to(dy.dtype).to(dy.device)


def _run_bwd(dy, idx, rows, padding_idx, scale, grad_scale=1.0) -> torch.Tensor:
    dw, buf = _out((rows, dy.shape[1]), dy.dtype)  # SENTINEL: rows never looked up are zeroed
    k.embedding_bwd(dy, idx, dw, padding_idx, scale, grad_scale)
    assert torch.all(buf[dw.numel() :] == SENTINEL), "written past dw's end"
    return dw


def _dy(n, dim, dtype, gen) -> torch.Tensor:
    # a wide dynamic range (so the order of the additions shows in the bits), some signed zeros
    dy = torch.randn(n, dim, generator=gen) * torch.exp2(torch.randint(-12, 13, (n, 1),
                                                                       generator=gen))  # fmt: skip
    dy[::7] = -0.0
    return dy.to(dtype).to(DEV)


@pytest.mark.parametrize("dim", DIMS)
def test_backward_is_the_in_order_sum(dim):
    gen = torch.Generator().manual_seed(100 + dim)
    rows, n = 19, 53
    for name, dtype in DT.items():
        dy = _dy(n, dim, dtype, gen)
        # most tokens on 6 rows (segments longer than the unrolled loop), rows 6.. never hit
        idx = torch.randint(0, 6, (n,), generator=gen)
        idx[::10] = torch.randint(0, rows, (len(idx[::10]),), generator=gen)
        combos = ((-1, False), (2, False), (-1, True), (0, True))
        for i, (padding_idx, scale) in enumerate(combos):
            idx_dtype = (torch.int32, torch.int64)[i % 2]  # each combination once, both types
            ix = idx.to(idx_dtype).to(DEV)
            what = f"{name} {idx_dtype} dim {dim} padding {padding_idx} scale {scale}"
            dw = _run_bwd(dy, ix, rows, padding_idx, scale)
            _same_bits(dw, _loop_bwd(dy, ix, rows, padding_idx, scale), what)
            if padding_idx >= 0:
                assert torch.all(dw[padding_idx] == 0), what
            if i == 2:  # one repeat per (dim, dtype) keeps the interpreter time down
                again = _run_bwd(dy, ix, rows, padding_idx, scale)
                _same_bits(again, dw, what + ": repeat call")


def test_order_of_the_additions_is_the_token_order():
    # 1e8 + 1 - 1e8 ... in fp32: the in-order result differs from any other order's
    vals = [1e8, 1.0, -1e8, 1.0, 3.0, -3.0, 0.5, 1e8, -1e8, 0.25, 1.0, 1e-3]
    dy = torch.tensor(vals, device=DEV)[:, None].repeat(1, 2)
    idx = torch.zeros(len(vals), dtype=torch.int64, device=DEV)
    dw = _run_bwd(dy, idx, 2, -1, False)
    want = np.float32(vals[0])
    for v in vals[1:]:
        want = np.float32(want + np.float32(v))
    assert dw[0, 0].item() == float(want) and dw[0, 1].item() == float(want)
    assert float(want) != float(np.sum(np.float32(vals[::-1]), dtype=np.float32))
    assert torch.all(dw[1] == 0)


def test_a_row_hit_by_many_tokens():
    """One segment far longer than the unrolled loop: 100000 tokens on one row on a GPU; the
    interpreter takes about 1 ms per token, so there 3000 (375 loop iterations)."""
    n, dim = (100_000, 2) if DEV == "cuda" else (3000, 2)
    gen = torch.Generator().manual_seed(5)
    dy = (torch.randn(n, dim, generator=gen) * 1000).to(DEV)
    idx = torch.full((n,), 1, dtype=torch.int32)
    idx[::100] = 0
    idx = idx.to(DEV)
    d = dy.cpu().numpy()
    for scale in (False, True) if DEV == "cuda" else (True,):
        dw = _run_bwd(dy, idx, 3, -1, scale)
        for v in (0, 1):
            toks = (idx.cpu() == v).nonzero()[:, 0].numpy()
            want = np.add.accumulate(d[toks], axis=0, dtype=np.float32)[-1]  # sequential sum
            if scale:
                want = want * np.float32(1.0 / len(toks))
            _same_bits(dw[v], torch.from_numpy(want).to(DEV), f"row {v} scale {scale}")
        assert torch.all(dw[2] == 0)


def test_signed_zeros():
    # a row of -0.0 sums to -0.0 (and stays -0.0 when scaled), -0.0 + +0.0 to +0.0: the sum
    # starts from -0.0, never from +0.0, and steps past a segment's end add nothing
    dy = torch.tensor([[-0.0, -0.0], [-0.0, 0.0], [-0.0, -0.0], [0.0, -0.0]])
    idx = torch.tensor([0, 1, 0, 1])
    for name, dtype in DT.items():
        for scale in (False, True):
            d = dy.to(dtype).to(DEV)
            dw = _run_bwd(d, idx.to(DEV), 3, -1, scale)
            _same_bits(dw, _loop_bwd(d, idx, 3, -1, scale), f"{name} scale {scale}")
            assert torch.signbit(dw[0]).all() and not torch.signbit(dw[1:]).any(), name


@pytest.mark.parametrize("grad_scale", [0.5, 3.0, 0.1])
def test_backward_grad_scale(grad_scale):
    """grad_scale (rounded to fp32) multiplies every row's fp32 sum once, before the rounding to
    T: bitwise the loop and reference.embedding_bwd (index_add_ in token order on CPU); with
    scale_grad_by_freq it is ignored (1 / count instead)."""
    gen = torch.Generator().manual_seed(7)
    rows, n = 11, 29
    for name, dtype in DT.items():
        for dim in (3, 130):
            dy = _dy(n, dim, dtype, gen)
            idx = torch.randint(0, 5, (n,), generator=gen).to(DEV)
            what = f"{name} dim {dim} grad_scale {grad_scale}"
            for padding_idx in (-1, 2):
                dw = _run_bwd(dy, idx, rows, padding_idx, False, grad_scale)
                _same_bits(dw, _loop_bwd(dy, idx, rows, padding_idx, False, grad_scale), what)
                # on the CPU: index_add_ there adds in token order (atomics on a GPU do not)
                ref = reference.embedding_bwd(dy.cpu(), idx.cpu(), rows, padding_idx, False,
                                              grad_scale).to(DEV)  # fmt: skip
                _same_bits(dw, ref, what + ": reference")
            by_freq = _run_bwd(dy, idx, rows, -1, True, grad_scale)
            _same_bits(by_freq, _run_bwd(dy, idx, rows, -1, True), what + ": by freq")
            _same_bits(by_freq, _loop_bwd(dy, idx, rows, -1, True), what + ": by freq, loop")


# ------------------------------------------------------------- fused token + positional forward

IDX_PAIRS = [(torch.int32, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int64),
             (torch.int64, torch.int32)]  # fmt: skip
SIN_POSITIONS = [0, 1, 7, 1000, 123456, 2**31 - 1, 2**30 + 12345, 99991]


def _tp(tok, ids, pw, pos, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """token_pos_fwd into an output view followed by SENTINELs; checks that the tail stays."""
    out, buf = _out((ids.shape[0], tok.shape[1]), tok.dtype)
    freq = reference.sinusoid_inv_freq(tok.shape[1], DEV) if pw is None else None
    k.token_pos_fwd(tok, ids, pw, pos, freq, scale, out)
    assert torch.all(buf[out.numel() :] == SENTINEL), "written past the output's end"
    return out, buf


def _sinusoid_pair_np(pos: torch.Tensor, dim: int) -> np.ndarray:
    """embedding.h's sinusoid_pair step by step in numpy (every operation rounded, no FMA):
    the (len(pos), dim) fp32 encoding, sine in the even columns, cosine in the odd ones."""
    angle = pos.cpu().double().numpy()[:, None] * reference.sinusoid_inv_freq(dim).numpy()
    k_ = np.rint(angle * np.float64(0.63661977236758134308))
    hi, lo = np.float64(1.57079632679489655800e00), np.float64(6.12323399573676603587e-17)
    r = ((angle - k_ * hi) - k_ * lo).astype(np.float32)
    f = np.float32
    r2 = r * r
    sp = r + r * r2 * (f(-1.6666654611e-1) + r2 * (f(8.3321608736e-3) + r2 * f(-1.9515295891e-4)))
    c = f(4.166664568298827e-2) + r2 * (f(-1.388731625493765e-3) + r2 * f(2.443315711809948e-5))
    cp = f(1.0) - f(0.5) * r2 + r2 * r2 * c
    q = k_.astype(np.int64) & 3
    s = np.where(q & 1, cp, sp)
    c = np.where(q & 1, sp, cp)
    s, c = np.where(q & 2, -s, s), np.where((q + 1) & 2, -c, c)
    return np.stack((s, c), axis=-1).reshape(len(pos), -1)[:, :dim]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (as fp64)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


@pytest.mark.parametrize("dim", [1, 3, 16, 100])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_token_pos_learned_is_the_reference(dim, layout):
    """Bitwise: fp32(fp32(scale) * tok) + pe in fp32 and one round-to-nearest-even to T, the
    same operations as reference.token_pos_fwd (torch on CPU rounds each of them alike)."""
    gen = torch.Generator().manual_seed(200 + dim)
    rows, positions, n = 13, 17, 11
    for name, dtype in DT.items():
        tok = _weight(rows, dim, dtype, layout, gen)
        pw = _weight(positions, dim, dtype, "contiguous" if dim % 2 else layout, gen)
        for i, (ids_dtype, pos_dtype) in enumerate(IDX_PAIRS):
            ids = torch.randint(0, rows, (n,), generator=gen)
            pos = torch.randint(0, positions, (n,), generator=gen)
            ids[:2], pos[:2] = torch.tensor([0, rows - 1]), torch.tensor([positions - 1, 0])
            ids, pos = ids.to(ids_dtype).to(DEV), pos.to(pos_dtype).to(DEV)
            scale = (1.0, 2.5, 1 / 3)[i % 3]  # 1/3: rounded to fp32 by both
            out, _ = _tp(tok, ids, pw, pos, scale)
            what = f"{name} {ids_dtype}/{pos_dtype} dim {dim} {layout} scale {scale}"
            _same_bits(out, reference.token_pos_fwd(tok, ids, pw, pos, scale), what)


def test_token_pos_learned_column_tiles():
    gen = torch.Generator().manual_seed(3)
    tok = _weight(5, 1030, torch.bfloat16, "column_slice", gen)
    pw = _weight(6, 1030, torch.bfloat16, "column_slice", gen)
    ids, pos = torch.tensor([4, 0, 2], device=DEV), torch.tensor([5, 5, 0], device=DEV)
    out, _ = _tp(tok, ids, pw, pos, 0.75)
    _same_bits(out, reference.token_pos_fwd(tok, ids, pw, pos, 0.75), "bf16 dim 1030")


@pytest.mark.parametrize("dim", [1, 7, 16, 100])
def test_token_pos_sinusoid(dim):
    """Bitwise the numpy transcription of sinusoid_pair (fp32 + fp32(scale * tok), rounded to T)
    and, against the exact sinusoid (reference.token_pos_fwd: fp64 sin / cos rounded to fp32),
    |err| <= 4 fp32 eps * max(1, |value|) for fp32 (the reduction rounds k * pi/2 hi: up to
    2^-22 for positions near 2^31, then r's rounding, the polynomial's < 1 ulp, the sum's
    rounding) and <= 1 ulp of fp16 / bf16 (a few fp32 ulp can only move a rounding boundary)."""
    gen = torch.Generator().manual_seed(300 + dim)
    n = len(SIN_POSITIONS) + 5
    eps = torch.finfo(torch.float32).eps
    for name, dtype in DT.items():
        tok = torch.randn(9, dim, generator=gen).to(dtype).to(DEV)
        for i, (ids_dtype, pos_dtype) in enumerate(IDX_PAIRS):
            ids = torch.randint(0, 9, (n,), generator=gen).to(ids_dtype).to(DEV)
            rand = torch.randint(0, 2**31, (5,), generator=gen).tolist()
            pos = torch.tensor(SIN_POSITIONS + rand).to(pos_dtype).to(DEV)
            scale = (1.0, 2.5)[i % 2]
            for table in (tok, torch.zeros_like(tok)):  # zeros: out is the encoding itself
                out, _ = _tp(table, ids, None, pos, scale)
                what = f"{name} {ids_dtype}/{pos_dtype} dim {dim} scale {scale}"
                e = (table[ids.long()].float() * torch.tensor(scale)).cpu().numpy()
                want = torch.from_numpy(e + _sinusoid_pair_np(pos, dim)).to(dtype).to(DEV)
                _same_bits(out, want, what + ": sinusoid_pair")
                ref = reference.token_pos_fwd(table, ids, None, pos, scale)
                err = (out.double() - ref.double()).abs()
                if dtype == torch.float32:
                    bound = 4 * eps * ref.double().abs().clamp(min=1)
                else:
                    bound = _ulp(ref)
                assert torch.all(err <= bound), (what, float((err / bound).max()))


def test_token_pos_sinusoid_values():
    # a few exact values: position 0 is (0, 1, 0, 1, ...); column 0 is sin(pos), column 1 cos
    out, _ = _tp(torch.zeros(1, 5, device=DEV), torch.zeros(3, dtype=torch.int64, device=DEV),
                 None, torch.tensor([0, 1, 2**31 - 1], device=DEV), 1.0)  # fmt: skip
    assert out[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    for p, row in ((1, 1), (2**31 - 1, 2)):
        want = torch.tensor([np.sin(p), np.cos(p)], dtype=torch.float64)
        assert torch.allclose(out[row, :2].double().cpu(), want, rtol=0, atol=4e-7), (p, out[row])


def test_token_pos_bad_index_raises_and_writes_nothing():
    tok, pw = torch.randn(7, 4, device=DEV), torch.randn(5, 4, device=DEV)
    freq = reference.sinusoid_inv_freq(4, DEV)
    good_ids, good_pos = torch.tensor([0, 6, 3], device=DEV), torch.tensor([4, 0, 2], device=DEV)
    cases = [  # (ids, pos weight, pos, message: the value, then the first bad element)
        (torch.tensor([0, 7, 3]), pw, good_pos, r"index 7 \(\D*1 .* embedding of 7 rows"),
        (torch.tensor([0, -1, 9]), None, good_pos, r"index -1 \(\D*1 "),
        (good_ids, pw, torch.tensor([4, 0, 5]), r"position 5 \(\D*2 .* table of 5 rows"),
        (good_ids, None, torch.tensor([0, -3, 2]), r"position -3 \(\D*1 .*2\^31"),
        (good_ids, None, torch.tensor([2**31, 0, 1]), r"position 2147483648 \(\D*0 "),
        # ids are checked first
        (torch.tensor([0, 1, 8]), pw, torch.tensor([9, 0, 0]), r"index 8 \(\D*2 "),
    ]
    for ids, pws, pos, msg in cases:
        for idx_dtype in (torch.int32, torch.int64):
            ids_ = ids.to(idx_dtype).to(DEV)
            pos_ = pos.to(DEV) if pos.max() >= 2**31 else pos.to(idx_dtype).to(DEV)
            out = torch.full((3, 4), SENTINEL, device=DEV)
            with pytest.raises(IndexError, match=msg):
                k.token_pos_fwd(tok, ids_, pws, pos_, freq if pws is None else None, 1.0, out)
            assert torch.all(out == SENTINEL), "a failed call wrote its output"
    # zero columns: still checked, nothing else
    with pytest.raises(IndexError, match="index 7"):
        k.token_pos_fwd(torch.randn(7, 0, device=DEV), torch.tensor([7], device=DEV), None,
                        torch.tensor([0], device=DEV), torch.zeros(0, dtype=torch.float64),
                        1.0, torch.empty(1, 0, device=DEV))  # fmt: skip


def test_token_pos_empty_and_invalid():
    tok, pw = torch.randn(4, 3, device=DEV), torch.randn(6, 3, device=DEV)
    freq = reference.sinusoid_inv_freq(3, DEV)
    ids, pos = torch.tensor([1, 2], device=DEV), torch.tensor([0, 5], device=DEV)
    none = torch.zeros(0, dtype=torch.int64, device=DEV)
    for pws, fr in ((pw, None), (None, freq)):
        out = torch.full((0, 3), SENTINEL, device=DEV)
        k.token_pos_fwd(tok, none, pws, none, fr, 1.0, out)  # n == 0: nothing to do
    out = torch.full((2, 0), SENTINEL, device=DEV)
    k.token_pos_fwd(torch.randn(4, 0, device=DEV), ids, None, pos,
                    torch.zeros(0, dtype=torch.float64, device=DEV), 1.0, out)  # fmt: skip

    def bad(match, tok=tok, ids=ids, pw=pw, pos=pos, freq=None, out=None):
        out = torch.empty(2, 3, device=DEV) if out is None else out
        with pytest.raises(ValueError, match="token_pos_fwd: " + match):
            k.token_pos_fwd(tok, ids, pw, pos, freq, 1.0, out)

    bad("out must be", out=torch.empty(3, 3, device=DEV))
    bad("out must be", out=torch.empty(2, 3, dtype=torch.float16, device=DEV))
    bad("out must be contiguous", out=torch.empty(3, 2, device=DEV).t())
    bad("indices must be a contiguous", ids=torch.tensor([1, 0, 2, 0], device=DEV)[::2])
    bad("indices must be a contiguous", pos=torch.tensor([1, 0, 2, 0], device=DEV)[::2])
    bad("indices must be int32 or int64", pos=pos.to(torch.int16))
    bad("1 positions for 2 ids", pos=pos[:1])
    bad("dtype torch.float64", tok=tok.double(), pw=pw.double(),
        out=torch.empty(2, 3, dtype=torch.float64, device=DEV))  # fmt: skip
    bad("pos_weight must be", pw=pw.half())
    bad("pos_weight must be", pw=torch.randn(6, 4, device=DEV))
    bad("the rows of tok_weight must be contiguous", tok=torch.randn(3, 4, device=DEV).t())
    bad("inv_freq is for the sinusoid", freq=freq)
    bad("the sinusoid needs inv_freq", pw=None)
    bad("the sinusoid needs inv_freq", pw=None, freq=freq.float())
    bad("inv_freq must hold 2", pw=None, freq=reference.sinusoid_inv_freq(5, DEV))


# --------------------------------------------------------------------------------- AOT specs


def test_aot_specs_cover_every_launch(monkeypatch):
    """Every launch (types, constexprs, num_warps) of a run over dims, dtypes and index types
    is one of aot_specs(); and every config the heuristics pick for any dim is listed."""
    specs = k.aot_specs()
    listed = {spec_key(s) for s in specs}
    assert len(listed) == len(specs) <= 80
    seen: set = set()
    for name in ("_embedding_fwd_kernel", "_embedding_bwd_kernel", "_token_pos_fwd_kernel"):
        monkeypatch.setattr(k, name, Recorder(getattr(k, name), seen))
    for dim in (1, 32, 33, 128, 129, 512, 513, 1030):
        for dtype in DT.values():
            for idx_dtype in (torch.int32, torch.int64):
                w = torch.randn(4, dim).to(dtype).to(DEV)
                idx = torch.tensor([1, 3, 1], dtype=idx_dtype, device=DEV)
                out = torch.empty(3, dim, dtype=dtype, device=DEV)
                k.embedding_fwd(w, idx, out)
                _same_bits(out, w[idx.long()], f"dim {dim}")
                dw = torch.empty_like(w)
                k.embedding_bwd(out, idx, dw, 3, True, 2.0)
                _same_bits(dw, _loop_bwd(out, idx, 4, 3, True), f"dim {dim} backward")
                dw = torch.empty_like(w)
                k.embedding_bwd(out, idx, dw, -1, False, 0.5)
                _same_bits(dw, _loop_bwd(out, idx, 4, -1, False, 0.5), f"dim {dim} grad_scale")
                # the fused forward, learned and sinusoid; the other index type for pos (cast
                # by the launcher) every other dim
                other = torch.int64 if idx_dtype == torch.int32 else torch.int32
                pos = torch.tensor([0, 2, 1], dtype=other if dim % 2 else idx_dtype, device=DEV)
                for pw in (w[:3], None):
                    got, _ = _tp(w, idx, pw, pos, 1.5)
                    want = reference.token_pos_fwd(w, idx, pw, pos, 1.5)
                    if pw is not None:
                        _same_bits(got, want, f"dim {dim} token_pos learned")
                    else:
                        tol = 4 * torch.finfo(torch.float32).eps * want.double().abs().clamp(min=1)
                        tol = torch.maximum(tol, _ulp(want))
                        assert torch.all((got.double() - want.double()).abs() <= tol), dim
    assert len(seen) == 4 * 2 * 2 + 4 * 3 + 4 * 3 * 2 * 2  # every spec launched: none is dead
    missing = seen - listed
    assert not missing, sorted(missing)[:3]
    # only the fused forward is launched without FMA contraction (part of the key), as its
    # specs say
    for s in specs:
        fused_fwd = kernel_name(s["kernel"]) == "_token_pos_fwd_kernel"
        assert s.get("enable_fp_fusion", True) == (not fused_fwd), s["config"]

    by_config = {(s[0], dict(s[2]).get("BLOCK"), dict(s[2]).get("TOKENS"), s[3]) for s in listed}
    for dim in [*range(1, 1100), 4095, 4096, 4097, 65536, 1 << 20]:
        f, b = k.embedding_fwd_config(dim), k.embedding_bwd_config(dim)
        t = k.token_pos_fwd_config(dim)
        assert ("_embedding_fwd_kernel", f.block, f.tokens, f.num_warps) in by_config, dim
        assert ("_embedding_bwd_kernel", b.block, None, b.num_warps) in by_config, dim
        assert ("_token_pos_fwd_kernel", t.block, t.tokens, t.num_warps) in by_config, dim
    assert len(k.aot_specs(aligned=True)) == len(specs)
