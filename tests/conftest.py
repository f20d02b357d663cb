"""Test-session setup: without a GPU, Triton kernels run under its interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
start. Tests that compile Triton kernels for sm_80/sm_90 run in a subprocess without it.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # the cases_<op>.py modules

import lmkernels  # noqa: E402,F401


def device_for(backend: str) -> str:
    """The device a backend's conformance cases run on in this process."""
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def free_ram_gib() -> float:
    """MemAvailable in GiB (0 when unknown): tests of > 2^31-element tensors check it first."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except OSError:
        return 0.0
