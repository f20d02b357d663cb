"""A patched model trains under PyTorch's own distributed engines as it does in one process.

Each test spawns 2 CPU ranks joined by gloo on loopback (``lmkernels.testing.run_ranks``) and
trains a small ``lmkernels.models.GPT`` for a few SGD steps, every rank on its half of the
global batch, under DistributedDataParallel or FSDP2 (``fully_shard`` per transformer block and
at the root), in fp32, in bf16 mixed precision, and under ``torch.compile``. Every rank also
trains the single-process references on the whole global batch itself (no extra process).
Checks:

* fp32: losses (all-reduced mean) and final parameters equal those of the patched model trained
  in one process up to the all-reduce's summation order (tight); the unpatched model run the
  same distributed way equals the unpatched single-process run equally tightly (the harness
  itself is right); against unpatched torch in one process within test_patch.py's tolerances;
  and against the fp64 single-process run within the project's 2x rule
  (:func:`lmkernels.testing.assert_accurate`: twice the error of unpatched torch run the very
  same way, plus a few ulps).
* bf16 mixed precision (DDP under CPU autocast, FSDP2 with ``MixedPrecisionPolicy``): the error
  against the fp32 single-process run at most twice that of unpatched torch run the same way
  (same engine, same precision), plus one bf16 ulp of the compared quantity.
* ``torch.compile`` (aot_eager; DDP compiled whole, FSDP2 per block before sharding and at
  the root), fp32: the fp32 checks above; lmkernels' forward ops are inside the compiled
  graphs, which are no more than unpatched torch's (lmkernels adds no graph break); with DDP
  the graph was split into subgraphs at the gradient buckets (dynamo's DDPOptimizer).

The same init on every run: the model is built after the same seed; all ranks then hold equal
weights, as DDP and FSDP2 require.

Why SGD (with momentum) and not AdamW: the parameters stay a smooth function of the gradients,
so a gradient off by any factor (say summed instead of averaged over ranks) shows; Adam's first
steps are nearly ``lr * sign(g)`` and hide a scale, and they turn the rounding noise of
gradients that are 0 in exact arithmetic into whole steps of ``lr`` (measured here with AdamW:
DDP against one process differs by 4e-4 in the parameters, for plain torch as for lmkernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import lmkernels
from lmkernels.models import GPT, GPTConfig
from lmkernels.testing import assert_accurate, run_ranks

CFG = GPTConfig(vocab=64, context=16, d_model=32, heads=2, layers=2)
# Compiled DDP: a model above 1 MiB of parameters, so that DDP's first gradient bucket (fixed
# at 1 MiB) is not the only one and dynamo's DDPOptimizer splits the graph at the buckets.
CFG_BUCKETS = GPTConfig(vocab=64, context=16, d_model=128, heads=2, layers=2)
BATCH, STEPS, LR = 4, 3, 0.5  # the global batch; every rank trains on BATCH // world rows

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


# ----------------------------------------------------------------------------- training runs


@dataclass
class Run:
    losses: torch.Tensor  # (STEPS,) fp64: the mean loss over the global batch at each step
    params: dict[str, torch.Tensor]  # name -> the full final parameter, fp64


def _batches(cfg: GPTConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of arithmetic sequences mod vocab (learnable: the loss falls)."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randint(0, cfg.vocab, (STEPS, BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (STEPS, BATCH, 1), generator=gen)
    ids = (start + stride * torch.arange(cfg.context + 1)) % cfg.vocab
    return [(w[:, :-1], w[:, 1:]) for w in ids]


def _model(cfg: GPTConfig, patched: bool, dtype=torch.float32) -> GPT:
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    model = GPT(cfg)
    if patched:
        report = lmkernels.patch(model)
        assert len(report.replaced) == 2 + 3 * cfg.layers + 2 and not report.left, report
    return model.to(dtype)


def _full(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "full_tensor"):  # an FSDP2 (DTensor) shard: all-gather the whole parameter
        p = p.full_tensor()
    return p.detach().to(torch.float64).clone()


def _train(model, net, cfg, rank=0, world=1, autocast=False) -> Run:
    """SGD steps of ``model`` through ``net`` (the model itself, or its DDP / compiled wrapper).
    With world > 1 each rank takes its own rows of the global batch, and the loss reported
    is the mean over ranks: the global mean, as the halves have equal token counts."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    per = BATCH // world
    losses = []
    for x, y in _batches(cfg):
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = net(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().to(torch.float64)  # (the fp64 run's losses stay fp64)
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    # (a compiled block's parameters are under _orig_mod)
    params = {n.replace("_orig_mod.", ""): _full(p) for n, p in model.named_parameters()}
    return Run(torch.tensor(losses, dtype=torch.float64), params)


def _single(cfg, patched, dtype=torch.float32) -> Run:
    model = _model(cfg, patched, dtype)
    return _train(model, model, cfg)


def _ddp(rank, world, cfg, patched, autocast=False, compile_backend=None) -> Run:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(cfg, patched)
    net = DDP(model, bucket_cap_mb=1)  # the smallest cap DDPOptimizer allows (the 1st bucket)
    if compile_backend is not None:
        torch._dynamo.reset()
        net = torch.compile(net, backend=compile_backend)
    return _train(model, net, cfg, rank, world, autocast=autocast)


def _fsdp2(rank, world, cfg, patched, bf16=False, compile_backend=None) -> Run:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compile_backend is not None:
        torch._dynamo.reset()
    model = _model(cfg, patched)
    kw = {"mesh": init_device_mesh("cpu", (world,))}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)  # fmt: skip
    for i, block in enumerate(model.blocks.layers):
        if compile_backend is not None:
            # each block compiled before it is sharded (as torchtitan does): FSDP2's hooks then
            # run around the compiled block. Compiling only the sharded root breaks the graph at
            # every block's hook, and dynamo resumes the frames of torch.nn modules (here
            # TransformerEncoderLayer.forward) eagerly: the blocks would not be compiled.
            block = model.blocks.layers[i] = torch.compile(block, backend=compile_backend)
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    net = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    return _train(model, net, cfg, rank, world)


# ------------------------------------------------------------------------------------ checks


def _diff(a: Run, b: Run) -> tuple[float, float]:
    """Max abs difference of the losses and of the parameters."""
    return (float((a.losses - b.losses).abs().max()),
            max(float((a.params[n] - p).abs().max()) for n, p in b.params.items()))  # fmt: skip


def _assert_same(ours: Run, ref: Run, what: str, rtol=1e-5, atol=1e-6, params_rtol=None,
                 params_atol=None) -> None:  # fmt: skip
    torch.testing.assert_close(ours.losses, ref.losses, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}, losses: {m}")  # fmt: skip
    assert ours.params.keys() == ref.params.keys()
    for n, p in ref.params.items():
        torch.testing.assert_close(ours.params[n], p, rtol=params_rtol or rtol,
                                   atol=params_atol or atol,
                                   msg=lambda m, n=n: f"{what}, {n}: {m}")  # fmt: skip


def _assert_trained(run: Run, init: dict[str, torch.Tensor], what: str) -> None:
    """Every parameter moved and the losses are finite: a run whose gradients never arrived
    would otherwise agree with another such run."""
    assert torch.isfinite(run.losses).all(), f"{what}: losses {run.losses.tolist()}"
    still = [n for n, p in run.params.items() if torch.equal(p, init[n])]
    assert not still, f"{what}: parameters unchanged by training: {still}"


def _assert_accurate(ours: Run, torch_run: Run, oracle: Run, init, dtype, what: str) -> None:
    """The project's 2x rule (lmkernels.testing.assert_accurate) on the losses and on each
    parameter's update ``p - p0``: the floor scales with the update, not the parameter
    (a LayerNorm weight near 1 would otherwise get a floor larger than its whole update)."""
    assert_accurate(ours.losses, torch_run.losses, oracle.losses, dtype, f"{what}, losses")
    for n, p0 in init.items():
        assert_accurate(ours.params[n] - p0, torch_run.params[n] - p0, oracle.params[n] - p0,
                        dtype, f"{what}, {n}")  # fmt: skip


def _errors(ours: Run, torch_run: Run, oracle: Run) -> str:
    e, b = _diff(ours, oracle), _diff(torch_run, oracle)
    return (f"error loss/params: lmkernels {e[0]:.2e}/{e[1]:.2e}, "
            f"torch {b[0]:.2e}/{b[1]:.2e}")  # fmt: skip


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def _fp32_checks(rank, what, ours, torch_run, cfg, init, oracle32=None, oracle64=None):
    """The fp32 checks of one distributed setup (see the module doc)."""
    patched32 = _single(cfg, True)
    oracle32 = oracle32 or _single(cfg, False)
    oracle64 = oracle64 or _single(cfg, False, torch.float64)
    _assert_trained(ours, init, what)
    d_p, d_t = _diff(ours, patched32), _diff(torch_run, oracle32)
    _say(rank, f"{what}: vs patched single process {d_p[0]:.2e}/{d_p[1]:.2e} (torch vs torch "
               f"{d_t[0]:.2e}/{d_t[1]:.2e}); vs torch single process "
               f"{_diff(ours, oracle32)[0]:.2e}/{_diff(ours, oracle32)[1]:.2e}; fp64 "
               f"{_errors(ours, torch_run, oracle64)}")  # fmt: skip
    _assert_same(ours, patched32, f"{what} vs patched, one process")
    _assert_same(torch_run, oracle32, f"{what} (torch) vs torch, one process")
    _assert_same(ours, oracle32, f"{what} vs torch, one process", params_rtol=1e-4,
                 params_atol=1e-5)  # fmt: skip
    _assert_accurate(ours, torch_run, oracle64, init, torch.float32, f"{what} vs fp64")


# ---------------------------------------------------------------------- spawned rank bodies


def _engine_ranks(rank: int, world: int, engine: str, train, low: dict, low_name: str) -> None:
    """fp32 checks, then bf16 ones (``train(..., **low)``), of one engine (_ddp or _fsdp2)."""
    init = {n: p.detach().double() for n, p in _model(CFG, False).named_parameters()}
    oracle32 = _single(CFG, False)
    ours, torch_run = train(rank, world, CFG, True), train(rank, world, CFG, False)
    _fp32_checks(rank, f"{engine} fp32", ours, torch_run, CFG, init, oracle32=oracle32)

    what = f"{engine} {low_name}"
    ours, torch_run = (train(rank, world, CFG, p, **low) for p in (True, False))
    _assert_trained(ours, init, what)
    _say(rank, f"{what} vs fp32 one process: {_errors(ours, torch_run, oracle32)}")
    _assert_accurate(ours, torch_run, oracle32, init, torch.bfloat16, what)


def _ddp_ranks(rank: int, world: int) -> None:
    _engine_ranks(rank, world, "DDP", _ddp, {"autocast": True}, "bf16 autocast")


def _fsdp2_ranks(rank: int, world: int) -> None:
    _engine_ranks(rank, world, "FSDP2", _fsdp2, {"bf16": True}, "bf16 (fp32 reduce)")


def _compiled_ranks(rank: int, world: int) -> None:
    # aot_eager: dynamo + AOT autograd over lmkernels' registered ops (fake tensors, the
    # registered autograd) and DDP's graph splitting, without inductor's C++ compile, which
    # took ~20 s per model here (2 cores) against ~1.5 s for aot_eager.
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    counts = {}

    def check_graphs(what: str, patched: bool) -> None:
        """The patched model's graphs hold lmkernels' four forward ops (the unpatched none),
        and there are as many as the unpatched model's: lmkernels adds no graph break."""
        ops = {str(n.target) for gm in graphs for n in gm.graph.nodes}
        ops = {t.split(".")[1] for t in ops if t.startswith("lmkernels.")}
        want = {"embedding_fwd", "norm_fwd", "attention_fwd", "cross_entropy_fwd"}
        want = want if patched else set()
        assert ops == want, f"{what}: lmkernels ops in the compiled graphs {ops}, expected {want}"
        _say(rank, f"{what} (patched={patched}): {len(graphs)} graphs, lmkernels ops {sorted(ops)}")
        counts[what, patched] = len(graphs)
        if not patched:
            assert counts[what, True] == len(graphs), f"{what}: graphs {counts}"
        graphs.clear()

    init = {n: p.detach().double() for n, p in _model(CFG_BUCKETS, False).named_parameters()}
    runs = []
    for patched in (True, False):
        runs.append(_ddp(rank, world, CFG_BUCKETS, patched, compile_backend=counting_aot_eager))
        assert len(graphs) >= 2, f"DDPOptimizer made {len(graphs)} graph(s), expected a split"
        check_graphs("compiled DDP", patched)
    _fp32_checks(rank, "compiled DDP fp32", *runs, CFG_BUCKETS, init)

    init = {n: p.detach().double() for n, p in _model(CFG, False).named_parameters()}
    runs = []
    for patched in (True, False):
        runs.append(_fsdp2(rank, world, CFG, patched, compile_backend=counting_aot_eager))
        check_graphs("compiled FSDP2", patched)
    _fp32_checks(rank, "compiled FSDP2 fp32", *runs, CFG, init)


# ------------------------------------------------------------------------------------- tests


def _need_fsdp2() -> None:
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(
            f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}"
        )


def test_ddp_matches_single_process():
    """DDP, fp32 and bf16 autocast."""
    run_ranks(_ddp_ranks)


def test_fsdp2_matches_single_process():
    """FSDP2 (per block and root), fp32 and bf16 parameters with fp32 gradient reduction."""
    _need_fsdp2()
    run_ranks(_fsdp2_ranks)


def test_compiled_ddp_and_fsdp2_match_single_process():
    """torch.compile (aot_eager) of DDP and of FSDP2, fp32."""
    _need_fsdp2()
    run_ranks(_compiled_ranks)
