"""Conformance cases of the embedding lookup (registered once, run on every backend).

Index shapes of rank 0 to 3 and empty ones, int32 and int64, many tokens hitting one row,
padding_idx positive and negative, scale_grad_by_freq (alone and with padding), a table whose
rows are strided (a column slice of a wider one) and a transposed (non-contiguous) table, and
embedding dims around the vector widths (1, 3, 127, 1000).
"""

from __future__ import annotations

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
