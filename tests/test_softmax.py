"""Softmax-family semantics beyond the conformance grid: API details, modules, errors,
torch.library integration (opcheck, compile), mask gradients, 64-bit offsets."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import lmkernels
import lmkernels.functional as LF
from conftest import free_ram_gib
from lmkernels.ops import softmax as softmax_ops
from lmkernels.ops._common import row_offsets

# ------------------------------------------------------------------------------ API semantics


def test_implicit_dim_matches_torch_and_warns():
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        x = torch.randn(shape)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            y = LF.softmax(x)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ref = F.softmax(x)  # torch's deprecated implicit dim
        torch.testing.assert_close(y, ref)
        assert any("Implicit dimension" in str(w.message) for w in ours)


def test_dtype_argument_casts_first():
    x = torch.randn(4, 33, dtype=torch.bfloat16)
    y = LF.log_softmax(x, -1, dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.log_softmax(x, -1, dtype=torch.float64))


def test_output_layout_follows_softmax_dim():
    x = torch.randn(4, 5, 6)
    for dim in range(3):
        y = LF.softmax(x, dim)
        assert y.movedim(dim, -1).is_contiguous()
        torch.testing.assert_close(y, F.softmax(x, dim))


@pytest.mark.parametrize("cls,ref", [(lmkernels.nn.Softmax, torch.nn.Softmax),
                                     (lmkernels.nn.LogSoftmax, torch.nn.LogSoftmax)])  # fmt: skip
def test_modules_are_drop_ins(cls, ref):
    m, r = cls(dim=1), ref(dim=1)
    assert isinstance(m, ref) and m.dim == 1 and repr(m) == repr(r)
    assert m.state_dict().keys() == r.state_dict().keys()
    x = torch.randn(3, 7, 2, requires_grad=True)
    torch.testing.assert_close(m(x), r(x))


def test_fully_masked_rows_give_zeros_and_zero_grad():
    x = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[:, 1] = True
    y = LF.scaled_masked_softmax(x, mask, scale=0.5)
    assert torch.equal(y[:, 1], torch.zeros(2, 8))
    assert torch.allclose(y[:, 0].sum(-1), torch.ones(2))
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(g[:, 1], torch.zeros(2, 8)) and not g.isnan().any()


def test_float_mask_gradient_is_summed_over_broadcast_dims():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: LF.scaled_masked_softmax(a, b, scale=0.3), (x, bias))


def test_gradcheck_fp64_causal_and_log():
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a: LF.scaled_masked_softmax(a, None, 0.7, True), (x,))
    torch.autograd.gradcheck(lambda a: LF.log_softmax(a, 1), (x,))


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: LF.softmax(torch.arange(6), 0), TypeError, "input"),
        (lambda: LF.softmax(torch.randn(3, 4), 2), IndexError, "dim"),
        (lambda: LF.softmax(torch.randn(3, 4), -3), IndexError, "dim"),
        (lambda: LF.softmax(torch.randn(3, 4), 1.0), TypeError, "dim"),
        (lambda: LF.softmax([1.0, 2.0], 0), TypeError, "input"),
        (lambda: LF.log_softmax(torch.randn(3), 0, dtype=torch.int32), TypeError, "dtype"),
        (lambda: LF.scaled_masked_softmax(torch.ones(3, 4, dtype=torch.int64)), TypeError, "x"),
        (lambda: LF.scaled_masked_softmax(torch.randn(3, 4), torch.ones(5, dtype=torch.bool)),
         ValueError, "mask"),
        (lambda: LF.scaled_masked_softmax(torch.randn(3, 4), torch.ones(2, 3, 4).bool()),
         ValueError, "mask"),
        (lambda: LF.scaled_masked_softmax(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int32)),
         TypeError, "mask"),
        (lambda: LF.scaled_masked_softmax(torch.randn(3, 4), torch.ones(3, 4).bool(),
                                          "2"), TypeError, "scale"),
        (lambda: LF.scaled_masked_softmax(torch.randn(4), causal=True), ValueError, "causal"),
        (lambda: LF.scaled_masked_softmax(torch.tensor(1.0)), ValueError, "x"),
        (lambda: LF.scaled_masked_softmax(torch.randn(3, 4), torch.ones(3, 4, device="meta")),
         ValueError, "mask"),
    ],
)  # fmt: skip
def test_bad_input_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


# ----------------------------------------------------------------------- torch integration


def _opcheck_cases():
    x = torch.randn(3, 5, 7, requires_grad=True)
    m = torch.rand(5, 7) < 0.3
    b = torch.randn(1, 5, 7, requires_grad=True)
    return [
        (x, 2, 1.0, False, None, False),
        (x, 0, 1.0, True, None, False),
        (x.detach().transpose(0, 2).requires_grad_(), 1, 1.0, False, None, False),
        (x, 2, 0.5, False, m, True),
        (x, 2, 0.5, False, b, False),
        (torch.randn(0, 4, requires_grad=True), 1, 1.0, False, None, False),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("i", range(6))
def test_opcheck(backend, i):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"{backend} cannot run CPU tensors here: {reason}")
    args = _opcheck_cases()[i]
    with lmkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.lmkernels.softmax_fwd.default, args)
        y = torch.ops.lmkernels.softmax_fwd(*args).detach()
        torch.library.opcheck(torch.ops.lmkernels.softmax_bwd.default,
                              (y, torch.randn_like(y), args[1], args[2], args[3]))  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(x, mask):
        a = LF.softmax(x * 2, -1)
        b = LF.log_softmax(x, 1, dtype=torch.float64)
        c = LF.scaled_masked_softmax(x, mask, scale=0.5, causal=True)
        return a.sum() + b.float().sum() + (c * c).sum()

    x = torch.randn(2, 6, 6, requires_grad=True)
    mask = torch.rand(6, 6) < 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    (g,) = torch.autograd.grad(out, x)
    ref = f(x, mask)
    (rg,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, rg)
    explanation = torch._dynamo.explain(f)(x, mask)
    assert explanation.graph_break_count == 0


def test_compile_inductor_runs_our_kernel():
    torch._dynamo.reset()
    f = torch.compile(lambda x: LF.softmax(x, -1) * 3, fullgraph=True)
    x = torch.randn(8, 300)
    torch.testing.assert_close(f(x), F.softmax(x, -1) * 3)


# ------------------------------------------------------- eager fast path vs the registered op


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the registered softmax_fwd op made by the public functions."""
    calls = []
    real = softmax_ops.softmax_fwd

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(softmax_ops, "softmax_fwd", spy)
    return calls


def test_plain_eager_calls_skip_the_registered_op(op_calls):
    x = torch.randn(6, 40, requires_grad=True)
    mask = torch.randn(40, requires_grad=True)
    y = LF.scaled_masked_softmax(x, mask, 0.5)
    with torch.no_grad():
        LF.log_softmax(x, 0)
    x2, mask2 = x.detach().clone().requires_grad_(), mask.detach().clone().requires_grad_()
    y2 = softmax_ops.softmax_fwd(x2, 1, 0.5, False, mask2, False)
    g = torch.randn_like(y)
    assert len(op_calls) == 1  # only the direct call above
    # Same kernels, so bitwise the same forward and gradients as through the registered op.
    assert torch.equal(y, y2)
    assert all(map(torch.equal, torch.autograd.grad(y, (x, mask), g),
                   torch.autograd.grad(y2, (x2, mask2), g)))  # fmt: skip


def test_modes_and_fake_tensors_see_the_registered_op(op_calls):
    x = torch.randn(4, 24, requires_grad=True)
    with _RecordOps() as rec:
        y = LF.softmax(x, -1)
        y.sum().backward()
    assert "lmkernels.softmax_fwd.default" in rec.ops
    assert "lmkernels.softmax_bwd.default" in rec.ops
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(3, 5, 7))
        fy = LF.softmax(fx, 1)
    assert type(fy) is not torch.Tensor and fy.shape == (3, 5, 7)
    assert fy.stride() == (35, 1, 5)  # the reduced dim innermost, as on every backend
    assert len(op_calls) == 2


def test_vmap_goes_through_the_registered_op():
    x = torch.randn(3, 4, 9)
    y = torch.func.vmap(lambda t: LF.softmax(t, -1))(x)
    torch.testing.assert_close(y, F.softmax(x, -1))


@pytest.mark.parametrize("eager", [True, False])
def test_double_backward_is_an_error_not_a_wrong_answer(eager):
    x = torch.randn(4, 5, requires_grad=True)
    y = LF.softmax(x, -1) if eager else softmax_ops.softmax_fwd(x, 1, 1.0, False, None, False)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        g.sum().backward()


# ---------------------------------------------------------------------------- 64-bit offsets


def test_row_offsets_are_int64_past_2_31():
    # A (70000, 1, 40000) mask broadcast to (70000, 3, 40000): row offsets up to ~2.8e9.
    off = row_offsets(torch.Size((70000, 3, 40000)), (40000, 0, 1), torch.device("cpu"))
    assert off.dtype == torch.int64 and off.numel() == 70000 * 3
    assert int(off[-1]) == 69999 * 40000 > 2**31
    assert int(off[3 * 60000 + 2]) == 60000 * 40000


def test_cpu_kernel_past_2_31_elements():
    """softmax over 2^31 + 4096 bf16 elements: the last rows live past 2^31 (64-bit offsets)."""
    if free_ram_gib() < 12:
        pytest.skip(f"needs ~9 GiB free RAM, {free_ram_gib():.1f} GiB available")
    cols = 4096
    rows = 2**31 // cols + 1
    x = torch.zeros(rows, cols, dtype=torch.bfloat16)
    probe = torch.randn(3, cols).to(torch.bfloat16)
    x[0], x[-2], x[-1] = probe
    with lmkernels.use_backend("cpu"):
        y = LF.softmax(x, -1)
    ref = F.softmax(probe.float(), -1).to(torch.bfloat16)
    torch.testing.assert_close(y[[0, -2, -1]], ref)
    torch.testing.assert_close(y[rows // 2], torch.full((cols,), 1 / cols, dtype=torch.bfloat16))


# ---------------------------------------------------------------- the baseline CPU kernels


def test_baseline_cpu_kernels_pass_the_conformance_cases():
    """The non-AVX2 build of the CPU kernels, chosen with ATEN_CPU_CAPABILITY=default."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests = os.path.dirname(__file__)
    code = (
        f"import sys; sys.path.insert(0, {tests!r})\n"
        "import torch, lmkernels, cases_softmax\n"
        "from lmkernels.testing import cases, check_case\n"
        "assert torch.ops.lmkernels_cpu.capability() == 'DEFAULT'\n"
        "with lmkernels.use_backend('cpu'):\n"
        "    for c in cases():\n"
        "        for dt in (torch.float32, torch.bfloat16):\n"
        "            check_case(c, dt)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
