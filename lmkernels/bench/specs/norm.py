"""Benchmarks of the normalisation family: layer_norm, rms_norm, and the fused pre-norm residual
steps add_layer_norm / add_rms_norm against the unfused torch sequence ``h = x + r; norm(h)``.

Shapes are (rows, hidden) with the normalisation over hidden; weight (and bias) have the data's
dtype and require grad. Sweep (model sizes, what a GPU runs): 16384 tokens at hidden 768 (GPT-2
small / BERT base), 1024, 2048, 4096 (Llama 7B) and 8192 tokens at 8192 (Llama 70B); fp32,
fp16, bf16. On a CPU the same hiddens with fewer tokens: 2048x768, 2048x4096, 1024x8192, fp32
and bf16.

Peers (CUDA only, skipped with the reason elsewhere): apex's ``fused_layer_norm_affine`` /
``fused_rms_norm_affine`` (layer_norm, rms_norm), Liger-Kernel's ``LigerLayerNormFunction``,
``LigerRMSNormFunction`` and ``LigerFusedAddRMSNormFunction`` (layer_norm, rms_norm,
add_rms_norm; with ``in_place=False``, so the backward does not overwrite the shared upstream
gradient), quack's ``rmsnorm`` (rms_norm; add_rms_norm as ``rmsnorm(x, w, residual=r,
prenorm=True)``, which returns (y, x + r)).

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
from lmkernels.bench.spec import Bench, Inputs, Provider, peer, standard_providers

EPS = 1e-6  # rms_norm
LN_EPS = 1e-5  # layer_norm (torch's default)
SHAPES = ((16384, 768), (16384, 1024), (16384, 2048), (16384, 4096), (8192, 8192))
CPU_SHAPES = ((2048, 768), (2048, 4096), (1024, 8192))
QUICK_SHAPES = ((128, 1024), (16, 8192))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


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
    y, h, _, _ = ref.norm_fwd(x, r, w, b, EPS if rms else LN_EPS, rms)
    return y if r is None else (y, h)


def _torch_add(norm):
    def f(x, r, *params):
        h = x + r
        return norm(h, *params), h

    return f


# torch's bf16 layer_norm backward reduces dweight / dbias with bf16 rounding on CPU: measured
# 0.09 (4096 rows) to 0.18 (16384 rows) relative error against the fp32 oracle. The sanity
# check is for wrong axes and garbage, so bf16 allows 0.25 here (ours: ~4e-3), fp16 (3 more
# mantissa bits) 0.05.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 0.05, torch.bfloat16: 0.25}


def _bench(name, make, nbytes, reference, ours, torch_fn, peers=lambda device: ()) -> Bench:
    return Bench(
        tolerance=dict(_TOLERANCE),
        name=name,
        shapes=SHAPES,
        cpu_shapes=CPU_SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=make,
        bytes=nbytes,
        reference=reference,
        providers=lambda device: standard_providers(
            device, ours=ours, reference=reference, torch_fn=torch_fn, peers=peers(device)
        ),
    )


def _ln(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, LN_EPS)


def _rms(x, w):
    return F.rms_norm(x, x.shape[-1:], w, EPS)


# ------------------------------------------------------------------------------------ peers


def _apex_layer_norm(device) -> Provider:
    def build():
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        def fn(x, w, b):
            return fused_layer_norm_affine(x, w, b, x.shape[-1:], LN_EPS)

        return Provider("apex", fn)

    return peer("apex", "apex.normalization.fused_layer_norm", device, build)


def _apex_rms_norm(device) -> Provider:
    def build():
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return Provider("apex", lambda x, w: fused_rms_norm_affine(x, w, x.shape[-1:], EPS))

    return peer("apex", "apex.normalization.fused_layer_norm", device, build)


def _liger_layer_norm(device) -> Provider:
    def build():
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return Provider(
            "liger-kernel", lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, LN_EPS)
        )

    return peer("liger-kernel", "liger_kernel.ops.layer_norm", device, build)


def _liger_rms_norm(device) -> Provider:
    def build():
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # (X, W, eps, offset, casting_mode, in_place)
        return Provider(
            "liger-kernel", lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        )

    return peer("liger-kernel", "liger_kernel.ops.rms_norm", device, build)


def _liger_add_rms_norm(device) -> Provider:
    def build():
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        def fn(x, r, w):  # -> (y, x + r), as ours
            return LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)

        return Provider("liger-kernel", fn)

    return peer("liger-kernel", "liger_kernel.ops.fused_add_rms_norm", device, build)


def _quack_rms_norm(device) -> Provider:
    def build():
        import quack

        return Provider("quack", lambda x, w: quack.rmsnorm(x, w, eps=EPS))

    return peer("quack", "quack", device, build)


def _quack_add_rms_norm(device) -> Provider:
    def build():
        import quack

        def fn(x, r, w):  # prenorm=True also returns the residual sum x + r
            return quack.rmsnorm(x, w, residual=r, eps=EPS, prenorm=True)

        return Provider("quack", fn)

    return peer("quack", "quack", device, build)


def _peers(*makers):
    return lambda device: [make(device) for make in makers]


BENCHES = [
    _bench(
        "layer_norm", _inputs(False, True), _nbytes(2, 3),
        lambda x, w, b: _ref_norm(x, None, w, b, False),
        lambda x, w, b: LF.layer_norm(x, x.shape[-1:], w, b, LN_EPS),
        _ln,
        _peers(_apex_layer_norm, _liger_layer_norm),
    ),
    _bench(
        "rms_norm", _inputs(False, False), _nbytes(2, 3),
        lambda x, w: _ref_norm(x, None, w, None, True),
        lambda x, w: LF.rms_norm(x, x.shape[-1:], w, EPS),
        _rms,
        _peers(_apex_rms_norm, _liger_rms_norm, _quack_rms_norm),
    ),
    _bench(
        "add_layer_norm", _inputs(True, True), _nbytes(4, 4),
        lambda x, r, w, b: _ref_norm(x, r, w, b, False),
        lambda x, r, w, b: LF.add_layer_norm(x, r, x.shape[-1:], w, b, LN_EPS),
        _torch_add(_ln),
    ),
    _bench(
        "add_rms_norm", _inputs(True, False), _nbytes(4, 4),
        lambda x, r, w: _ref_norm(x, r, w, None, True),
        lambda x, r, w: LF.add_rms_norm(x, r, x.shape[-1:], w, EPS),
        _torch_add(_rms),
        _peers(_liger_add_rms_norm, _quack_add_rms_norm),
    ),
]  # fmt: skip
