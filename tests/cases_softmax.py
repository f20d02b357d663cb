"""Conformance cases of the softmax family (registered once, run on every backend).

Shape choices: rows are small primes (3, 5) so every kernel sees a non-power-of-two grid;
columns cover 1, primes, both sides of the powers of two the kernels tile by and of each
backend's thresholds (named where they are listed) and long rows beyond the single-tile
limits (large=True: not run in the Triton interpreter, where it would take minutes; the
looped Triton path is covered there by test_triton_softmax.py with a lowered threshold).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels.reference import causal_mask
from lmkernels.testing import Case, poison_tail, register

INF = float("inf")


def _x(shape, dtype, device, gen, scale=3.0):
    x = torch.randn(shape, generator=gen, device=device) * scale
    return x.to(dtype).requires_grad_(True)


def torch_masked_softmax(x, mask=None, scale=1.0, causal=False):
    """Plain-torch definition of scaled_masked_softmax (fully masked rows -> zeros)."""
    z = x * scale
    if mask is not None:
        z = z.masked_fill(mask, -INF) if mask.dtype == torch.bool else (z + mask).to(x.dtype)
    if causal:
        z = z.masked_fill(causal_mask(z.shape[-2], z.shape[-1], z.device), -INF)
    empty = (z == -INF).all(-1, keepdim=True)
    return torch.softmax(z.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)


def _plain(name, shape, dim, log=False, transform=None, large=False, **kw):
    ours = LF.log_softmax if log else LF.softmax
    ref = F.log_softmax if log else F.softmax

    def make(dtype, device, gen):
        x = _x(shape, dtype, device, gen)
        if transform is not None:
            x = transform(x.detach()).requires_grad_(True)
        return (x,), dict(dim=dim, **kw)

    op = "log_softmax" if log else "softmax"
    return Case(op, name, make, ours, ref, small=not large)


def _special_rows(dtype, device, gen):
    x = torch.randn(6, 33, generator=gen, device=device).to(dtype)
    x[0, 5] = float("nan")
    x[1, 7] = INF
    x[2, :] = -INF  # torch gives NaN for the whole row
    x[3, ::2] = -INF
    x[4, 0] = -INF
    x[5, :] = 0.0
    return (x.requires_grad_(True),), dict(dim=-1)


_PLAIN = []
for log in (False, True):
    # 1024/1025: CUDA's warp-per-row limit; 8192/8193: Triton's single-tile limit
    for cols in (1, 2, 7, 127, 128, 129, 1000, 1024, 1025, 4095, 4097, 8192, 8193):
        _PLAIN.append(_plain(f"rows3_cols{cols}", (3, cols), -1, log))
    # the CPU kernels split few long rows (cols >= 16384) across threads
    for cols in (16383, 16384, 262147):
        _PLAIN.append(_plain(f"rows1_cols{cols}", (1, cols), -1, log, large=True))
    _PLAIN += [
        _plain("dim0_rank3", (5, 4, 3), 0, log),
        _plain("dim1_rank3", (5, 4, 3), 1, log),
        _plain("dim_neg2_rank4", (2, 3, 5, 7), -2, log),
        _plain("rank1", (257,), 0, log),
        _plain("rank0", (), 0, log),
        _plain("rank0_dim_neg1", (), -1, log),
        _plain("transposed_input", (9, 5), -1, log, transform=lambda t: t.t()),
        _plain("strided_input", (4, 26), -1, log, transform=lambda t: t[:, ::2]),
        _plain("empty_rows", (0, 5), -1, log),
        _plain("empty_cols", (4, 0), -1, log),
        _plain("empty_dim_other", (0, 5), 0, log),
        _plain("long_row", (2, 70001), -1, log, large=True),
        _plain("many_rows", (1031, 67), -1, log, large=True),
        _plain("poisoned_tail", (5, 77), -1, log, transform=poison_tail),
        Case("log_softmax" if log else "softmax", "nan_inf_rows", _special_rows,
             LF.log_softmax if log else LF.softmax, F.log_softmax if log else F.softmax),
    ]  # fmt: skip


def _dtype_arg(dtype, device, gen):
    return (_x((3, 50), dtype, device, gen),), dict(dim=-1, dtype=torch.float32)


_PLAIN.append(Case("softmax", "dtype_arg_float32", _dtype_arg, LF.softmax, F.softmax))
_PLAIN.append(Case("log_softmax", "dtype_arg_float32", _dtype_arg, LF.log_softmax, F.log_softmax))


def _masked(name, shape, mask_shape=None, kind="bool", scale=1.0, causal=False, mask_grad=False,
            fully_masked_row=False, mask_transform=None, poison=False, large=False):  # fmt: skip
    def make(dtype, device, gen):
        x = _x(shape, dtype, device, gen)
        mask = None
        if mask_shape is not None:
            if kind == "bool":
                mask = torch.rand(mask_shape, generator=gen, device=device) < 0.3
            else:
                mdtype = dtype if kind == "same" else torch.float32
                mask = torch.randn(mask_shape, generator=gen, device=device).to(mdtype)
                mask = mask.masked_fill(torch.rand(mask_shape, generator=gen, device=device) < 0.2,
                                        -INF)  # fmt: skip
            if fully_masked_row:
                mask[..., 0, :] = True if kind == "bool" else -INF
            if mask_transform is not None:
                mask = mask_transform(mask)
            if poison:
                mask = poison_tail(mask) if mask.dtype != torch.bool else mask
            if mask_grad:
                mask.requires_grad_(True)
        if poison:
            x = poison_tail(x)
        return (x, mask), dict(scale=scale, causal=causal)

    return Case("scaled_masked_softmax", name, make, LF.scaled_masked_softmax,
                torch_masked_softmax, small=not large)  # fmt: skip


_MASKED = [
    _masked("no_mask_scaled", (2, 3, 5, 9), None, scale=0.125),
    _masked("bool_full", (2, 3, 5, 9), (2, 3, 5, 9)),
    _masked("bool_key_padding", (2, 3, 5, 130), (2, 1, 1, 130), scale=0.3),
    _masked("bool_rank2_broadcast", (2, 3, 7, 11), (7, 11)),
    _masked("bool_col_broadcast", (2, 3, 7, 11), (2, 1, 7, 1)),
    _masked("bool_fully_masked_row", (2, 2, 4, 6), (2, 2, 4, 6), fully_masked_row=True),
    _masked("float32_bias", (2, 3, 5, 9), (3, 5, 9), kind="float32"),
    _masked("same_dtype_bias", (2, 3, 5, 9), (1, 3, 5, 9), kind="same"),
    _masked("float_bias_grad", (2, 3, 5, 9), (5, 9), kind="float32", mask_grad=True),
    _masked("float_fully_masked_row", (3, 4, 6), (3, 4, 6), kind="float32",
            fully_masked_row=True),
    _masked("transposed_mask", (2, 6, 6), (2, 6, 6), mask_transform=lambda m: m.transpose(-1, -2)),
    _masked("causal_square", (2, 3, 9, 9), None, causal=True),
    _masked("causal_wide", (2, 5, 9), None, causal=True, scale=0.5),
    _masked("causal_tall", (2, 9, 5), None, causal=True),
    _masked("causal_and_mask", (2, 3, 8, 8), (2, 1, 1, 8), causal=True),
    _masked("causal_fully_masked_row", (1, 4, 4), (1, 4, 4), causal=True, fully_masked_row=True),
    _masked("poisoned_inputs", (2, 5, 77), (2, 5, 77), kind="float32", poison=True),
    _masked("long_row", (1, 2, 3, 70001), (1, 1, 1, 70001), scale=0.2, large=True),
]  # fmt: skip

register(*_PLAIN, *_MASKED)
