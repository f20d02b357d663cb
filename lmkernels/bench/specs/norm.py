"""Benchmarks of the normalisation family: layer_norm, rms_norm, and the fused pre-norm residual
steps add_layer_norm / add_rms_norm against the unfused torch sequence ``h = x + r; norm(h)``.

Shapes are (rows, hidden) with the normalisation over hidden; weight (and bias) have the data's
dtype and require grad. The sweep holds 4 Mi elements per tensor, hidden 256 ... 65536.

Byte model (N = rows * hidden, e = element size; the (hidden,) parameters are negligible):

    layer_norm / rms_norm     fwd: read x, write y                       2 N e
                              bwd: read x and dy, write dx               3 N e
    add_*_norm                fwd: read x and r, write y and h           4 N e
                              bwd: read h, dy and dh, write dx (= dr)    4 N e
    fwdbwd                    the sum
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, standard_providers

EPS = 1e-6
SHAPES = ((16384, 256), (4096, 1024), (1024, 4096), (256, 16384), (64, 65536))
QUICK_SHAPES = ((128, 1024), (16, 8192))
DTYPES = (torch.float32, torch.bfloat16)


def _nbytes(per_elem_fwd: int, per_elem_bwd: int):
    def nbytes(shape, dtype, mode) -> int:
        ne = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        fwd, bwd = per_elem_fwd * ne, per_elem_bwd * ne
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]

    return nbytes


def _gen(name, shape, dtype) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name} {tuple(shape)} {dtype}".encode()))


def _rand(shape, dtype, device, gen, scale=1.0, offset=0.0) -> Tensor:
    t = torch.randn(shape, generator=gen) * scale + offset
    return t.to(device=device, dtype=dtype)


def _inputs(residual: bool, bias: bool):
    def make(shape, dtype, device) -> Inputs:
        gen = _gen(f"norm {residual} {bias}", shape, dtype)
        cols = shape[-1]
        args = [_rand(shape, dtype, device, gen, 2.0, 0.5).requires_grad_()]
        if residual:
            args.append(_rand(shape, dtype, device, gen, 3.0).requires_grad_())
        args.append(_rand((cols,), dtype, device, gen, 0.5, 1.0).requires_grad_())
        if bias:
            args.append(_rand((cols,), dtype, device, gen, 0.5).requires_grad_())
        dy = _rand(shape, dtype, device, gen)
        grad_out = (dy, _rand(shape, dtype, device, gen)) if residual else dy
        return Inputs(tuple(args), grad_out)

    return make


# ----------------------------------------------------------------------------- the functions


def _ref_norm(x, r, w, b, rms):
    """The fp32 oracle through lmkernels.reference (x, r: (rows, cols))."""
    y, h, _, _ = ref.norm_fwd(x, r, w, b, EPS if rms else 1e-5, rms)
    return y if r is None else (y, h)


def _torch_add(norm):
    def f(x, r, *params):
        h = x + r
        return norm(h, *params), h

    return f


# torch's bf16 layer_norm backward reduces dweight / dbias with bf16 rounding on CPU: measured
# 0.09 (4096 rows) to 0.18 (16384 rows) relative error against the fp32 oracle. The sanity
# check is for wrong axes and garbage, so bf16 allows 0.25 here (ours: ~4e-3).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 0.25}


def _bench(name, make, nbytes, reference, ours, torch_fn) -> Bench:
    return Bench(
        tolerance=dict(_TOLERANCE),
        name=name,
        shapes=SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        make_inputs=make,
        bytes=nbytes,
        reference=reference,
        providers=lambda device: standard_providers(
            device, ours=ours, reference=reference, torch_fn=torch_fn
        ),
    )


def _ln(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b)


def _rms(x, w):
    return F.rms_norm(x, x.shape[-1:], w, EPS)


BENCHES = [
    _bench(
        "layer_norm", _inputs(False, True), _nbytes(2, 3),
        lambda x, w, b: _ref_norm(x, None, w, b, False),
        lambda x, w, b: LF.layer_norm(x, x.shape[-1:], w, b),
        _ln,
    ),
    _bench(
        "rms_norm", _inputs(False, False), _nbytes(2, 3),
        lambda x, w: _ref_norm(x, None, w, None, True),
        lambda x, w: LF.rms_norm(x, x.shape[-1:], w, EPS),
        _rms,
    ),
    _bench(
        "add_layer_norm", _inputs(True, True), _nbytes(4, 4),
        lambda x, r, w, b: _ref_norm(x, r, w, b, False),
        lambda x, r, w, b: LF.add_layer_norm(x, r, x.shape[-1:], w, b),
        _torch_add(_ln),
    ),
    _bench(
        "add_rms_norm", _inputs(True, False), _nbytes(4, 4),
        lambda x, r, w: _ref_norm(x, r, w, None, True),
        lambda x, r, w: LF.add_rms_norm(x, r, x.shape[-1:], w, EPS),
        _torch_add(_rms),
    ),
]  # fmt: skip
