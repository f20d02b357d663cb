"""Backend selection: context manager, environment variable, default order, clear refusals."""

import os
import subprocess
import sys

import pytest
import torch

import lmkernels
import lmkernels.functional as LF
from lmkernels.backends import BackendUnavailable, availability, selected_backend


def test_use_backend_nests_and_restores():
    assert selected_backend() is None
    with lmkernels.use_backend("reference"):
        assert selected_backend() == "reference"
        with lmkernels.use_backend("cpu"):
            assert selected_backend() == "cpu"
        assert selected_backend() == "reference"
    assert selected_backend() is None


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        with lmkernels.use_backend("cudnn"):
            pass


def test_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(3, 4)
    with lmkernels.use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda.*CUDA"):
        LF.softmax(x, -1)


def test_explicit_backend_refuses_an_unsupported_call_before_running():
    from lmkernels.backends import Impl, dispatch

    def never(*_):
        raise AssertionError("must not run")

    impls = {"reference": Impl(never, lambda *a: "float64 is not supported")}
    with lmkernels.use_backend("reference"), pytest.raises(BackendUnavailable, match="float64"):
        dispatch("demo", impls, torch.device("cpu"), torch.zeros(1))
    # automatic mode moves on and reports every reason when nothing can serve the call
    with pytest.raises(BackendUnavailable, match="reference: float64"):
        dispatch("demo", impls, torch.device("cpu"), torch.zeros(1))


@pytest.mark.skipif(availability("cuda", "cuda") is None, reason="a usable cuda backend exists")
def test_cuda_backend_refuses_float64_by_its_supports_table():
    from lmkernels.ops.softmax import _FWD

    reason = _FWD["cuda"].supports(torch.zeros(2, dtype=torch.float64))
    assert reason is not None and "float64" in reason


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("LMKERNELS_BACKEND", "reference")
    assert selected_backend() == "reference"
    with lmkernels.use_backend("cpu"):  # the context manager is stronger
        assert selected_backend() == "cpu"
    monkeypatch.setenv("LMKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        selected_backend()


def test_default_order_on_cpu_uses_the_cpu_backend(monkeypatch):
    if availability("cpu", "cpu") is not None:
        pytest.skip(f"the cpu backend is not available here: {availability('cpu', 'cpu')}")
    calls = []
    real = torch.ops.lmkernels_cpu.softmax_fwd

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(torch.ops.lmkernels_cpu, "softmax_fwd", Spy())
    LF.softmax(torch.randn(2, 5), -1)
    assert calls, "the default CPU order must pick the cpu backend first"


def test_info_cli_lists_every_backend_with_reasons():
    out = subprocess.run([sys.executable, "-m", "lmkernels", "info"], capture_output=True,
                         text=True, check=True, env=dict(os.environ)).stdout  # fmt: skip
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"\n  {name}" in out
    assert "torch" in out and "available" in out
    if not torch.cuda.is_available():
        assert "runs on CUDA tensors" in out


_BACKWARD_OPS = {
    "softmax": lambda x: LF.softmax(x, dim=-1),
    "layer_norm": lambda x: LF.layer_norm(x, (8,)),
    "rms_norm": lambda x: LF.rms_norm(x, (8,)),
    "rotary": lambda x: LF.apply_rotary(
        x.view(1, 2, 2, 8), torch.ones(2, 8, dtype=x.dtype), torch.zeros(2, 8, dtype=x.dtype)
    ),
    "embedding": lambda x: LF.embedding(torch.tensor([0, 1, 1]), x),
    "sdpa": lambda x: LF.scaled_dot_product_attention(*(x.view(1, 1, 4, 8),) * 3),
}


@pytest.mark.parametrize("op", list(_BACKWARD_OPS))
def test_backward_runs_on_the_forward_backend(monkeypatch, op):
    """Autograd runs a CUDA backward on its own device thread, outside the forward's
    use_backend block; the backward must still run on the forward's backend. Simulated with a
    backward on another thread (a new thread starts without the block's context variable)."""
    import threading

    from lmkernels import backends

    seen = []
    real = backends.selected_backend
    monkeypatch.setattr(backends, "selected_backend", lambda: seen.append(real()) or seen[-1])
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with lmkernels.use_backend("reference"):
        y = _BACKWARD_OPS[op](x)
    seen.clear()
    errors = []

    def backward():
        try:
            y.sum().backward()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=backward)
    t.start()
    t.join()
    assert not errors, errors
    assert x.grad is not None
    assert seen and set(seen) == {"reference"}, seen
