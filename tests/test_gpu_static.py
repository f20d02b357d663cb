"""GPU code proven without a GPU: every Triton kernel config compiles for sm_80, sm_86 and sm_90
with zero spills and shared memory within the arch limit; the CUDA module is built for sm_80 and
sm_90 with zero spills (local memory) wherever nvcc exists."""

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest

import lmkernels

# one AOT report per process (it takes minutes): under xdist every test here runs on one worker
pytestmark = pytest.mark.xdist_group("gpu_report")


@functools.cache
def _report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "lmkernels", "gpu-report", "--json"], env=env,
                         capture_output=True, text=True, timeout=2400)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_every_triton_config_compiles_for_sm80_sm86_sm90_without_spills():
    import importlib

    from lmkernels.gpu_report import ARCHS, SM86_MODULES, TRITON_MODULES

    rows = _report()["triton"]
    # (spec, arch) pairs: a spec naming its archs (per-arch configs) compiles for those only;
    # the modules without an sm_86 table compile for sm_80 and sm_90
    counts = {
        name: sum(
            len(s.get("archs", ARCHS if name in SM86_MODULES else (80, 90)))
            for s in importlib.import_module(f"lmkernels.triton_kernels.{name}").aot_specs()
        )
        for name in TRITON_MODULES
    }
    assert all(counts.values()), counts
    assert len(rows) == sum(counts.values())
    assert {r["arch"] for r in rows} == {80, 86, 90} == set(ARCHS)
    assert {r["smem_limit"] for r in rows} == {163 * 1024, 99 * 1024, 227 * 1024}
    # the modules compiled for sm_80 only (not attention) fit sm_86's 99 KB per block too
    assert all(r["smem"] <= 99 * 1024 for r in rows if not r["kernel"].startswith("_attn_"))
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["smem"] > r["smem_limit"]]
    assert not bad, bad[:5]
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_cuda_module_built_for_sm80_sm90_without_spills():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the CUDA module is not built on this machine")
    if os.environ.get("LMKERNELS_SKIP_CUDA", "0") not in ("", "0"):
        pytest.skip("LMKERNELS_SKIP_CUDA is set: the CUDA module was not built")
    data = _report()
    assert data["cuda_unavailable"] is None, data["cuda_unavailable"]
    rows = data["cuda"]
    assert {r["arch"] for r in rows} >= {"sm_80", "sm_90"}
    assert any("softmax" in r["kernel"] for r in rows)
    for kernel in ("norm_fwd_cached_kernel", "norm_fwd_looped_kernel", "norm_bwd_cached_kernel",
                   "norm_bwd_looped_kernel", "norm_bwd_partial_kernel",
                   "norm_bwd_finalize_kernel", "embedding_check_kernel",
                   "embedding_gather_kernel", "embedding_bwd_kernel", "rotary_kernel",
                   "cross_entropy_kernel"):  # fmt: skip
        archs = {r["arch"] for r in rows if kernel in r["kernel"]}
        assert archs >= {"sm_80", "sm_90"}, f"{kernel}: built for {sorted(archs)}"
    assert not [r for r in rows if r["local"] or r["stack"] or r.get("spill_stores")], rows


def test_cuda_module_call_without_gpu_is_a_clear_error():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the runtime tests cover the module")
    with pytest.raises(RuntimeError, match="softmax"):
        _cuda.softmax_fwd(256, 256, 0, 1, 1, 1.0, False, 0, 4, 0, 1, False, 1, 0)
    p = 256  # a fake device pointer: validation passes, the launch finds no driver
    with pytest.raises(RuntimeError, match="norm_fwd.*no usable NVIDIA GPU"):
        _cuda.norm_fwd(p, p, p, p, p, p, p, p, 1, 0, 4, 8, 1e-5, False, 0)
    with pytest.raises(RuntimeError, match="norm_bwd.*no usable NVIDIA GPU"):
        _cuda.norm_bwd(p, p, p, p, 0, p, p, p, p, p, 2, 2, 4, 8, True, 0)
    assert lmkernels.info()["modules"]["_cuda"] == "built"


# (arguments, the argument the ValueError must name); a valid call is
# norm_fwd(x, residual, weight, bias, y, h, mean, rstd, dtype, stream_dtype, rows, cols, eps,
# rms, stream) and norm_bwd(dy, dh_out, h, weight, mean, rstd, dh, dw, db, workspace, dtype,
# stream_dtype, rows, cols, rms, stream). Validation happens before any CUDA call, so these run
# with or without a GPU.
_P = 256
_FWD_OK = dict(
    x=_P,
    residual=0,
    weight=0,
    bias=0,
    y=_P,
    h=0,
    mean=_P,
    rstd=_P,
    dtype=0,
    stream_dtype=0,
    rows=4,
    cols=8,
    eps=1e-5,
    rms=False,
    stream=0,
)
_BWD_OK = dict(
    dy=_P,
    dh_out=0,
    h=_P,
    weight=0,
    mean=_P,
    rstd=_P,
    dh=_P,
    dw=_P,
    db=_P,
    workspace=_P,
    dtype=0,
    stream_dtype=0,
    rows=4,
    cols=8,
    rms=False,
    stream=0,
)
_NORM_BAD = [
    ("norm_fwd", dict(dtype=3), "dtype"),  # F64
    ("norm_fwd", dict(dtype=7), "dtype"),
    ("norm_fwd", dict(stream_dtype=1), "stream_dtype"),  # F16 stream for F32 data
    ("norm_fwd", dict(dtype=1, stream_dtype=2), "stream_dtype"),
    ("norm_fwd", dict(dtype=2, stream_dtype=3), "stream_dtype"),
    ("norm_fwd", dict(rows=-1), "rows"),
    ("norm_fwd", dict(cols=-5), "cols"),
    ("norm_fwd", dict(residual=_P), "h"),  # residual without h
    ("norm_fwd", dict(h=_P), "h"),  # h without residual
    ("norm_fwd", dict(x=0), "x"),
    ("norm_fwd", dict(y=0), "y"),
    ("norm_fwd", dict(rstd=0), "rstd"),
    ("norm_fwd", dict(mean=0), "mean"),  # layer_norm needs mean
    ("norm_fwd", dict(rms=True), "mean"),  # rms_norm has none
    ("norm_bwd", dict(dtype=3), "dtype"),
    ("norm_bwd", dict(stream_dtype=2), "stream_dtype"),
    ("norm_bwd", dict(rows=-2), "rows"),
    ("norm_bwd", dict(cols=-1), "cols"),
    ("norm_bwd", dict(dy=0), "dy"),
    ("norm_bwd", dict(h=0), "h"),
    ("norm_bwd", dict(rstd=0), "rstd"),
    ("norm_bwd", dict(dh=0), "dh"),
    ("norm_bwd", dict(mean=0), "mean"),
    ("norm_bwd", dict(rms=True), "mean"),
    ("norm_bwd", dict(workspace=0), "workspace"),  # dw/db wanted
]


@pytest.mark.parametrize("op,change,arg", _NORM_BAD,
                         ids=[f"{op}-" + "-".join(f"{k}={v}" for k, v in c.items())
                              for op, c, _ in _NORM_BAD])  # fmt: skip
def test_cuda_norm_bad_arguments_name_the_argument(op, change, arg):
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    kwargs = {**(_FWD_OK if op == "norm_fwd" else _BWD_OK), **change}
    with pytest.raises(ValueError, match=rf"lmkernels\._cuda\.{op}: {arg}: "):
        getattr(_cuda, op)(**kwargs)


def test_cuda_norm_empty_calls_launch_nothing():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    import torch

    # no rows or no columns: returns before any CUDA call, even with null pointers
    _cuda.norm_fwd(**{**_FWD_OK, "x": 0, "y": 0, "mean": 0, "rstd": 0, "rows": 0})
    _cuda.norm_fwd(**{**_FWD_OK, "x": 0, "y": 0, "mean": 0, "rstd": 0, "cols": 0})
    _cuda.norm_bwd(**{**_BWD_OK, "dy": 0, "h": 0, "dh": 0, "dw": 0, "db": 0, "rows": 0})
    _cuda.norm_bwd(**{**_BWD_OK, "dy": 0, "h": 0, "dh": 0, "dw": 0, "db": 0, "cols": 0})
    # without dw/db no workspace is needed: validation passes (the launch itself needs a GPU)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="norm_bwd"):
            _cuda.norm_bwd(**{**_BWD_OK, "dw": 0, "db": 0, "workspace": 0})
