"""The looped (long-row) Triton kernels in the interpreter: the single-tile limit is lowered so
every conformance case longer than 64 columns runs through them, with 32-element chunks (so
rows also end mid-chunk, and causal rows stop mid-row)."""

import pytest
import torch

import cases_softmax  # noqa: F401  (registers its cases)
import lmkernels
from conftest import device_for
from lmkernels.backends import availability
from lmkernels.testing import cases, check_case

LOOPED = [c for c in cases() if c.small and c.op in ("softmax", "log_softmax",
                                                     "scaled_masked_softmax")]  # fmt: skip


@pytest.fixture
def small_tiles(monkeypatch):
    reason = availability("triton", device_for("triton"))
    if reason is not None:
        pytest.skip(f"triton unavailable: {reason}")
    from lmkernels.triton_kernels import softmax as k

    monkeypatch.setattr(k, "SINGLE_TILE_MAX_COLS", 64)
    monkeypatch.setattr(k, "LOOPED_BLOCK", 32)
    assert k.softmax_config(65, torch.float32).looped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LOOPED, ids=lambda c: c.id)
def test_looped_kernels_conform(small_tiles, case, dtype):
    with lmkernels.use_backend("triton"):
        check_case(case, dtype, device_for("triton"))
