"""The conformance suite: every registered case x every backend x every dtype."""

import cases_attention  # noqa: F401  (registers its cases)
import cases_cross_entropy  # noqa: F401
import cases_embedding  # noqa: F401
import cases_norm  # noqa: F401
import cases_rotary  # noqa: F401
import pytest
import torch

import cases_softmax  # noqa: F401
import lmkernels
from conftest import device_for
from lmkernels.backends import BACKENDS, availability
from lmkernels.testing import cases, check_case, check_deterministic

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}  # fmt: skip

# Which dtypes each backend serves (anything else raises BackendUnavailable, tested below).
BACKEND_DTYPES = {
    "reference": set(DTYPES.values()),
    "cpu": set(DTYPES.values()),
    "triton": set(DTYPES.values()),
    "cuda": {torch.float32, torch.float16, torch.bfloat16},
}


# Op families a backend serves in fewer dtypes than its other ops (they raise
# BackendUnavailable for the rest; tested in test_norm.py).
_NORMS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
NARROWER = {("triton", op): {torch.float32, torch.float16, torch.bfloat16} for op in _NORMS}
# Triton embedding, token + positional and rotary: no fp64 (BackendUnavailable naming the dtype,
# tested in test_embedding.py / test_token_positional.py / test_rotary.py).
NARROWER |= {("triton", op): {torch.float32, torch.float16, torch.bfloat16}
             for op in ("embedding", "token_positional_embedding", "apply_rotary")}  # fmt: skip
# Triton attention and cross-entropy: fp32/fp16/bf16 (BackendUnavailable naming the dtype).
NARROWER |= {("triton", op): {torch.float32, torch.float16, torch.bfloat16}
             for op in ("attention", "varlen_attention", "cross_entropy",
                        "linear_cross_entropy")}  # fmt: skip


def _enter(backend: str, case, dtype):
    device = device_for(backend)
    reason = availability(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable here: {reason}")
    if dtype not in case.dtypes:
        pytest.skip(f"{case.id} is not defined for {dtype}")
    served = NARROWER.get((backend, case.op), BACKEND_DTYPES[backend])
    if not served:
        pytest.skip(f"backend {backend} has no {case.op} kernel yet (raises BackendUnavailable)")
    if dtype not in served:
        pytest.skip(
            f"backend {backend} does not serve {case.op} in {dtype} (raises BackendUnavailable)"
        )
    if "computes_fp64" in case.tags and torch.float64 not in served:
        pytest.skip(f"{case.id} computes in fp64, which backend {backend} does not serve")
    if backend == "triton" and device == "cpu" and not case.small:
        pytest.skip("large case: too slow for the Triton interpreter (runs on a GPU)")
    return device


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend, case, dtype):
    dtype = DTYPES[dtype]
    device = _enter(backend, case, dtype)
    with lmkernels.use_backend(backend):
        check_case(case, dtype, device)


@pytest.mark.parametrize("case", [c for c in cases() if "poison" not in c.name][::7],
                         ids=lambda c: c.id)  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, case):
    device = _enter(backend, case, torch.float32)
    # the cpu kernels' bits must not depend on the thread count: runs alternate 2 and 1 threads
    # (make test runs its workers with OMP_NUM_THREADS=1, so this is where 2 threads run)
    threads = (2, 1) if backend == "cpu" else ()
    with lmkernels.use_backend(backend):
        check_deterministic(case, torch.float32, device, threads=threads)
