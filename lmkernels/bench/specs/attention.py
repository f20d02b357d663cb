"""Benchmarks of fused attention against torch's ``scaled_dot_product_attention`` (on CPU its
flash kernel with blocked GEMMs; on a GPU its flash / efficient kernels) and the naive
matmul-softmax-matmul that materialises the L x S scores.

Shapes are (batch, heads, seq, head_dim) with L = S; ``attention`` is full attention,
``attention_causal`` top-left causal, ``attention_dropout`` full attention with dropout_p =
0.1 (ours draws its bits in the kernels; torch's CPU SDPA then takes its math path, which
materialises the scores). q, k, v require grad. On a GPU, the FA2-class target is
``--ops attention,attention_causal --dtypes bf16 --shapes 4x16x8192x128`` (TFLOP/s column).

FLOP model (the standard count, as FlashAttention reports it): forward 4 * B * H * L * S * D
(two matrix products), halved for causal; backward 2.5x the forward; fwdbwd the sum. Byte model
(the unavoidable traffic, a floor): forward reads q, k, v and writes o; backward reads q, k, v,
o, dO and writes dq, dk, dv.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, Provider, standard_providers

SHAPES = ((4, 8, 1024, 64), (1, 16, 2048, 128))
QUICK_SHAPES = ((1, 2, 128, 32),)
DTYPES = (torch.float32, torch.bfloat16)


def _flops(causal: bool):
    def count(shape, dtype, mode) -> int:
        b, h, seq, d = shape
        fwd = 4 * b * h * seq * seq * d // (2 if causal else 1)
        return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwdbwd": fwd * 7 // 2}[mode]

    return count


def _bytes(shape, dtype, mode) -> int:
    b, h, seq, d = shape
    t = b * h * seq * d * torch.empty((), dtype=dtype).element_size()
    return {"fwd": 4 * t, "bwd": 8 * t, "fwdbwd": 12 * t}[mode]


def _inputs(shape, dtype, device) -> Inputs:
    b, h, seq, d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"attention {shape} {dtype}".encode()))
    q, k, v, dy = (torch.randn(b, h, seq, d, generator=gen) for _ in range(4))
    qkv = tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    return Inputs(qkv, dy.to(device=device, dtype=dtype))


def _naive(causal: bool, dropout_p: float):
    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return torch.matmul(F.dropout(torch.softmax(s, dim=-1), dropout_p), v)

    return fn


def _bench(name: str, causal: bool, dropout_p: float = 0.0) -> Bench:
    def ours(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)

    def torch_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)

    def reference(q, k, v):
        scale = 1 / math.sqrt(q.shape[-1])
        thr = ref.dropout_threshold(dropout_p)
        return ref.attention_fwd(q, k, v, None, scale, -1, 0 if causal else -1,
                                 drop_threshold=thr, seed=12345)[0]  # fmt: skip

    return Bench(
        name=name,
        shapes=SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        make_inputs=_inputs,
        bytes=_bytes,
        flops=_flops(causal),
        reference=reference,
        providers=lambda device: standard_providers(
            device,
            ours=ours,
            reference=reference,
            torch_fn=torch_fn,
            peers=(Provider("naive", _naive(causal, dropout_p)),),
        ),  # fmt: skip
        # every provider drops different probabilities (up to 1 / (1 - p) * max|v| apart):
        # the pre-timing check only catches results off by orders of magnitude or NaN; the
        # tests check the dropout bits against the reference
        **({"tolerance": dict.fromkeys(DTYPES, 10.0)} if dropout_p else {}),
    )


BENCHES = [
    _bench("attention", False),
    _bench("attention_causal", True),
    _bench("attention_dropout", False, 0.1),
]
