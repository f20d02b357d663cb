"""Conformance cases of apply_rotary (registered once, run on every backend).

Both layouts ((batch, seq, heads, head_dim) with cos of shape (seq, 1, head_dim), and
(batch, heads, seq, head_dim) with (seq, head_dim)), per-batch tables, both conventions
(rotate_half and interleaved), head dims around the vector width (2, 6, 40, 128), a
non-contiguous x, fp32 tables with 16-bit x (an fp32 result, as torch promotes), empty x.
"""

from __future__ import annotations

import torch

import lmkernels.functional as LF
from lmkernels import reference
from lmkernels.testing import Case, register


def torch_rotary(x, cos, sin, interleaved=False):
    """The plain torch formulation (Hugging Face / GPT-J)."""
    rot = reference.rotate_every_two if interleaved else reference.rotate_half
    return x * cos + rot(x) * sin


def _case(name, x_shape, cs_shape, transpose=None, cs_dtype=None, dtypes=None, **kwargs):
    def make(dtype, device, gen):
        x = torch.randn(x_shape, generator=gen, device=device).to(dtype)
        if transpose is not None:
            x = x.transpose(*transpose)
        angle = torch.rand(cs_shape, generator=gen, device=device) * 6.3
        cs = cs_dtype or dtype
        return (x.requires_grad_(), angle.cos().to(cs), angle.sin().to(cs)), dict(kwargs)

    kw = {} if dtypes is None else dict(dtypes=dtypes)
    return Case("apply_rotary", name, make, LF.apply_rotary, torch_rotary, **kw)


HALF = (torch.float16, torch.bfloat16)
register(
    _case("bshd", (2, 5, 3, 16), (5, 1, 16)),
    _case("bhsd", (2, 3, 5, 16), (5, 16)),
    _case("per_batch_positions", (2, 5, 3, 16), (2, 5, 1, 16)),
    _case("bshd_interleaved", (2, 5, 3, 16), (5, 1, 16), interleaved=True),
    _case("bhsd_interleaved", (2, 3, 5, 40), (5, 40), interleaved=True),
    _case("head_dim_2", (3, 4, 2), (4, 2)),
    _case("head_dim_6", (3, 4, 6), (4, 6)),
    _case("head_dim_40", (2, 7, 40), (7, 40)),
    _case("head_dim_128", (2, 9, 2, 128), (9, 1, 128)),
    _case("non_contiguous_x", (2, 3, 5, 16), (5, 1, 16), transpose=(1, 2)),
    _case("fp32_tables", (2, 5, 3, 16), (5, 1, 16), cs_dtype=torch.float32, dtypes=HALF),
    _case("empty", (0, 5, 16), (5, 16)),
)
