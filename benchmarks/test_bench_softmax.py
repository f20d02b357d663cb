"""The softmax-family specs under pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Same benches, inputs, providers and correctness check as ``python -m lmkernels.bench``, on a
few shapes; pytest-benchmark groups the providers of one (op, mode, dtype, shape) together.
Unavailable providers are skipped with their reason. No timing thresholds.
"""

from __future__ import annotations

import pytest
import torch

from lmkernels.bench import runner, spec
from lmkernels.bench.specs import softmax as softmax_spec

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = ((1024, 4096),)
MODES = ("fwd", "fwdbwd")

_inputs: dict = {}  # (bench, shape, dtype) -> (Inputs, Oracle), shared by the providers
_compiled: dict = {}  # (bench, shape, dtype, provider) -> torch.compile'd function


def _cases():
    for b in softmax_spec.BENCHES:
        for p in b.providers(DEVICE):
            for dtype in b.dtypes_on(DEVICE):
                for shape in SHAPES:
                    for mode in MODES:
                        name = f"{b.name}-{mode}-{spec.dtype_name(dtype)}-{spec.shape_str(shape)}"
                        yield pytest.param(b, p, dtype, shape, mode, id=f"{name}-{p.name}")


@pytest.mark.parametrize("bench,provider,dtype,shape,mode", _cases())
def test_softmax(benchmark, bench, provider, dtype, shape, mode):
    if provider.fn is None:
        pytest.skip(provider.reason)
    why = provider.supports(shape, dtype) if provider.supports else None
    if why:
        pytest.skip(why)
    key = (bench.name, shape, dtype)
    if key not in _inputs:
        inputs = bench.make_inputs(shape, dtype, DEVICE)
        _inputs[key] = (inputs, runner.oracle(bench, inputs))
    inputs, want = _inputs[key]
    fn = provider.fn
    if provider.compile:
        fn = _compiled.setdefault((*key, provider.name), torch.compile(fn, dynamic=False))
    thunk, err = runner.build_thunk(provider, fn, inputs, mode, want)
    assert err <= bench.tolerance[dtype], f"{provider.name} is wrong: max relative error {err}"
    benchmark.group = f"{bench.name} {mode} {spec.dtype_name(dtype)} {spec.shape_str(shape)}"
    benchmark.extra_info["bytes"] = bench.bytes(shape, dtype, mode)
    if DEVICE.type == "cuda":
        thunk = _synced(thunk)
    benchmark(thunk)


def _synced(f):
    def run():
        f()
        torch.cuda.synchronize()

    return run
