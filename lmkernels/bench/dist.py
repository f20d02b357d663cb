"""Tensor-parallel ops across processes: lmkernels on DTensors vs torch's own DTensor paths.

    python -m lmkernels.bench dist [--world 2] [--reps 9] [--quick] [--out DIR]

Each case shards its inputs over a 1-D mesh of ``--world`` ranks (gloo on CPU, one thread per
rank; nccl when there are that many GPUs), checks that lmkernels and torch agree (values and
gradients, ``full_tensor()``), then times one forward + backward per provider, alternating
providers, with a barrier before and after each step (so a step's time is the slowest rank's,
communication included). Reported: median and p20/p80 over ``--reps`` steps, and
torch ÷ lmkernels (the speed-up). Results: ``dist.json`` and ``dist.md`` under ``--out``
(default ``benchmarks/results/dist/``).

Cases: vocabulary-parallel cross-entropy (torch: ``loss_parallel()``), the row-sharded
embedding (torch: DTensor's masked-partial embedding), LayerNorm on sequence-sharded rows and
attention sharded over heads (torch: DTensor's rules for its own ops).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmkernels.bench.timing import summarize

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dist"
PROVIDERS = ("lmkernels", "torch")


def _cases(quick: bool) -> list[tuple[str, str, object]]:
    """(name, shape text, make) where make(mesh, device) -> (params, {provider: step})."""
    n, v = (256, 4096) if quick else (2048, 32768)
    ev, ed, et = (4096, 256, 512) if quick else (32768, 1024, 4096)
    lb, ls, lh = (4, 64, 256) if quick else (16, 512, 1024)
    ab, ah, al = (1, 4, 128) if quick else (2, 16, 1024)
    return [
        ("cross_entropy vocab-parallel", f"{n}x{v}", lambda m, d: _ce(m, d, n, v)),
        ("embedding row-sharded", f"{et} ids, {ev}x{ed}", lambda m, d: _emb(m, d, ev, ed, et)),
        ("layer_norm sequence-sharded", f"{lb}x{ls}x{lh}", lambda m, d: _ln(m, d, lb, ls, lh)),
        ("attention heads-sharded causal", f"{ab}x{ah}x{al}x64",
         lambda m, d: _attn(m, d, ab, ah, al)),
    ]  # fmt: skip


def _leaf(t, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, mesh, placements).requires_grad_(t.is_floating_point())


def _ce(mesh, device, n, v):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import lmkernels.functional as LF

    x = _leaf(torch.randn(n, v, device=device), mesh, [Shard(1)])
    t = torch.randint(0, v, (n,), device=device)
    td = _leaf(t, mesh, [Replicate()])

    def ours():
        LF.cross_entropy(x, t).backward()

    def theirs():
        with loss_parallel():
            F.cross_entropy(x, td).backward()

    return [x], {"lmkernels": ours, "torch": theirs}


def _emb(mesh, device, rows, dim, tokens):
    from torch.distributed.tensor import Replicate, Shard

    import lmkernels.functional as LF

    w = _leaf(torch.randn(rows, dim, device=device), mesh, [Shard(0)])
    ids = torch.randint(0, rows, (tokens,), device=device)
    ids_d = _leaf(ids, mesh, [Replicate()])
    g = _leaf(torch.randn(tokens, dim, device=device), mesh, [Replicate()]).detach()

    def run(out):
        out.redistribute(mesh, [Replicate()]).backward(g)

    return [w], {"lmkernels": lambda: run(LF.embedding(ids, w)),
                 "torch": lambda: run(F.embedding(ids_d, w))}  # fmt: skip


def _ln(mesh, device, b, s, h):
    from torch.distributed.tensor import Replicate, Shard

    import lmkernels.functional as LF

    x = _leaf(torch.randn(b, s, h, device=device), mesh, [Shard(1)])
    w, bias = (_leaf(torch.randn(h, device=device), mesh, [Replicate()]) for _ in range(2))
    g = _leaf(torch.randn(b, s, h, device=device), mesh, [Shard(1)]).detach()
    return [x, w, bias], {
        "lmkernels": lambda: LF.layer_norm(x, (h,), w, bias).backward(g),
        "torch": lambda: F.layer_norm(x, (h,), w, bias).backward(g),
    }


def _attn(mesh, device, b, heads, length):
    from torch.distributed.tensor import Shard

    import lmkernels.functional as LF

    q, k, v = (_leaf(torch.randn(b, heads, length, 64, device=device), mesh, [Shard(1)])
               for _ in range(3))  # fmt: skip
    g = _leaf(torch.randn(b, heads, length, 64, device=device), mesh, [Shard(1)]).detach()
    return [q, k, v], {
        "lmkernels": lambda: LF.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g),
        "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g),
    }


def _grads(params):
    out = [p.grad.full_tensor().clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _rank_main(rank: int, world: int, quick: bool, reps: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world,))
    rows = []
    for name, shape, make in _cases(quick):
        torch.manual_seed(0)
        params, steps = make(mesh, device)
        row = {"case": name, "shape": shape, "world": world}
        got = {}
        for p, step in steps.items():  # correctness first: the gradients must agree
            try:
                step()
                got[p] = _grads(params)
            except Exception as e:  # noqa: BLE001  (reported in the table, not timed)
                row[p] = {"status": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"}
        if len(got) == 2:
            for a, b in zip(got["lmkernels"], got["torch"], strict=True):
                # fp32 sums over thousands of rows: the tolerance scales with the largest value
                scale = max(1.0, float(b.abs().max()))
                torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * scale)
        times = {p: [] for p in got}
        for _ in range(reps):
            for p in times:
                step = steps[p]
                dist.barrier()
                t0 = time.perf_counter()
                step()
                dist.barrier()
                times[p].append(time.perf_counter() - t0)
                for q in params:
                    q.grad = None
        for p, ts in times.items():
            t = summarize(ts)
            row[p] = {"status": "ok", "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                      "p80_ms": t.p80_ms}  # fmt: skip
        if len(times) == 2:
            row["speedup"] = row["torch"]["median_ms"] / row["lmkernels"]["median_ms"]
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def table(rows: list[dict]) -> str:
    lines = ["| case | shape | ranks | lmkernels ms (p20-p80) | torch ms (p20-p80) | "
             "torch ÷ lmkernels |", "|---|---|---|---|---|---|"]  # fmt: skip

    def cell(r):
        if r["status"] != "ok":
            return r["status"][:160]
        return f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})"

    for r in rows:
        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"| {r['case']} | {r['shape']} | {r['world']} | {cell(r['lmkernels'])} | "
                     f"{cell(r['torch'])} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from lmkernels.bench.roofline import git_revision, machine_info
    from lmkernels.testing import run_ranks

    ap = argparse.ArgumentParser(prog="python -m lmkernels.bench dist", description=__doc__)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repetitions")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    reps = 3 if a.quick else a.reps
    gpus = torch.cuda.device_count()
    backend = "nccl" if gpus >= a.world else "gloo"
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / "dist.rows.json"
    run_ranks(_rank_main, a.quick, reps, str(raw), world=a.world, backend=backend,
              timeout=3600)  # fmt: skip
    rows = json.loads(raw.read_text())
    raw.unlink()
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    meta = {"machine": machine_info(device), "git": git_revision(), "backend": backend,
            "reps": reps, "quick": a.quick}  # fmt: skip
    (a.out / "dist.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    rev = meta["git"].get("git_revision", "?")[:7]
    md = (f"Tensor-parallel ops on {a.world} ranks ({backend}), fwd+bwd per step, median of "
          f"{reps} steps; git {rev}\n\n{table(rows)}\n")  # fmt: skip
    (a.out / "dist.md").write_text(md)
    print(md)
    return 0 if all(r["lmkernels"]["status"] == "ok" for r in rows) else 1
