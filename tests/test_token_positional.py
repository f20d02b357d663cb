"""token_positional_embedding beyond the conformance grid: the sinusoid's accuracy at large
positions, default and broadcast positions, the backward into both tables, bad arguments,
out-of-range ids and positions, the module, torch.library integration (opcheck, compile),
determinism, and the cpu backend's streaming-store path."""

import math

import pytest
import torch
import torch.nn.functional as F
from cases_embedding import torch_token_positional

import lmkernels
import lmkernels.functional as LF
import lmkernels.nn as LN
from lmkernels import reference
from lmkernels.backends import BackendUnavailable
from lmkernels.ops import embedding as emb_ops

HOST_BACKENDS = ["reference", "cpu"]


def _needs(backend):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")


def _exact_sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...), exactly in fp64 from the
    formula (math.sin of each angle), independent of the library's reference."""
    out = torch.empty(pos.numel(), dim, dtype=torch.float64)
    for r, p in enumerate(pos.tolist()):
        for j in range(dim):
            angle = p / 10000 ** ((j - j % 2) / dim)
            out[r, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


# ------------------------------------------------------------------------------ sinusoid


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dim", [7, 64])
def test_sinusoid_stays_accurate_at_large_positions(backend, dim):
    """Angles formed and reduced in fp64: a few fp32 ulp at positions up to 2^31 - 1, where the
    usual fp32 formulation is off by whole radians."""
    _needs(backend)
    pos = torch.tensor([0, 1, 7, 1000, 123456, 10**7, 2**31 - 1])
    ids = torch.zeros(pos.shape, dtype=torch.int64)
    tok = torch.zeros(1, dim)
    with lmkernels.use_backend(backend):
        got = LF.token_positional_embedding(ids, tok, pos, sinusoidal=True)
    err = (got.double() - _exact_sinusoid(pos, dim)).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float32).eps, err
    torch_err = (torch_token_positional(ids, tok, pos, sinusoidal=True).double()
                 - _exact_sinusoid(pos, dim)).abs().max().item()  # fmt: skip
    assert torch_err > 100 * err  # (the point of the fp64 angle)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_sinusoid_fp64_is_exact_to_fp64(backend):
    _needs(backend)
    pos = torch.tensor([0, 3, 999, 2**20])
    tok = torch.zeros(1, 10, dtype=torch.float64)
    with lmkernels.use_backend(backend):
        got = LF.token_positional_embedding(torch.zeros(4, dtype=torch.long), tok, pos,
                                            sinusoidal=True)  # fmt: skip
    # (an angle of 2^20 is itself known to about 2^20 * 2^-52: both sides round it once)
    torch.testing.assert_close(got, _exact_sinusoid(pos, 10), rtol=0, atol=1e-9)


# ----------------------------------------------------------------- positions, scale, grads


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_default_positions_count_along_the_last_dim(backend):
    _needs(backend)
    tok, pos_w = torch.randn(10, 4), torch.randn(6, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with lmkernels.use_backend(backend):
        got = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, scale=2.0)
        scalar = LF.token_positional_embedding(torch.tensor(7), tok, pos_weight=pos_w)
    torch.testing.assert_close(got, 2.0 * tok[ids] + pos_w[:3])
    torch.testing.assert_close(scalar, tok[7] + pos_w[0])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_backward_scales_the_token_table_and_skips_padding(backend):
    """dE = scale * (sum of dy per id) without the padding row; dP = sum of dy per position;
    a frozen table gets no gradient and costs no backward pass."""
    _needs(backend)
    torch.manual_seed(0)
    tok = torch.randn(12, 8, requires_grad=True)
    pos_w = torch.randn(5, 8, requires_grad=True)
    ids = torch.randint(0, 12, (3, 5))
    ids[0, :2] = 4
    dy = torch.randn(3, 5, 8)
    with lmkernels.use_backend(backend):
        out = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, scale=3.0, padding_idx=4)
        d_tok, d_pos = torch.autograd.grad(out, (tok, pos_w), dy)
    want_tok = torch.zeros(12, 8, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), dy.reshape(-1, 8).double()
    )
    want_tok[4] = 0
    torch.testing.assert_close(d_tok, (3.0 * want_tok).float())
    torch.testing.assert_close(d_pos, dy.sum(0))
    frozen = pos_w.detach()
    with lmkernels.use_backend(backend):
        out = LF.token_positional_embedding(ids, tok, pos_weight=frozen)
    (g,) = torch.autograd.grad(out, (tok,), dy)
    torch.testing.assert_close(g, want_tok.float() + torch.zeros(12, 8).index_put_(
        (torch.tensor([4]),), dy.reshape(-1, 8)[ids.reshape(-1) == 4].sum(0)))  # fmt: skip


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_only_the_positional_table_trains(backend):
    _needs(backend)
    tok = torch.randn(6, 4)
    pos_w = torch.randn(3, 4, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with lmkernels.use_backend(backend):
        out = LF.token_positional_embedding(ids, tok, pos_weight=pos_w)
        (g,) = torch.autograd.grad(out.sum(), (pos_w,))
    torch.testing.assert_close(g, torch.full((3, 4), 2.0))


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_out_of_range_ids_and_positions_are_index_errors_naming_them(backend, idx_dtype):
    _needs(backend)
    tok, pos_w = torch.randn(10, 4), torch.randn(6, 4)
    ids = torch.tensor([[1, 2, 3]], dtype=idx_dtype)
    with lmkernels.use_backend(backend):
        with pytest.raises(IndexError, match="index 10 .*embedding of 10 rows"):
            LF.token_positional_embedding(ids.clone().fill_(10), tok, pos_weight=pos_w)
        with pytest.raises(IndexError, match="position 6 .*positional table of 6 rows"):
            LF.token_positional_embedding(ids, tok, torch.tensor([0, 6, 1]), pos_w)
        with pytest.raises(IndexError, match=r"position -3 .*sinusoidal.*\[0, 2\^31\)"):
            LF.token_positional_embedding(ids, tok, torch.tensor([0, -3, 1], dtype=idx_dtype),
                                          sinusoidal=True)  # fmt: skip
        # the ids are checked first
        with pytest.raises(IndexError, match="index -1"):
            LF.token_positional_embedding(ids.clone().fill_(-1), tok, torch.tensor([9, 9, 9]),
                                          pos_w)  # fmt: skip


def _bad_calls():
    tok, pos_w, ids = torch.randn(10, 4), torch.randn(6, 4), torch.tensor([[1, 2]])
    f = LF.token_positional_embedding
    return [
        (lambda: f(ids.float(), tok, pos_weight=pos_w), TypeError, "ids"),
        (lambda: f([1, 2], tok, pos_weight=pos_w), TypeError, "ids"),
        (lambda: f(ids, tok.long(), pos_weight=pos_w), TypeError, "token_weight"),
        (lambda: f(ids, tok[0], pos_weight=pos_w), ValueError, "token_weight"),
        (lambda: f(ids, tok), ValueError, "pos_weight .*sinusoidal"),
        (lambda: f(ids, tok, pos_weight=pos_w, sinusoidal=True), ValueError, "exactly one"),
        (lambda: f(ids, tok, pos_weight=pos_w.double()), TypeError, "pos_weight"),
        (lambda: f(ids, tok, pos_weight=pos_w[:, :3]), ValueError, "pos_weight"),
        (lambda: f(ids, tok, pos_weight=pos_w[0]), ValueError, "pos_weight"),
        (lambda: f(ids, tok, ids.float(), pos_w), TypeError, "positions"),
        (lambda: f(ids, tok, torch.tensor([0, 1, 2]), pos_w), ValueError, "positions"),
        (lambda: f(ids, tok, pos_weight=pos_w, scale=True), TypeError, "scale"),
        (lambda: f(ids, tok, pos_weight=pos_w, scale="2"), TypeError, "scale"),
        (lambda: f(ids, tok, pos_weight=pos_w, padding_idx=10), ValueError, "padding_idx"),
        (lambda: f(ids, tok, pos_weight=pos_w, padding_idx=1.5), TypeError, "padding_idx"),
        (lambda: f(ids, tok, sinusoidal=1), TypeError, "sinusoidal"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(i):
    call, exc, name = _bad_calls()[i]
    with pytest.raises(exc, match=name):
        call()


def test_triton_refuses_fp64_with_a_reason():
    _needs("triton")
    tok = torch.randn(10, 4, dtype=torch.float64)
    with lmkernels.use_backend("triton"), pytest.raises(BackendUnavailable, match="float64"):
        LF.token_positional_embedding(torch.tensor([1, 2]), tok, sinusoidal=True)


# --------------------------------------------------------------------------- module


def test_module_learned_matches_the_functional_and_trains():
    torch.manual_seed(0)
    m = LN.TokenPositionalEmbedding(20, 8, 16, scale=math.sqrt(8), padding_idx=-1)
    assert m.padding_idx == 19 and torch.count_nonzero(m.token_weight[19]) == 0
    assert set(m.state_dict()) == {"token_weight", "pos_weight"}
    assert "max_positions=16" in repr(m) and "padding_idx=19" in repr(m)
    ids = torch.randint(0, 20, (2, 5))
    out = m(ids)
    want = torch_token_positional(ids, m.token_weight, None, m.pos_weight, scale=math.sqrt(8),
                                  padding_idx=19)  # fmt: skip
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert m.token_weight.grad is not None and m.pos_weight.grad is not None
    assert torch.count_nonzero(m.token_weight.grad[19]) == 0


def test_module_sinusoidal_has_only_the_token_table():
    m = LN.TokenPositionalEmbedding(20, 6, sinusoidal=True, dtype=torch.bfloat16)
    assert [n for n, _ in m.named_parameters()] == ["token_weight"] and not list(m.buffers())
    assert m.token_weight.dtype == torch.bfloat16 and "sinusoidal=True" in repr(m)
    ids = torch.tensor([[3, 4, 5]])
    pos = torch.tensor([[10, 11, 12]])
    torch.testing.assert_close(m(ids, pos), torch_token_positional(ids, m.token_weight, pos,
                                                                   sinusoidal=True))  # fmt: skip


@pytest.mark.parametrize("kwargs", [dict(), dict(max_positions=8, sinusoidal=True)])
def test_module_needs_exactly_one_positional_encoding(kwargs):
    with pytest.raises(ValueError, match="max_positions"):
        LN.TokenPositionalEmbedding(10, 4, **kwargs)


# ------------------------------------------------------------------ torch.library integration


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    _needs(backend)
    tok = torch.randn(20, 7).to(dtype).requires_grad_()
    pos_w = torch.randn(9, 7).to(dtype).requires_grad_()
    ids = torch.tensor([3, 3, 0, 19, 5])
    pos = torch.tensor([0, 1, 2, 8, 4])
    with lmkernels.use_backend(backend):
        for pw, scale, pad in ((pos_w, 1.0, -1), (None, 2.5, 3), (pos_w, 0.5, 0)):
            torch.library.opcheck(torch.ops.lmkernels.token_pos_fwd.default,
                                  (tok, ids, pw, pos, scale, pad))  # fmt: skip
        dy = torch.randn(5, 7).to(dtype)
        torch.library.opcheck(torch.ops.lmkernels.embedding_bwd.default,
                              (dy, ids, 20, 3, False, 2.5))  # fmt: skip


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_compile_fullgraph_no_graph_break(sinusoidal):
    torch._dynamo.reset()
    pos_w = None if sinusoidal else torch.randn(8, 6, requires_grad=True)

    def f(ids, tok):
        return LF.token_positional_embedding(ids, tok, pos_weight=pos_w, sinusoidal=sinusoidal,
                                             scale=2.0, padding_idx=1) * 2  # fmt: skip

    tok = torch.randn(16, 6, requires_grad=True)
    ids = torch.tensor([[1, 2, 2], [15, 0, 1]])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(ids, tok), f(ids, tok)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, tok, g)[0],
                               torch.autograd.grad(ref, tok, g)[0])  # fmt: skip
    assert torch._dynamo.explain(f)(ids, tok).graph_break_count == 0


# ------------------------------------------------------------------- cpu specifics


def test_cpu_backward_is_bitwise_repeatable_and_thread_count_independent():
    _needs("cpu")
    torch.manual_seed(0)
    tok = torch.randn(300, 64, requires_grad=True)
    pos_w = torch.randn(50, 64, requires_grad=True)
    ids = torch.randint(0, 40, (100, 50))
    dy = torch.randn(100, 50, 64)
    threads = torch.get_num_threads()
    runs = []
    with lmkernels.use_backend("cpu"):
        try:
            for n in (1, 2, 2, 1):
                torch.set_num_threads(n)
                out = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, scale=1.7)
                runs.append((out, *torch.autograd.grad(out, (tok, pos_w), dy)))
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for r in runs for a, b in zip(r, runs[0], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinusoidal", [False, True])
def test_cpu_outputs_of_16_mib_take_the_streaming_store_path(dtype, sinusoidal):
    """An output of >= 16 MiB is written with non-temporal stores: the same values as the
    cached path (a slice of the same call's rows computed small)."""
    _needs("cpu")
    torch.manual_seed(0)
    tok = torch.randn(1000, 1024).to(dtype)
    pos_w = None if sinusoidal else torch.randn(2048, 1024).to(dtype)
    ids = torch.randint(0, 1000, (4, 2048))  # 8192 x 1024: 16 or 32 MiB
    with lmkernels.use_backend("cpu"):
        big = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, sinusoidal=sinusoidal)
        small = LF.token_positional_embedding(ids[:, :64], tok, pos_weight=pos_w,
                                              sinusoidal=sinusoidal)  # fmt: skip
    assert torch.equal(big[:, :64], small)
    with lmkernels.use_backend("reference"):
        want = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, sinusoidal=sinusoidal)
    ulp = torch.finfo(dtype).eps
    assert (big.double() - want.double()).abs().max() <= 2 * ulp * want.abs().max().double()


def test_learned_forward_rounds_once_to_the_dtype():
    """cpu: each output is computed in fp32 and rounded once to bf16: with AVX2 as one fp32 FMA
    (the same bits as the exact fp64 value rounded to fp32, then to bf16), without it as an fp32
    multiply and add, never the two bf16 roundings of the unfused torch sequence."""
    _needs("cpu")
    torch.manual_seed(0)
    tok = torch.randn(30, 40).to(torch.bfloat16)
    pos_w = torch.randn(7, 40).to(torch.bfloat16)
    ids = torch.randint(0, 30, (5, 7))
    with lmkernels.use_backend("cpu"):
        got = LF.token_positional_embedding(ids, tok, pos_weight=pos_w, scale=0.3)
    scale32 = torch.tensor(0.3, dtype=torch.float32)
    if torch.ops.lmkernels_cpu.capability() == "AVX2":
        exact = torch.addcmul(pos_w.double()[:7], tok.double()[ids], scale32.double())
        want = exact.float().to(torch.bfloat16)
    else:
        want = (tok.float()[ids] * scale32 + pos_w.float()[:7]).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert not torch.equal(got, F.embedding(ids, tok) * 0.3 + pos_w[:7])  # torch rounds twice


def test_reference_positions_check_handles_int32_limits():
    reference.check_positions(torch.tensor([2**31 - 1], dtype=torch.int32), None)
    with pytest.raises(IndexError):
        reference.check_positions(torch.tensor([-1], dtype=torch.int32), None)
    with pytest.raises(IndexError):
        reference.check_positions(torch.tensor([2**31]), None)


def test_emb_ops_entry_point_runs_the_registered_op_under_compile_only():
    """Plain eager calls skip the torch.library op; compile sees the op (see eager_call)."""
    tok = torch.randn(4, 3)
    out = emb_ops.token_positional(tok, torch.tensor([1]), None, torch.tensor([2]), 1.0, -1)
    torch.testing.assert_close(
        out, torch_token_positional(torch.tensor([1]), tok, torch.tensor([2]), sinusoidal=True)
    )
