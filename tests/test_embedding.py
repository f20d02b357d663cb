"""Embedding semantics beyond the conformance grid: the module and its state_dict, max_norm's
in-place effect, out-of-range indices, bad arguments, sparse gradients, torch.library
integration (opcheck, compile), determinism, and offsets past 2^31 on the cpu backend."""

import pytest
import torch
import torch.nn.functional as F

import lmkernels
import lmkernels.functional as LF
import lmkernels.nn as LN
from conftest import free_ram_gib
from lmkernels.backends import BackendUnavailable
from lmkernels.ops import embedding as emb_ops

HOST_BACKENDS = ["reference", "cpu"]


def _needs(backend):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")


# --------------------------------------------------------------------------- module


def test_module_loads_torch_state_dict_and_matches():
    torch.manual_seed(0)
    ref = torch.nn.Embedding(30, 8, padding_idx=3)
    ours = LN.Embedding(30, 8, padding_idx=3)
    assert isinstance(ours, torch.nn.Embedding)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    idx = torch.tensor([[1, 3, 3], [29, 0, 3]])
    y, yr = ours(idx), ref(idx)
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert torch.count_nonzero(ours.weight.grad[3]) == 0


def test_from_pretrained_freezes_and_keeps_the_options():
    table = torch.randn(10, 4)
    m = LN.Embedding.from_pretrained(table, padding_idx=-2, max_norm=1.5)
    assert type(m) is LN.Embedding and not m.weight.requires_grad
    assert m.padding_idx == 8 and m.max_norm == 1.5
    ref = torch.nn.Embedding.from_pretrained(table.clone(), padding_idx=-2, max_norm=1.5)
    idx = torch.tensor([0, 9, 9, 2])
    assert torch.equal(m(idx), ref(idx))
    assert torch.equal(m.weight, ref.weight)  # the same rows renormalised in place


# ------------------------------------------------------------------------ max_norm


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5])
def test_max_norm_renormalises_looked_up_rows_in_place_as_torch(backend, norm_type):
    _needs(backend)
    torch.manual_seed(1)
    w = torch.randn(12, 6) * 3  # every row's norm is far above 1
    orig, w_ref = w.clone(), w.clone()
    idx = torch.tensor([[0, 5, 5], [11, 2, 0]])
    with lmkernels.use_backend(backend):
        y = LF.embedding(idx, w, max_norm=1.0, norm_type=norm_type)
    y_ref = F.embedding(idx, w_ref, max_norm=1.0, norm_type=norm_type)
    assert torch.equal(w, w_ref) and torch.equal(y, y_ref)
    looked_up = [0, 2, 5, 11]
    untouched = [r for r in range(12) if r not in looked_up]
    assert not torch.equal(w[looked_up], orig[looked_up])
    assert torch.equal(w[untouched], orig[untouched])


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad", [10, -1, 2**40])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_out_of_range_index_is_an_index_error_naming_it(backend, bad, idx_dtype):
    _needs(backend)
    if idx_dtype == torch.int32 and bad > 2**31:
        pytest.skip("not representable in int32")
    w = torch.randn(10, 4, requires_grad=True)
    before = w.detach().clone()
    idx = torch.tensor([[1, 2], [bad, 3]], dtype=idx_dtype)
    with lmkernels.use_backend(backend), pytest.raises(IndexError, match=f"index {bad} "):
        LF.embedding(idx, w)
    assert torch.equal(w.detach(), before)


def _bad_calls():
    w, idx = torch.randn(10, 4), torch.tensor([1, 2])
    return [
        (lambda: LF.embedding(idx.float(), w), TypeError, "input"),
        (lambda: LF.embedding([1, 2], w), TypeError, "input"),
        (lambda: LF.embedding(idx.to(torch.int16), w), TypeError, "input"),
        (lambda: LF.embedding(idx, w.long()), TypeError, "weight"),
        (lambda: LF.embedding(idx, w[0]), ValueError, "weight"),
        (lambda: LF.embedding(idx, w, padding_idx=10), ValueError, "padding_idx"),
        (lambda: LF.embedding(idx, w, padding_idx=-11), ValueError, "padding_idx"),
        (lambda: LF.embedding(idx, w, padding_idx=1.0), TypeError, "padding_idx"),
        (lambda: LF.embedding(idx, w, scale_grad_by_freq=1), TypeError, "scale_grad_by_freq"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(i):
    call, exc, name = _bad_calls()[i]
    with pytest.raises(exc, match=name):
        call()


def test_triton_refuses_fp64_with_a_reason():
    _needs("triton")
    w, idx = torch.randn(10, 4, dtype=torch.float64), torch.tensor([1, 2])
    with lmkernels.use_backend("triton"), pytest.raises(BackendUnavailable, match="float64"):
        LF.embedding(idx, w)


# ----------------------------------------------------------------------- sparse


def test_sparse_gradient_is_served_by_torch():
    w = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([1, 2, 2])
    LF.embedding(idx, w, sparse=True).sum().backward()
    assert w.grad.is_sparse
    dense = torch.zeros(10, 4)
    dense[1] = 1
    dense[2] = 2
    torch.testing.assert_close(w.grad.to_dense(), dense)


# ------------------------------------------------------------------ torch.library integration


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    _needs(backend)
    w = torch.randn(20, 7).to(dtype).requires_grad_()
    idx = torch.tensor([3, 3, 0, 19, 5])
    with lmkernels.use_backend(backend):
        for pad, scale in ((-1, False), (3, True)):
            torch.library.opcheck(torch.ops.lmkernels.embedding_fwd.default, (w, idx, pad, scale))
            dy = torch.randn(5, 7).to(dtype)
            torch.library.opcheck(torch.ops.lmkernels.embedding_bwd.default,
                                  (dy, idx, 20, pad, scale))  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(idx, w):
        return LF.embedding(idx, w, padding_idx=1, scale_grad_by_freq=True) * 2

    w = torch.randn(16, 8, requires_grad=True)
    idx = torch.tensor([[1, 2, 2], [15, 0, 1]])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(idx, w), f(idx, w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, w, g)[0], torch.autograd.grad(ref, w, g)[0])
    assert torch._dynamo.explain(f)(idx, w).graph_break_count == 0


# ----------------------------------------------------------------------- determinism


def test_cpu_backward_is_bitwise_repeatable_and_thread_count_independent():
    _needs("cpu")
    torch.manual_seed(0)
    w = torch.randn(300, 64, requires_grad=True)
    idx = torch.randint(0, 40, (5000,))  # many tokens per row
    dy = torch.randn(5000, 64)
    threads = torch.get_num_threads()
    grads = []
    with lmkernels.use_backend("cpu"), torch.random.fork_rng():
        try:
            for n in (1, 2, 2, 1):
                torch.set_num_threads(n)
                grads.append(torch.autograd.grad(LF.embedding(idx, w), w, dy)[0])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)
    # and it is the in-order fp32 sum: the same bits as adding the rows one by one
    want = torch.zeros(300, 64)
    for t in range(5000):
        want[idx[t]] += dy[t]
    assert torch.equal(grads[0], want)


def test_deterministic_algorithms_mode_is_honoured():
    w = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([1, 1, 2])
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (g,) = torch.autograd.grad(LF.embedding(idx, w).sum(), w)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(g[1], torch.full((4,), 2.0))


# ----------------------------------------------------------------------- 64-bit offsets


def test_cpu_offsets_past_2_31_elements():
    """A bf16 table of 2^31 + 2048 elements: rows past element 2^31, forward (plain and fused
    token + positional) and backward."""
    _needs("cpu")
    if free_ram_gib() < 12:
        pytest.skip(f"needs ~9 GiB free RAM, {free_ram_gib():.1f} GiB available")
    dim = 1024
    rows = 2**31 // dim + 2
    w = torch.zeros(rows, dim, dtype=torch.bfloat16)
    w[-1] = torch.arange(dim, dtype=torch.bfloat16)
    idx = torch.tensor([rows - 1, 0, rows - 1])
    y = emb_ops._run_fwd(w, idx)
    assert torch.equal(y[0], w[-1]) and torch.equal(y[2], w[-1]) and torch.count_nonzero(y[1]) == 0
    # the fused token + positional forward, the same table in both roles
    y = emb_ops._run_tp_fwd(w, idx, w, torch.tensor([0, rows - 1, 0]), 2.0)
    assert torch.equal(y[0], 2 * w[-1]) and torch.equal(y[1], w[-1]) and torch.equal(y[2], y[0])
    del w
    dy = torch.ones(3, dim, dtype=torch.bfloat16)
    dw = emb_ops._run_bwd(dy, idx, rows, -1, False)
    assert torch.equal(dw[-1], torch.full((dim,), 2.0, dtype=torch.bfloat16))
    assert torch.equal(dw[0], torch.ones(dim, dtype=torch.bfloat16))
    assert torch.count_nonzero(dw[-2]) == 0 and torch.count_nonzero(dw[rows // 2]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_outputs_of_16_mib_take_the_streaming_store_path(dtype):
    """out and dw of >= 16 MiB are written with non-temporal stores: the same values."""
    _needs("cpu")
    torch.manual_seed(0)
    rows = 8192 if dtype == torch.bfloat16 else 4096  # dw: exactly 16 MiB
    w = torch.randn(rows, 1024).to(dtype)
    idx = torch.randint(0, rows, (8192,))
    idx[:100] = 7  # one row hit many times
    out = emb_ops._run_fwd(w, idx)  # >= 16 MiB
    assert torch.equal(out, w[idx])
    dy = torch.randn(8192, 1024).to(dtype)
    for pad, scale in ((-1, False), (7, True)):
        got = emb_ops._run_bwd(dy, idx, rows, pad, scale)
        want = lmkernels.reference.embedding_bwd(dy, idx, rows, pad, scale)
        assert torch.equal(got, want)
