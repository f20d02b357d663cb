"""Cross-entropy semantics beyond the conformance grid: modules, legacy arguments, errors,
in-place backward, torch.library integration (opcheck, compile), 64-bit offsets, the baseline
CPU kernels."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lmkernels
import lmkernels.functional as LF
import lmkernels.nn as LN
from conftest import free_ram_gib

# ------------------------------------------------------------------------------ API semantics


def test_module_is_a_drop_in():
    w = torch.rand(7) + 0.5
    ours = LN.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum")
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1,
                                    reduction="sum")  # fmt: skip
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x, t = torch.randn(9, 7), torch.randint(0, 7, (9,))
    torch.testing.assert_close(ours(x, t), ref(x, t))


def test_legacy_reduction_arguments_match_torch():
    x, t = torch.randn(5, 4), torch.randint(0, 4, (5,))
    with pytest.warns(UserWarning):
        ours = LF.cross_entropy(x, t, size_average=False)
    with pytest.warns(UserWarning):
        ref = F.cross_entropy(x, t, size_average=False)
    torch.testing.assert_close(ours, ref)


def test_strided_targets():
    x, t = torch.randn(4, 7), torch.randint(0, 7, (8,))
    torch.testing.assert_close(LF.cross_entropy(x, t[::2]), F.cross_entropy(x, t[::2]))


def test_loss_times_a_constant_scales_every_gradient():
    x = torch.randn(6, 11, requires_grad=True)
    t = torch.tensor([1, -100, 3, 10, 0, 5])
    for red in ("mean", "sum", "none"):
        (g,) = torch.autograd.grad((LF.cross_entropy(x, t, reduction=red) * 3.5).sum(), x)
        (rg,) = torch.autograd.grad((F.cross_entropy(x, t, reduction=red) * 3.5).sum(), x)
        torch.testing.assert_close(g, rg)


def test_retain_graph_backward_twice_accumulates():
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4])
    loss = LF.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2, t).backward()
    torch.testing.assert_close(x.grad, 2 * x2.grad)


def test_weight_gradient_is_an_error_as_in_torch():
    w = torch.rand(5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    loss = LF.cross_entropy(x, torch.tensor([0, 1, 2]), w)
    with pytest.raises(RuntimeError, match="weight"):
        loss.backward()


# ------------------------------------------------------------------------------- in place


def test_inplace_backward_writes_the_gradient_over_the_logits():
    x0 = torch.randn(5, 13)
    t = torch.tensor([1, 0, -100, 12, 7])
    leaf = x0.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf (a leaf that needs grad cannot be written in place)
    loss = LF.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True)
    ref_leaf = x0.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf, t, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    (dref,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(logits.detach(), dref)  # the logits now hold d loss / d logits
    loss.backward()
    torch.testing.assert_close(leaf.grad, dref)


def test_inplace_backward_marks_the_logits_modified():
    x = torch.randn(4, 6, requires_grad=True)
    logits = x * 2.0
    kept = logits.pow(2)  # saves logits' old value for its backward
    loss = LF.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + kept.sum()).backward()


def test_inplace_backward_on_a_leaf_is_torchs_error():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        LF.cross_entropy(x, torch.tensor([0, 1, 2]), inplace_backward=True)


def test_without_inplace_backward_the_logits_are_untouched():
    x = torch.randn(6, 20)
    x_before = x.clone()
    leaf = x.requires_grad_()
    LF.cross_entropy(leaf, torch.randint(0, 20, (6,))).backward()
    assert torch.equal(x.detach(), x_before)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1])), IndexError,
         "target 5 .at position 1"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, -2, 1])), IndexError,
         "target -2"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "target"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), ValueError,
         "probabilit"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([True, False, True])),
         TypeError, "target"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), [0, 1, 2]), TypeError, "target"),
        (lambda: LF.cross_entropy(torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2])),
         TypeError, "input"),
        (lambda: LF.cross_entropy(torch.tensor(1.0), torch.tensor(0)), ValueError, "input"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.ones(4)),
         ValueError, "weight"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]),
                                  torch.ones(5, dtype=torch.long)), TypeError, "weight"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]),
                                  label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg"),
         ValueError, "reduction"),
        (lambda: LF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=1.5),
         TypeError, "ignore_index"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7),
                                         torch.tensor([0, 1, 2, 3])), ValueError, "weight"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 3]), torch.randn(9)),
         ValueError, "bias"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).double(),
                                         torch.tensor([0, 1, 2, 3])), ValueError, "weight"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 10])), IndexError, "target 10"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2])), ValueError, "target"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 3]), chunk_size=0),
         ValueError, "chunk_size"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 3]), softcap=0.0),
         ValueError, "softcap"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 3]), z_loss=-1.0),
         ValueError, "z_loss"),
        (lambda: LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8),
                                         torch.tensor([0, 1, 2, 3]),
                                         class_weight=torch.ones(3)), ValueError, "class_weight"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input_raises_naming_the_argument(backend, call, exc, words):
    with lmkernels.use_backend(backend), pytest.raises(exc, match=words):
        call()


# ----------------------------------------------------------------------- torch integration


def _ce_opcheck_cases():
    x = torch.randn(6, 17, requires_grad=True)
    t = torch.tensor([1, -100, 3, 16, 0, 5])
    w = torch.rand(17) + 0.5
    return [
        (x, t, None, -100, 0.0, 0.0, 0.0, 1, True),
        (x, t, w, -100, 0.2, 0.0, 0.0, 2, True),
        (x, t, w, -100, 0.1, 0.0, 0.0, 0, False),
        (x, t, None, -100, 0.0, 4.0, 1e-3, 1, True),
        (torch.randn(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long), None, -100,
         0.0, 0.0, 0.0, 2, True),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("i", range(5))
def test_opcheck_cross_entropy(backend, i):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"{backend} cannot run CPU tensors here: {reason}")
    args = _ce_opcheck_cases()[i]
    with lmkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.lmkernels.cross_entropy_fwd.default, args)
        x, t, w = args[:3]
        dloss = torch.randn(x.shape[0])
        torch.library.opcheck(torch.ops.lmkernels.cross_entropy_bwd.default,
                              (x.detach(), t, w, dloss, *args[3:7]))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_linear_cross_entropy(backend, reduction):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"{backend} cannot run CPU tensors here: {reason}")
    h = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    t = torch.tensor([1, -100, 3, 12, 0, 5, 7])
    args = (h, w, b, t, None, -100, 0.1, 0.0, 1e-3, reduction, True, True, True, 3)
    with lmkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.lmkernels.linear_cross_entropy_fwd.default, args)
        torch.library.opcheck(torch.ops.lmkernels.linear_cross_entropy_bwd.default,
                              (h.detach(), w.detach(), b.detach(), t, None, torch.randn(7), -100,
                               0.1, 0.0, 1e-3, True, True, True, 3))  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(x, t, h, w):
        a = LF.cross_entropy(x, t, label_smoothing=0.1)
        b = LF.cross_entropy(x, t, reduction="none")
        c = LF.linear_cross_entropy(h, w, t, chunk_size=2, z_loss=1e-3)
        return a + b.sum() * 0.5 + c

    x = torch.randn(5, 9, requires_grad=True)
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    t = torch.tensor([1, 0, -100, 8, 3])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, h, w)
    grads = torch.autograd.grad(out, (x, h, w))
    ref = f(x, t, h, w)
    ref_grads = torch.autograd.grad(ref, (x, h, w))
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)
    assert torch._dynamo.explain(f)(x, t, h, w).graph_break_count == 0


def test_compile_inductor_runs_our_kernel():
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: LF.cross_entropy(x, t) * 3, fullgraph=True)
    x, t = torch.randn(8, 300), torch.randint(0, 300, (8,))
    torch.testing.assert_close(f(x, t), F.cross_entropy(x, t) * 3)


# ---------------------------------------------------------------------------- 64-bit offsets


_CPU_REASON = lmkernels.backends.availability("cpu", "cpu")
needs_cpu_backend = pytest.mark.skipif(
    _CPU_REASON is not None, reason=f"cpu backend unavailable: {_CPU_REASON}"
)


@needs_cpu_backend
def test_cpu_kernel_row_offsets_past_2_31():
    """Two rows 2^31 elements apart in one (never touched) allocation: the second row's offset
    only fits 64 bits."""
    if free_ram_gib() < 2:
        pytest.skip(f"needs ~1 GiB free RAM, {free_ram_gib():.1f} GiB available")
    cols = 1000
    buf = torch.empty(2**31 + cols, dtype=torch.bfloat16)  # pages never written stay unbacked
    x = buf.as_strided((2, cols), (2**31, 1))
    probe = torch.randn(2, cols).to(torch.bfloat16)
    x.copy_(probe)
    t = torch.tensor([3, 999])
    with lmkernels.use_backend("cpu"):
        loss = LF.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(probe.float(), t, reduction="none").bfloat16())


# ---------------------------------------------------------------- the baseline CPU kernels


@needs_cpu_backend
def test_baseline_cpu_kernels_pass_the_conformance_cases():
    """The non-AVX2 build of the CPU kernels, chosen with ATEN_CPU_CAPABILITY=default."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests = os.path.dirname(__file__)
    code = (
        f"import sys; sys.path.insert(0, {tests!r})\n"
        "import torch, lmkernels, cases_cross_entropy\n"
        "from lmkernels.testing import cases, check_case\n"
        "assert torch.ops.lmkernels_cpu.capability() == 'DEFAULT'\n"
        "with lmkernels.use_backend('cpu'):\n"
        "    for c in cases():\n"
        "        if c.small:\n"
        "            for dt in (torch.float32, torch.bfloat16):\n"
        "                check_case(c, dt)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------- the gradient computed in the forward


def test_backward_of_loss_hands_over_the_forward_gradient_safely():
    """loss.backward() (incoming gradient 1) takes the forward's gradient as is; a retained
    graph still gives fresh, correct gradients each time, and writing into a gradient that
    autograd.grad returned makes the next backward an error, not a wrong answer."""
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.tensor([1, 2, -100, 4, 8, 0])
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    loss = LF.cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(g1, ref.grad)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * ref.grad)
    x.grad = None
    loss = LF.cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_recomputing_backward_passes_the_conformance_cases(monkeypatch, backend):
    """On a GPU the 'mean' / 'sum' forward writes no gradient and the backward recomputes it
    with the incoming gradient folded into the scale (STORE_GRAD_DEVICES): that path, on this
    machine's backends, over every small cross-entropy case (weights, ignored and all-ignored
    batches, smoothing, incoming gradients other than 1)."""
    import cases_cross_entropy  # noqa: F401  (registers the cases)

    from lmkernels.ops import cross_entropy as ops_ce
    from lmkernels.testing import cases, check_case

    if backend == "cpu" and _CPU_REASON is not None:
        pytest.skip(f"cpu backend unavailable: {_CPU_REASON}")
    monkeypatch.setattr(ops_ce, "STORE_GRAD_DEVICES", ())
    launched = []
    monkeypatch.setattr(ops_ce, "_run_bwd", _counting(ops_ce._run_bwd, launched))
    with lmkernels.use_backend(backend):
        for c in cases():
            if c.small and c.id.startswith("cross_entropy:"):
                for dt in (torch.float32, torch.bfloat16):
                    check_case(c, dt)
    assert len(launched) > 20, "no 'mean' / 'sum' backward recomputed the gradient"


def _counting(fn, calls):
    def wrapped(logits, target, weight, dloss, *args):
        if dloss.dim() == 0:  # a reduced loss's incoming gradient
            calls.append(1)
        return fn(logits, target, weight, dloss, *args)

    return wrapped


def test_linear_cross_entropy_backward_of_loss_matches_torch():
    h = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    t = torch.tensor([1, -100, 3, 12, 0, 5, 7])
    LF.linear_cross_entropy(h, w, t, b, chunk_size=3).backward()  # incoming gradient 1
    refs = [p.detach().clone().requires_grad_() for p in (h, w, b)]
    F.cross_entropy(F.linear(*refs), t).backward()
    for p, r in zip((h, w, b), refs, strict=True):
        torch.testing.assert_close(p.grad, r.grad)


@needs_cpu_backend
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_bits_do_not_depend_on_the_thread_count(reduction):
    """Enough rows for torch's CPU sum to split by the thread count (its bits then differ
    between 1 and 2 threads at this size): the row losses are summed in an order fixed by
    their number."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300001, 3, generator=gen) * 4
    t = torch.randint(0, 3, (300001,), generator=gen)
    w = torch.rand(3, generator=gen) + 0.5
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with lmkernels.use_backend("cpu"):
                outs.append(LF.cross_entropy(x, t, w if reduction == "mean" else None,
                                             reduction=reduction))  # fmt: skip
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    ref = F.cross_entropy(x, t, w if reduction == "mean" else None, reduction=reduction)
    torch.testing.assert_close(outs[0], ref)
