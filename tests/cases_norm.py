"""Conformance cases of the normalisation family (registered once, run on every backend).

Shape choices: 5 rows (a prime) and hidden sizes 1, 3, 127, 1000, 4097 (odd, around the
vector widths and tiles of every backend); 130 rows to span three dw/db row blocks of 64 (the
last one partial); 65536 and 70001 columns for the long-row paths (large=True: not run in the
Triton interpreter, whose looped kernels test_triton_norm.py covers with lowered thresholds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels.testing import Case, poison_tail, register

INF = float("inf")
HALF = (torch.float16, torch.bfloat16)


def _t(shape, dtype, device, gen, scale=1.0, offset=0.0, grad=True):
    t = torch.randn(shape, generator=gen, device=device) * scale + offset
    return t.to(dtype).requires_grad_(grad)


def _params(n_shape, dtype, device, gen, weight, bias, param_dtype=None):
    pd = param_dtype or dtype
    w = _t(n_shape, pd, device, gen, 0.5, 1.0) if weight else None
    b = _t(n_shape, pd, device, gen, 0.5) if bias else None
    return w, b


def _torch_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm. torch's CUDA kernel rejects fp32 weight / bias with 16-bit x, which its
    CPU kernel (and ours, on every device) takes: such calls run torch on the CPU."""
    if x.is_cuda and any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        cpu = [None if t is None else t.cpu() for t in (weight, bias)]
        return F.layer_norm(x.cpu(), normalized_shape, *cpu, eps=eps).to(x.device)
    return F.layer_norm(x, normalized_shape, weight, bias, eps=eps)


def _ln(name, shape, n_dims=1, weight=True, bias=True, param_dtype=None, scale=2.0, offset=0.5,
        transform=None, large=False, dtypes=None, eps=1e-5):  # fmt: skip
    def make(dtype, device, gen):
        x = _t(shape, dtype, device, gen, scale, offset)
        if transform is not None:
            x = transform(x.detach()).requires_grad_(True)
        n_shape = tuple(x.shape[x.dim() - n_dims :])
        w, b = _params(n_shape, dtype, device, gen, weight, bias, param_dtype)
        return (x, n_shape, w, b), dict(eps=eps)

    kw = {} if dtypes is None else dict(dtypes=dtypes)
    return Case("layer_norm", name, make, LF.layer_norm, _torch_layer_norm, small=not large, **kw)


def _rms(name, shape, n_dims=1, weight=True, param_dtype=None, scale=2.0, offset=0.5,
         transform=None, large=False, dtypes=None, eps=None):  # fmt: skip
    def make(dtype, device, gen):
        x = _t(shape, dtype, device, gen, scale, offset)
        if transform is not None:
            x = transform(x.detach()).requires_grad_(True)
        n_shape = tuple(x.shape[x.dim() - n_dims :])
        w, _ = _params(n_shape, dtype, device, gen, weight, False, param_dtype)
        return (x, n_shape, w), dict(eps=eps)

    kw = {} if dtypes is None else dict(dtypes=dtypes)
    return Case("rms_norm", name, make, LF.rms_norm, F.rms_norm, small=not large, **kw)


def _special(rms):
    def make(dtype, device, gen):
        x = torch.randn(6, 40, generator=gen, device=device).to(dtype)
        x[0, 3] = float("nan")
        x[1, 7] = INF
        x[2, :] = 0.0  # zero variance: rstd = 1 / sqrt(eps)
        x[3, :] = 3.0  # constant row (layer_norm: zero variance around a non-zero mean)
        x[4, 5] = -INF
        w = _t((40,), dtype, device, gen, 0.5, 1.0)
        x.requires_grad_(True)
        if rms:
            return (x, (40,), w), {}
        return (x, (40,), w, _t((40,), dtype, device, gen)), {}

    op = "rms_norm" if rms else "layer_norm"
    return Case(op, "nan_inf_zero_rows", make, LF.rms_norm if rms else LF.layer_norm,
                _torch_rms_norm if rms else F.layer_norm)  # fmt: skip


def _torch_rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm; on CUDA fp64 it runs on the CPU: torch's fp64 CUDA rms_norm turns a row
    holding an inf into NaN throughout (torch 2.11 on an H100), where its fp32 CUDA and CPU
    kernels give 0 * inf = NaN at the inf only (x * rsqrt(inf) = 0 elsewhere)."""
    if x.is_cuda and x.dtype == torch.float64:
        w = None if weight is None else weight.cpu()
        return F.rms_norm(x.cpu(), normalized_shape, w, eps).to(x.device)
    return F.rms_norm(x, normalized_shape, weight, eps)


_LN = []
for cols in (1, 3, 127, 1000, 4097):
    _LN.append(_ln(f"rows5_cols{cols}", (5, cols)))
_LN += [
    _ln("rows130_three_blocks", (130, 33)),
    _ln("rank3", (2, 7, 48)),
    _ln("multi_dim_shape", (3, 4, 6, 5), n_dims=2),
    _ln("weight_only", (5, 77), bias=False),
    Case(
        "layer_norm",
        "strided_params",
        lambda dt, dev, gen: (
            (
                _t((5, 40), dt, dev, gen),
                (40,),
                _t((80,), dt, dev, gen)[::2].detach().requires_grad_(),
                _t((40, 2), dt, dev, gen)[:, 1].detach().requires_grad_(),
            ),
            {},
        ),
        LF.layer_norm,
        F.layer_norm,
    ),  # fmt: skip
    _ln("bias_only", (5, 77), weight=False),
    _ln("no_affine", (5, 77), weight=False, bias=False),
    _ln("fp32_params", (5, 300), param_dtype=torch.float32, dtypes=HALF),
    _ln("fp32_weight_only", (5, 300), bias=False, param_dtype=torch.float32, dtypes=HALF),
    _ln("large_mean", (5, 500), scale=0.01, offset=100.0),
    # an outlier in column 0, the CPU kernels' shift for the row sums: exercises the guard of
    # their one-pass statistics, which only 16-bit data uses
    _ln(
        "outlier_first_column",
        (5, 300),
        dtypes=HALF,
        transform=lambda t: t.index_fill(1, t.new_zeros(1, dtype=torch.long), 3000.0),
    ),
    _ln("eps_0.1", (5, 64), scale=0.2, eps=0.1),
    _ln("transposed_input", (40, 9), transform=lambda t: t.t()),
    _ln("strided_input", (6, 50), transform=lambda t: t[:, ::2]),
    _ln("poisoned_tail", (5, 77), transform=poison_tail),
    _ln("empty_rows", (0, 16)),
    _ln("empty_cols", (3, 0)),
    _ln("long_row", (2, 65536), large=True),
    _ln("long_row_odd", (3, 70001), large=True),
    _ln("many_rows", (1031, 67), large=True),
    _special(False),
]

_RMS = []
for cols in (1, 3, 127, 1000, 4097):
    _RMS.append(_rms(f"rows5_cols{cols}", (5, cols)))
_RMS += [
    _rms("rows130_three_blocks", (130, 33)),
    _rms("multi_dim_shape", (3, 4, 6, 5), n_dims=3),
    _rms("no_weight", (5, 77), weight=False),
    _rms("fp32_weight", (5, 300), param_dtype=torch.float32, dtypes=HALF),
    _rms("bf16_weight", (5, 300), param_dtype=torch.bfloat16),
    _rms("eps_1e-3", (5, 64), scale=0.05, eps=1e-3),
    _rms("transposed_input", (40, 9), transform=lambda t: t.t()),
    _rms("poisoned_tail", (5, 77), transform=poison_tail),
    _rms("empty_rows", (0, 16)),
    _rms("empty_cols", (3, 0)),
    _rms("long_row", (2, 65536), large=True),
    _rms("many_rows", (1031, 67), large=True),
    _special(True),
]


# ----------------------------------------------------------------------- fused residual add


def torch_add_norm(x, residual, normalized_shape, weight=None, bias=None, eps=None,
                   residual_in_fp32=False, rms=False):  # fmt: skip
    """The unfused torch sequence that add_layer_norm / add_rms_norm fuse."""
    stream = torch.promote_types(x.dtype, residual.dtype)
    if residual_in_fp32:
        stream = torch.promote_types(stream, torch.float32)
    h = x.to(stream) + residual.to(stream)
    acc = torch.float64 if torch.float64 in (stream, x.dtype) else torch.float32
    w = None if weight is None else weight.to(acc)
    if rms:
        normed = F.rms_norm(h.to(acc), normalized_shape, w, eps)
    else:
        b = None if bias is None else bias.to(acc)
        normed = F.layer_norm(h.to(acc), normalized_shape, w, b, 1e-5 if eps is None else eps)
    return normed.to(x.dtype), h


def _add(name, shape, rms, weight=True, bias=True, fp32_stream=False, res_dtype=None,
         param_dtype=None, transform=None, large=False, dtypes=None, tags=()):  # fmt: skip
    def make(dtype, device, gen):
        x = _t(shape, dtype, device, gen, 1.0)
        if transform is not None:
            x = transform(x.detach()).requires_grad_(True)
        r = _t(x.shape, res_dtype or dtype, device, gen, 3.0, 0.5)
        n_shape = tuple(x.shape[-1:])
        w, b = _params(n_shape, dtype, device, gen, weight, bias and not rms, param_dtype)
        args = (x, r, n_shape, w) if rms else (x, r, n_shape, w, b)
        kwargs = dict(residual_in_fp32=fp32_stream)
        if rms:
            kwargs["eps"] = 1e-6
        return args, kwargs

    def ref(*args, **kw):
        if rms:
            x, r, s, w = args
            return torch_add_norm(x, r, s, w, None, rms=True, **kw)
        x, r, s, w, b = args
        return torch_add_norm(x, r, s, w, b, **kw)

    op = "add_rms_norm" if rms else "add_layer_norm"
    kw = {} if dtypes is None else dict(dtypes=dtypes)
    # elementwise=False: normed depends on h rounded to the stream dtype, which the fp64 oracle
    # cannot reproduce; where torch and we round a value next to a tie differently, a single
    # element may sit one ulp beyond the element-wise bound. The max-error rule still applies.
    return Case(op, name, make, LF.add_rms_norm if rms else LF.add_layer_norm, ref,
                small=not large, elementwise=False, tags=tags, **kw)  # fmt: skip


_ADD = []
for rms in (False, True):
    _ADD += [
        _add("rows5_cols1000", (5, 1000), rms),
        _add("rows130_cols33", (130, 33), rms),
        _add("cols1", (7, 1), rms),
        _add("no_affine", (5, 127), rms, weight=False, bias=False),
        _add("residual_in_fp32", (5, 300), rms, fp32_stream=True),
        _add("fp32_residual", (5, 300), rms, res_dtype=torch.float32, dtypes=HALF),
        _add("fp32_params", (5, 300), rms, param_dtype=torch.float32, dtypes=HALF),
        _add(
            "fp16_residual_for_bf16",
            (5, 64),
            rms,
            res_dtype=torch.float16,
            dtypes=(torch.bfloat16,),
        ),  # fmt: skip
        # fp32 x + fp64 residual: the data is upcast to fp64 (tag: the op computes in fp64)
        _add(
            "fp64_residual",
            (5, 64),
            rms,
            res_dtype=torch.float64,
            dtypes=(torch.float32,),
            tags=("computes_fp64",),
        ),  # fmt: skip
        _add("transposed_x", (40, 9), rms, transform=lambda t: t.t()),
        _add("poisoned_tail", (5, 77), rms, transform=poison_tail),
        _add("long_row", (2, 65536), rms, large=True),
    ]

register(*_LN, *_RMS, *_ADD)
