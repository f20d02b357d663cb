"""lmkernels under torch.distributed: DTensor sharding rules for the registered ops, and the
vocabulary-parallel cross-entropy and embedding.

**Sharding rules.** DTensor runs a custom op only where a sharding rule tells it which input
placements the op accepts and what the outputs' placements are. The rules here say that the
row-wise ops work shard by shard along any dimension except the one they reduce over:

* ``norm_fwd`` / ``norm_bwd`` (layer_norm, rms_norm and the fused residual variants): rows
  sharded (``Shard`` of a leading dimension, also the strided shard DTensor makes when a
  sequence-sharded activation is flattened), parameters replicated; the weight and bias
  gradients come out ``Partial`` (each rank's sum over its rows).
* ``softmax_fwd`` / ``softmax_bwd`` (softmax, log_softmax, scaled_masked_softmax): any dimension
  but ``dim``; with ``causal=True`` not the query dimension either (the mask depends on the
  global query index); a mask is sharded like the dimension it broadcasts over.
* ``embedding_fwd`` / ``embedding_bwd``: indices sharded (weight replicated; the weight gradient
  ``Partial``) or the embedding dimension sharded (indices replicated).

A placement that shards the reduced dimension raises :class:`ShardingError` naming the op and
the placement, instead of a silent all-gather of the whole activation: redistribute explicitly
(``x.redistribute(mesh, [Replicate()])``) if that is what you want. ``Partial`` inputs are
reduced by DTensor first, as for torch's own ops.

The rules are registered when ``torch.distributed.tensor`` is imported (before or after
lmkernels), so lmkernels itself does not pay DTensor's import time.

**Vocabulary parallelism.** Two cases need collectives inside the op, so they are handled in
:mod:`lmkernels.functional` before any rule is consulted:

* ``cross_entropy`` on logits whose class dimension is sharded: each rank computes its classes'
  logsumexp, target logit and (label smoothing) logit sum, one all-gather combines them, and
  the backward needs no communication (:func:`vocab_parallel_cross_entropy`).
* ``embedding`` of a weight sharded over its rows (the vocabulary): each rank looks up the
  indices that fall in its rows, writes zeros for the others, and returns a ``Partial``
  DTensor whose pending sum is the full lookup (:func:`vocab_parallel_embedding` for plain
  process groups, which all-reduces itself).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch
import torch.distributed as dist
from torch import Tensor

from lmkernels.ops import cross_entropy as _ce_ops
from lmkernels.ops import softmax as _softmax_ops

_DTENSOR = "torch.distributed.tensor"


class ShardingError(NotImplementedError):
    """A DTensor placement an lmkernels op cannot compute on (the message names both). A
    NotImplementedError, which DTensor's dispatcher passes on as it is."""


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing DTensor when nothing has)."""
    mod = sys.modules.get(_DTENSOR)
    return mod is not None and isinstance(t, mod.DTensor)


def replicate_like(t: Tensor, like) -> object:
    """``t`` (the same on every rank) as a DTensor replicated over ``like``'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


# ------------------------------------------------------------------------- sharding rules

_registered = False


def register_sharding_rules() -> None:
    """Register the DTensor sharding rules of lmkernels' ops (idempotent; see the module doc)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.lmkernels
    register_sharding(ops.norm_fwd.default)(_norm_fwd_rule)
    register_sharding(ops.norm_bwd.default)(_norm_bwd_rule)
    register_sharding(ops.softmax_fwd.default)(_softmax_fwd_rule)
    register_sharding(ops.softmax_bwd.default)(_softmax_bwd_rule)
    register_sharding(ops.embedding_fwd.default)(_embedding_fwd_rule)
    register_sharding(ops.embedding_bwd.default)(_embedding_bwd_rule)
    register_sharding(ops.attention_fwd.default)(_attention_fwd_rule)
    register_sharding(ops.attention_bwd.default)(_attention_bwd_rule)
    register_sharding([ops.rotary.default, ops.rotary_bwd.default])(_rotary_rule)
    register_sharding(ops.rotary_.default)(_rotary_inplace_rule)
    for name, why in _REPLICATED_ONLY.items():
        op = getattr(ops, name).default
        register_sharding(op)(_replicated_only(name, why, len(op._schema.returns)))
    _registered = True


def _placement_types():
    from torch.distributed.tensor import Partial, Replicate

    return Partial, Replicate


def _is_shard(p, dims=None) -> bool:
    """Whether ``p`` is a Shard or a strided shard (which is not a Shard subclass and whose
    is_shard() is False) of one of ``dims`` (of any dim when None)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(p, (Shard, _StridedShard)) and (dims is None or p.dim in dims)


def _shards(spec) -> list:
    """The distinct Shard placements (strided ones included) among ``spec``'s mesh dims."""
    out = []
    for p in spec.placements:
        if _is_shard(p) and p not in out:
            out.append(p)
    return out


def _opt(t, p):
    """``p``, the placement of an optional tensor argument ``t``; None where ``t`` is None."""
    return None if t is None else p


def _refuse(op: str, arg: str, spec, why: str) -> None:
    raise ShardingError(
        f"lmkernels {op}: {arg} has placements {tuple(spec.placements)}, which {why}; "
        f"redistribute it first (for example to Replicate() on that mesh dim)"
    )


def _check_not_sharded(op: str, arg: str, spec, dims: set[int], why: str) -> None:
    if any(_is_shard(p, dims) for p in spec.placements):
        _refuse(op, arg, spec, why)


def _norm_fwd_rule(x, residual, weight, bias, eps, rms):
    _, R = _placement_types()
    _check_not_sharded("layer_norm/rms_norm", "input (as rows x normalized)", x, {1},
                       "shards the normalized dims")  # fmt: skip
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and any(_is_shard(q) for q in p.placements):
            _refuse("layer_norm/rms_norm", name, p, "shards a parameter of the normalized dims")
    params = [_opt(weight, R()), _opt(bias, R()), None, None]
    rules = [([R(), R(), R(), R()], [R(), _opt(residual, R()), *params])]
    for s in _shards(x):
        if s.dim == 0:  # h is empty without a residual, mean with rms
            outs = [s, _opt(residual, s) or R(), R() if rms else s, s]
            rules.append((outs, [s, _opt(residual, s), *params]))
    return rules


def _norm_bwd_rule(dy, dh_out, h, weight, mean, rstd, rms, need_dw, need_db):
    P, R = _placement_types()
    _check_not_sharded("layer_norm/rms_norm backward", "grad (as rows x normalized)", dy, {1},
                       "shards the normalized dims")  # fmt: skip
    rules = [([R(), R(), R()], [R(), _opt(dh_out, R()), R(), _opt(weight, R()), R(), R(),
                                None, None, None])]  # fmt: skip
    for s in _shards(dy):
        if s.dim == 0:
            rules.append((
                [s, P() if need_dw else R(), P() if need_db else R()],
                [s, _opt(dh_out, s), s, _opt(weight, R()), R() if rms else s, s, None, None, None],
            ))  # fmt: skip
    return rules


def _softmax_row_shards(op, x, dim, causal):
    reduced = {dim % x.ndim} | ({x.ndim - 2} if causal and x.ndim >= 2 else set())
    why = "shards the softmax dim" if not causal else "shards the softmax or the query dim"
    _check_not_sharded(op, "input", x, reduced, why)
    return [s for s in _shards(x) if s.dim not in reduced]


def _softmax_fwd_rule(x, dim, scale, log, mask, causal):
    _, R = _placement_types()
    rules = [([R()], [R(), None, None, None, R() if mask is not None else None, None])]
    for s in _softmax_row_shards("softmax", x, dim, causal):
        m = None if mask is None else _broadcast_placement(mask, x, s)
        if mask is None or m is not None:
            rules.append(([s], [s, None, None, None, m, None]))
    return rules


def _softmax_bwd_rule(y, dy, dim, scale, log):
    _, R = _placement_types()
    rules = [([R()], [R(), R(), None, None, None])]
    for s in _softmax_row_shards("softmax backward", dy, dim, False):
        rules.append(([s], [s, s, None, None, None]))
    return rules


def _embedding_fwd_rule(weight, idx, padding_idx, scale_grad_by_freq):
    _, R = _placement_types()
    if any(_is_shard(p, {0}) for p in weight.placements):
        _refuse(
            "embedding",
            "weight",
            weight,
            "shards the rows (the vocabulary) and reached the "
            "op directly; lmkernels.functional.embedding serves it by a masked lookup",
        )
    rules = [([R()], [R(), R(), None, None])]
    rules += [([s], [R(), s, None, None]) for s in _shards(idx)]
    rules += [([s], [s, R(), None, None]) for s in _shards(weight) if s.dim == 1]
    return rules


def _embedding_bwd_rule(dy, idx, num_embeddings, padding_idx, scale_grad_by_freq,
                        grad_scale=1.0):  # fmt: skip
    P, R = _placement_types()
    rules = [([R()], [R(), R(), None, None, None, None])]
    row_shards = [s for s in _shards(idx)]
    if row_shards and scale_grad_by_freq:
        _refuse(
            "embedding backward",
            "input",
            idx,
            "shards the indices, but scale_grad_by_freq needs every index's global count",
        )
    rules += [([P()], [s, s, None, None, None, None]) for s in row_shards]
    rules += [([s], [s, R(), None, None, None, None]) for s in _shards(dy) if s.dim == 1]
    return rules


def _attention_shards(op, q, k, v, mask, dropout_p, varlen):
    """The placements attention can keep: batch (dim 0) and heads (dim 1, when every rank gets
    whole groups of query heads with their key/value head)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_not_sharded(op, name, t, {2, 3}, "shards the sequence or the head dim (no ring "
                           "attention here)")  # fmt: skip
    shards = []
    for t in (q, k, v):
        for m, p in enumerate(t.placements):
            if not _is_shard(p):
                continue
            if dropout_p > 0:
                _refuse(op, "query", t, "shards attention with dropout (every shard would draw "
                        "the same random bits)")  # fmt: skip
            if p.dim == 0 and varlen:
                _refuse(op, "query", t, "shards a packed variable-length batch")
            if p.dim == 1 and k.shape[1] % t.mesh.size(m):
                _refuse(op, "key", k, f"shards {k.shape[1]} key/value heads over "
                        f"{t.mesh.size(m)} ranks unevenly")  # fmt: skip
            if p not in shards:
                shards.append(p)
    return shards


def _attention_tail(cu_q, cu_k, seed) -> list:
    """The placements of the arguments after the mask: scale, window_left / right, bottom_right,
    the replicated cu_seqlens, max_q / max_k, dropout_p and the replicated seed."""
    _, R = _placement_types()
    return [None] * 4 + [_opt(cu_q, R()), _opt(cu_k, R()), None, None, None, _opt(seed, R())]


def _attention_fwd_rule(q, k, v, mask, scale, window_left, window_right, bottom_right, cu_q,
                        cu_k, max_q, max_k, dropout_p, seed):  # fmt: skip
    _, R = _placement_types()
    tail = _attention_tail(cu_q, cu_k, seed)
    rules = [([R(), R()], [R(), R(), R(), _opt(mask, R()), *tail])]
    for s in _attention_shards("attention", q, k, v, mask, dropout_p, cu_q is not None):
        m = None if mask is None else (s if mask.shape[s.dim] == q.shape[s.dim] else R())
        rules.append(([s, s], [s, s, s, m, *tail]))
    return rules


def _attention_bwd_rule(dout, q, k, v, out, lse, mask, scale, window_left, window_right,
                        bottom_right, cu_q, cu_k, max_q, max_k, dropout_p, seed):  # fmt: skip
    _, R = _placement_types()
    tail = _attention_tail(cu_q, cu_k, seed)
    rules = [([R(), R(), R()], [R()] * 6 + [_opt(mask, R()), *tail])]
    for s in _attention_shards("attention backward", q, k, v, mask, dropout_p, cu_q is not None):
        m = None if mask is None else (s if mask.shape[s.dim] == q.shape[s.dim] else R())
        rules.append(([s, s, s], [s] * 6 + [m, *tail]))
    return rules


def _rotary_rule(x, cos, sin, interleaved):
    _, R = _placement_types()
    _check_not_sharded("apply_rotary", "input", x, {x.ndim - 1}, "shards the rotary dim")
    rules = [([R()], [R(), R(), R(), None])]
    for s in _shards(x):
        tables = [_broadcast_placement(t, x, s) for t in (cos, sin)]
        if None not in tables:
            rules.append(([s], [s, *tables, None]))
    return rules


def _rotary_inplace_rule(x, cos, sin, interleaved):
    return [([], ins) for _, ins in _rotary_rule(x, cos, sin, interleaved)]


def _broadcast_placement(t, x, s):
    """The placement of ``t`` (broadcast to ``x``, right-aligned) when ``x`` has shard ``s``:
    sharded the same way along the matching dim, replicated where ``t`` broadcasts; None if
    ``s`` is a strided shard over a dim ``t`` has in full."""
    _, R = _placement_types()
    d = s.dim - (x.ndim - t.ndim)
    if d < 0 or t.shape[d] == 1:
        return R()
    return type(s)(d) if type(s).__name__ == "Shard" else None


# ops whose sharded forms are served elsewhere or not at all: replicated inputs only
_REPLICATED_ONLY = {
    "cross_entropy_fwd": "is served by lmkernels.functional.cross_entropy (vocabulary-parallel "
    "on a sharded class dim)",
    "cross_entropy_bwd": "is served by lmkernels.functional.cross_entropy",
    "linear_cross_entropy_fwd": "is not supported by linear_cross_entropy (no vocabulary-"
    "parallel fused head yet: shard the logits' class dim and use cross_entropy)",
    "linear_cross_entropy_bwd": "is not supported by linear_cross_entropy",
    "token_pos_fwd": "is not supported by token_positional_embedding (use embedding)",
}


def _replicated_only(name: str, why: str, outputs: int):
    def rule(*args, **kwargs):
        from torch.distributed.tensor._dtensor_spec import DTensorSpec

        _, R = _placement_types()
        specs = [a if isinstance(a, DTensorSpec) else None for a in (*args, *kwargs.values())]
        for i, spec in enumerate(specs):
            if spec is not None and any(_is_shard(p) for p in spec.placements):
                _refuse(name, f"argument {i}", spec, f"is sharded, which {why}")
        return [([R()] * outputs, [None if spec is None else R() for spec in specs])]

    return rule


# ----------------------------------------------------------------- import hook for DTensor


class _AfterDTensorImport(importlib.abc.MetaPathFinder):
    """Registers the rules right after ``torch.distributed.tensor`` is first imported."""

    def find_spec(self, name, path, target=None):
        if name != _DTENSOR:
            return None
        sys.meta_path.remove(self)  # find the real module without coming back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register_sharding_rules()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register the rules now if DTensor is imported, else as soon as it is."""
    if not dist.is_available():
        return
    if _DTENSOR in sys.modules:
        register_sharding_rules()
    elif not any(isinstance(f, _AfterDTensorImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDTensorImport())


# -------------------------------------------------------------- vocabulary-parallel loss


def _all_gather(t: Tensor, group) -> Tensor:
    """(world, *t.shape): every rank's ``t``, in group rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _local_lse(logits: Tensor, at: Tensor, x_at: Tensor) -> Tensor:
    """logsumexp of each row of ``logits`` (accumulation dtype) by lmkernels' cross-entropy
    kernel: with a valid class ``at`` of each row, whose logit is ``x_at``, the row's loss is
    lse - x_at; one read of the logits without a temporary."""
    with torch.no_grad():
        return _ce_ops.cross_entropy_rows(logits, at, None, -1, 0.0, 0.0, 0.0, "none") + x_at


def _local_probs(logits: Tensor, local_lse: Tensor, lse: Tensor, acc: torch.dtype) -> Tensor:
    """exp(logits - lse) in the accumulation dtype: lmkernels' softmax of the rank's classes
    rescaled from their own normaliser ``local_lse`` to the global one (fp32 / fp64 logits;
    16-bit ones are widened first, so the gradient is rounded once)."""
    if logits.dtype != acc:
        return torch.exp(logits.to(acc) - lse[:, None])
    with torch.no_grad():
        p = _softmax_ops.softmax(logits, 1, 1.0, False, None, False)
    return p.mul_(torch.exp(local_lse - lse)[:, None])


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, start, classes, group, ignore, eps, reduction):
        acc = _ce_ops.acc_dtype(logits.dtype)
        n, local = logits.shape
        valid = target != ignore
        at = target - start
        here = valid & (at >= 0) & (at < local)
        at = torch.where(here, at, 0)
        w_local = None if weight is None else weight[start : start + local]
        if local:
            x_t = logits.gather(1, at[:, None])[:, 0].to(acc)
            stats = [_local_lse(logits, at, x_t), torch.where(here, x_t, 0)]
        else:  # no classes on this rank
            stats = [logits.new_full((n,), -torch.inf, dtype=acc), logits.new_zeros(n, dtype=acc)]
        if eps:
            stats.append(logits.sum(1, dtype=acc) if w_local is None else logits.to(acc) @ w_local)
        parts = _all_gather(torch.stack(stats), group)  # (world, k, n)
        lse = torch.logsumexp(parts[:, 0], 0)
        x_t = parts[:, 1].sum(0)
        w_t = valid.to(acc) if weight is None else torch.where(valid, weight[target * valid], 0)
        loss = (1 - eps) * w_t * (lse - x_t)
        w_sum = float(classes) if weight is None else weight.sum()
        if eps:
            loss = loss + (eps / classes) * torch.where(valid, w_sum * lse - parts[:, 2].sum(0), 0)
        denom = _ce_ops.mean_denominator(target, weight, ignore, acc)
        ctx.save_for_backward(logits, stats[0], lse, w_t, at, here, valid, denom, w_local)
        ctx.args = (eps, classes, w_sum, reduction)
        return _ce_ops.reduce_rows(loss, reduction, denom)

    @staticmethod
    def backward(ctx, dloss):
        logits, local_lse, lse, w_t, at, here, valid, denom, w_local = ctx.saved_tensors
        eps, classes, w_sum, reduction = ctx.args
        acc = lse.dtype
        scale = dloss.to(acc).expand(lse.shape)
        if reduction == "mean":
            scale = scale / denom
        scale = torch.where(valid, scale, 0)  # (and so 0 for ignored rows, whatever denom is)
        if not logits.shape[1]:
            return torch.zeros_like(logits), *[None] * 8
        grad = _local_probs(logits, local_lse, lse, acc)
        grad *= (scale * ((1 - eps) * w_t + (eps / classes) * w_sum))[:, None]
        hit = (scale * (1 - eps) * w_t * here)[:, None]
        grad.scatter_add_(1, at[:, None], -hit)
        if eps:
            w = torch.ones(1, dtype=acc, device=grad.device) if w_local is None else w_local
            grad -= (scale * (eps / classes))[:, None] * w[None, :]
        return grad.to(logits.dtype), None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    vocab_start: int,
    vocab_size: int,
    group=None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``cross_entropy`` of logits whose classes are split over the ranks of ``group``.

    ``logits``: (N, V_local), this rank's classes ``[vocab_start, vocab_start + V_local)`` of
    ``vocab_size``; ``target``: (N,) global class indices, the same on every rank; ``weight``:
    the full (vocab_size,) class weights or None. Returns the loss of ``torch.nn.functional.
    cross_entropy`` on the concatenated logits (the same value on every rank) with gradients
    for this rank's logits. One all-gather of (2 or 3, N) floats in the forward; none in the
    backward. The loss has the accumulation dtype (fp32; fp64 for fp64 logits)."""
    fn = "vocab_parallel_cross_entropy"
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be (N, V_local), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{fn}: target must have shape ({logits.shape[0]},), got "
                         f"{tuple(target.shape)}")  # fmt: skip
    if not 0 <= vocab_start <= vocab_start + logits.shape[1] <= vocab_size:
        raise ValueError(f"{fn}: classes [{vocab_start}, {vocab_start + logits.shape[1]}) are "
                         f"not within the vocabulary of {vocab_size}")  # fmt: skip
    if reduction not in _ce_ops.REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_ce_ops.REDUCTIONS}, got {reduction!r}")
    if weight is not None and tuple(weight.shape) != (vocab_size,):
        raise ValueError(f"{fn}: weight must have shape ({vocab_size},), got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    target = target.long()
    _ce_ops.check_targets(target, vocab_size, ignore_index)  # same on every rank: no hang
    acc = _ce_ops.acc_dtype(logits.dtype)
    weight = None if weight is None else weight.to(acc)
    return _VocabParallelCE.apply(
        logits,
        target,
        weight,
        int(vocab_start),
        int(vocab_size),
        group,
        int(ignore_index),
        float(label_smoothing),
        reduction,
    )


def _chunk_start(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of chunk ``index`` of ``size`` split as torch.chunk (DTensor's Shard)."""
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(step, size - start)


def _class_shard(op: str, arg: str, t, dim: int) -> tuple[int, int, int]:
    """(mesh dim, start, length) of a DTensor sharded over ``dim`` on exactly one mesh dim and
    replicated on the others; ShardingError otherwise."""
    found = []
    for m, p in enumerate(t.placements):
        if p.is_shard() and p.dim == dim and type(p).__name__ == "Shard":
            found.append(m)
        elif not p.is_replicate():
            _refuse(op, arg, t, f"has {p} on mesh dim {m} (supported: Shard({dim}) on one mesh "
                    "dim, Replicate() on the others)")  # fmt: skip
    if len(found) != 1:
        _refuse(op, arg, t, f"shards dim {dim} on {len(found)} mesh dims (supported: one)")
    mesh = t.device_mesh
    start, length = _chunk_start(t.shape[dim], mesh.size(found[0]), mesh.get_local_rank(found[0]))
    if t.to_local().shape[dim] != length:
        _refuse(op, arg, t, "is not split as Shard() splits (torch.chunk)")
    return found[0], start, length


def _replicated_local(op: str, arg: str, t):
    """The local tensor of a replicated DTensor (a plain tensor as it is)."""
    if t is None or not is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        _refuse(op, arg, t, "is not replicated (the other operand's sharding needs it whole)")
    return t.to_local()


def dtensor_cross_entropy(input, target, weight, ignore_index, reduction, eps):
    """cross_entropy of a DTensor ``input`` (lmkernels.functional.cross_entropy's arguments,
    checked): vocabulary-parallel when the class dim is sharded, local when replicated."""
    from torch.distributed.tensor import DTensor, Replicate

    from lmkernels import functional

    op, cdim = "cross_entropy", 0 if input.dim() == 1 else 1
    mesh = input.device_mesh
    target = _replicated_local(op, "target", target)
    weight = _replicated_local(op, "weight", weight)
    if all(p.is_replicate() for p in input.placements):
        out = functional.cross_entropy(input.to_local(), target, weight, None, ignore_index, None,
                                       reduction, eps)  # fmt: skip
    else:
        m, start, _ = _class_shard(op, "input", input, cdim)
        local = input.to_local()
        rows = local.unsqueeze(0) if local.dim() == 1 else local.movedim(1, -1)
        rows = rows.reshape(-1, local.shape[cdim])
        t = target.reshape(-1)
        out = vocab_parallel_cross_entropy(rows, t, start, input.shape[cdim], mesh.get_group(m),
                                           weight, ignore_index, reduction, eps)  # fmt: skip
        if reduction == "none":
            out = out.reshape(target.shape)
        if not (input.dtype in (torch.float16, torch.bfloat16)
                and torch.is_autocast_enabled(local.device.type)):  # fmt: skip
            out = out.to(input.dtype)
    return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)


# ------------------------------------------------------------ vocabulary-parallel embedding


def _masked_lookup(ids, weight, start, padding_idx, max_norm, norm_type):
    """This rank's part of ``full_weight[ids]``: its rows' lookups, zeros elsewhere."""
    from lmkernels import functional

    local = weight.shape[0]
    at = ids - start
    here = (at >= 0) & (at < local)
    at = torch.where(here, at, 0)
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, at[here].contiguous(), max_norm, norm_type)
    pad = None
    if padding_idx is not None and 0 <= padding_idx - start < local:
        pad = padding_idx - start
    out = functional.embedding(at, weight, pad)
    return torch.where(here[..., None], out, 0)


def vocab_parallel_embedding(
    input: Tensor,
    weight: Tensor,
    vocab_start: int,
    vocab_size: int,
    group=None,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
) -> Tensor:
    """``embedding(input, full_weight)`` where this rank holds rows ``[vocab_start, vocab_start +
    len(weight))`` of the ``vocab_size``-row table and ``input`` is the same on every rank:
    a masked lookup of this rank's rows, then an all-reduce (sum) over ``group``. The weight
    gradient is this rank's rows'. ``padding_idx`` and ``max_norm`` as torch's (global row
    numbers)."""
    fn = "vocab_parallel_embedding"
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D, got shape {tuple(weight.shape)}")
    if not 0 <= vocab_start <= vocab_start + weight.shape[0] <= vocab_size:
        raise ValueError(f"{fn}: rows [{vocab_start}, {vocab_start + weight.shape[0]}) are not "
                         f"within the vocabulary of {vocab_size}")  # fmt: skip
    _check_ids(fn, input, vocab_size)
    pad = None if padding_idx is None else padding_idx % vocab_size
    part = _masked_lookup(input, weight, vocab_start, pad, max_norm, norm_type)
    return _AllReduceSum.apply(part, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each rank's part is the output's gradient (which is
    the same on every rank when the output feeds the same computation everywhere)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _check_ids(fn: str, ids: Tensor, rows: int) -> None:
    bad = (ids < 0) | (ids >= rows)
    if ids.numel() and bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise IndexError(f"{fn}: index {int(ids.reshape(-1)[i])} (at position {i} of the "
                         f"flattened input) is out of range for {rows} rows")  # fmt: skip


def dtensor_embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq):
    """embedding with a DTensor ``weight`` sharded over its rows on one mesh dim: the masked
    lookup, returned as a DTensor that is Partial (pending sum) on that mesh dim."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    op = "embedding"
    if scale_grad_by_freq:
        _refuse(op, "weight", weight, "shards the rows, but scale_grad_by_freq needs every "
                "index's count over the whole table")  # fmt: skip
    m, start, _ = _class_shard(op, "weight", weight, 0)
    ids = _replicated_local(op, "input", input)
    _check_ids("lmkernels.functional.embedding", ids, weight.shape[0])
    pad = None if padding_idx is None else padding_idx % weight.shape[0]
    part = _masked_lookup(ids, weight.to_local(), start, pad, max_norm, norm_type)
    mesh = weight.device_mesh
    placements = [Partial() if i == m else Replicate() for i in range(mesh.ndim)]
    return DTensor.from_local(part, mesh, placements, run_check=False)
