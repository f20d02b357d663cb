"""Benchmark of apply_rotary against the plain torch ``x * cos + rotate_half(x) * sin``.

Shapes are (batch, seq, heads, head_dim) with cos / sin of shape (seq, 1, head_dim) (the
Hugging Face layout, broadcast over heads), in x's dtype; x requires grad.

Byte model (N = x.numel(), e = element size; the tables are negligible):

    fwd     read x, write out       2 N e
    bwd     read dy, write dx       2 N e
    fwdbwd  the sum
"""

from __future__ import annotations

import math
import zlib

import torch

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, standard_providers

SHAPES = ((4, 2048, 16, 128), (8, 1024, 32, 64), (1, 4096, 8, 256))
QUICK_SHAPES = ((1, 64, 4, 64),)
DTYPES = (torch.float32, torch.bfloat16)


def _bytes(shape, dtype, mode) -> int:
    per = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return {"fwd": per, "bwd": per, "fwdbwd": 2 * per}[mode]


def _inputs(shape, dtype, device) -> Inputs:
    gen = torch.Generator().manual_seed(zlib.crc32(f"rotary {shape} {dtype}".encode()))
    _, seq, _, hd = shape
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    angle = torch.rand(seq, 1, hd, generator=gen) * 6.3
    cos, sin = (t.to(device=device, dtype=dtype) for t in (angle.cos(), angle.sin()))
    return Inputs((x, cos, sin), torch.randn(shape, generator=gen).to(device=device, dtype=dtype))


def _torch(x, cos, sin):
    return x * cos + ref.rotate_half(x) * sin


BENCHES = [
    Bench(
        name="apply_rotary",
        shapes=SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        make_inputs=_inputs,
        bytes=_bytes,
        reference=lambda x, cos, sin: ref.rotary(x, cos, sin, False),
        providers=lambda device: standard_providers(
            device,
            ours=lambda x, cos, sin: LF.apply_rotary(x, cos, sin),
            reference=lambda x, cos, sin: ref.rotary(x, cos, sin, False),
            torch_fn=_torch,
        ),
    ),
]
