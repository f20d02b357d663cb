"""apply_rotary beyond the conformance grid: in place, gradients for the tables, bad arguments,
torch.library integration (opcheck, compile) and the cpu op's own argument checks."""

import pytest
import torch
from cases_rotary import torch_rotary

import lmkernels
import lmkernels.functional as LF
from lmkernels.backends import BackendUnavailable

HOST_BACKENDS = ["reference", "cpu"]


def _needs(backend):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")


def _tables(shape, dtype=torch.float32):
    angle = torch.rand(shape) * 6.3
    return angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_in_place_writes_x_and_returns_it(backend, interleaved):
    _needs(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 32)
    cos, sin = _tables((7, 1, 32))
    want = torch_rotary(x.double(), cos.double(), sin.double(), interleaved)
    with lmkernels.use_backend(backend):
        out = LF.apply_rotary(x, cos, sin, interleaved=interleaved, inplace=True)
    assert out is x
    torch.testing.assert_close(x.double(), want, rtol=1e-6, atol=1e-6)


def test_table_gradients_use_the_reference_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _tables((5, 8)))
    y = LF.apply_rotary(x, cos, sin)
    yr = torch_rotary(x, cos, sin)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, cos, sin), g),
                    torch.autograd.grad(yr, (x, cos, sin), g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def _bad_calls():
    x = torch.randn(2, 5, 8)
    cos, sin = _tables((5, 8))
    return [
        (lambda: LF.apply_rotary(x.long(), cos, sin), TypeError, "x"),
        (lambda: LF.apply_rotary(x, cos.long(), sin), TypeError, "cos"),
        (lambda: LF.apply_rotary(torch.randn(2, 5, 7), cos[:, :7], sin[:, :7]), ValueError,
         "even"),
        (lambda: LF.apply_rotary(x, cos[:4], sin), ValueError, "cos"),
        (lambda: LF.apply_rotary(x, cos, sin[:, :4]), ValueError, "sin"),
        (lambda: LF.apply_rotary(x, cos, sin, interleaved=1), TypeError, "interleaved"),
        (lambda: LF.apply_rotary(x.bfloat16(), cos, sin, inplace=True), ValueError, "inplace"),
        (lambda: LF.apply_rotary(x.transpose(0, 1), cos[:2], sin[:2], inplace=True), ValueError,
         "contiguous"),
    ]  # fmt: skip


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(i):
    call, exc, name = _bad_calls()[i]
    with pytest.raises(exc, match=name):
        call()


def test_triton_refuses_fp64_with_a_reason():
    _needs("triton")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    cos, sin = _tables((5, 8), torch.float64)
    with lmkernels.use_backend("triton"), pytest.raises(BackendUnavailable, match="float64"):
        LF.apply_rotary(x, cos, sin)


def test_cpu_op_refuses_offsets_outside_the_table():
    _needs("cpu")
    x = torch.randn(4, 8)
    cos, sin = _tables((4, 8))
    ok = torch.arange(4) * 8
    op = torch.ops.lmkernels_cpu.rotary
    out = torch.empty_like(x)
    op(x, out, cos, sin, ok, ok, False, False)  # fine
    for bad in (ok + 1, ok - 1, torch.tensor([0, 8, 16, 32])):
        with pytest.raises(RuntimeError, match="outside its storage"):
            op(x, out, cos, sin, bad, ok, False, False)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_opcheck(backend):
    _needs(backend)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    cos, sin = _tables((5, 1, 16))
    with lmkernels.use_backend(backend):
        for inter in (False, True):
            torch.library.opcheck(torch.ops.lmkernels.rotary.default, (x, cos, sin, inter))
            torch.library.opcheck(torch.ops.lmkernels.rotary_bwd.default,
                                  (x.detach(), cos, sin, inter))  # fmt: skip
            torch.library.opcheck(torch.ops.lmkernels.rotary_.default,
                                  (x.detach().clone(), cos, sin, inter))  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(q, k, cos, sin):
        return LF.apply_rotary(q, cos, sin) + LF.apply_rotary(k, cos, sin, interleaved=True)

    q, k = torch.randn(2, 3, 5, 16, requires_grad=True), torch.randn(2, 3, 5, 16)
    cos, sin = _tables((5, 16))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k, cos, sin), f(q, k, cos, sin)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, q, g)[0], torch.autograd.grad(ref, q, g)[0])
    assert torch._dynamo.explain(f)(q, k, cos, sin).graph_break_count == 0
