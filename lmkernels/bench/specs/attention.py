"""Benchmarks of fused attention against torch's ``scaled_dot_product_attention`` (on CPU its
flash kernel with blocked GEMMs; on a GPU its flash / efficient kernels), the naive
matmul-softmax-matmul that materialises the L x S scores, and (CUDA only) flash-attn and
xformers; and of varlen_attention over packed sequences of mixed lengths.

Shapes are (batch, heads, seq, head_dim) with L = S; ``attention`` is full attention,
``attention_causal`` top-left causal, ``attention_dropout`` full attention with dropout_p =
0.1 (ours draws its bits in the kernels; torch's CPU SDPA then takes its math path, which
materialises the scores). q, k, v require grad.

Sweep (model sizes, what a GPU runs): about 16k tokens per batch (B * L = 16384) in 16 heads,
sequence 512 ... 16384, head_dim 64 (GPT-2 / BERT class) at the short lengths and 128 (Llama
class) at the long ones: 32x16x512x64, 16x16x1024x64, 8x16x2048x128, 2x16x8192x128,
1x16x16384x128; fp32, fp16, bf16. The FA2-class target is ``--ops attention,attention_causal
--dtypes bf16 --shapes 2x16x8192x128`` (TFLOP/s column). On a CPU: 4x8x512x64 and
1x8x1024x128, fp32 and bf16.

The providers that materialise the scores skip the shapes where those would not fit: ``naive``
above 2^31 score elements (B H L S), and on a CPU in 16-bit dtypes (torch's CPU matrix products
in bf16 take a scalar fallback GEMM without AVX512-BF16 / AMX); the ``reference`` (fp32
autograd) above 2^30, with dropout above 2^22 (it draws the keep bits with int64 Philox
arithmetic on tensors of the scores' size: a test oracle, not a timing baseline). The fp32
oracle of the correctness check runs the reference per (batch, head) under activation
checkpointing, so it holds one L x S matrix at a time at every size (1 GiB at L = 16384).

Peers (CUDA only, skipped with the reason elsewhere): flash-attn's ``flash_attn_func`` and
xformers' ``memory_efficient_attention`` (``LowerTriangularMask`` for causal) for attention and
attention_causal. Both take (B, L, H, D): ``prepare`` transposes q, k, v into that layout once,
outside the timed region, and the output is returned as a (B, H, L, D) view (no copy).
flash-attn takes fp16 / bf16 only.

FLOP model (the standard count, as FlashAttention reports it): forward 4 * B * H * L * S * D
(two matrix products), halved for causal; backward 2.5x the forward; fwdbwd the sum. Byte model
(the unavoidable traffic, a floor): forward reads q, k, v and writes o; backward reads q, k, v,
o, dO and writes dq, dk, dv.

varlen_attention: causal attention over a packed batch (no padding) of ``n`` sequences; a shape
(n, heads, max_len, head_dim) holds sequence i with max_len * (4, 1, 3, 2)[i % 4] // 4 tokens
(a mix of full, quarter, three-quarter and half lengths). Inputs are q, k, v of (total, heads,
head_dim) and the int32 cu_seqlens. ``torch`` runs SDPA once per sequence (what a packed batch
costs without a varlen kernel); flash-attn's ``flash_attn_varlen_func`` takes the same packed
layout. FLOP model: only the real per-sequence products count, forward 4 * sum(L_i * S_i) * H
* D halved for causal, backward 2.5x; byte model as above over the packed tokens. Sweep: about
20k packed tokens in 16 heads, max_len 512 ... 16384: 64x16x512x64, 32x16x1024x64,
16x16x2048x128, 4x16x8192x128, 2x16x16384x128; on a CPU 4x8x1024x64 and 2x4x2048x128.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, Provider, peer, standard_providers

SHAPES = (
    (32, 16, 512, 64),
    (16, 16, 1024, 64),
    (8, 16, 2048, 128),
    (2, 16, 8192, 128),
    (1, 16, 16384, 128),
)
CPU_SHAPES = ((4, 8, 512, 64), (1, 8, 1024, 128))
QUICK_SHAPES = ((1, 2, 128, 32),)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)

VARLEN_SHAPES = (
    (64, 16, 512, 64),
    (32, 16, 1024, 64),
    (16, 16, 2048, 128),
    (4, 16, 8192, 128),
    (2, 16, 16384, 128),
)
VARLEN_CPU_SHAPES = ((4, 8, 1024, 64), (2, 4, 2048, 128))
VARLEN_QUICK_SHAPES = ((4, 2, 128, 32),)
VARLEN_MIX = (4, 1, 3, 2)  # sequence i holds max_len * VARLEN_MIX[i % 4] // 4 tokens

MAX_NAIVE_SCORES = 2**31  # B H L S score elements the naive provider may materialise
MAX_REFERENCE_SCORES = 2**30  # ... the reference provider (fp32, its autograd graph)
# ... with dropout: it draws its keep bits with int64 Philox arithmetic on (B, H, L, S) tensors
# (~2 s per call at 2^23 elements on a CPU core): a test oracle more than a timing baseline
MAX_REFERENCE_DROPOUT_SCORES = 2**22


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _count(fwd: int, mode: str) -> int:
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwdbwd": fwd * 7 // 2}[mode]


def _flops(causal: bool):
    def count(shape, dtype, mode) -> int:
        b, h, seq, d = shape
        return _count(4 * b * h * seq * seq * d // (2 if causal else 1), mode)

    return count


def _io_bytes(elements: int, dtype, mode) -> int:
    t = elements * _elt(dtype)
    return {"fwd": 4 * t, "bwd": 8 * t, "fwdbwd": 12 * t}[mode]


def _bytes(shape, dtype, mode) -> int:
    return _io_bytes(math.prod(shape), dtype, mode)


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


def _score_limit(name: str, limit: int, scores):
    """``supports`` of a provider that materialises ``scores(shape)`` score elements."""

    def supports(shape, dtype):
        n = scores(shape)
        if n <= limit:
            return None
        return f"{name} materialises {n} score elements (> 2^{limit.bit_length() - 1})"

    return supports


# torch's CPU matrix products in bf16 / fp16 take a scalar fallback GEMM on CPUs without
# AVX512-BF16 / AMX: 0.5 GFLOP/s per core on the 2-core AVX2 VM, ~100x below fp32
_CPU_HALF_GEMM = "on a CPU naive runs fp32 only (16-bit matrix products: torch's fallback GEMM)"


def _naive_supports(device):
    too_big = _score_limit("naive", MAX_NAIVE_SCORES, _dense_scores)

    def supports(shape, dtype):
        if device.type == "cpu" and dtype != torch.float32:
            return _CPU_HALF_GEMM
        return too_big(shape, dtype)

    return supports


def _dense_scores(shape) -> int:
    b, h, seq, _ = shape
    return b * h * seq * seq


def _half_only(name: str):
    def supports(shape, dtype):
        ok = dtype in (torch.float16, torch.bfloat16)
        return None if ok else f"{name} takes fp16 / bf16 only"

    return supports


def _per_head_checkpointed(fn):
    """``fn(q, k, v)`` on (B, H, L, D) tensors run per (batch, head) slice, each under activation
    checkpointing: an fp32 oracle that holds one L x S score matrix at a time."""

    def run(q, k, v):
        rows = []
        for b in range(q.shape[0]):
            heads = [
                checkpoint(fn, *(t[b : b + 1, h : h + 1] for t in (q, k, v)), use_reentrant=False)
                for h in range(q.shape[1])
            ]
            rows.append(torch.cat(heads, 1))
        return torch.cat(rows, 0)

    return run


def _reference(causal: bool, dropout_p: float):
    def fn(q, k, v):
        scale = 1 / math.sqrt(q.shape[-1])
        thr = ref.dropout_threshold(dropout_p)
        return ref.attention_fwd(q, k, v, None, scale, -1, 0 if causal else -1,
                                 drop_threshold=thr, seed=12345)[0]  # fmt: skip

    return fn


# -------------------------------------------------------------------------------- peers


def _blhd(args):
    """(B, H, L, D) -> the (B, L, H, D) layout of flash-attn and xformers (once, untimed)."""
    return tuple(t.transpose(1, 2).contiguous() for t in args)


def _flash_attn_peer(device, causal: bool) -> Provider:
    def build():
        from flash_attn import flash_attn_func

        def fn(q, k, v):  # (B, L, H, D)
            return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)

        return Provider("flash-attn", fn, prepare=_blhd, supports=_half_only("flash-attn"))

    return peer("flash-attn", "flash_attn", device, build)


def _xformers_peer(device, causal: bool) -> Provider:
    def build():
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None

        def fn(q, k, v):  # (B, L, H, D)
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)

        return Provider("xformers", fn, prepare=_blhd)

    return peer("xformers", "xformers.ops", device, build)


# -------------------------------------------------------------------------------- benches


def _bench(name: str, causal: bool, dropout_p: float = 0.0) -> Bench:
    def ours(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)

    def torch_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)

    reference = _reference(causal, dropout_p)
    ref_limit = MAX_REFERENCE_DROPOUT_SCORES if dropout_p else MAX_REFERENCE_SCORES

    def providers(device):
        peers = []
        if not dropout_p:  # flash-attn and xformers draw their own dropout bits: not compared
            peers = [_flash_attn_peer(device, causal), _xformers_peer(device, causal)]
        out = standard_providers(
            device,
            ours=ours,
            reference=reference,
            torch_fn=torch_fn,
            peers=(
                Provider("naive", _naive(causal, dropout_p), supports=_naive_supports(device)),
                *peers,
            ),
        )  # fmt: skip
        why = _score_limit("reference", ref_limit, _dense_scores)
        return [replace(p, supports=why) if p.name == "reference" else p for p in out]

    return Bench(
        name=name,
        shapes=SHAPES,
        cpu_shapes=CPU_SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=_inputs,
        bytes=_bytes,
        flops=_flops(causal),
        reference=_per_head_checkpointed(reference),
        providers=providers,
        # every provider drops different probabilities (up to 1 / (1 - p) * max|v| apart):
        # the pre-timing check only catches results off by orders of magnitude or NaN; the
        # tests check the dropout bits against the reference
        **({"tolerance": dict.fromkeys(DTYPES, 10.0)} if dropout_p else {}),
    )


# ------------------------------------------------------------------------------- varlen


def varlen_lengths(shape) -> tuple[int, ...]:
    """The sequence lengths of a varlen shape (n, heads, max_len, head_dim)."""
    n, _, max_len, _ = shape
    return tuple(max(1, max_len * VARLEN_MIX[i % 4] // 4) for i in range(n))


def _varlen_flops(shape, dtype, mode) -> int:
    _, h, _, d = shape
    fwd = 4 * sum(n * n for n in varlen_lengths(shape)) * h * d // 2  # causal: half
    return _count(fwd, mode)


def _varlen_bytes(shape, dtype, mode) -> int:
    _, h, _, d = shape
    return _io_bytes(sum(varlen_lengths(shape)) * h * d, dtype, mode)


def _varlen_scores(shape) -> int:
    return shape[1] * sum(n * n for n in varlen_lengths(shape))


def _varlen_inputs(shape, dtype, device) -> Inputs:
    _, h, _, d = shape
    lens = varlen_lengths(shape)
    total = sum(lens)
    gen = torch.Generator().manual_seed(zlib.crc32(f"varlen {shape} {dtype}".encode()))
    q, k, v, dy = (torch.randn(total, h, d, generator=gen) for _ in range(4))
    qkv = tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    cu = torch.tensor((0, *itertools.accumulate(lens)), dtype=torch.int32, device=device)
    # every provider takes (q, k, v, cu_seqlens, max_seqlen, lengths as a tuple of ints)
    return Inputs((*qkv, cu, max(lens), lens), dy.to(device=device, dtype=dtype))


def _varlen_ours(q, k, v, cu, max_len, lens):
    return LF.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True)


def _varlen_torch(q, k, v, cu, max_len, lens):
    outs = []
    for qi, ki, vi in zip(*(t.split(lens) for t in (q, k, v)), strict=True):
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), is_causal=True
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _varlen_reference(q, k, v, cu, max_len, lens):
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = ref.attention_fwd(q4, k4, v4, None, 1 / math.sqrt(q.shape[-1]), -1, 0, True, cu, cu)[0]
    return out.squeeze(0).transpose(0, 1)


_dense_causal_oracle = _per_head_checkpointed(_reference(True, 0.0))


def _varlen_oracle(q, k, v, cu, max_len, lens):
    """Per sequence, per head, checkpointed: one L_i x L_i score matrix at a time."""
    outs = []
    for seq in zip(*(t.split(lens) for t in (q, k, v)), strict=True):
        o = _dense_causal_oracle(*(t.transpose(0, 1).unsqueeze(0) for t in seq))
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def _flash_attn_varlen_peer(device) -> Provider:
    def build():
        from flash_attn import flash_attn_varlen_func

        def fn(q, k, v, cu, max_len, lens):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

        return Provider("flash-attn", fn, supports=_half_only("flash-attn"))

    return peer("flash-attn", "flash_attn", device, build)


def _varlen_providers(device) -> list[Provider]:
    out = standard_providers(
        device,
        ours=_varlen_ours,
        reference=_varlen_reference,
        torch_fn=_varlen_torch,
        peers=[_flash_attn_varlen_peer(device)],
    )
    why = _score_limit("reference", MAX_REFERENCE_SCORES, _varlen_scores)
    return [replace(p, supports=why) if p.name == "reference" else p for p in out]


BENCHES = [
    _bench("attention", False),
    _bench("attention_causal", True),
    _bench("attention_dropout", False, 0.1),
    Bench(
        name="varlen_attention",
        shapes=VARLEN_SHAPES,
        cpu_shapes=VARLEN_CPU_SHAPES,
        quick_shapes=VARLEN_QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=_varlen_inputs,
        bytes=_varlen_bytes,
        flops=_varlen_flops,
        reference=_varlen_oracle,
        providers=_varlen_providers,
    ),
]
