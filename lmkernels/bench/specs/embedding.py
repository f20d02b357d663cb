"""Benchmarks of the embedding lookup against ``torch.nn.functional.embedding``, and of the
fused token + positional input layer against the unfused torch sequence.

Shapes are (tokens, num_embeddings, embedding_dim); indices are uniform over the table, int64;
the table requires grad. The backward is the dense table gradient (every row written: the
rows not looked up are zeros), deterministic in lmkernels. Sweep (model sizes, what a GPU
runs): 16384 tokens into the tables of GPT-2 (50257 x 768), Llama 2 7B (32000 x 4096), Llama 3
8B (128256 x 4096), Gemma 2B (256000 x 2048), and 8192 tokens into Llama 3 70B's (128256 x
8192); fp32, fp16, bf16. On a CPU: 2048 tokens into GPT-2's and Llama 2's tables, fp32 and
bf16 (every backward writes the whole table gradient: at Gemma's 2 GiB fp32 table one case takes
about two minutes on a 2-core CPU).

Byte model (N = tokens * dim, V = num_embeddings * dim, e = element size; indices: 8 bytes):

    fwd     read the looked-up rows, write the output           2 N e + 8 tokens
    bwd     read dy, write the whole table gradient             (N + V) e + 8 tokens
    fwdbwd  the sum

token_positional (learned, GPT-2 style ``wte(ids) + wpe(arange(seq))``) and
token_positional_sinusoid (``sqrt(d) * wte(ids) + pe[:seq]``, torch reading a precomputed
encoding table, lmkernels computing it on the fly). Shapes are (batch, seq, num_embeddings,
embedding_dim); ids uniform, int64; positions 0 .. seq-1. Sweep: 16384 tokens as 16 x 1024
into GPT-2's table (50257 x 768), 8 x 2048 into Llama 2 7B's (32000 x 4096), 2 x 8192 into
Llama 3 8B's (128256 x 4096); on a CPU 2 x 1024 into GPT-2's and 1 x 2048 into Llama 2's. With
N = batch * seq * dim,
S = seq * dim (the positional rows, read once from memory) and V as above:

    fwd     read the token rows and S, write the output          2 N e + S e   (sinusoid: 2 N e)
    bwd     read dy twice (one pass per table), write dE and dP  2 N e + (V + S) e
            (sinusoid: dy once, dE)                              N e + V e
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, standard_providers

SHAPES = (
    (16384, 50257, 768),
    (16384, 32000, 4096),
    (16384, 128256, 4096),
    (16384, 256000, 2048),
    (8192, 128256, 8192),
)
CPU_SHAPES = ((2048, 50257, 768), (2048, 32000, 4096))
QUICK_SHAPES = ((256, 1000, 64),)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


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
        cpu_shapes=CPU_SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
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


# ------------------------------------------------------------------ token + positional

TP_SHAPES = ((16, 1024, 50257, 768), (8, 2048, 32000, 4096), (2, 8192, 128256, 4096))
TP_CPU_SHAPES = ((2, 1024, 50257, 768), (1, 2048, 32000, 4096))
TP_QUICK_SHAPES = ((2, 64, 1000, 64),)


def _tp_bytes(sinusoid: bool):
    def count(shape, dtype, mode) -> int:
        batch, seq, rows, dim = shape
        e = torch.empty((), dtype=dtype).element_size()
        n, s = batch * seq * dim, seq * dim
        fwd = (2 * n if sinusoid else 2 * n + s) * e + 8 * batch * seq
        bwd = ((n + rows * dim) if sinusoid else (2 * n + rows * dim + s)) * e + 8 * batch * seq
        return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]

    return count


def _tp_inputs(sinusoid: bool):
    def make(shape, dtype, device) -> Inputs:
        batch, seq, rows, dim = shape
        key = f"token_positional {sinusoid} {shape} {dtype}"
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        ids = torch.randint(0, rows, (batch, seq), generator=gen).to(device)
        tok = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
        dy = torch.randn(batch, seq, dim, generator=gen).to(device=device, dtype=dtype)
        if sinusoid:  # the table the unfused torch sequence reads (lmkernels ignores it)
            table = ref.sinusoid(torch.arange(seq, device=device), dim, dtype)
        else:
            table = torch.randn(seq, dim, generator=gen).to(device=device, dtype=dtype)
            table.requires_grad_()
        return Inputs((ids, tok.requires_grad_(), table), dy)

    return make


def _tp_ours(ids, tok, table):
    return LF.token_positional_embedding(ids, tok, pos_weight=table)


def _tp_torch(ids, tok, table):
    return F.embedding(ids, tok) + F.embedding(
        torch.arange(ids.shape[-1], device=ids.device), table
    )


def _tp_reference(ids, tok, table):
    pos = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape).reshape(-1)
    out = ref.token_pos_fwd(tok, ids.reshape(-1), table, pos, 1.0)
    return out.view(*ids.shape, tok.shape[1])


def _sin_scale(tok) -> float:
    return math.sqrt(tok.shape[1])


def _tps_ours(ids, tok, table):
    return LF.token_positional_embedding(ids, tok, sinusoidal=True, scale=_sin_scale(tok))


def _tps_torch(ids, tok, table):
    return F.embedding(ids, tok) * _sin_scale(tok) + table[: ids.shape[-1]]


def _tps_reference(ids, tok, table):
    pos = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape).reshape(-1)
    out = ref.token_pos_fwd(tok, ids.reshape(-1), None, pos, _sin_scale(tok))
    return out.view(*ids.shape, tok.shape[1])


def _tp_bench(name, sinusoid, ours, reference, torch_fn) -> Bench:
    return Bench(
        name=name,
        shapes=TP_SHAPES,
        cpu_shapes=TP_CPU_SHAPES,
        quick_shapes=TP_QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=_tp_inputs(sinusoid),
        bytes=_tp_bytes(sinusoid),
        reference=reference,
        providers=lambda device: standard_providers(
            device, ours=ours, reference=reference, torch_fn=torch_fn
        ),
    )


BENCHES += [
    _tp_bench("token_positional", False, _tp_ours, _tp_reference, _tp_torch),
    _tp_bench("token_positional_sinusoid", True, _tps_ours, _tps_reference, _tps_torch),
]
