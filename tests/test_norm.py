"""Normalisation-family semantics beyond the conformance grid: modules and state_dicts, errors,
torch.library integration (opcheck, compile), thread-count-independent dW/dB, partial use of
the fused outputs."""

import pytest
import torch
import torch.nn.functional as F

import lmkernels
import lmkernels.functional as LF
import lmkernels.nn as LN
from conftest import free_ram_gib
from lmkernels.ops import norm as norm_ops

# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_module_loads_torch_state_dict(affine, bias):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm((4, 24), eps=1e-4, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = LN.LayerNorm((4, 24), eps=1e-4, elementwise_affine=affine, bias=bias)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 24, requires_grad=True)
    y, r = ours(x), ref(x)
    torch.testing.assert_close(y, r)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *ours.parameters()], g),
                    torch.autograd.grad(r, [x, *ref.parameters()], g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_module_loads_torch_state_dict(affine):
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(40, eps=None, elementwise_affine=affine, dtype=torch.bfloat16)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
    ours = LN.RMSNorm(40, elementwise_affine=affine, dtype=torch.bfloat16)
    assert isinstance(ours, torch.nn.RMSNorm)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    # bf16: within one bf16 ulp of torch (both round an fp32 result once)
    torch.testing.assert_close(ours(x), ref(x), rtol=2**-7, atol=1e-6)


# ------------------------------------------------------------------------------ errors


def _bad_calls():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    return [
        (lambda: LF.layer_norm(x, (4,)), ValueError, "normalized_shape"),
        (lambda: LF.layer_norm(x, ()), ValueError, "normalized_shape"),
        (lambda: LF.layer_norm(x, "8"), TypeError, "normalized_shape"),
        (lambda: LF.layer_norm(x, (8,), torch.randn(4)), ValueError, "weight"),
        (lambda: LF.layer_norm(x, (8,), w, torch.randn(9)), ValueError, "bias"),
        (lambda: LF.layer_norm(x, (8,), w.to("meta")), ValueError, "weight"),
        (lambda: LF.layer_norm(x, (8,), w.double()), TypeError, "weight"),
        (lambda: LF.layer_norm(x.bfloat16(), (8,), w, w.bfloat16()), TypeError, "weight"),
        (lambda: LF.layer_norm(x.long(), (8,)), TypeError, "input"),
        (lambda: LF.layer_norm(x, (8,), eps="1e-5"), TypeError, "eps"),
        (lambda: LF.rms_norm(x.int(), (8,)), TypeError, "input"),
        (lambda: LF.rms_norm(x, (8,), [1.0] * 8), TypeError, "weight"),
        (lambda: LF.add_rms_norm(x, torch.randn(4, 9), (8,)), ValueError, "residual"),
        (lambda: LF.add_rms_norm(x, torch.randn(4, 8).long(), (8,)), TypeError, "residual"),
        (lambda: LF.add_layer_norm(x, x, (8,), residual_in_fp32=1), TypeError, "residual_in_fp32"),
        (lambda: LF.add_layer_norm(x, x.to("meta"), (8,)), ValueError, "residual"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(i):
    call, exc, word = _bad_calls()[i]
    with pytest.raises(exc, match=word):
        call()


def test_eps_is_not_validated_beyond_torch():
    # torch accepts eps <= 0 (a zero-variance row then gives inf/NaN): so do we
    x = torch.randn(3, 8)
    x[0] = 1.0
    torch.testing.assert_close(LF.layer_norm(x, (8,), eps=0.0), F.layer_norm(x, (8,), eps=0.0),
                               equal_nan=True)  # fmt: skip


# ------------------------------------------------------------------ torch.library integration


def _opcheck_args():
    x = torch.randn(70, 24, requires_grad=True)
    r = torch.randn(70, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    return [
        (x, None, w, b, 1e-5, False),
        (x, r, w, None, 1e-6, True),
        (x.detach().bfloat16().requires_grad_(), r.detach().float().requires_grad_(), w, b,
         1e-5, False),
        # weight and bias of the data's 16-bit dtype (the cpu op widens them itself)
        (x.detach().bfloat16().requires_grad_(), None, w.detach().bfloat16().requires_grad_(),
         b.detach().bfloat16().requires_grad_(), 1e-5, False),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("i", range(4))
def test_opcheck(backend, i):
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    args = _opcheck_args()[i]
    with lmkernels.use_backend(backend):
        torch.library.opcheck(torch.ops.lmkernels.norm_fwd.default, args)
        y, h, mean, rstd = norm_ops.norm_fwd(*[a.detach() if torch.is_tensor(a) else a
                                               for a in args])  # fmt: skip
        x, res, w, b, eps, rms = args
        hh = x.detach() if res is None else h
        dh_out = None if res is None else torch.randn_like(h)
        bwd_args = (
            torch.randn_like(y),
            dh_out,
            hh,
            w.detach(),
            mean,
            rstd,
            rms,
            True,
            b is not None,
        )
        torch.library.opcheck(torch.ops.lmkernels.norm_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_params_are_their_fp32_widening(backend, dtype):
    # The ops take weight / bias in the data's 16-bit dtype as well as in fp32 (no conversion
    # call on the eager path): the same bits either way, forward and backward.
    reason = lmkernels.backends.availability(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    torch.manual_seed(0)
    x, dy = torch.randn(37, 40).to(dtype), torch.randn(37, 40).to(dtype)
    w, b = torch.randn(40).to(dtype), torch.randn(40).to(dtype)
    with lmkernels.use_backend(backend):
        for rms in (False, True):
            bias = None if rms else b
            got = norm_ops.norm_fwd(x, None, w, bias, 1e-5, rms)
            want = norm_ops.norm_fwd(x, None, w.float(), None if rms else b.float(), 1e-5, rms)
            assert all(torch.equal(g, e) for g, e in zip(got, want, strict=True))
            _, _, mean, rstd = got
            got = norm_ops.norm_bwd(dy, None, x, w, mean, rstd, rms, True, not rms)
            want = norm_ops.norm_bwd(dy, None, x, w.float(), mean, rstd, rms, True, not rms)
            assert all(torch.equal(g, e) for g, e in zip(got, want, strict=True))


def test_cpu_op_names_a_param_of_the_wrong_dtype():
    if lmkernels.backends.availability("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    x = torch.randn(4, 8).bfloat16()
    y, mean, rstd = torch.empty_like(x), torch.empty(4), torch.empty(4)
    for name, w, b in (("weight", torch.ones(8).half(), None), ("bias", None, torch.ones(8).half()),
                       ("weight", torch.ones(8, dtype=torch.float64), None)):  # fmt: skip
        with pytest.raises(RuntimeError, match=f"{name} must be Float or x's dtype BFloat16"):
            torch.ops.lmkernels_cpu.norm_fwd(x, None, w, b, y, None, mean, rstd, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight must be Float, got BFloat16"):
        torch.ops.lmkernels_cpu.norm_fwd(x.float(), None, torch.ones(8).bfloat16(), None,
                                         y.float(), None, mean, rstd, 1e-5, False)  # fmt: skip


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def f(x, r, w, b):
        n, h = LF.add_layer_norm(x, r, (32,), w, b)
        return LF.rms_norm(n, (32,), w) * 2 + h

    x, r = torch.randn(5, 32, requires_grad=True), torch.randn(5, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    ref = f(x, r, w, b)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (x, r, w, b), g),
                    torch.autograd.grad(ref, (x, r, w, b), g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, c)
    assert torch._dynamo.explain(f)(x, r, w, b).graph_break_count == 0


def test_compile_inductor_runs_our_kernel():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: LF.rms_norm(x, (300,), w) + 1, fullgraph=True)
    x, w = torch.randn(8, 300), torch.randn(300)
    torch.testing.assert_close(f(x, w), F.rms_norm(x, (300,), w) + 1)


# ------------------------------------------------------------------------- determinism


def test_cpu_param_grads_do_not_depend_on_thread_count():
    """dW/dB partial sums follow fixed 64-row blocks (norm.h), so 1 and 2 threads agree."""
    if lmkernels.backends.availability("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(0)
    x = torch.randn(1000, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    g = torch.randn(1000, 96)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with lmkernels.use_backend("cpu"):
                y = LF.layer_norm(x, (96,), w, b)
                grads.append(torch.autograd.grad(y, (x, w, b), g))
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)


# -------------------------------------------------------------- partial use of fused outputs


@pytest.mark.parametrize("use", ["normed", "sum"])
def test_gradient_through_one_output_of_the_fused_op(use):
    x, r = torch.randn(6, 20, requires_grad=True), torch.randn(6, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True)

    def pick(n, h):
        return n if use == "normed" else h

    out = pick(*LF.add_rms_norm(x, r, 20, w, eps=1e-6))
    h = x + r
    ref = pick(F.rms_norm(h, (20,), w, 1e-6), h)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, r, w), g, allow_unused=True)
    exp = torch.autograd.grad(ref, (x, r, w), g, allow_unused=True)
    for a, c in zip(got, exp, strict=True):
        if c is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, c)


# ---------------------------------------------------------------------------- 64-bit offsets


def test_cpu_kernels_past_2_31_elements():
    """rms_norm forward and backward over 2^31 + 4096 bf16 elements (rows past 2^31)."""
    if lmkernels.backends.availability("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    if free_ram_gib() < 12:
        pytest.skip(f"needs ~9 GiB free RAM, {free_ram_gib():.1f} GiB available")
    cols = 4096
    rows = 2**31 // cols + 1
    x = torch.zeros(rows, cols, dtype=torch.bfloat16)
    probe = torch.randn(3, cols).to(torch.bfloat16)
    x[0], x[-2], x[-1] = probe
    with lmkernels.use_backend("cpu"):
        y = LF.rms_norm(x, (cols,), eps=1e-6)
    ref = F.rms_norm(probe.float(), (cols,), eps=1e-6)
    torch.testing.assert_close(y[[0, -2, -1]], ref.to(torch.bfloat16))
    assert torch.count_nonzero(y[rows // 2]) == 0
    del y
    # backward with dy = x (zero rows have xhat = 0): dh and dw come from the probe rows only
    rstd = torch.full((rows,), 1e3, dtype=torch.float32)  # = 1 / sqrt(0 + 1e-6) for zero rows
    rstd[[0, -2, -1]] = torch.rsqrt(probe.float().pow(2).mean(-1) + 1e-6)
    dh = torch.empty_like(x)
    w = torch.ones(cols)
    dw = torch.empty(cols)
    torch.ops.lmkernels_cpu.norm_bwd(x, None, x, w, None, rstd, dh, dw, None, True)
    p = probe.double()
    xhat = p * rstd[[0, -2, -1]].double()[:, None]
    want_dh = rstd[[0, -2, -1]].double()[:, None] * (p - xhat * (p * xhat).mean(-1, keepdim=True))
    torch.testing.assert_close(dh[[0, -2, -1]], want_dh.to(torch.bfloat16))
    torch.testing.assert_close(dw.double(), (p * xhat).sum(0), rtol=1e-5, atol=1e-5)


def test_gpu_backends_refuse_fp64_with_a_reason():
    for backend in ("triton", "cuda"):
        device = "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"
        if lmkernels.backends.availability(backend, device) is not None:
            continue
        x = torch.randn(4, 8, dtype=torch.float64, device=device)
        with (
            lmkernels.use_backend(backend),
            pytest.raises(lmkernels.backends.BackendUnavailable, match="float64"),
        ):
            LF.layer_norm(x, (8,))


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 4096), (torch.bfloat16, 8192)])
def test_cpu_outputs_of_16_mib_take_the_streaming_store_path(dtype, rows):
    """y and dh of >= 16 MiB are written with non-temporal stores: same values as below that."""
    if lmkernels.backends.availability("cpu", "cpu") is not None:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(0)
    x = torch.randn(rows, 1024).to(dtype).requires_grad_()
    w, b = torch.randn(1024, dtype=dtype), torch.randn(1024, dtype=dtype)
    g = torch.randn(rows, 1024).to(dtype)
    with lmkernels.use_backend("cpu"):
        y = LF.layer_norm(x, (1024,), w, b)
        (dx,) = torch.autograd.grad(y, x, g)
        # the same rows in 16 calls of 1 MiB outputs (regular stores)
        parts = [p.detach().requires_grad_() for p in x.chunk(16)]
        ys = [LF.layer_norm(p, (1024,), w, b) for p in parts]
        pairs = zip(ys, parts, g.chunk(16), strict=True)
        dxs = [torch.autograd.grad(yp, p, gp)[0] for yp, p, gp in pairs]
    assert torch.equal(y, torch.cat(ys)) and torch.equal(dx, torch.cat(dxs))
