"""Benchmarks of the language-model loss: cross_entropy (class-index targets, 'mean', a tenth of
the targets ignored) and linear_cross_entropy (the output projection fused with the loss).

cross_entropy shapes are (tokens, vocab). Sweep (model sizes, what a GPU runs): the vocabularies
of Llama 2 (32000), GPT-2 (50257), Llama 3 (128256) and Gemma (256000), at 8192 ... 1024 tokens
(1 Gi logits at most); fp32, fp16, bf16. On a CPU: 32000 at 1024 tokens, 128256 at 512, 256000
at 256, fp32 and bf16.
Byte model (N = tokens * vocab, e = element size; the targets' 8 bytes per token are left out):

    fwd     reads the logits                          N e
    bwd     writes the gradient                       N e
    fwdbwd  the sum                                   2 N e

(lmkernels on CPU tensors: the forward also writes the gradient and the backward scales it,
or hands it over when the incoming gradient is 1; on a GPU the backward recomputes it from the
logits: 2 N e + N e. An ideal fused kernel reads the logits once and writes the gradient once.)

linear_cross_entropy shapes are (tokens, hidden, vocab): hidden / vocab pairs of real models,
GPT-2 (768, 50257), Llama 2 7B (4096, 32000), Llama 3 8B (4096, 128256), Gemma 7B (3072,
256000), Llama 3 70B (8192, 128256), at 8192 or 4096 tokens; fp32, fp16, bf16. On a CPU: 256
tokens at (768, 50257) and 128 at (2048, 32000), about 50 GFLOP per forward and backward, fp32
only (torch's CPU matrix products in bf16 take a scalar fallback GEMM on CPUs without
AVX512-BF16 / AMX, ~100x slower than fp32). FLOP model: the logits 2 T H V (forward), the
gradients of hidden and weight 4 T H V (backward). The peak memory column is the one to read
next to the time: the unfused baseline holds (tokens, vocab) logits, log-probabilities and
their gradient.

Peers (CUDA only, skipped with the reason elsewhere): Liger-Kernel's ``LigerCrossEntropyLoss``
and quack's ``cross_entropy`` (cross_entropy), Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` (linear_cross_entropy).
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

IGNORE_FRAC = 0.1

CE_SHAPES = ((8192, 32000), (4096, 50257), (2048, 128256), (1024, 256000))
CE_CPU_SHAPES = ((1024, 32000), (512, 128256), (256, 256000))
CE_QUICK = ((512, 32000), (64, 50257))
LCE_SHAPES = (
    (8192, 768, 50257),
    (8192, 4096, 32000),
    (8192, 4096, 128256),
    (4096, 3072, 256000),
    (4096, 8192, 128256),
)
LCE_CPU_SHAPES = ((256, 768, 50257), (128, 2048, 32000))
LCE_QUICK = ((128, 256, 32000),)
# torch's CPU matrix products in bf16 / fp16 take a scalar fallback GEMM on CPUs without
# AVX512-BF16 / AMX (0.5 GFLOP/s per core on the 2-core AVX2 VM, ~100x below fp32)
LCE_CPU_DTYPES = (torch.float32,)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _generator(shape, dtype) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"ce {tuple(shape)} {dtype}".encode()))


def _targets(tokens: int, vocab: int, gen: torch.Generator, device) -> Tensor:
    t = torch.randint(0, vocab, (tokens,), generator=gen)
    t[torch.rand(tokens, generator=gen) < IGNORE_FRAC] = -100
    return t.to(device)


def ce_bytes(shape, dtype, mode) -> int:
    n = math.prod(shape) * _elt(dtype)
    return {"fwd": n, "bwd": n, "fwdbwd": 2 * n}[mode]


def ce_inputs(shape, dtype, device) -> Inputs:
    tokens, vocab = shape
    gen = _generator(shape, dtype)
    x = (2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    t = _targets(tokens, vocab, gen, device)
    return Inputs((x, t), torch.tensor(1.0, device=device, dtype=dtype))


def _ce_ref(x, t):
    loss, _ = ref.cross_entropy_rows(x, t, None, -100, 0.0, 0.0, 0.0, None, False)
    return loss.sum() / (t != -100).sum()


def _liger_ce_peer(device) -> Provider:
    def build():
        from liger_kernel.transformers import LigerCrossEntropyLoss

        loss = LigerCrossEntropyLoss()
        return Provider("liger-kernel", lambda x, t: loss(x, t))

    return peer("liger-kernel", "liger_kernel.transformers", device, build)


def _quack_ce_peer(device) -> Provider:
    def build():
        import quack

        def fn(x, t):  # 'mean' over the targets that are not ignored, as torch
            return quack.cross_entropy(x, t, ignore_index=-100, reduction="mean")

        return Provider("quack", fn)

    return peer("quack", "quack", device, build)


def lce_flops(shape, dtype, mode) -> int:
    t, h, v = shape
    return {"fwd": 2 * t * h * v, "bwd": 4 * t * h * v, "fwdbwd": 6 * t * h * v}[mode]


def lce_bytes(shape, dtype, mode) -> int:
    # the weight (V, H) read once per pass and the hidden states: what no chunking avoids
    t, h, v = shape
    e = _elt(dtype)
    fwd = (v * h + t * h) * e
    return {"fwd": fwd, "bwd": 2 * fwd, "fwdbwd": 3 * fwd}[mode]


def lce_inputs(shape, dtype, device) -> Inputs:
    tokens, hidden, vocab = shape
    gen = _generator(shape, dtype)
    h = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device=device, dtype=dtype)
    t = _targets(tokens, vocab, gen, device)
    return Inputs((h.requires_grad_(), w.requires_grad_(), t),
                  torch.tensor(1.0, device=device, dtype=dtype))  # fmt: skip


def _lce_torch(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def _lce_ref(h, w, t):
    return _ce_ref(F.linear(h.float(), w.float()), t)


def _liger_lce_peer(device) -> Provider:
    def build():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return Provider("liger-kernel", lambda h, w, t: loss(w, h, t))

    return peer("liger-kernel", "liger_kernel.transformers", device, build)


BENCHES = [
    Bench(
        name="cross_entropy",
        shapes=CE_SHAPES,
        cpu_shapes=CE_CPU_SHAPES,
        quick_shapes=CE_QUICK,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=ce_inputs,
        bytes=ce_bytes,
        reference=_ce_ref,
        providers=lambda device: standard_providers(
            device,
            ours=lambda x, t: LF.cross_entropy(x, t),
            reference=_ce_ref,
            torch_fn=lambda x, t: F.cross_entropy(x, t),
            peers=[_liger_ce_peer(device), _quack_ce_peer(device)],
        ),
    ),
    Bench(
        name="linear_cross_entropy",
        shapes=LCE_SHAPES,
        cpu_shapes=LCE_CPU_SHAPES,
        quick_shapes=LCE_QUICK,
        dtypes=DTYPES,
        cpu_dtypes=LCE_CPU_DTYPES,
        make_inputs=lce_inputs,
        bytes=lce_bytes,
        flops=lce_flops,
        reference=_lce_ref,
        providers=lambda device: standard_providers(
            device,
            ours=lambda h, w, t: LF.linear_cross_entropy(h, w, t),
            reference=_lce_ref,
            torch_fn=_lce_torch,
            peers=[_liger_lce_peer(device)],
        ),
    ),
]
