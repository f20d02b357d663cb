"""Tests of the benchmark specs (lmkernels/bench/specs): every public op is benchmarked, the
sweeps hold the model sizes the benchmark issue names, the CPU and quick sweeps stay smaller,
peer libraries are listed as skipped with a reason where they cannot run, and the varlen
attention bench's FLOP / byte models and providers are right. No timing thresholds.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lmkernels.functional as LF
from lmkernels.backends import use_backend
from lmkernels.bench import runner, spec
from lmkernels.bench.specs import attention as attention_spec

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only passed to providers(): nothing runs on it here
F32, BF16 = torch.float32, torch.bfloat16
BENCHES = spec.discover()
BY_NAME = {b.name: b for b in BENCHES}
STANDARD = {"reference", "torch", "torch.compile", "naive"}
PEERS = {"flash-attn", "xformers", "apex", "liger-kernel", "quack"}

# the peers each bench compares against (CUDA only)
EXPECTED_PEERS = {
    "attention": {"flash-attn", "xformers"},
    "attention_causal": {"flash-attn", "xformers"},
    "varlen_attention": {"flash-attn"},
    "layer_norm": {"apex", "liger-kernel"},
    "rms_norm": {"apex", "liger-kernel", "quack"},
    "add_rms_norm": {"liger-kernel", "quack"},
    "apply_rotary": {"liger-kernel"},
    "cross_entropy": {"liger-kernel", "quack"},
    "linear_cross_entropy": {"liger-kernel"},
    "softmax": {"liger-kernel", "quack"},
    "masked_softmax": {"apex"},
    "causal_softmax": {"apex"},
}


def _bench(name: str) -> spec.Bench:
    return BY_NAME[name]


def _ours(b: spec.Bench) -> spec.Provider:
    """The lmkernels provider of ``b`` that can run here (the test is skipped if none can)."""
    ours = [p for p in b.providers(CPU) if p.name.startswith("lmkernels-") and p.fn is not None]
    if not ours:
        pytest.skip("no lmkernels backend runs on this machine's CPU")
    return ours[0]


# ------------------------------------------------------------------------------ coverage


def test_bench_names_are_unique_and_every_bench_has_lmkernels_providers():
    assert len(BY_NAME) == len(BENCHES)
    for b in BENCHES:
        names = [p.name for p in b.providers(CPU)]
        assert {"lmkernels-cpu", "lmkernels-triton", "lmkernels-cuda"} <= set(names), b.name
        assert {"reference", "torch", "torch.compile"} <= set(names), b.name


def test_every_public_kernel_op_has_a_bench(monkeypatch):
    """Run each bench's lmkernels provider once on its quick inputs and record which public
    functions it calls (outermost calls only, so an op called inside another does not count)."""
    kernel_ops = [n for n in LF.__all__ if n != "perplexity"]  # perplexity: exp(cross_entropy)
    assert "varlen_attention" in kernel_ops and len(kernel_ops) == len(LF.__all__) - 1
    called: dict[str, set[str]] = {}
    depth = [0]
    current = [""]

    def record(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                called.setdefault(name, set()).add(current[0])
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name in LF.__all__:
        monkeypatch.setattr(LF, name, record(name, getattr(LF, name)))
    for b in BENCHES:
        p = _ours(b)
        inputs = b.make_inputs(b.quick_shapes[0], F32, CPU)
        current[0] = b.name
        with torch.no_grad(), use_backend(p.backend):
            p.fn(*inputs.args)
    missing = sorted(set(kernel_ops) - set(called))
    assert not missing, f"public ops without a bench: {missing}"
    assert called["varlen_attention"] == {"varlen_attention"}


# -------------------------------------------------------------------------------- sweeps


def _dims(name: str, index: int) -> set[int]:
    return {s[index] for s in _bench(name).shapes}


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_norm_sweep_is_model_hiddens(name):
    hiddens = _dims(name, -1)
    assert {768, 1024, 2048, 4096, 8192} <= hiddens and max(hiddens) == 8192
    assert all(4096 <= rows <= 16384 for rows, _ in _bench(name).shapes)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "masked_softmax", "causal_softmax"])
def test_softmax_sweep_is_hiddens_and_attention_scores(name):
    cols = _dims(name, -1)
    assert {768, 1024, 2048, 4096, 8192} <= cols  # hidden-size rows
    assert {512, 16384} <= cols  # attention-score rows, sequence 512 ... 16384
    assert all(rows >= 4096 for rows, _ in _bench(name).shapes)


def test_cross_entropy_sweeps_are_model_vocabularies():
    assert {32000, 50257, 128256, 256000} <= _dims("cross_entropy", 1)
    lce = _bench("linear_cross_entropy").shapes
    hiddens, vocabs = {h for _, h, _ in lce}, {v for _, _, v in lce}
    assert {32000, 256000} <= vocabs and min(vocabs) >= 32000
    assert min(hiddens) <= 1024 and max(hiddens) == 8192 and 4096 in hiddens
    assert all(t >= 4096 for t, _, _ in lce)


@pytest.mark.parametrize("name", ["embedding", "token_positional", "token_positional_sinusoid"])
def test_embedding_sweeps_are_model_tables(name):
    shapes = _bench(name).shapes
    vocabs, dims = {s[-2] for s in shapes}, {s[-1] for s in shapes}
    assert 32000 in vocabs and max(vocabs) >= 128256
    assert 768 in dims and max(dims) >= 4096
    assert all(math.prod(s[:-2]) >= 8192 for s in shapes)  # tokens
    if name == "embedding":
        assert 256000 in vocabs and 8192 in dims


def test_rotary_and_attention_sweeps_are_model_sequences_and_head_dims():
    for name, seq_dim in [("apply_rotary", 1), ("attention", 2), ("attention_causal", 2),
                          ("attention_dropout", 2), ("varlen_attention", 2)]:  # fmt: skip
        shapes = _bench(name).shapes
        assert {s[-1] for s in shapes} == {64, 128}, name
        seqs = {s[seq_dim] for s in shapes}
        assert min(seqs) == 512 and max(seqs) == 16384 and {1024, 2048} <= seqs, name
    for b, h, seq, d in _bench("attention").shapes:  # ~16k tokens per batch, in 16 heads
        assert b * seq == 16384 and h == 16
        assert 4 * b * h * seq * seq * d <= 2**41  # the forward of one call: <= 2.2 TFLOP
    assert all(16384 <= sum(attention_spec.varlen_lengths(s)) <= 32768
               for s in _bench("varlen_attention").shapes)  # fmt: skip


def test_every_bench_has_fp16_on_a_gpu_and_fp32_bf16_on_a_cpu():
    for b in BENCHES:
        assert {F32, torch.float16, BF16} <= set(b.dtypes), b.name
        assert F32 in b.dtypes_on(CPU) and torch.float16 not in b.dtypes_on(CPU), b.name
        if b.name != "linear_cross_entropy":  # bf16 CPU matmuls: see cross_entropy.py
            assert b.dtypes_on(CPU) == (F32, BF16), b.name
        assert b.dtypes_on(CUDA) == b.dtypes


def _dominated(small: tuple[int, ...], shapes) -> bool:
    return any(len(s) == len(small) and all(a <= c for a, c in zip(small, s, strict=True))
               for s in shapes)  # fmt: skip


@pytest.mark.parametrize("b", BENCHES, ids=lambda b: b.name)
def test_cpu_and_quick_sweeps_are_no_larger_than_the_model_sweep(b):
    assert b.cpu_shapes, f"{b.name}: no CPU sweep (the model sizes would run on a CPU)"
    assert b.sweep(CPU) == b.cpu_shapes and b.sweep(CUDA) == b.shapes
    assert b.sweep(CPU, quick=True) == b.quick_shapes
    biggest = max(math.prod(s) for s in b.shapes)
    for s in (*b.cpu_shapes, *b.quick_shapes):
        assert _dominated(s, b.shapes), f"{b.name}: {s} is larger than every GPU shape"
        assert math.prod(s) <= biggest
    # quick shapes are smaller than the CPU sweep, which keeps a model dimension (hidden,
    # vocabulary, head_dim) of the GPU sweep
    assert max(map(math.prod, b.quick_shapes)) <= min(map(math.prod, b.cpu_shapes))
    assert {s[-1] for s in b.cpu_shapes} & {s[-1] for s in b.shapes}


# ---------------------------------------------------------------------------------- peers


@pytest.mark.parametrize("b", BENCHES, ids=lambda b: b.name)
def test_peers_on_cpu_are_skipped_with_a_reason(b):
    providers = b.providers(CPU)
    names = [p.name for p in providers]
    assert len(names) == len(set(names)), names
    peers = {p.name: p for p in providers}
    assert EXPECTED_PEERS.get(b.name, set()) <= set(peers), b.name
    for p in providers:
        if p.name.startswith("lmkernels-") or p.name in STANDARD:
            continue
        assert p.name in PEERS, f"{b.name}: unknown provider {p.name}"
        assert p.fn is None and p.reason and "CUDA" in p.reason, (b.name, p)


def test_every_peer_library_is_a_provider_somewhere():
    names = {p.name for b in BENCHES for p in b.providers(CPU)}
    assert names >= PEERS
    assert set(EXPECTED_PEERS) <= set(BY_NAME)


@pytest.mark.parametrize("b", BENCHES, ids=lambda b: b.name)
def test_peers_on_cuda_are_built_or_skipped_with_a_reason(b):
    """On a CUDA device a peer that cannot be imported is listed with the import failure; one
    that can be is built (a callable, or a reason when the bench cannot time it fairly)."""
    for p in b.providers(CUDA):
        if p.name in PEERS:
            assert (p.fn is not None) != bool(p.reason), (b.name, p)


def test_blhd_layout_conversion_of_the_attention_peers():
    """flash-attn and xformers take (B, L, H, D): ``prepare`` transposes q, k, v once and the
    output goes back as a transposed view. A stand-in with that layout passes the check in
    every mode and its timed callables run repeatedly; without the conversion it fails."""
    b = _bench("attention_causal")
    inputs = b.make_inputs((2, 3, 64, 16), F32, CPU)
    want = runner.oracle(b, inputs)

    def blhd_attention(q, k, v):  # (B, L, H, D) in and out, as flash_attn_func
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return o.transpose(1, 2)

    def fn(q, k, v):
        return blhd_attention(q, k, v).transpose(1, 2)

    p = spec.Provider("stand-in", fn, prepare=attention_spec._blhd)
    for mode in spec.MODES:
        thunk, err = runner.build_thunk(p, fn, inputs, mode, want)
        assert err < 1e-5, (mode, err)
        thunk()
        thunk()  # every timed call reuses the graph of the one prepare
    unprepared = spec.Provider("no-layout", fn)
    _, err = runner.build_thunk(unprepared, fn, inputs, "fwd", want)
    assert err > 1e-2


# ---------------------------------------------------------------- providers' supports()


def test_score_materialising_providers_skip_what_would_not_fit():
    for name in ("attention", "attention_causal"):
        provs = {p.name: p for p in _bench(name).providers(CUDA)}
        naive, reference = provs["naive"].supports, provs["reference"].supports
        assert naive((2, 16, 8192, 128), BF16) is None  # 2^31 scores
        assert "materialises" in naive((1, 16, 16384, 128), BF16)
        assert reference((8, 16, 2048, 128), F32) is None
        assert "materialises" in reference((2, 16, 8192, 128), F32)
    cpu = {p.name: p for p in _bench("attention").providers(CPU)}
    assert cpu["naive"].supports((1, 2, 128, 32), F32) is None
    assert "fp32 only" in cpu["naive"].supports((1, 2, 128, 32), BF16)
    drop = {p.name: p for p in _bench("attention_dropout").providers(CPU)}
    assert drop["reference"].supports((1, 2, 128, 32), F32) is None
    assert drop["reference"].supports((4, 8, 512, 64), F32)
    varlen = {p.name: p for p in _bench("varlen_attention").providers(CUDA)}
    assert varlen["reference"].supports((16, 16, 2048, 128), F32) is None
    assert varlen["reference"].supports((2, 16, 16384, 128), F32)


# --------------------------------------------------------------------------------- varlen


def test_varlen_lengths_and_inputs():
    shape = (4, 2, 128, 32)
    assert attention_spec.varlen_lengths(shape) == (128, 32, 96, 64)
    assert attention_spec.varlen_lengths((6, 16, 16384, 128)) == (
        16384, 4096, 12288, 8192, 16384, 4096
    )  # fmt: skip
    q, k, v, cu, max_len, lens = _bench("varlen_attention").make_inputs(shape, F32, CPU).args
    assert q.shape == k.shape == v.shape == (320, 2, 32) and q.requires_grad
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 128, 160, 256, 320]
    assert max_len == 128 and lens == (128, 32, 96, 64)


def test_varlen_flop_and_byte_models_match_hand_counts():
    b = _bench("varlen_attention")
    shape = (4, 2, 128, 32)  # lengths 128, 32, 96, 64: 320 tokens
    # causal: half of 4 * sum(L_i^2) * H * D, with sum(L_i^2) = 16384 + 1024 + 9216 + 4096
    fwd = 4 * 30720 * 2 * 32 // 2
    assert fwd == 3_932_160
    assert b.flops(shape, F32, "fwd") == fwd
    assert b.flops(shape, F32, "bwd") == fwd * 5 // 2
    assert b.flops(shape, BF16, "fwdbwd") == fwd * 7 // 2
    t = 320 * 2 * 32 * 4  # one packed (total, H, D) fp32 tensor
    assert b.bytes(shape, F32, "fwd") == 4 * t  # read q, k, v; write o
    assert b.bytes(shape, F32, "bwd") == 8 * t  # read q, k, v, o, dO; write dq, dk, dv
    assert b.bytes(shape, BF16, "fwdbwd") == 12 * t // 2
    # one sequence of full length: the dense causal count
    one = (1, 16, 2048, 128)
    assert b.flops(one, F32, "fwd") == _bench("attention_causal").flops(one, F32, "fwd")
    assert b.bytes(one, F32, "fwdbwd") == _bench("attention_causal").bytes(one, F32, "fwdbwd")


def test_varlen_quick_run_passes_the_check_on_cpu():
    b = _bench("varlen_attention")
    cfg = runner.Config(reps=2, device=CPU, quick=True, providers=["!torch.compile"])
    doc = runner.run([b], cfg, progress=False)
    rows = doc["results"]
    assert not [r for r in rows if r["status"] == "FAILED"], rows
    ok = {(r["provider"], r["mode"], r["dtype"]) for r in rows if r["status"] == "ok"}
    for prov in ("torch", "reference") + (("lmkernels-cpu",) if _ours(b).name == "lmkernels-cpu"
                                           else ()):  # fmt: skip
        for mode in spec.MODES:
            for d in ("fp32", "bf16"):
                assert (prov, mode, d) in ok, (prov, mode, d)
    assert {s["provider"] for s in doc["skipped_providers"]} >= {"flash-attn"}
    assert all(r["flops"] > 0 for r in rows if r["status"] == "ok")


def test_varlen_check_catches_attention_across_sequences():
    """A provider that lets queries see other sequences' keys (one causal pass over the packed
    tokens) is caught by the pre-timing check, forward and backward."""
    b = _bench("varlen_attention")
    inputs = b.make_inputs((4, 2, 128, 32), F32, CPU)
    want = runner.oracle(b, inputs)

    def packed(q, k, v, cu, max_len, lens):
        o = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (q, k, v)), is_causal=True
        )
        return o.transpose(0, 1)

    for mode in ("fwd", "fwdbwd"):
        _, err = runner.build_thunk(spec.Provider("packed", packed), packed, inputs, mode, want)
        assert err > 1e-2, (mode, err)
    torch_p = {p.name: p for p in b.providers(CPU)}["torch"]
    _, err = runner.build_thunk(torch_p, torch_p.fn, inputs, "fwdbwd", want)
    assert err < 1e-5


def test_checkpointed_oracles_match_the_reference():
    """The oracles run the reference per (batch, head) / per sequence under checkpointing: the
    same outputs and gradients as the reference over the whole batch."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))  # fmt: skip
    dy = torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64)
    for causal in (False, True):
        whole = attention_spec._reference(causal, 0.0)
        chunked = attention_spec._per_head_checkpointed(whole)
        a, b = whole(q, k, v), chunked(q, k, v)
        torch.testing.assert_close(b, a)
        ga = torch.autograd.grad(a, (q, k, v), dy)
        gb = torch.autograd.grad(b, (q, k, v), dy)
        for x, y in zip(gb, ga, strict=True):
            torch.testing.assert_close(x, y)
    vb = _bench("varlen_attention")
    args = vb.make_inputs((5, 2, 64, 16), F32, CPU).args
    a = attention_spec._varlen_reference(*args)
    b = vb.reference(*args)
    torch.testing.assert_close(b, a)
    ga = torch.autograd.grad(a, args[:3], torch.ones_like(a))
    gb = torch.autograd.grad(b, args[:3], torch.ones_like(b))
    for x, y in zip(gb, ga, strict=True):
        torch.testing.assert_close(x, y)


# --------------------------------------------------------------- every bench, quick shapes


@pytest.mark.parametrize("b", BENCHES, ids=lambda b: b.name)
def test_quick_shape_passes_the_check(b):
    """Every runnable provider but torch.compile passes the pre-timing check on the first
    quick shape, forward and forward + backward, in each CPU dtype."""
    shape = b.quick_shapes[0]
    for dtype in b.dtypes_on(CPU):
        inputs = b.make_inputs(shape, dtype, CPU)
        want = runner.oracle(b, inputs)
        for p in b.providers(CPU):
            if p.fn is None or p.compile or (p.supports and p.supports(shape, dtype)):
                continue
            for mode in ("fwd", "fwdbwd"):
                _, err = runner.build_thunk(p, p.fn, inputs, mode, want)
                assert err <= b.tolerance[dtype], (b.name, p.name, dtype, mode, err)
