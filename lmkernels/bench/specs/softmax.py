"""Benchmarks of the softmax family: softmax, log_softmax and scaled_masked_softmax (with a
boolean key-padding mask, and causal).

Shapes are (rows, cols) with the softmax over cols. The attention-score benches view the same
(rows, cols) as scores ``x`` of shape (G, L, S): S = cols keys, L = min(rows, cols) queries
(all the rows when min(rows, cols) does not divide them), G = rows / L groups (batch x heads).

Sweep (model sizes, what a GPU runs): 16384 token rows over hidden-size rows 768, 1024, 2048,
4096, 8192, and attention-score rows with sequence 512 ... 16384: 32768x512 (64 groups of
512 x 512 scores), 16384x2048 (8 of 2048 x 2048), 16384x8192 (2 of 8192 x 8192), 16384x16384
(one 16384 x 16384 score matrix); fp32, fp16, bf16. On a CPU: 4096x512 (8 groups of 512 x 512),
2048x2048, 2048x4096, 1024x8192, fp32 and bf16.

Peers (CUDA only, skipped with the reason elsewhere): Liger-Kernel's ``LigerSoftmaxFunction``
and quack's ``softmax`` (softmax); apex's fused ``ScaledMaskedSoftmax`` /
``ScaledUpperTriangMaskedSoftmax`` (masked_softmax, causal_softmax; fp16 / bf16).

Byte model (the bytes an ideal kernel must move; N = rows * cols, e = element size):

    fwd     reads x, writes y                       2 N e   (+ G S for the bool padding mask)
    bwd     reads y and dy, writes dx               3 N e
    fwdbwd  the sum                                 5 N e   (+ G S)

The causal mask is computed from indices, so it moves no bytes.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

import lmkernels.functional as LF
from lmkernels import reference as ref
from lmkernels.bench.spec import Bench, Inputs, Provider, peer, standard_providers

SCALE = 0.125  # 1 / sqrt(head_dim = 64)

SHAPES = (
    (16384, 768),
    (16384, 1024),
    (16384, 2048),
    (16384, 4096),
    (16384, 8192),
    (32768, 512),
    (16384, 16384),
)
CPU_SHAPES = ((4096, 512), (2048, 2048), (2048, 4096), (1024, 8192))
QUICK_SHAPES = ((128, 1024), (16, 8192))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _attn_dims(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, cols) -> (G, L, S) for the attention-score benches."""
    rows, cols = shape
    q = min(rows, cols)
    if rows % q:
        q = rows
    return rows // q, q, cols


def _rowwise_bytes(shape, dtype, mode, extra_fwd: int = 0) -> int:
    n, e = math.prod(shape), _elt(dtype)
    fwd, bwd = 2 * n * e + extra_fwd, 3 * n * e
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def plain_bytes(shape, dtype, mode) -> int:
    return _rowwise_bytes(shape, dtype, mode)


def padding_mask_bytes(shape, dtype, mode) -> int:
    g, _, s = _attn_dims(shape)
    return _rowwise_bytes(shape, dtype, mode, extra_fwd=g * s)  # one bool per (group, key)


def _generator(shape, dtype) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{tuple(shape)} {dtype}".encode()))


def _rand(shape, dtype, device, gen) -> Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def plain_inputs(shape, dtype, device) -> Inputs:
    gen = _generator(shape, dtype)
    x = (2 * _rand(shape, dtype, device, gen)).requires_grad_()
    return Inputs((x,), _rand(shape, dtype, device, gen))


def padding_inputs(shape, dtype, device) -> Inputs:
    g, q, s = _attn_dims(shape)
    gen = _generator(shape, dtype)
    x = (4 * _rand((g, q, s), dtype, device, gen)).requires_grad_()
    # Every group keeps between half and all of its keys, so no row is fully masked.
    keep = torch.randint(s // 2, s + 1, (g, 1, 1), generator=gen)
    mask = (torch.arange(s).view(1, 1, s) >= keep).to(device)  # True = masked out
    return Inputs((x, mask), _rand((g, q, s), dtype, device, gen))


def causal_inputs(shape, dtype, device) -> Inputs:
    g, q, s = _attn_dims(shape)
    gen = _generator(shape, dtype)
    x = (4 * _rand((g, q, s), dtype, device, gen)).requires_grad_()
    # torch eager needs the mask as a tensor; lmkernels computes it from indices.
    causal = ref.causal_mask(q, s, device)
    return Inputs((x, causal), _rand((g, q, s), dtype, device, gen))


# ----------------------------------------------------------------------------- the functions


def _torch_masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.softmax((x * SCALE).masked_fill(mask, float("-inf")), -1)


def _apex_masked_peer(device) -> Provider:
    def build():
        from apex.transformer.functional.fused_softmax import ScaledMaskedSoftmax

        def prepare(args):
            x, mask = args
            g, q, s = x.shape
            return x.view(g, 1, q, s), mask.view(g, 1, 1, s).expand(g, 1, q, s).contiguous()

        def supports(shape, dtype):
            ok = dtype in (torch.float16, torch.bfloat16)
            return None if ok else "apex fused softmax takes fp16/bf16 only"

        return Provider(
            "apex",
            lambda x4, m4: ScaledMaskedSoftmax.apply(x4, m4, SCALE),
            prepare=prepare,
            supports=supports,
        )

    return peer("apex", "apex.transformer.functional.fused_softmax", device, build)


def _apex_causal_peer(device) -> Provider:
    def build():
        from apex.transformer.functional.fused_softmax import ScaledUpperTriangMaskedSoftmax

        def supports(shape, dtype):
            _, q, s = _attn_dims(shape)
            if dtype not in (torch.float16, torch.bfloat16):
                return "apex fused softmax takes fp16/bf16 only"
            return None if q == s else "apex's causal softmax needs square scores (L == S)"

        return Provider(
            "apex",
            lambda x, _causal: ScaledUpperTriangMaskedSoftmax.apply(x, SCALE),
            supports=supports,
        )

    return peer("apex", "apex.transformer.functional.fused_softmax", device, build)


def _liger_peer(device) -> Provider:
    def build():
        from liger_kernel.ops.softmax import LigerSoftmaxFunction

        return Provider("liger-kernel", lambda x: LigerSoftmaxFunction.apply(x))

    return peer("liger-kernel", "liger_kernel.ops.softmax", device, build)


def _quack_peer(device) -> Provider:
    def build():
        import quack

        return Provider("quack", lambda x: quack.softmax(x))  # (M, N), over N

    return peer("quack", "quack", device, build)


def _softmax_ref(x):
    return ref.softmax_fwd(x, -1, 1.0, False, None, False)


def _log_softmax_ref(x):
    return ref.softmax_fwd(x, -1, 1.0, True, None, False)


def _masked_ref(x, mask):
    return ref.softmax_fwd(x, -1, SCALE, False, mask, False)


def _causal_ref(x, _causal):
    return ref.softmax_fwd(x, -1, SCALE, False, None, True)


def _common(name, make_inputs, nbytes, reference, providers) -> Bench:
    return Bench(
        name=name,
        shapes=SHAPES,
        cpu_shapes=CPU_SHAPES,
        quick_shapes=QUICK_SHAPES,
        dtypes=DTYPES,
        cpu_dtypes=CPU_DTYPES,
        make_inputs=make_inputs,
        bytes=nbytes,
        reference=reference,
        providers=providers,
    )


BENCHES = [
    _common(
        "softmax", plain_inputs, plain_bytes, _softmax_ref,
        lambda device: standard_providers(
            device,
            ours=lambda x: LF.softmax(x, -1),
            reference=_softmax_ref,
            torch_fn=lambda x: torch.softmax(x, -1),
            peers=[_liger_peer(device), _quack_peer(device)],
        ),
    ),
    _common(
        "log_softmax", plain_inputs, plain_bytes, _log_softmax_ref,
        lambda device: standard_providers(
            device,
            ours=lambda x: LF.log_softmax(x, -1),
            reference=_log_softmax_ref,
            torch_fn=lambda x: torch.log_softmax(x, -1),
        ),
    ),
    _common(
        "masked_softmax", padding_inputs, padding_mask_bytes, _masked_ref,
        lambda device: standard_providers(
            device,
            ours=lambda x, mask: LF.scaled_masked_softmax(x, mask, SCALE),
            reference=_masked_ref,
            torch_fn=_torch_masked,
            peers=[_apex_masked_peer(device)],
        ),
    ),
    _common(
        "causal_softmax", causal_inputs, plain_bytes, _causal_ref,
        lambda device: standard_providers(
            device,
            ours=lambda x, _causal: LF.scaled_masked_softmax(x, None, SCALE, causal=True),
            reference=_causal_ref,
            torch_fn=_torch_masked,
            peers=[_apex_causal_peer(device)],
        ),
    ),
]  # fmt: skip
