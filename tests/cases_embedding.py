"""Conformance cases of the embedding lookup (registered once, run on every backend).

Index shapes of rank 0 to 3 and empty ones, int32 and int64, many tokens hitting one row,
padding_idx positive and negative, scale_grad_by_freq (alone and with padding), a table whose
rows are strided (a column slice of a wider one) and a transposed (non-contiguous) table, and
embedding dims around the vector widths (1, 3, 127, 1000).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels.testing import Case, register


def _weight(rows, dim, dtype, device, gen, layout="contiguous"):
    if layout == "transposed":
        w = torch.randn(dim, rows, generator=gen, device=device).t()
    elif layout == "column_slice":
        w = torch.randn(rows, dim + 5, generator=gen, device=device)[:, 2 : 2 + dim]
    else:
        w = torch.randn(rows, dim, generator=gen, device=device)
    return w.to(dtype).requires_grad_(True)


def _case(name, idx_shape, rows=20, dim=16, idx_dtype=torch.int64, hot=None, layout="contiguous",
          **kwargs):  # fmt: skip
    def make(dtype, device, gen):
        w = _weight(rows, dim, dtype, device, gen, layout)
        idx = torch.randint(0, rows, idx_shape, generator=gen, device=device)
        if hot is not None:  # most tokens hit a few rows
            idx = idx % hot
        return (idx.to(idx_dtype), w), dict(kwargs)

    return Case("embedding", name, make, LF.embedding, F.embedding)


register(
    _case("basic", (3, 5)),
    _case("scalar_index", ()),
    _case("rank1", (9,)),
    _case("rank3", (2, 3, 4)),
    _case("int32", (4, 6), idx_dtype=torch.int32),
    _case("empty", (0,)),
    _case("empty_2d", (2, 0)),
    _case("many_hit_one_row", (300,), rows=50, hot=3),
    _case("padding_idx", (6, 7), hot=5, padding_idx=2),
    _case("negative_padding_idx", (6, 7), rows=8, padding_idx=-1),
    _case("scale_grad_by_freq", (40,), hot=6, scale_grad_by_freq=True),
    _case("scale_grad_with_padding", (40,), hot=6, scale_grad_by_freq=True, padding_idx=0),
    _case("column_slice_table", (5, 5), layout="column_slice"),
    _case("transposed_table", (5, 5), layout="transposed"),
    _case("dim_1", (7,), dim=1),
    _case("dim_3", (7,), dim=3),
    _case("dim_127", (11,), dim=127),
    _case("dim_1000_vocab_1000", (64,), rows=1000, dim=1000, hot=40),
)


# ------------------------------------------------------- fused token + positional embedding


def torch_token_positional(ids, token_weight, positions=None, pos_weight=None, *,
                           sinusoidal=False, scale=1.0, padding_idx=None):  # fmt: skip
    """The unfused torch sequence: ``scale * embedding(ids) + P[positions]``, the sinusoid
    built as usual (``pos * exp(-2i ln(10000) / d)`` in fp32, fp64 for fp64 tables) and cast to
    the table's dtype."""
    e = F.embedding(ids, token_weight, padding_idx) * scale
    if positions is None:
        positions = torch.arange(ids.shape[-1] if ids.dim() else 1, device=ids.device)
        positions = positions.view(ids.shape[-1:])
    if not sinusoidal:
        return e + F.embedding(positions, pos_weight)
    dim = token_weight.shape[1]
    acc = torch.float64 if token_weight.dtype == torch.float64 else torch.float32
    div = torch.exp(torch.arange(0, dim, 2, dtype=acc, device=ids.device) * (-math.log(1e4) / dim))
    angle = positions.to(acc).unsqueeze(-1) * div
    pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[..., :dim]
    return e + pe.to(token_weight.dtype)


def _tp_case(name, idx_shape, rows=20, dim=16, max_pos=8, pos_shape=None, pos_max=None,
             idx_dtype=torch.int64, pos_dtype=torch.int64, hot=None, layout="contiguous",
             **kwargs):  # fmt: skip
    def make(dtype, device, gen):
        w = _weight(rows, dim, dtype, device, gen, layout)
        idx = torch.randint(0, rows, idx_shape, generator=gen, device=device)
        if hot is not None:
            idx = idx % hot
        pos = None
        if pos_shape is not None:
            top = pos_max if pos_max is not None else max_pos
            pos = torch.randint(0, top, pos_shape, generator=gen, device=device).to(pos_dtype)
        p = None if kwargs.get("sinusoidal") else _weight(max_pos, dim, dtype, device, gen, layout)
        return (idx.to(idx_dtype), w, pos, p), dict(kwargs)

    return Case("token_positional_embedding", name, make, LF.token_positional_embedding,
                torch_token_positional)  # fmt: skip


register(
    _tp_case("learned", (3, 5)),
    _tp_case("learned_positions_2d", (3, 5), pos_shape=(3, 5)),
    _tp_case("learned_scale_padding", (4, 6), hot=4, scale=4.0, padding_idx=2),
    _tp_case("learned_negative_padding", (4, 6), rows=6, padding_idx=-1),
    _tp_case("learned_int32_ids_int64_positions", (2, 7), pos_shape=(7,), idx_dtype=torch.int32),
    _tp_case(
        "learned_int32_both", (2, 7), pos_shape=(2, 7), idx_dtype=torch.int32, pos_dtype=torch.int32
    ),  # fmt: skip
    _tp_case("learned_rank1", (8,)),
    _tp_case("learned_scalar_ids", ()),
    _tp_case("learned_rank3", (2, 3, 4), pos_shape=(3, 1)),
    _tp_case("learned_empty", (0,)),
    _tp_case("learned_empty_2d", (2, 0)),
    _tp_case("learned_column_slice_tables", (3, 5), layout="column_slice"),
    _tp_case("learned_transposed_tables", (3, 5), layout="transposed"),
    _tp_case("learned_dim_1", (3, 5), dim=1),
    _tp_case("learned_dim_127", (3, 5), dim=127),
    _tp_case("learned_many_hit_one_row", (300,), rows=50, max_pos=400, hot=3, scale=2.5),
    _tp_case("sinusoid", (3, 5), sinusoidal=True),
    _tp_case(
        "sinusoid_scale_padding", (4, 6), hot=4, sinusoidal=True, scale=4.0, padding_idx=1
    ),  # fmt: skip
    _tp_case("sinusoid_odd_dim", (3, 5), dim=7, sinusoidal=True),
    _tp_case("sinusoid_dim_3", (3, 5), dim=3, sinusoidal=True),
    _tp_case("sinusoid_dim_1000", (2, 9), dim=1000, sinusoidal=True),
    _tp_case(
        "sinusoid_large_positions", (2, 40), pos_shape=(2, 40), pos_max=2**20, sinusoidal=True
    ),  # fmt: skip
    _tp_case(
        "sinusoid_int32",
        (2, 7),
        pos_shape=(2, 7),
        idx_dtype=torch.int32,
        pos_dtype=torch.int32,
        pos_max=5000,
        sinusoidal=True,
    ),  # fmt: skip
    _tp_case("sinusoid_empty", (2, 0), sinusoidal=True),
)
