"""Benchmark of apply_rotary against the plain torch ``x * cos + rotate_half(x) * sin``.

Shapes are (batch, seq, heads, head_dim) with cos / sin of shape (seq, 1, head_dim) (the
Hugging Face layout, broadcast over heads), in x's dtype; x requires grad. Sweep (model sizes,
what a GPU runs): 16384 tokens per batch at sequence 512 ... 16384, head_dim 64 (GPT-NeoX /
Pythia class, 16 and 12 heads) and 128 (Llama class, 32 heads): 32x512x16x64, 16x1024x12x64,
8x2048x32x128, 2x8192x32x128, 1x16384x32x128; fp32, fp16, bf16. On a CPU: 4x512x12x64,
2x1024x32x128, 1x2048x32x128, fp32 and bf16.

Peer: Liger-Kernel's ``LigerRopeFunction`` uses the same (rotate_half) convention but rotates q
and k together, in place (and the incoming gradients in place in the backward); timing it on
this bench's single shared x would need copies that are not part of the op, so it is listed
as skipped with that reason (on a CPU: skipped as every peer is).

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
from lmkernels.bench.spec import Bench, Inputs, Provider, peer, standard_providers

SHAPES = (
    (32, 512, 16, 64),
    (16, 1024, 12, 64),
    (8, 2048, 32, 128),
    (2, 8192, 32, 128),
    (1, 16384, 32, 128),
)
CPU_SHAPES = ((4, 512, 12, 64), (2, 1024, 32, 128), (1, 2048, 32, 128))
QUICK_SHAPES = ((1, 64, 4, 64),)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


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


def _liger_peer(device) -> Provider:
    def build():
        return Provider(
            "liger-kernel",
            reason="LigerRopeFunction rotates q and k together and in place (the incoming "
            "gradients too): not comparable on this bench's single shared x without extra copies",
        )

    return peer("liger-kernel", "liger_kernel.ops.rope", device, build)


BENCHES = [
    Bench(
        name="apply_rotary",
        shapes=SHAPES,
        cpu_shapes=CPU_SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=_inputs,
        bytes=_bytes,
        reference=lambda x, cos, sin: ref.rotary(x, cos, sin, False),
        providers=lambda device: standard_providers(
            device,
            ours=lambda x, cos, sin: LF.apply_rotary(x, cos, sin),
            reference=lambda x, cos, sin: ref.rotary(x, cos, sin, False),
            torch_fn=_torch,
            peers=[_liger_peer(device)],
        ),
    ),
]
