"""Attention semantics beyond the conformance grid: fully masked rows (zeros and zero
gradients), the dropout RNG (Philox known answers, statistics, seeding, generators, gradients),
bad arguments, torch.library integration (opcheck, compile), and the varlen API against
per-sequence calls."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import lmkernels
import lmkernels.functional as LF
import lmkernels.nn as LN
from lmkernels import reference
from lmkernels.ops import attention as attn_ops

HOST_BACKENDS = ["reference", "cpu"]


def _needs(backend, dropout=False):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    t = torch.empty(1, 1, 1, 8)
    reason = attn_ops._FWD[backend].supports(
        t, t, t, None, attn_ops.AttnOptions(1.0, dropout_p=0.1 * dropout)
    )
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_fully_masked_rows_give_zeros_and_zero_gradients(backend):
    _needs(backend)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    mask = torch.rand(5, 6) > 0.3
    mask[1] = False
    with lmkernels.use_backend(backend):
        out = LF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, 1], torch.zeros(1, 2, 8))
    # as torch 2.13 (older torch versions gave NaN rows)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_no_keys_at_all_gives_zeros(backend):
    _needs(backend)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 5)
    with lmkernels.use_backend(backend):
        out = LF.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 4, 5) and torch.count_nonzero(out) == 0


def test_dropout_is_seeded_by_torch_and_unbiased():
    torch.manual_seed(0)
    q, k = torch.randn(4, 8, 256, 16), torch.randn(4, 8, 1, 16)
    v = torch.ones(4, 8, 1, 1)  # 8192 dropout draws
    torch.manual_seed(123)
    a = LF.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(123)
    b = LF.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, b)
    # one key: out = v / (1 - p) where kept, 0 where dropped
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02, kept  # (4.5 standard deviations)
    torch.testing.assert_close(a[a != 0], torch.full_like(a[a != 0], 1 / 0.75))
    c = LF.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    assert not torch.equal(a, c)


def test_dropout_mean_matches_no_dropout():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 4)
    want = LF.scaled_dot_product_attention(q, k, v)
    runs = torch.stack([LF.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
                        for _ in range(4000)])  # fmt: skip
    torch.testing.assert_close(runs.mean(0), want, atol=0.08, rtol=0)


def test_philox_known_answers():
    """The Philox4x32-10 known-answer vectors of Salmon et al.'s Random123 distribution."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in vectors:
        got = reference.philox4x32_10(*(torch.tensor(c) for c in ctr), *key)
        assert [int(x) for x in got] == list(want)


def test_dropout_bits_are_uniform_and_independent():
    """Keep rates at several p within 5 standard deviations, and no correlation between the
    four lanes of one Philox call, neighbouring rows or heads."""
    bh = torch.arange(4).view(4, 1, 1)
    rows, cols = torch.arange(64).view(1, 64, 1), torch.arange(256).view(1, 1, 256)
    n = 4 * 64 * 256
    for p in (0.1, 0.5, 0.9):
        thr = reference.dropout_threshold(p)
        keep = reference.attention_dropout_keep(2**63 + 12345, thr, bh, rows, cols).double()
        assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        x = (keep - keep.mean()) / keep.std()
        for a, b in ((x[..., :-1], x[..., 1:]), (x[:, :-1], x[:, 1:]), (x[:-1], x[1:])):
            assert abs((a * b).mean().item()) < 5 / a.numel() ** 0.5


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_dropout_gradcheck(backend):
    """With a fixed generator seed, dropout attention is a fixed function: fp64 gradcheck of
    the kernels' backward (causal, GQA) and of varlen."""
    _needs(backend, dropout=True)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        gen = torch.Generator().manual_seed(11)
        return LF.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True,
                                               enable_gqa=True, generator=gen)  # fmt: skip

    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 7], dtype=torch.int32)

    def g(q, k, v):
        gen = torch.Generator().manual_seed(12)
        return LF.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                   v[0].transpose(0, 1), cu, cu_k, 4, 4, causal=True,
                                   dropout_p=0.3, generator=gen)  # fmt: skip

    with lmkernels.use_backend(backend):
        out = f(q, k, v)
        assert torch.equal(out, f(q, k, v))
        assert torch.count_nonzero(out == 0) > 0  # something was dropped
        assert torch.autograd.gradcheck(f, (q, k, v))
        assert torch.autograd.gradcheck(g, (q, k, v))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_dropout_follows_the_reference_bits(backend):
    """The output is the reference's with the key drawn from the generator: the kernels and
    the oracle use the same lmk/philox.h bits."""
    _needs(backend, dropout=True)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    with lmkernels.use_backend(backend):
        gen = torch.Generator().manual_seed(3)
        out = LF.scaled_dot_product_attention(q, k, v, dropout_p=0.35, generator=gen)
    seed = int(LF._dropout_seed("t", torch.Generator().manual_seed(3))) & (2**64 - 1)
    thr = reference.dropout_threshold(0.35)
    want, _ = reference.attention_fwd(q, k, v, None, 0.25, drop_threshold=thr, seed=seed)
    torch.testing.assert_close(out, want)
    nodrop, _ = reference.attention_fwd(q, k, v, None, 0.25)
    assert (out - nodrop).abs().max() > 0.1


def test_dropout_generator_argument():
    q = torch.randn(1, 2, 8, 8)
    f = LF.scaled_dot_product_attention
    a = f(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    b = f(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    c = f(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(1)
    first, second = (
        f(q, q, q, dropout_p=0.5, generator=gen),
        f(q, q, q, dropout_p=0.5, generator=gen),
    )
    assert torch.equal(first, a) and not torch.equal(second, a)  # the generator advances
    with pytest.raises(TypeError, match="generator"):
        f(q, q, q, dropout_p=0.5, generator=1)


def test_dropout_one_gives_zeros_and_zero_gradients():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    kv = torch.randn(7, 2, 8, requires_grad=True)
    cu, cu_q = (
        torch.tensor([0, 3, 7], dtype=torch.int32),
        torch.tensor([0, 2, 5], dtype=torch.int32),
    )
    outs = [
        LF.scaled_dot_product_attention(q, q, q, dropout_p=1.0),
        LF.varlen_attention(q[0].transpose(0, 1), kv, kv, cu_q, cu, 3, 4, dropout_p=1.0),
    ]  # fmt: skip
    for out, inputs in zip(outs, ((q,), (q, kv)), strict=True):
        assert torch.count_nonzero(out) == 0
        grads = torch.autograd.grad(out.sum(), inputs)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_dropout_with_a_mask_that_requires_grad_draws_the_same_bits():
    """The composite path (a mask needing its gradient) drops the same probabilities as the
    kernels."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 4)
    m = torch.randn(6, 9)
    f = LF.scaled_dot_product_attention
    want = f(q, k, v, m, 0.3, generator=torch.Generator().manual_seed(9))
    got = f(q, k, v, m.requires_grad_(), 0.3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want)


def test_mask_gradient_flows_like_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    m = torch.randn(4, 6, requires_grad=True)
    (g,) = torch.autograd.grad(LF.scaled_dot_product_attention(q, k, v, attn_mask=m).sum(), m)
    (want,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum(), m)
    torch.testing.assert_close(g, want)


def _bad_calls():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    f = LF.scaled_dot_product_attention
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qv, kv = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    g = LF.varlen_attention
    return [
        (lambda: f(q, k[:1].expand(3, 2, 6, 8), v), ValueError, "broadcast"),
        (lambda: f(q, k[..., :4], v), ValueError, "key"),
        (lambda: f(q, k, v[:, :, :5]), ValueError, "value"),
        (lambda: f(q, k.double(), v), TypeError, "key"),
        (lambda: f(q, k, v, enable_gqa=False), ValueError, "broadcast"),
        (
            lambda: f(q, k[:, :1].expand(2, 3, 6, 8), v[:, :1].expand(2, 3, 6, 8), enable_gqa=True),
            ValueError,
            "enable_gqa",
        ),  # fmt: skip
        (
            lambda: f(q, q, q, attn_mask=torch.ones(5, 4, dtype=torch.bool)),
            ValueError,
            "attn_mask",
        ),  # fmt: skip
        (
            lambda: f(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32)),
            TypeError,
            "attn_mask",
        ),  # fmt: skip
        (lambda: f(q, q, q, attn_mask=torch.ones(5, 5).half()), TypeError, "attn_mask"),
        (
            lambda: f(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True),
            ValueError,
            "attn_mask",
        ),  # fmt: skip
        (lambda: f(q, q, q, dropout_p=1.5), ValueError, "dropout_p"),
        (lambda: f(q, q, q, scale="x"), TypeError, "scale"),
        (lambda: f(q, q, q, is_causal=1), TypeError, "is_causal"),
        (lambda: f(q, q, q, window=(2,)), ValueError, "window"),
        (lambda: f(q, q, q, window=(-2, 3)), ValueError, "window"),
        (lambda: f(q.long(), q, q), TypeError, "query"),
        (lambda: g(qv, kv, kv, cu.long(), cu, 3, 3), TypeError, "cu_seqlens_q"),
        (
            lambda: g(qv, kv, kv, cu, torch.tensor([0, 4, 2, 5], dtype=torch.int32), 3, 3),
            ValueError,
            "cu_seqlens_k",
        ),  # fmt: skip
        (
            lambda: g(
                qv, kv, kv, cu, torch.tensor([0, 3, 2, 5], dtype=torch.int32)[[0, 2, 1]], 3, 3
            ),
            ValueError,
            "cu_seqlens_k",
        ),  # fmt: skip
        (
            lambda: g(qv, kv, kv, torch.tensor([0, 5], dtype=torch.int32), cu, 5, 3),
            ValueError,
            "cu_seqlens_k",
        ),  # fmt: skip
        (lambda: g(qv, kv, kv, cu, cu, 2, 3), ValueError, "max_seqlen"),
        (lambda: g(qv[None], kv, kv, cu, cu, 3, 3), ValueError, "q"),
        (lambda: g(torch.randn(5, 3, 8), kv, kv, cu, cu, 3, 3), ValueError, "multiple"),
        (lambda: g(qv, kv, kv, cu, cu, 3, 3, window=(1, 2, 3)), ValueError, "window"),
        (lambda: g(qv, kv, kv, cu, cu, 3, 3, dropout_p=-0.1), ValueError, "dropout_p"),
        (lambda: g(qv, kv, kv, cu, cu, 3, 3, dropout_p=0.1, generator="g"), TypeError, "generator"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(i):
    call, exc, name = _bad_calls()[i]
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_varlen_equals_one_call_per_sequence(backend):
    """Each packed sequence is its own bottom-right aligned causal attention."""
    _needs(backend)
    torch.manual_seed(0)
    lq, lk = [3, 0, 6], [5, 2, 6]
    cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 13], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    with lmkernels.use_backend(backend):
        out = LF.varlen_attention(q, k, v, cu_q, cu_k, 6, 6, causal=True)
        for b in range(3):
            if lq[b] == 0:
                continue
            qs = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
            ks = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1)
            vs = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1)
            keep = torch.ones(lq[b], lk[b], dtype=torch.bool).tril(lk[b] - lq[b])
            want = LF.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True)
            torch.testing.assert_close(out[cu_q[b] : cu_q[b + 1]], want.transpose(0, 1))


# ------------------------------------------------------------------ torch.library integration


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_opcheck(backend):
    _needs(backend)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, requires_grad=True)
    v = torch.randn(2, 2, 7, 6, requires_grad=True)
    mask = (torch.rand(5, 7) > 0.2).expand(2, 4, 5, 7)
    with lmkernels.use_backend(backend):
        seed = torch.tensor(-12345)
        for m, wl, wr, p in ((None, -1, -1, 0.0), (mask, -1, -1, 0.0), (None, 2, 0, 0.0),
                             (mask.float(), 1, 1, 0.25)):  # fmt: skip
            torch.library.opcheck(torch.ops.lmkernels.attention_fwd.default,
                                  (q, k, v, m, 0.3, wl, wr, False, None, None, 0, 0, p,
                                   seed if p else None))  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2

    q = torch.randn(1, 4, 6, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    assert torch._dynamo.explain(f)(q, k, v).graph_break_count == 0


def test_compile_with_dropout_is_seeded_like_eager():
    torch._dynamo.reset()

    def f(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(q, k, v)
    torch.manual_seed(5)
    ref = f(q, k, v)
    assert torch.count_nonzero(ref == 0) > 0
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------- MultiheadAttention


def _mha_pair(**kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, **kw)
    ours = LN.MultiheadAttention(16, 4, **kw)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref.eval(), ours.eval()


@pytest.mark.parametrize(
    "kw, masks",
    [
        (dict(), {}),
        (dict(batch_first=True), {"kpm": "bool"}),
        (dict(batch_first=True), {"attn": "bool2d", "kpm": "bool"}),
        (dict(), {"attn": "float3d"}),
        (dict(kdim=12, vdim=10), {"kpm": "float"}),
        (dict(bias=False, batch_first=True), {"attn": "causal", "is_causal": True}),
        (dict(batch_first=True), {"attn": "causal", "is_causal": True, "kpm": "bool"}),
        # self-attention (query is key is value): one packed in-projection
        (dict(), {"self": True}),
        (dict(batch_first=True), {"self": True, "attn": "causal", "is_causal": True}),
        (dict(batch_first=True, bias=False), {"self": True, "kpm": "bool"}),
    ],
)
def test_multihead_attention_matches_torch(kw, masks):
    ref, ours = _mha_pair(**kw)
    n, length = 2, 5
    s = length if masks.get("is_causal") or masks.get("self") else 7
    bf = kw.get("batch_first", False)
    shape = (lambda t, d: (n, t, d)) if bf else (lambda t, d: (t, n, d))
    q = torch.randn(shape(length, 16), requires_grad=True)
    k = torch.randn(shape(s, kw.get("kdim", 16)), requires_grad=True)
    v = torch.randn(shape(s, kw.get("vdim", 16)), requires_grad=True)
    if masks.get("self"):
        k = v = q
    args = {}
    if masks.get("kpm") == "bool":
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[0, -2:] = True
        args["key_padding_mask"] = kpm
    elif masks.get("kpm") == "float":
        args["key_padding_mask"] = torch.randn(n, s)
    if masks.get("attn") == "bool2d":
        args["attn_mask"] = torch.rand(length, s) > 0.8
    elif masks.get("attn") == "float3d":
        args["attn_mask"] = torch.randn(n * 4, length, s)
    elif masks.get("attn") == "causal":
        args["attn_mask"] = torch.ones(length, s, dtype=torch.bool).triu(1)
        args["is_causal"] = True
    want, _ = ref(q, k, v, need_weights=False, **args)
    linear, shapes = torch.nn.functional.linear, []

    def recording_linear(x, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return linear(x, weight, bias)

    with mock.patch("torch.nn.functional.linear", recording_linear):
        got, w = ours(q, k, v, need_weights=False, **args)
    assert w is None
    # self-attention: one packed (3e, e) in-projection (any layout); otherwise three
    assert shapes.count((48, 16)) == (1 if masks.get("self") else 0)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, *ours.parameters()), g),
                    torch.autograd.grad(want, (q, k, v, *ref.parameters()), g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_multihead_attention_unbatched_and_need_weights():
    ref, ours = _mha_pair()
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0],
                               ref(x, x, x, need_weights=False)[0])  # fmt: skip
    got, w = ours(x, x, x)  # need_weights=True: torch's own path, weights exact
    want, w_ref = ref(x, x, x)
    assert torch.equal(w, w_ref) and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)


@pytest.mark.parametrize("dtype, e, what", [(torch.float64, 16, "float64"),
                                            (torch.float32, 264, "head dim 264")])  # fmt: skip
def test_triton_refuses_what_it_cannot_run_with_a_reason(dtype, e, what):
    reason = lmkernels.backends.availability("triton", "cpu")
    if reason is not None:
        pytest.skip(f"backend triton unavailable here: {reason}")
    q = torch.randn(1, 1, 4, e, dtype=dtype)
    with lmkernels.use_backend("triton"), pytest.raises(lmkernels.BackendUnavailable, match=what):
        LF.scaled_dot_product_attention(q, q, q)


def test_multihead_attention_dropout_in_training_only():
    """Training mode drops attention probabilities in the kernels (repeatable under
    torch.manual_seed); eval mode is exact."""
    torch.manual_seed(0)
    mha = LN.MultiheadAttention(16, 4, dropout=0.3, batch_first=True)
    x = torch.randn(2, 7, 16, requires_grad=True)
    mha.eval()
    exact = mha(x, x, x, need_weights=False)[0]
    ref = torch.nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True)
    ref.load_state_dict(mha.state_dict())
    torch.testing.assert_close(exact, ref.eval()(x, x, x, need_weights=False)[0])
    mha.train()
    torch.manual_seed(1)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    b = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b) and (a - exact).abs().max() > 1e-3
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.isfinite(g).all()
