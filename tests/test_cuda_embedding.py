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

    return k._cuda_fwd, k._cuda_bwd


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
            torch.ops.lmkernels_cpu.embedding_bwd(dy.cpu(), idx.cpu(), want, padding_idx, scale)
            _assert_bitwise(dw, want, f"cuda vs cpu backend {dtype} pad={padding_idx}")


@needs_gpu
def test_backward_keeps_denormals():
    # --use_fast_math flushes fp32 denormals; the backward's adds must not (IEEE add.rn.f32)
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


# --------------------------------------------------------------- bindings (no GPU needed)

_P = 256  # a fake device pointer: validation passes, the launch itself needs a GPU
_FWD_OK = dict(weight=_P, idx=_P, out=_P, status=_P, dtype=0, idx64=True, n=4, dim=8,
               num_embeddings=10, weight_stride=8, stream=0)  # fmt: skip
_BWD_OK = dict(dy=_P, dw=_P, order=_P, seg_offsets=_P, seg_rows=_P, seg_scale=0, dtype=0, nseg=2,
               n=4, dim=8, num_embeddings=10, padding_idx=-1, stream=0)  # fmt: skip
_CHECK_OK = dict(idx=_P, status=_P, idx64=False, n=4, num_embeddings=10, stream=0)
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
]
_OK = {"embedding_fwd": _FWD_OK, "embedding_bwd": _BWD_OK, "embedding_check": _CHECK_OK}


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
