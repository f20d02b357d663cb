"""Conformance cases of the language-model loss (registered once, run on every backend):
cross_entropy against torch.nn.functional.cross_entropy, linear_cross_entropy against
F.cross_entropy(F.linear(...)) (and, with the z-loss and the soft-cap, the written-out torch
formula).

Shape choices: rows are small primes; classes cover 1, primes, both sides of the powers of two
kernels tile by and of the CPU's 2048-column summation chunk, and (large=True: not in the
Triton interpreter) vocabulary-sized rows that are multiples of no block (50257, 32001).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels.testing import Case, poison_tail, register

IGNORE = -100


def _logits(shape, dtype, device, gen, scale=2.0):
    x = torch.randn(shape, generator=gen, device=device) * scale
    return x.to(dtype).requires_grad_(True)


def _targets(shape, classes, device, gen, ignore_frac=0.25, ignore=IGNORE):
    t = torch.randint(0, max(classes, 1), shape, generator=gen, device=device)
    drop = torch.rand(shape, generator=gen, device=device) < ignore_frac
    return t.masked_fill(drop, ignore)


def _ce(name, shape, reduction="mean", weight=False, eps=0.0, ignore=IGNORE, ignore_frac=0.25,
        transform=None, large=False, inplace=False):  # fmt: skip
    def make(dtype, device, gen):
        x = _logits(shape, dtype, device, gen)
        if transform is not None:
            x = transform(x.detach()).requires_grad_(True)
        classes = x.shape[0] if x.dim() == 1 else x.shape[1]
        tshape = () if x.dim() == 1 else (x.shape[0], *x.shape[2:])
        t = _targets(tshape, classes, device, gen, ignore_frac, ignore)
        kw = dict(reduction=reduction, label_smoothing=eps, ignore_index=ignore)
        if not weight:
            return (x, t), kw
        # positional, so the fp64 oracle gets fp64 weights as torch requires
        w = torch.rand(classes, generator=gen, device=device) + 0.5
        return (x, t, w.to(dtype)), kw

    ours = LF.cross_entropy
    if inplace:  # the gradient over a copy of the logits (a leaf cannot be written in place)

        def ours(x, t, *weight, **kw):
            return LF.cross_entropy(x.clone(), t, *weight, inplace_backward=True, **kw)

    return Case("cross_entropy", name, make, ours, F.cross_entropy, small=not large)


def _special_rows(dtype, device, gen):
    x = torch.randn(6, 33, generator=gen, device=device).to(dtype)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2, :] = -float("inf")  # torch: NaN
    x[3, ::2] = -float("inf")  # the target is made one of the finite columns below
    x[4, 0] = -float("inf")
    x[5, :] = 0.0
    t = torch.tensor([1, 2, 3, 5, 9, 0], device=device)
    return (x.requires_grad_(True), t), dict(reduction="none")


def _prob_targets(dtype, device, gen):
    x = _logits((5, 11), dtype, device, gen)
    p = torch.softmax(torch.randn(5, 11, generator=gen, device=device), -1).to(dtype)
    return (x, p), dict(label_smoothing=0.1)


_CE = []
for cols in (1, 2, 7, 128, 129, 1000, 2047, 2049, 4097):
    _CE.append(_ce(f"rows5_cols{cols}", (5, cols)))
for red in ("mean", "sum", "none"):
    _CE += [
        _ce(f"{red}_ignore", (7, 37), red),
        _ce(f"{red}_weights", (7, 37), red, weight=True),
        _ce(f"{red}_smoothing", (7, 37), red, eps=0.15),
        _ce(f"{red}_weights_smoothing", (7, 37), red, weight=True, eps=0.3),
        _ce(f"{red}_all_ignored", (4, 9), red, weight=True, eps=0.1, ignore_frac=1.0),
        _ce(f"{red}_kdim", (3, 11, 4, 2), red, weight=True, eps=0.1),
        _ce(f"{red}_inplace", (5, 33), red, weight=True, eps=0.1, inplace=True),
    ]
_CE += [
    _ce("ignore_index_is_a_class", (7, 9), ignore=3, ignore_frac=0.0),
    _ce("ignore_index_positive_none", (7, 9), "none", ignore=3),
    _ce("smoothing_one", (5, 17), eps=1.0, weight=True),
    _ce("rank1", (23,), ignore_frac=0.0),
    _ce("rank1_none", (23,), "none", ignore_frac=0.0),
    _ce("transposed_logits", (9, 5), weight=True, transform=lambda t: t.t().contiguous().t()),
    _ce("strided_logits", (4, 26), eps=0.2, transform=lambda t: t[:, ::2]),
    _ce("row_strided_logits", (6, 40), "sum", transform=lambda t: t[:, 3:30]),
    _ce("empty_batch_mean", (0, 5)),
    _ce("empty_batch_sum", (0, 5), "sum"),
    _ce("empty_batch_none", (0, 5), "none"),
    _ce("poisoned_tail", (5, 77), weight=True, eps=0.1, transform=poison_tail),
    _ce("inplace_rank1", (19,), "sum", ignore_frac=0.0, inplace=True),
    # (no smoothing: torch's fp16 sum of 50257 log-probabilities overflows)
    _ce("gpt2_vocab", (3, 50257), large=True),
    _ce("llama_vocab_plus1", (4, 32001), "sum", weight=True, large=True),
    _ce("many_rows", (1031, 67), large=True),
    Case("cross_entropy", "nan_inf_rows", _special_rows, LF.cross_entropy, F.cross_entropy),
    Case("cross_entropy", "probability_targets", _prob_targets, LF.cross_entropy,
         F.cross_entropy),
]  # fmt: skip


# ------------------------------------------------------------------ linear + cross-entropy


def _torch_linear_ce(h, w, t, b=None, class_weight=None, ignore_index=IGNORE, reduction="mean",
                     label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None):  # fmt: skip
    """The definition: full logits, optional soft-cap, torch's cross-entropy, plus the z-loss
    on the rows not ignored (reduced as the loss)."""
    if class_weight is not None:  # the fp64 oracle: torch wants the weights in h's dtype
        class_weight = class_weight.to(h.dtype)
    z = F.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    kw = dict(weight=class_weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss == 0.0:
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), reduction=reduction,
                               **kw).reshape(t.shape if reduction == "none" else ())  # fmt: skip
    zf, tf = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    ce = F.cross_entropy(zf, tf, reduction="none", **kw)
    valid = tf != ignore_index
    lse = torch.logsumexp(zf.float() if zf.dtype != torch.float64 else zf, -1)
    rows = ce + (z_loss * lse * lse * valid).to(ce.dtype)
    if reduction == "none":
        return rows.reshape(t.shape)
    if reduction == "sum":
        return rows.sum()
    denom = valid.sum() if class_weight is None else class_weight[tf.clamp(min=0)][valid].sum()
    return rows.sum() / denom


def _lce(name, tokens, hidden, vocab, bias=True, reduction="mean", class_weight=False, **kw):
    def make(dtype, device, gen):
        h = _logits((*tokens, hidden), dtype, device, gen, scale=1.0)
        w = _logits((vocab, hidden), dtype, device, gen, scale=hidden**-0.5)
        t = _targets(tokens, vocab, device, gen)
        args = (h, w, t) + ((_logits((vocab,), dtype, device, gen, 0.5),) if bias else ())
        kwargs = dict(reduction=reduction, **kw)
        if class_weight:
            kwargs["class_weight"] = (torch.rand(vocab, generator=gen, device=device) + 0.5).to(
                dtype
            )
        return args, kwargs

    return Case("linear_cross_entropy", name, make, LF.linear_cross_entropy, _torch_linear_ce)


_LCE = [
    _lce("mean", (13,), 16, 37),
    _lce("mean_chunked", (13,), 16, 37, chunk_size=4),
    _lce("sum_chunked_no_bias", (2, 7), 24, 129, bias=False, reduction="sum", chunk_size=5),
    _lce("none_chunked", (11,), 16, 50, reduction="none", chunk_size=3),
    _lce("weights_smoothing", (9,), 8, 33, class_weight=True, label_smoothing=0.2, chunk_size=4),
    _lce("z_loss", (9,), 8, 33, z_loss=1e-2, chunk_size=4),
    _lce("softcap", (9,), 8, 33, softcap=3.0, chunk_size=2),
    _lce("softcap_z_loss_none", (9,), 8, 33, reduction="none", softcap=5.0, z_loss=1e-3),
    _lce("vocab_2049", (5,), 8, 2049, chunk_size=2),
]

register(*_CE, *_LCE)
