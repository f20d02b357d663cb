"""The CUDA embedding kernels (csrc/cuda/embedding.cu) through their launchers
``lmkernels.ops.embedding._cuda_fwd`` / ``_cuda_bwd``, on a GPU; and the argument checks of
the ``lmkernels._cuda.embedding_*`` bindings, which need only the built module.

Forward: a byte copy, so it must equal ``reference.embedding_fwd`` bit for bit for every dtype,
whatever word size the copy picks (16, 8, 4 or 2 bytes: dims and row strides around each), with
strided and misaligned tables; outputs sit in sentinel-filled buffers (a write past the end is
caught). Bad indices raise IndexError naming the first one and write nothing.
Backward: the in-order fp32 (fp64) sum of the contract, so it must equal the reference computed
on the CPU (``index_add_`` adds in index order there; on a GPU it uses atomics) bit for bit, for
every dtype; with scale_grad_by_freq, the unscaled sum times fp32(1 / count) (the CPU backend's
scale) and the reference bit for bit.
Fused token + positional forward (``lmkernels.functional.token_positional_embedding`` under
``use_backend("cuda")``, and its launcher ``_cuda_tp_fwd``): with a learned table the
reference's two fp32 (fp64) roundings, so bit for bit the reference backend; with the sinusoid
within a few fp32 ulp of the exact value (embedding.h), up to position 2^31 - 1. Bad ids or
positions raise the reference's IndexError and write nothing; its backward is two embedding
backwards (the token table's scaled), bit for bit the reference on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from lmkernels import reference

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA embedding kernels need one to run"
)

DEVICE = "cuda"
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [F32, F16, BF16, F64]
SENTINEL = 7.0
TAIL = 64  # sentinel elements after every output buffer
_BITS = {F32: torch.int32, F16: torch.int16, BF16: torch.int16, F64: torch.int64}


def _cuda_module():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    return _cuda


def _launchers():
    from lmkernels.ops import embedding as k

    def bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale=1.0):
        k._cuda_bwd(dy, idx, dw, padding_idx, scale_grad_by_freq, grad_scale)

    return k._cuda_fwd, bwd


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _assert_bitwise(ours, want, what):
    assert ours.shape == want.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(want.shape)}"
    if not torch.equal(_bits(ours.cpu()), _bits(want.cpu())):
        diff = (_bits(ours.cpu()) != _bits(want.cpu())).nonzero()
        raise AssertionError(
            f"{what}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}"
        )


def _table(rows, dim, dtype, gen, layout="contiguous", offset=0):
    """A (rows, dim) table with unit column stride: contiguous, a column slice of a wider one
    (row stride dim + 5), or starting `offset` elements into its buffer."""
    if layout == "column_slice":
        full = torch.randn(rows, dim + 5, generator=gen, device=DEVICE).to(dtype)
        return full[:, 2 : 2 + dim]
    buf = torch.randn(rows * dim + offset, generator=gen, device=DEVICE).to(dtype)
    return buf[offset:].view(rows, dim)


def _out(shape, dtype, offset=0):
    """A contiguous output view in a sentinel-filled buffer, and the buffer's tail."""
    n = shape[0] * shape[1]
    buf = torch.full((n + offset + TAIL,), SENTINEL, dtype=dtype, device=DEVICE)
    return buf[offset : offset + n].view(shape), buf[offset + n :]


def _indices(n, rows, gen, idx_dtype=torch.int64, hot=None):
    idx = torch.randint(0, rows, (n,), generator=gen, device=DEVICE)
    if hot is not None:  # most tokens hit a few rows
        idx = idx % hot
    return idx.to(idx_dtype)


# ----------------------------------------------------------------------------------- forward

FWD_DIMS = [1, 2, 3, 4, 8, 12, 64, 127, 1000, 4096]


@needs_gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("dim", FWD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_is_the_reference_gather_bit_for_bit(dtype, dim, idx_dtype):
    fwd, _ = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(dim)
    rows, n = 97, 301
    idx = _indices(n, rows, gen, idx_dtype)
    for layout, offset in (("contiguous", 0), ("column_slice", 0), ("contiguous", 1)):
        w = _table(rows, dim, dtype, gen, layout, offset)
        for out_offset in (0, 1):
            out, tail = _out((n, dim), dtype, out_offset)
            fwd(w, idx, out)
            what = f"forward {dtype} dim={dim} {layout} offset={offset} out_offset={out_offset}"
            _assert_bitwise(out, reference.embedding_fwd(w, idx), what)
            assert bool((tail == SENTINEL).all()), f"{what}: write past the end of out"


@needs_gpu
def test_forward_copies_nan_and_inf_bits():
    fwd, _ = _launchers()
    w = torch.tensor([[float("nan"), float("inf")], [-float("inf"), -0.0]], device=DEVICE)
    w = w.repeat(1, 4)
    idx = torch.tensor([1, 0, 0, 1], device=DEVICE)
    for dtype in DTYPES:
        wt = w.to(dtype)
        out, _ = _out((4, 8), dtype)
        fwd(wt, idx, out)
        _assert_bitwise(out, wt[idx], f"special values {dtype}")


@needs_gpu
def test_forward_many_tokens_and_a_single_row_table():
    fwd, _ = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    idx = _indices(3_000_001, 50_000, gen)
    w = _table(50_000, 16, BF16, gen)
    out, tail = _out((idx.shape[0], 16), BF16)
    fwd(w, idx, out)
    _assert_bitwise(out, reference.embedding_fwd(w, idx), "3M tokens")
    one = _table(1, 5, F32, gen)
    out, _ = _out((3, 5), F32)
    fwd(one, torch.zeros(3, dtype=torch.int32, device=DEVICE), out)
    _assert_bitwise(out, one.expand(3, 5), "one-row table")


@needs_gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_bad_index_raises_index_error_naming_the_first_and_writes_nothing(idx_dtype):
    fwd, _ = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    rows, n, dim = 40, 100_000, 64
    w = _table(rows, dim, F32, gen)
    for bad in ([(70_000, rows), (90_000, -1)], [(5, -3), (6, rows + 10)], [(n - 1, 1 << 30)]):
        idx = _indices(n, rows, gen, idx_dtype)
        for t, v in bad:
            idx[t] = v
        t0, v0 = bad[0]
        out, tail = _out((n, dim), F32)
        msg = (
            rf"index {v0} \(at position {t0} of the flattened input\) is out of range for an "
            rf"embedding of {rows} rows"
        )
        with pytest.raises(IndexError, match=msg):
            fwd(w, idx, out)
        assert bool((out == SENTINEL).all()), "a call with a bad index wrote its output"
        assert bool((tail == SENTINEL).all())
    torch.cuda.synchronize()  # no sticky device error was left behind
    # zero rows: every index is bad; zero columns: the check alone
    empty = torch.empty(0, dim, device=DEVICE)
    with pytest.raises(IndexError, match="position 0 .* of 0 rows"):
        fwd(empty, idx[:3], _out((3, dim), F32)[0])
    no_cols = torch.empty(rows, 0, device=DEVICE)
    fwd(no_cols, idx[:10] % rows, torch.empty(10, 0, device=DEVICE))
    with pytest.raises(IndexError, match=f"index {rows} "):
        fwd(no_cols, torch.tensor([0, rows], device=DEVICE), torch.empty(2, 0, device=DEVICE))


# ---------------------------------------------------------------------------------- backward


def _want_bwd(dy, idx, rows, padding_idx, scale_grad_by_freq):
    """The contract's result computed on the CPU: the in-order sums of the reference (index_add_
    is sequential there), scaled the CPU backend's way (times the accumulation dtype's rounding
    of the double 1 / count)."""
    dy_c, idx_c = dy.cpu(), idx.cpu()
    if not scale_grad_by_freq:
        return reference.embedding_bwd(dy_c, idx_c, rows, padding_idx, False)
    acc = F64 if dy.dtype == F64 else F32
    sums = torch.zeros(rows, dy.shape[1], dtype=acc)
    sums.index_add_(0, idx_c.long(), dy_c.to(acc))
    counts = torch.bincount(idx_c.long(), minlength=rows).clamp_(min=1)
    sums *= counts.double().reciprocal().to(acc).unsqueeze(1)
    if padding_idx >= 0:
        sums[padding_idx] = 0
    return sums.to(dy.dtype)


BWD_DIMS = [1, 3, 4, 8, 16, 100, 128, 1000, 4104]


@needs_gpu
@pytest.mark.parametrize("dim", BWD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_backward_is_the_in_order_sum_bit_for_bit(dtype, dim):
    _, bwd = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(10 + dim)
    rows = 300
    for n, hot, idx_dtype, padding_idx, scale in (
        (1000, None, torch.int64, -1, False),
        (1000, 7, torch.int32, 3, False),  # many tokens per row, padding among them
        (4000, 40, torch.int64, 0, True),
        (257, None, torch.int32, -1, True),
        (1, None, torch.int64, -1, False),
    ):
        idx = _indices(n, rows, gen, idx_dtype, hot)
        for dy_offset in (0, 1):  # 1: dy not 16-byte aligned, one column per lane
            dy = _table(n, dim, dtype, gen, offset=dy_offset)
            dw = torch.full((rows, dim), SENTINEL, dtype=dtype, device=DEVICE)
            bwd(dy, idx, dw, padding_idx, scale)
            what = (f"backward {dtype} dim={dim} n={n} hot={hot} pad={padding_idx} "
                    f"scale={scale} dy_offset={dy_offset}")  # fmt: skip
            _assert_bitwise(dw, _want_bwd(dy, idx, rows, padding_idx, scale), what)
            if scale:  # and the reference (the same reciprocal scale) on the CPU
                ref = reference.embedding_bwd(dy.cpu(), idx.cpu(), rows, padding_idx, True)
                _assert_bitwise(dw, ref, what + " vs reference")


@needs_gpu
def test_backward_matches_the_cpu_backend_bit_for_bit():
    import lmkernels

    if lmkernels.backends.availability("cpu", "cpu") is not None:
        pytest.skip("the cpu backend (lmkernels._C) is not available here")
    _, bwd = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    rows, n, dim = 200, 5000, 72
    idx = _indices(n, rows, gen, hot=30)
    for dtype in DTYPES:
        dy = _table(n, dim, dtype, gen)
        for padding_idx, scale in ((-1, False), (5, True)):
            dw = torch.empty(rows, dim, dtype=dtype, device=DEVICE)
            bwd(dy, idx, dw, padding_idx, scale)
            want = torch.empty(rows, dim, dtype=dtype)
            cpu_bwd = torch.ops.lmkernels_cpu.embedding_bwd
            cpu_bwd(dy.cpu(), idx.cpu(), want, padding_idx, scale, 1.0)
            _assert_bitwise(dw, want, f"cuda vs cpu backend {dtype} pad={padding_idx}")


@needs_gpu
def test_backward_keeps_denormals():
    # the backward's adds keep fp32 denormals (IEEE add.rn.f32), whatever the build flags
    _, bwd = _launchers()
    tiny = torch.finfo(F32).smallest_normal
    dy = torch.full((4, 8), tiny / 4, device=DEVICE)  # denormal rows
    idx = torch.tensor([2, 2, 2, 0], device=DEVICE)
    dw = torch.empty(3, 8, device=DEVICE)
    bwd(dy, idx, dw, -1, False)
    _assert_bitwise(dw, _want_bwd(dy, idx, 3, -1, False), "denormal sums")
    assert bool((dw[2] == 3 * (tiny / 4)).all()) and bool((dw[0] > 0).all())


@needs_gpu
def test_backward_is_bitwise_repeatable():
    _, bwd = _launchers()
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    rows, n, dim = 1000, 200_000, 256
    idx = _indices(n, rows, gen, hot=50)
    idx[::3] = 7  # one very hot row
    for dtype in (F32, BF16):
        dy = _table(n, dim, dtype, gen)
        first = torch.empty(rows, dim, dtype=dtype, device=DEVICE)
        bwd(dy, idx, first, 1, True)
        for _ in range(3):
            again = torch.empty(rows, dim, dtype=dtype, device=DEVICE)
            bwd(dy, idx, again, 1, True)
            _assert_bitwise(again, first, f"repeat {dtype}")
        fwd_order = _want_bwd(dy, idx, rows, 1, True)
        _assert_bitwise(first, fwd_order, f"hot rows {dtype}")


@needs_gpu
def test_backward_untouched_and_padding_rows_are_zero_and_empty_inputs():
    _, bwd = _launchers()
    dy = torch.ones(5, 6, device=DEVICE)
    idx = torch.tensor([4, 1, 4, 4, 1], device=DEVICE)
    dw = torch.full((8, 6), SENTINEL, device=DEVICE)
    bwd(dy, idx, dw, 4, False)
    want = torch.zeros(8, 6)
    want[1] = 2.0
    _assert_bitwise(dw, want, "padding / untouched rows")
    dw = torch.full((8, 6), SENTINEL, device=DEVICE)
    bwd(dy[:0], idx[:0], dw, -1, False)
    assert bool((dw == 0).all()), "no tokens: dw must be zeros"


@needs_gpu
def test_offsets_past_2_31_elements():
    """A bf16 table of 2^31 + 2048 elements: rows past element 2^31, forward and backward."""
    fwd, bwd = _launchers()
    dim = 1024
    rows = 2**31 // dim + 2
    need = 2 * rows * dim * 2 + (1 << 30)  # table and dw in bf16, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(
            f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free"
        )
    w = torch.zeros(rows, dim, dtype=BF16, device=DEVICE)
    w[-1] = torch.arange(dim, dtype=BF16, device=DEVICE)
    idx = torch.tensor([rows - 1, 0, rows - 1], device=DEVICE)
    out = torch.empty(3, dim, dtype=BF16, device=DEVICE)
    fwd(w, idx, out)
    assert torch.equal(out[0], w[-1]) and torch.equal(out[2], w[-1])
    assert int(torch.count_nonzero(out[1])) == 0
    del w
    dy = torch.ones(3, dim, dtype=BF16, device=DEVICE)
    dw = torch.empty(rows, dim, dtype=BF16, device=DEVICE)
    bwd(dy, idx, dw, -1, False)
    assert torch.equal(dw[-1], torch.full((dim,), 2.0, dtype=BF16, device=DEVICE))
    assert torch.equal(dw[0], torch.ones(dim, dtype=BF16, device=DEVICE))
    assert int(torch.count_nonzero(dw[-2])) == 0 and int(torch.count_nonzero(dw[rows // 2])) == 0


# ------------------------------------------------------------ fused token + positional forward

# (atol, rtol) of the sinusoid against the reference (exact in fp64, rounded): the kernel's
# sinusoid is within 3 * 2^-24 of the exact value, then the sum may round the other way (an ulp
# of the output dtype)
_TP_TOL = {F32: (3e-7, 2.4e-7), F16: (1e-6, 1e-3), BF16: (1e-6, 8e-3), F64: (3e-7, 1e-15)}
TP_DTYPES = [F32, F16, BF16, F64]
TP_DIMS = [1, 2, 7, 8, 100, 1000]
_MAX_POS = 2**31 - 1


def _tp(backend, ids, tok, positions, pw, scale, padding_idx=None):
    import lmkernels
    from lmkernels.functional import token_positional_embedding

    with lmkernels.use_backend(backend):
        return token_positional_embedding(ids, tok, positions, pw, sinusoidal=pw is None,
                                          scale=scale, padding_idx=padding_idx)  # fmt: skip


def _tp_launcher():
    _cuda_module()
    from lmkernels.ops import embedding as k

    return k._cuda_tp_fwd


def _positions(shape, high, gen, dtype, large=False):
    """Random positions below `high`; `large`: spread up to 2^31 - 1 with both ends included."""
    if large:
        p = torch.randint(0, _MAX_POS + 1, shape, generator=gen, device=DEVICE)
        flat = p.view(-1)
        flat[0], flat[-1] = _MAX_POS, 0
        if flat.numel() > 2:
            flat[1] = _MAX_POS - 1
    else:
        p = torch.randint(0, high, shape, generator=gen, device=DEVICE)
    return p.to(dtype)


# (layout, offset) of the token table and of the positional table: contiguous (16-byte units
# where dim allows), then column slices (rows dim + 5 apart) and tables one element into their
# buffer (column pairs)
_TP_LAYOUTS = [
    (("contiguous", 0), ("contiguous", 0)),
    (("column_slice", 0), ("contiguous", 1)),
    (("contiguous", 1), ("column_slice", 0)),
]


@needs_gpu
@pytest.mark.parametrize("dim", TP_DIMS)
@pytest.mark.parametrize("dtype", TP_DTYPES, ids=lambda d: str(d)[6:])
def test_token_pos_learned_is_the_reference_bit_for_bit(dtype, dim):
    gen = torch.Generator(device=DEVICE).manual_seed(100 + dim)
    rows, npos, batch, seq = 97, 61, 3, 53
    for (layout, offset), (pos_layout, pos_offset) in _TP_LAYOUTS:
        tok = _table(rows, dim, dtype, gen, layout, offset)
        pw = _table(npos, dim, dtype, gen, pos_layout, pos_offset)
        for ids_dtype, pos_dtype, scale in (
            (torch.int64, torch.int64, 1.0),
            (torch.int32, torch.int64, 3.7),
            (torch.int64, torch.int32, dim**0.5),
            (torch.int32, torch.int32, -0.3),
        ):
            ids = _indices(batch * seq, rows, gen, ids_dtype).view(batch, seq)
            positions = _positions((batch, seq), npos, gen, pos_dtype)
            what = (f"learned {dtype} dim={dim} {layout}+{offset} {pos_layout}+{pos_offset} "
                    f"{ids_dtype} {pos_dtype} {scale}")  # fmt: skip
            ours = _tp("cuda", ids, tok, positions, pw, scale)
            want = _tp("reference", ids, tok, positions, pw, scale)
            _assert_bitwise(ours, want, what)
            # positions broadcast over the batch (the default 0 .. seq - 1)
            ours = _tp("cuda", ids[:, :npos], tok, None, pw, scale)
            want = _tp("reference", ids[:, :npos], tok, None, pw, scale)
            _assert_bitwise(ours, want, what + " default positions")


@needs_gpu
@pytest.mark.parametrize("dim", TP_DIMS)
@pytest.mark.parametrize("dtype", TP_DTYPES, ids=lambda d: str(d)[6:])
def test_token_pos_sinusoid_matches_the_reference(dtype, dim):
    gen = torch.Generator(device=DEVICE).manual_seed(200 + dim)
    rows, n = 97, 257
    atol, rtol = _TP_TOL[dtype]
    for (layout, offset), _ in _TP_LAYOUTS:
        tok = _table(rows, dim, dtype, gen, layout, offset)
        for ids_dtype, pos_dtype, scale, large in (
            (torch.int64, torch.int64, 1.0, False),
            (torch.int32, torch.int64, 2.5, True),
            (torch.int64, torch.int32, dim**0.5, True),
            (torch.int32, torch.int32, 1.0, True),
        ):
            ids = _indices(n, rows, gen, ids_dtype)
            positions = _positions((n,), 4096, gen, pos_dtype, large)
            what = f"sinusoid {dtype} dim={dim} {layout}+{offset} {ids_dtype} {pos_dtype} {scale}"
            ours = _tp("cuda", ids, tok, positions, None, scale)
            want = _tp("reference", ids, tok, positions, None, scale)
            torch.testing.assert_close(ours, want, atol=atol, rtol=rtol,
                                       msg=lambda m, what=what: f"{what}: {m}")  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: str(d)[6:])
def test_token_pos_sinusoid_is_within_a_few_fp32_ulp_of_exact(dtype):
    # zero token rows: out is the kernel's sinusoid itself (exact in fp64 data)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    for dim in (7, 100, 512):
        positions = torch.cat([
            torch.arange(0, 2048, device=DEVICE),
            torch.randint(0, _MAX_POS + 1, (4096,), generator=gen, device=DEVICE),
            torch.arange(_MAX_POS - 1023, _MAX_POS + 1, device=DEVICE),
        ])  # fmt: skip
        ids = torch.zeros_like(positions)
        tok = torch.zeros(1, dim, dtype=dtype, device=DEVICE)
        ours = _tp("cuda", ids, tok, positions, None, 1.0).cpu().double()
        exact = reference.sinusoid(positions.cpu(), dim, F64)
        err = (ours - exact).abs().max().item()
        assert err <= 4 * 2.0**-24, f"dim={dim}: sinusoid error {err:.3g} > 4 * 2^-24"


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lambda d: str(d)[6:])
def test_token_pos_launcher_writes_exactly_out(dtype):
    # out aligned (16-byte units) and one element in (column pairs), in sentinel-filled buffers;
    # many tokens (grid-stride) and a wide row (several steps per lane)
    fwd = _tp_launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    for n, dim, rows in ((100_003, 24, 1000), (300, 4096, 50)):
        tok = _table(rows, dim, dtype, gen)
        pw = _table(rows, dim, dtype, gen)
        ids = _indices(n, rows, gen)
        pos = _indices(n, rows, gen, torch.int32)
        inv_freq = reference.sinusoid_inv_freq(dim, DEVICE)
        for out_offset in (0, 1):
            for table in (pw, None):
                out, tail = _out((n, dim), dtype, out_offset)
                fwd(tok, ids, table, pos, None if table is not None else inv_freq, 1.5, out)
                want = reference.token_pos_fwd(tok, ids, table, pos, 1.5)
                what = (
                    f"launcher {dtype} n={n} dim={dim} out+{out_offset} learned={table is not None}"
                )
                if table is not None:
                    _assert_bitwise(out, want, what)
                else:
                    atol, rtol = _TP_TOL[dtype]
                    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
                assert bool((tail == SENTINEL).all()), f"{what}: write past the end of out"


def _index_error(backend, *args):
    with pytest.raises(IndexError) as info:
        _tp(backend, *args)
    return str(info.value)


@needs_gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_token_pos_bad_id_or_position_raises_the_reference_error_and_writes_nothing(idx_dtype):
    fwd = _tp_launcher()
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    rows, npos, n, dim = 40, 30, 50_000, 64
    tok = _table(rows, dim, F32, gen)
    pw = _table(npos, dim, F32, gen)
    inv_freq = reference.sinusoid_inv_freq(dim, DEVICE)
    big = 2**31 if idx_dtype == torch.int64 else -5  # past the sinusoid's positions
    cases = [  # (learned, bad ids, bad positions)
        (True, [(30_000, rows), (40_000, -1)], []),
        (True, [], [(7, npos), (8, -2)]),
        (True, [(n - 1, rows + 3)], [(3, npos)]),  # a bad id wins over an earlier bad position
        (False, [], [(20_000, big), (49_000, -1)]),
        (False, [(5, -7)], [(4, big)]),
    ]
    for learned, bad_ids, bad_pos in cases:
        ids = _indices(n, rows, gen, idx_dtype)
        pos = _indices(n, npos, gen, idx_dtype)
        for t, v in bad_ids:
            ids[t] = v
        for t, v in bad_pos:
            pos[t] = v
        table = pw if learned else None
        what = f"learned={learned} ids={bad_ids} pos={bad_pos}"
        want = _index_error("reference", ids, tok, pos, table, 2.0)
        assert _index_error("cuda", ids, tok, pos, table, 2.0) == want, what
        out, tail = _out((n, dim), F32)
        with pytest.raises(IndexError):
            fwd(tok, ids, table, pos, None if learned else inv_freq, 2.0, out)
        assert bool((out == SENTINEL).all()), f"{what}: a call with a bad index wrote its output"
        assert bool((tail == SENTINEL).all())
    torch.cuda.synchronize()  # no sticky device error was left behind
    # an empty positional table: every position is bad
    empty = torch.empty(0, dim, device=DEVICE)
    ids = _indices(5, rows, gen, idx_dtype)
    pos = torch.zeros(5, dtype=idx_dtype, device=DEVICE)
    assert _index_error("cuda", ids, tok, pos, empty, 1.0) == _index_error(
        "reference", ids, tok, pos, empty, 1.0
    )


@needs_gpu
def test_token_pos_no_tokens():
    fwd = _tp_launcher()
    tok = torch.randn(10, 6, device=DEVICE)
    for pw in (torch.randn(4, 6, device=DEVICE), None):
        for shape in ((0,), (2, 0)):
            ids = torch.empty(shape, dtype=torch.int64, device=DEVICE)
            pos = None if len(shape) == 2 else torch.empty(0, dtype=torch.int32, device=DEVICE)
            out = _tp("cuda", ids, tok, pos, pw, 2.0)
            assert out.shape == (*shape, 6)
    out, tail = _out((0, 6), F32)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    fwd(tok, empty, None, empty, reference.sinusoid_inv_freq(6, DEVICE), 1.0, out)
    assert bool((tail == SENTINEL).all())


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lambda d: str(d)[6:])
def test_token_pos_backward_is_the_reference_bit_for_bit(dtype):
    # dy given: the gradients do not depend on the forward's values; the reference runs on
    # the CPU, where index_add_ adds in index order (the contract's order)
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    rows, npos, dim, batch, seq = 50, 40, 72, 4, 37
    ids = _indices(batch * seq, rows, gen, hot=9).view(batch, seq)
    ids[0, :5] = 2  # the padding row among them
    positions = _positions((batch, seq), npos, gen, torch.int32)
    dy = torch.randn(batch, seq, dim, generator=gen, device=DEVICE).to(dtype)
    for learned, scale, padding_idx in ((True, 2.5, 2), (True, 1.0, None), (False, 0.3, 2)):
        tok = _table(rows, dim, dtype, gen)
        pw = _table(npos, dim, dtype, gen) if learned else None
        grads = {}
        for backend, dev in (("cuda", DEVICE), ("reference", "cpu")):
            t = tok.detach().to(dev).requires_grad_()
            p = pw.detach().to(dev).requires_grad_() if learned else None
            out = _tp(backend, ids.to(dev), t, positions.to(dev), p, scale, padding_idx)
            out.backward(dy.to(dev))
            grads[backend] = (t.grad, p.grad if learned else None)
        what = f"backward {dtype} learned={learned} scale={scale} pad={padding_idx}"
        _assert_bitwise(grads["cuda"][0], grads["reference"][0], what + " d_tok")
        if learned:
            _assert_bitwise(grads["cuda"][1], grads["reference"][1], what + " d_pos")


# --------------------------------------------------------------- bindings (no GPU needed)

_P = 256  # a fake device pointer: validation passes, the launch itself needs a GPU
_FWD_OK = dict(weight=_P, idx=_P, out=_P, status=_P, dtype=0, idx64=True, n=4, dim=8,
               num_embeddings=10, weight_stride=8, stream=0)  # fmt: skip
_BWD_OK = dict(dy=_P, dw=_P, order=_P, seg_offsets=_P, seg_rows=_P, seg_scale=0, dtype=0, nseg=2,
               n=4, dim=8, num_embeddings=10, padding_idx=-1, stream=0)  # fmt: skip
_CHECK_OK = dict(idx=_P, status=_P, idx64=False, n=4, num_embeddings=10, stream=0)
_TP_OK = dict(tok_weight=_P, ids=_P, pos_weight=_P, pos=_P, inv_freq=0, out=_P, status=_P,
              dtype=0, ids64=True, pos64=False, n=4, dim=8, num_embeddings=10, tok_stride=8,
              num_positions=16, pos_stride=8, scale=1.0, stream=0)  # fmt: skip
_SIN = dict(pos_weight=0, inv_freq=_P, pos_stride=0, num_positions=2**31)  # the sinusoid
_BAD = [
    ("embedding_fwd", dict(dtype=4), "dtype"),  # Bool
    ("embedding_fwd", dict(dtype=9), "dtype"),
    ("embedding_fwd", dict(n=-1), "n"),
    ("embedding_fwd", dict(dim=-1), "dim"),
    ("embedding_fwd", dict(num_embeddings=-1), "num_embeddings"),
    ("embedding_fwd", dict(weight_stride=-8), "weight_stride"),
    ("embedding_fwd", dict(idx=0), "idx"),
    ("embedding_fwd", dict(status=0), "status"),
    ("embedding_fwd", dict(weight=0), "weight"),
    ("embedding_fwd", dict(out=0), "out"),
    ("embedding_fwd", dict(weight=_P + 2), "weight"),  # not 4-byte aligned for fp32
    ("embedding_fwd", dict(out=_P + 1, dtype=1), "out"),
    ("embedding_bwd", dict(dtype=5), "dtype"),
    ("embedding_bwd", dict(nseg=-1), "nseg"),
    ("embedding_bwd", dict(nseg=5), "nseg"),  # more segments than tokens
    ("embedding_bwd", dict(n=-2), "n"),
    ("embedding_bwd", dict(dim=-1), "dim"),
    ("embedding_bwd", dict(num_embeddings=-1), "num_embeddings"),
    ("embedding_bwd", dict(padding_idx=-2), "padding_idx"),
    ("embedding_bwd", dict(padding_idx=10), "padding_idx"),
    ("embedding_bwd", dict(dy=0), "dy"),
    ("embedding_bwd", dict(dw=0), "dw"),
    ("embedding_bwd", dict(order=0), "order"),
    ("embedding_bwd", dict(seg_offsets=0), "seg_offsets"),
    ("embedding_bwd", dict(seg_rows=0), "seg_rows"),
    ("embedding_bwd", dict(dy=_P + 4, dtype=3), "dy"),  # not 8-byte aligned for fp64
    ("embedding_check", dict(n=-1), "n"),
    ("embedding_check", dict(num_embeddings=-3), "num_embeddings"),
    ("embedding_check", dict(idx=0), "idx"),
    ("embedding_check", dict(status=0), "status"),
    ("token_pos_fwd", dict(dtype=4), "dtype"),
    ("token_pos_fwd", dict(dtype=-1), "dtype"),
    ("token_pos_fwd", dict(n=-1), "n"),
    ("token_pos_fwd", dict(dim=-1), "dim"),
    ("token_pos_fwd", dict(num_embeddings=-1), "num_embeddings"),
    ("token_pos_fwd", dict(tok_stride=-8), "tok_stride"),
    ("token_pos_fwd", dict(num_positions=-1), "num_positions"),
    ("token_pos_fwd", dict(pos_stride=-8), "pos_stride"),
    ("token_pos_fwd", dict(inv_freq=_P), "inv_freq"),  # both encodings
    ("token_pos_fwd", dict(pos_weight=0), "pos_weight"),  # neither
    ("token_pos_fwd", dict(tok_stride=7), "tok_stride"),  # rows overlap
    ("token_pos_fwd", dict(pos_stride=4), "pos_stride"),
    ("token_pos_fwd", dict(_SIN, num_positions=2**31 + 1), "num_positions"),
    ("token_pos_fwd", dict(ids=0), "ids"),
    ("token_pos_fwd", dict(pos=0), "pos"),
    ("token_pos_fwd", dict(status=0), "status"),
    ("token_pos_fwd", dict(tok_weight=0), "tok_weight"),
    ("token_pos_fwd", dict(out=0), "out"),
    ("token_pos_fwd", dict(tok_weight=_P + 2), "tok_weight"),  # not 4-byte aligned for fp32
    ("token_pos_fwd", dict(out=_P + 1, dtype=2), "out"),
    ("token_pos_fwd", dict(pos_weight=_P + 4, dtype=3), "pos_weight"),
    ("token_pos_fwd", dict(_SIN, inv_freq=_P + 4), "inv_freq"),  # fp64 frequencies
]
_OK = {"embedding_fwd": _FWD_OK, "embedding_bwd": _BWD_OK, "embedding_check": _CHECK_OK,
       "token_pos_fwd": _TP_OK}  # fmt: skip


@pytest.mark.parametrize("op,change,arg", _BAD,
                         ids=[f"{op}-" + "-".join(f"{k}={v}" for k, v in c.items())
                              for op, c, _ in _BAD])  # fmt: skip
def test_bad_arguments_name_the_argument(op, change, arg):
    _cuda = _cuda_module()
    with pytest.raises(ValueError, match=rf"lmkernels\._cuda\.{op}: {arg}: "):
        getattr(_cuda, op)(**{**_OK[op], **change})


def test_empty_calls_launch_nothing_and_no_gpu_is_a_clear_error():
    _cuda = _cuda_module()
    # nothing to do: returns before any CUDA call, even with null pointers
    _cuda.embedding_fwd(**{**_FWD_OK, "weight": 0, "idx": 0, "out": 0, "status": 0, "n": 0})
    _cuda.embedding_check(**{**_CHECK_OK, "idx": 0, "status": 0, "n": 0})
    nulls = dict(dy=0, dw=0, order=0, seg_offsets=0, seg_rows=0)
    _cuda.embedding_bwd(**{**_BWD_OK, **nulls, "nseg": 0})
    _cuda.embedding_bwd(**{**_BWD_OK, **nulls, "dim": 0})
    assert {"embedding_check", "embedding_fwd", "embedding_bwd"} <= set(_cuda.build_info()["ops"])
    if torch.cuda.is_available():
        return
    # zero columns or rows: no table or output pointer needed; the check still runs
    for change in ({"dim": 0}, {"num_embeddings": 0}):
        with pytest.raises(RuntimeError, match="embedding_fwd.*no usable NVIDIA GPU"):
            _cuda.embedding_fwd(**{**_FWD_OK, "weight": 0, "out": 0, **change})
    with pytest.raises(RuntimeError, match="embedding_fwd.*no usable NVIDIA GPU"):
        _cuda.embedding_fwd(**_FWD_OK)
    with pytest.raises(RuntimeError, match="embedding_bwd.*no usable NVIDIA GPU"):
        _cuda.embedding_bwd(**_BWD_OK)
    with pytest.raises(RuntimeError, match="embedding_check.*no usable NVIDIA GPU"):
        _cuda.embedding_check(**_CHECK_OK)


def test_token_pos_empty_calls_launch_nothing_and_no_gpu_is_a_clear_error():
    _cuda = _cuda_module()
    nulls = dict(tok_weight=0, ids=0, pos=0, out=0, status=0)
    _cuda.token_pos_fwd(**{**_TP_OK, **nulls, "n": 0})  # returns before any CUDA call
    _cuda.token_pos_fwd(**{**_TP_OK, **_SIN, **nulls, "n": 0})
    assert "token_pos_fwd" in _cuda.build_info()["ops"]
    if torch.cuda.is_available():
        return
    # valid calls (the launch finds no driver): both encodings; a single-row table's stride is
    # never used; zero columns or an empty table need no table or output pointer (check only)
    for change in (
        {},
        _SIN,
        {"num_embeddings": 1, "tok_stride": 0},
        {"num_positions": 1, "pos_stride": 0},
        {"dim": 0, "tok_weight": 0, "out": 0},
        {"num_positions": 0, "tok_weight": 0, "out": 0},
        {**_SIN, "ids64": False, "pos64": True, "dtype": 3, "scale": 0.5},
    ):
        with pytest.raises(RuntimeError, match="token_pos_fwd.*no usable NVIDIA GPU"):
            _cuda.token_pos_fwd(**{**_TP_OK, **change})
