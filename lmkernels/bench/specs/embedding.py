"""Benchmark of the embedding lookup against ``torch.nn.functional.embedding``.

Shapes are (tokens, num_embeddings, embedding_dim); indices are uniform over the table, int64;
the table requires grad. The backward is the dense table gradient (every row written: the
rows not looked up are zeros), deterministic in lmkernels.

Byte model (N = tokens * dim, V = num_embeddings * dim, e = element size; indices: 8 bytes):

    fwd     read the looked-up rows, write the output           2 N e + 8 tokens
    bwd     read dy, write the whole table gradient             (N + V) e + 8 tokens
    fwdbwd  the sum
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, standard_providers

SHAPES = ((16384, 32000, 1024), (4096, 32000, 1024), (16384, 50304, 768))
QUICK_SHAPES = ((256, 1000, 64),)
DTYPES = (torch.float32, torch.bfloat16)


def _bytes(shape, dtype, mode) -> int:
    tokens, rows, dim = shape
    e = torch.empty((), dtype=dtype).element_size()
    fwd = 2 * tokens * dim * e + 8 * tokens
    bwd = (tokens + rows) * dim * e + 8 * tokens
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def _inputs(shape, dtype, device) -> Inputs:
    tokens, rows, dim = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"embedding {shape} {dtype}".encode()))
    idx = torch.randint(0, rows, (tokens,), generator=gen).to(device)
    w = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, dim, generator=gen).to(device=device, dtype=dtype)
    return Inputs((idx, w), dy)


BENCHES = [
    Bench(
        name="embedding",
        shapes=SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        make_inputs=_inputs,
        bytes=_bytes,
        reference=lambda idx, w: ref.embedding_fwd(w, idx),
        providers=lambda device: standard_providers(
            device,
            ours=lambda idx, w: LF.embedding(idx, w),
            reference=lambda idx, w: ref.embedding_fwd(w, idx),
            torch_fn=lambda idx, w: F.embedding(idx, w),
        ),
    ),
]
