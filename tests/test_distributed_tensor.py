"""lmkernels ops on DTensors (2 gloo ranks on CPU): the sharding rules of the row-wise ops, the
vocabulary-parallel cross-entropy and embedding, and the error for an unsupported placement.

Every check compares the sharded run (``full_tensor()`` of values and gradients) with the
same function on the whole, unsharded tensors in the same process: lmkernels itself for the
row-wise ops (whose rows are independent, so values and input gradients must be bitwise
equal), torch for the vocabulary-parallel ops (which compute differently). Each spawned
function runs a list of checks and reports every failure at once (a spawn costs seconds).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import lmkernels.functional as LF
from lmkernels import distributed as lmkdist
from lmkernels.testing import run_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _checks(rank, checks):
    failed = []
    for check in checks:
        torch.manual_seed(0)
        try:
            check(rank)
        except Exception as e:  # noqa: BLE001  (collected, re-raised below)
            failed.append(f"{check.__name__}: {type(e).__name__}: {e}")
    if failed:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(failed))


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


def _dt(t, placements, grad=True):
    from torch.distributed.tensor import distribute_tensor

    d = distribute_tensor(t.detach(), _mesh(), placements)
    return d.requires_grad_(grad) if t.is_floating_point() else d


def _plain(t, grad=True):
    t = t.detach().clone()
    return t.requires_grad_(grad) if t.is_floating_point() else t


def _full(t):
    return t.full_tensor() if lmkdist.is_dtensor(t) else t


def _expect(rank, ok, what):
    if not ok:
        raise AssertionError(what)


# -------------------------------------------------------------------------- row-wise rules


def check_norms_shard_rows(rank):
    from torch.distributed.tensor import Replicate, Shard

    for fn, params in ((LF.layer_norm, 2), (LF.rms_norm, 1)):
        for dim in (0, 1):  # batch rows; sequence rows (a strided shard once flattened)
            x = torch.randn(2, 6, 8)
            ps = [torch.randn(8) for _ in range(params)]
            dy = torch.randn(2, 6, 8)
            xd, pd = _dt(x, [Shard(dim)]), [_dt(p, [Replicate()]) for p in ps]
            xp, pp = _plain(x), [_plain(p) for p in ps]
            yd, yp = fn(xd, (8,), *pd), fn(xp, (8,), *pp)
            _expect(rank, yd.placements == (Shard(dim),), f"{fn.__name__}: {yd.placements}")
            yd.backward(_dt(dy, [Shard(dim)], False))
            yp.backward(dy)
            name = f"{fn.__name__} Shard({dim})"
            _expect(rank, torch.equal(yd.full_tensor(), yp), f"{name}: values differ")
            _expect(rank, torch.equal(xd.grad.full_tensor(), xp.grad), f"{name}: dx differs")
            for a, b in zip(pd, pp, strict=True):
                torch.testing.assert_close(_full(a.grad), b.grad, rtol=1e-6, atol=1e-6)


def check_add_norm_shard_rows(rank):
    from torch.distributed.tensor import Replicate, Shard

    x, r, w = torch.randn(4, 3, 8), torch.randn(4, 3, 8), torch.randn(8)
    xd, rd, wd = _dt(x, [Shard(0)]), _dt(r, [Shard(0)]), _dt(w, [Replicate()])
    xp, rp, wp = _plain(x), _plain(r), _plain(w)
    yd, hd = LF.add_rms_norm(xd, rd, (8,), wd)
    yp, hp = LF.add_rms_norm(xp, rp, (8,), wp)
    (yd * 2 + hd).sum().backward()
    (yp * 2 + hp).sum().backward()
    for a, b, name in ((yd, yp, "y"), (hd, hp, "h"), (xd.grad, xp.grad, "dx"),
                       (rd.grad, rp.grad, "dresidual")):  # fmt: skip
        _expect(rank, torch.equal(a.full_tensor(), b), f"add_rms_norm: {name} differs")
    torch.testing.assert_close(_full(wd.grad), wp.grad, rtol=1e-6, atol=1e-6)


def check_softmax_shard_rows(rank):
    from torch.distributed.tensor import Replicate, Shard

    x, dy = torch.randn(4, 3, 5, 7), torch.randn(4, 3, 5, 7)
    mask = torch.rand(4, 1, 5, 7) < 0.3
    cases = [
        (lambda t, m: LF.softmax(t, dim=-1), Shard(0), None),
        (lambda t, m: LF.log_softmax(t, dim=2), Shard(3), None),
        (lambda t, m: LF.scaled_masked_softmax(t, m, 0.5, causal=True), Shard(1), Replicate()),
        (lambda t, m: LF.scaled_masked_softmax(t, m, 0.5, causal=True), Shard(0), Shard(0)),
    ]
    for i, (f, place, mplace) in enumerate(cases):
        xd, xp = _dt(x, [place]), _plain(x)
        md = None if mplace is None else _dt(mask, [mplace])
        yd, yp = f(xd, md), f(xp, mask)
        _expect(rank, yd.placements == (place,), f"softmax case {i}: {yd.placements}")
        yd.backward(_dt(dy, [place], False))
        yp.backward(dy)
        _expect(rank, torch.equal(yd.full_tensor(), yp), f"softmax case {i}: values differ")
        _expect(rank, torch.equal(xd.grad.full_tensor(), xp.grad), f"softmax case {i}: dx")


def check_unsupported_placements(rank):
    from torch.distributed.tensor import Replicate, Shard

    x, y = torch.randn(4, 6, 8), torch.randn(2, 2, 4, 8)
    cases = [
        (lambda: LF.layer_norm(_dt(x, [Shard(2)]), (8,)), "layer_norm", "normalized dims"),
        (lambda: LF.softmax(_dt(x, [Shard(1)]), dim=1), "softmax", "Shard(dim=1)"),
        (lambda: LF.scaled_masked_softmax(_dt(x, [Shard(1)]), causal=True), "softmax",
         "Shard(dim=1)"),
        (lambda: LF.cross_entropy(_dt(x[:, :, 0], [Shard(0)]), torch.zeros(4, dtype=torch.long)),
         "cross_entropy", "Shard(dim=0)"),
        (lambda: LF.embedding(torch.tensor([1, 2]), _dt(x[0], [Shard(0)]),
                              scale_grad_by_freq=True), "embedding", "scale_grad_by_freq"),
        (lambda: LF.embedding(_dt(torch.tensor([1, 2]), [Shard(0)]), _dt(x[0], [Shard(0)])),
         "embedding", "input"),
        (lambda: LF.layer_norm(_dt(x, [Shard(0)]), (8,), _dt(torch.ones(8), [Shard(0)])),
         "layer_norm", "weight"),
        (lambda: LF.scaled_dot_product_attention(*[_dt(q, [Shard(2)]) for q in (y, y, y)]),
         "attention", "sequence"),
        (lambda: LF.scaled_dot_product_attention(_dt(y, [Shard(1)]), _dt(y[:, :1], [Shard(1)]),
                                                 _dt(y[:, :1], [Shard(1)]), enable_gqa=True),
         "attention", "unevenly"),
        (lambda: LF.scaled_dot_product_attention(*[_dt(q, [Shard(0)]) for q in (y, y, y)],
                                                 dropout_p=0.5), "attention", "dropout"),
        (lambda: LF.apply_rotary(_dt(x, [Shard(2)]), _dt(x[0], [Replicate()], False),
                                 _dt(x[0], [Replicate()], False)), "apply_rotary", "rotary dim"),
        (lambda: LF.linear_cross_entropy(_dt(x[0], [Replicate()]), _dt(x[:, 0], [Shard(0)]),
                                         _dt(torch.zeros(6, dtype=torch.long), [Replicate()])),
         "linear_cross_entropy", "vocabulary"),
    ]  # fmt: skip
    for i, (call, op, text) in enumerate(cases):
        try:
            call()
        except lmkdist.ShardingError as e:
            msg = str(e)
            _expect(rank, op in msg and text in msg, f"case {i}: message {msg!r}")
        else:
            raise AssertionError(f"unsupported case {i} ({op}) did not raise ShardingError")


# -------------------------------------------------------------------- vocabulary parallel


def check_vocab_parallel_cross_entropy(rank):
    from torch.distributed.tensor import Replicate, Shard

    for vocab in (10, 7):  # even and uneven splits
        x = torch.randn(12, vocab) * 3
        t = torch.randint(0, vocab, (12,))
        t[[2, 7]] = -100
        w = torch.rand(vocab) + 0.5
        for reduction in ("mean", "sum", "none"):
            for eps, weight in ((0.0, None), (0.1, None), (0.2, w)):
                xd, xp = _dt(x, [Shard(1)]), _plain(x)
                wd = None if weight is None else _dt(weight, [Replicate()], False)
                ld = LF.cross_entropy(xd, t, wd, reduction=reduction, label_smoothing=eps)
                lp = F.cross_entropy(xp, t, weight, reduction=reduction, label_smoothing=eps)
                name = f"V={vocab} {reduction} eps={eps} weight={weight is not None}"
                _expect(rank, ld.placements == (Replicate(),), f"{name}: {ld.placements}")
                torch.testing.assert_close(ld.full_tensor(), lp.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"{n}: loss: {m}")  # fmt: skip
                g = torch.randn(lp.shape)
                ld.backward(_dt(g, [Replicate()], False))
                lp.backward(g)
                torch.testing.assert_close(xd.grad.full_tensor(), xp.grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"{n}: grad: {m}")  # fmt: skip
    # a 3-D input (N, C, d) and a target out of range (the same IndexError as unsharded)
    x, t = torch.randn(3, 6, 4), torch.randint(0, 6, (3, 4))
    xd, xp = _dt(x, [Shard(1)]), _plain(x)
    LF.cross_entropy(xd, t).backward()
    F.cross_entropy(xp, t).backward()
    torch.testing.assert_close(xd.grad.full_tensor(), xp.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(IndexError, match="target 6"):
        LF.cross_entropy(_dt(x, [Shard(1)]), torch.full((3, 4), 6))


def check_vocab_parallel_embedding(rank):
    from torch.distributed.tensor import Partial, Replicate, Shard

    for vocab in (10, 7):
        w = torch.randn(vocab, 4)
        ids = torch.randint(0, vocab, (3, 5))
        ids[0, :3] = torch.tensor([0, vocab - 1, 3])
        dy = torch.randn(3, 5, 4)
        for pad in (None, 3, vocab - 1):
            wd, wp = _dt(w, [Shard(0)]), _plain(w)
            od, op = LF.embedding(ids, wd, pad), F.embedding(ids, wp, pad)
            _expect(rank, od.placements == (Partial(),), f"V={vocab}: {od.placements}")
            full = od.redistribute(od.device_mesh, [Replicate()])
            _expect(rank, torch.equal(full.to_local(), op), f"V={vocab} pad={pad}: values")
            full.backward(_dt(dy, [Replicate()], False))
            op.backward(dy)
            torch.testing.assert_close(wd.grad.full_tensor(), wp.grad, rtol=1e-6, atol=1e-6)
    # max_norm renormalises the looked-up rows of each shard in place, as torch does
    w = torch.randn(9, 4) * 3
    ids = torch.tensor([[1, 8, 4], [4, 0, 2]])
    wd, wp = _dt(w, [Shard(0)], False), w.clone()
    od = LF.embedding(ids, wd, max_norm=1.0)
    op = F.embedding(ids, wp, max_norm=1.0)
    torch.testing.assert_close(od.full_tensor(), op)
    torch.testing.assert_close(wd.full_tensor(), wp)
    # the plain process-group function: an all-reduced lookup, this rank's rows' gradient
    world = torch.distributed.get_world_size()
    w = torch.randn(11, 3)
    start, rows = lmkdist._chunk_start(11, world, rank)
    wl = w[start : start + rows].clone().requires_grad_()
    ids = torch.randint(0, 11, (6,))
    out = lmkdist.vocab_parallel_embedding(ids, wl, start, 11)
    _expect(rank, torch.equal(out, F.embedding(ids, w)), "vocab_parallel_embedding: values")
    out.sum().backward()
    ref = torch.zeros(11, 3).index_add_(0, ids, torch.ones(6, 3))[start : start + rows]
    _expect(rank, torch.equal(wl.grad, ref), "vocab_parallel_embedding: gradient")


def check_embedding_rules(rank):
    from torch.distributed.tensor import Replicate, Shard

    w, ids, dy = torch.randn(10, 6), torch.randint(0, 10, (4, 5)), torch.randn(4, 5, 6)
    for wplace, iplace, oplace in ((Replicate(), Shard(0), Shard(0)),
                                   (Shard(1), Replicate(), Shard(2))):  # fmt: skip
        wd, wp = _dt(w, [wplace]), _plain(w)
        od, op = LF.embedding(_dt(ids, [iplace]), wd), F.embedding(ids, wp)
        _expect(rank, od.placements == (oplace,), f"embedding {wplace}: {od.placements}")
        od.backward(_dt(dy, [oplace], False))
        op.backward(dy)
        _expect(rank, torch.equal(od.full_tensor(), op), f"embedding {wplace}: values")
        torch.testing.assert_close(wd.grad.full_tensor(), wp.grad, rtol=1e-6, atol=1e-6)


def check_attention_shard_heads(rank):
    from torch.distributed.tensor import Replicate, Shard

    cases = [  # (query heads, key/value heads, causal, placement, mask)
        (4, 4, True, Shard(1), False),
        (4, 2, False, Shard(1), True),  # grouped-query: whole groups per rank
        (2, 2, True, Shard(0), False),
        (2, 1, False, Shard(0), True),
    ]
    for hq, hk, causal, place, masked in cases:
        q, k, v = torch.randn(2, hq, 5, 8), torch.randn(2, hk, 7, 8), torch.randn(2, hk, 7, 4)
        mask = torch.rand(2, 1, 5, 7) < 0.7 if masked else None
        dy = torch.randn(2, hq, 5, 4)
        gqa = hq != hk
        dts = [_dt(t, [place]) for t in (q, k, v)]
        md = None
        if masked:
            md = _dt(mask, [place if place.dim == 0 else Replicate()])
        od = LF.scaled_dot_product_attention(*dts, md, is_causal=causal, enable_gqa=gqa)
        ps = [_plain(t) for t in (q, k, v)]
        op = LF.scaled_dot_product_attention(*ps, mask, is_causal=causal, enable_gqa=gqa)
        name = f"attention hq={hq} hk={hk} {place}"
        _expect(rank, od.placements == (place,), f"{name}: {od.placements}")
        od.backward(_dt(dy, [place], False))
        op.backward(dy)
        _expect(rank, torch.equal(od.full_tensor(), op), f"{name}: values differ")
        for a, b, g in zip(dts, ps, "qkv", strict=True):
            _expect(rank, torch.equal(a.grad.full_tensor(), b.grad), f"{name}: d{g} differs")


def check_rotary_rules(rank):
    from torch.distributed.tensor import Replicate, Shard

    x, dy = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 4, 8)  # (batch, seq, heads, head_dim)
    cos, sin = torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    for place, table in ((Shard(0), Replicate()), (Shard(2), Replicate()), (Shard(1), Shard(0))):
        xd, xp = _dt(x, [place]), _plain(x)
        cd, sd = _dt(cos, [table], False), _dt(sin, [table], False)
        yd, yp = LF.apply_rotary(xd, cd, sd), LF.apply_rotary(xp, cos, sin)
        _expect(rank, yd.placements == (place,), f"rotary {place}: {yd.placements}")
        yd.backward(_dt(dy, [place], False))
        yp.backward(dy)
        _expect(rank, torch.equal(yd.full_tensor(), yp), f"rotary {place}: values differ")
        _expect(rank, torch.equal(xd.grad.full_tensor(), xp.grad), f"rotary {place}: dx")
    xd = _dt(x, [Shard(1)], False)  # in place, sequence-sharded
    LF.apply_rotary(xd, _dt(cos, [Shard(0)], False), _dt(sin, [Shard(0)], False), inplace=True)
    _expect(rank, torch.equal(xd.full_tensor(), LF.apply_rotary(x, cos, sin)), "rotary_")


def check_two_dim_mesh(rank):
    """A (1, world) mesh: rules expanded over mesh dims; the loss's group is the second dim's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(
        "cpu", (1, torch.distributed.get_world_size()), mesh_dim_names=("dp", "tp")
    )
    x, w, t = torch.randn(6, 3, 8), torch.randn(8), torch.randint(0, 8, (6,))
    xd = distribute_tensor(x, mesh, [Replicate(), Shard(1)]).requires_grad_()
    wd = distribute_tensor(w, mesh, [Replicate(), Replicate()]).requires_grad_()
    xp, wp = _plain(x), _plain(w)
    yd, yp = LF.rms_norm(xd, (8,), wd), LF.rms_norm(xp, (8,), wp)
    _expect(rank, yd.placements == (Replicate(), Shard(1)), f"rms_norm: {yd.placements}")
    _expect(rank, torch.equal(yd.full_tensor(), yp), "rms_norm on a 2-D mesh: values differ")
    ld = LF.cross_entropy(yd[:, 0].redistribute(mesh, [Replicate(), Shard(1)]), t)
    lp = F.cross_entropy(yp[:, 0], t)
    ld.backward()
    lp.backward()
    torch.testing.assert_close(ld.full_tensor(), lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xd.grad.full_tensor(), xp.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wd.grad.full_tensor(), wp.grad, rtol=1e-5, atol=1e-6)


def _run_rules(rank, world):
    _checks(rank, [check_norms_shard_rows, check_add_norm_shard_rows, check_softmax_shard_rows,
                   check_embedding_rules, check_attention_shard_heads, check_rotary_rules,
                   check_two_dim_mesh, check_unsupported_placements])  # fmt: skip


class _TinyLM(torch.nn.Module):
    """Embedding, a pre-norm MLP block, a final norm, the vocabulary head and the loss."""

    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.norm2 = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, ids, targets):
        h = self.tok(ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        logits = self.head(self.norm2(h))
        return self.loss(logits.flatten(0, 1), targets.flatten())


def check_tensor_parallel_model(rank):
    """A patched model under torch's parallelize_module (Megatron-style tensor + sequence
    parallelism): row-sharded embedding, sequence-sharded norms, vocabulary-sharded loss. Loss
    and every parameter gradient equal the unsharded, unpatched model's."""
    import copy

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    import lmkernels

    plain = _TinyLM()
    model = copy.deepcopy(plain)
    report = lmkernels.patch(model)
    _expect(rank, len(report.replaced) == 4, str(report))  # tok, norm, norm2, loss
    parallelize_module(model, _mesh(), {
        "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                use_local_output=False),
    })  # fmt: skip
    ids, targets = torch.randint(0, 16, (2, 6)), torch.randint(0, 16, (2, 6))
    loss = model(ids, targets)
    ref = plain(ids, targets)
    torch.testing.assert_close(loss.full_tensor(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(_full(p.grad), q.grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def _run_vocab_parallel(rank, world):
    _checks(rank, [check_vocab_parallel_cross_entropy, check_vocab_parallel_embedding,
                   check_tensor_parallel_model])  # fmt: skip


def test_dtensor_sharding_rules():
    run_ranks(_run_rules)


def test_vocab_parallel():
    run_ranks(_run_vocab_parallel)


_EVERY_OP_HAS_A_RULE = """
import sys, torch, lmkernels
assert "torch.distributed.tensor" not in sys.modules, "lmkernels imported DTensor"
from torch.distributed.tensor import DTensor
rules = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lmkernels::")]
ops = [getattr(torch.ops.lmkernels, n.split("::")[1]).default for n in names]
missing = [str(op) for op in ops if op not in rules]
print(len(ops), "ops; without a rule:", missing)
"""


def test_every_op_has_a_rule_once_dtensor_is_imported():
    """lmkernels does not import DTensor; importing it later registers a rule (or a clear
    refusal) for every lmkernels op, so none fails with DTensor's bare 'no sharding strategy'."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _EVERY_OP_HAS_A_RULE], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    count = int(res.stdout.split()[0])
    assert count >= 15 and res.stdout.strip().endswith("without a rule: []"), res.stdout
