"""The Triton embedding launchers (lmkernels.triton_kernels.embedding) called directly: the
forward is bitwise ``weight[idx]`` for every dtype, index type, row stride and dim (across the
config boundaries and the column tiles), writes nothing past its output and nothing at all for a
bad index; the backward is bitwise the in-order fp32 sum of embedding.h (a Python loop adding
the dy rows in token order, scaled, rounded once), with repeated indices, padding_idx,
scale_grad_by_freq, a segment far longer than the unrolled loop, and repeat calls; every config
the launchers pick is listed by aot_specs().

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are small.
"""

import numpy as np
import pytest
import torch
from launch_recorder import Recorder, spec_key

from conftest import device_for
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


def _loop_bwd(dy, idx, rows, padding_idx, scale_grad_by_freq) -> torch.Tensor:
    """embedding.h's backward, literally: per row, its tokens' dy rows added in increasing t in
    fp32, times fp32(1 / count) with scale_grad_by_freq, rounded once to dy's dtype."""
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
        out[v] = acc
    return torch.from_numpy(out).to(dy.dtype).to(dy.device)


def _run_bwd(dy, idx, rows, padding_idx, scale) -> torch.Tensor:
    dw, buf = _out((rows, dy.shape[1]), dy.dtype)  # SENTINEL: rows never looked up are zeroed
    k.embedding_bwd(dy, idx, dw, padding_idx, scale)
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


# --------------------------------------------------------------------------------- AOT specs


def test_aot_specs_cover_every_launch(monkeypatch):
    """Every launch (types, constexprs, num_warps) of a run over dims, dtypes and index types
    is one of aot_specs(); and every config the heuristics pick for any dim is listed."""
    specs = k.aot_specs()
    listed = {spec_key(s) for s in specs}
    assert len(listed) == len(specs) <= 40
    seen: set = set()
    monkeypatch.setattr(k, "_embedding_fwd_kernel", Recorder(k._embedding_fwd_kernel, seen))
    monkeypatch.setattr(k, "_embedding_bwd_kernel", Recorder(k._embedding_bwd_kernel, seen))
    for dim in (1, 32, 33, 128, 129, 512, 513, 1030):
        for dtype in DT.values():
            for idx_dtype in (torch.int32, torch.int64):
                w = torch.randn(4, dim).to(dtype).to(DEV)
                idx = torch.tensor([1, 3, 1], dtype=idx_dtype, device=DEV)
                out = torch.empty(3, dim, dtype=dtype, device=DEV)
                k.embedding_fwd(w, idx, out)
                _same_bits(out, w[idx.long()], f"dim {dim}")
                dw = torch.empty_like(w)
                k.embedding_bwd(out, idx, dw, 3, True)
                _same_bits(dw, _loop_bwd(out, idx, 4, 3, True), f"dim {dim} backward")
    assert len(seen) == 4 * 2 * 2 + 4 * 3  # every spec launched once: none is dead
    missing = seen - listed
    assert not missing, sorted(missing)[:3]

    by_config = {(s[0], dict(s[2]).get("BLOCK"), dict(s[2]).get("TOKENS"), s[3]) for s in listed}
    for dim in [*range(1, 1100), 4095, 4096, 4097, 65536, 1 << 20]:
        f, b = k.embedding_fwd_config(dim), k.embedding_bwd_config(dim)
        assert ("_embedding_fwd_kernel", f.block, f.tokens, f.num_warps) in by_config, dim
        assert ("_embedding_bwd_kernel", b.block, None, b.num_warps) in by_config, dim
    assert len(k.aot_specs(aligned=True)) == len(specs)
