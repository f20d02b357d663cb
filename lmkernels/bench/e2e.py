"""End-to-end benchmark: one training step (forward, backward, AdamW step) of the example GPT
(:class:`lmkernels.models.GPT`, plain torch modules), as written (``torch``), after
:func:`lmkernels.patch` (``lmkernels``), and each under ``torch.compile``.

    python -m lmkernels.bench e2e [--quick] [--device cpu|cuda] [--reps N] [--out DIR]

Every provider starts from the same weights and trains on the same random batch; the steps are
timed round-robin in one process (CPU; CUDA: events around single steps after warm-up), and the
peak memory is that of one step beyond the model, its gradients and the optimizer state held
before it. Results: ``e2e.json`` and ``e2e.md`` in ``--out``, with tokens/s, the ratio to the
unpatched eager model, and the losses after the timed steps (patched and unpatched models must
agree: a provider whose loss differs by more than 1e-3 relative is reported as FAILED).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

import lmkernels
from lmkernels.bench.timing import keep_freed_memory, peak_memory, time_all
from lmkernels.models import GPT, GPTConfig

CONFIGS = {
    # a GPT-2-style block stack at a size this 2-core CPU trains in about a second per step
    "gpt-d256-l4-v16k-t256": (
        GPTConfig(vocab=16384, context=256, d_model=256, heads=4, layers=4),
        8,
    ),  # fmt: skip
    "gpt-d256-l4-v32k-t1024": (
        GPTConfig(vocab=32000, context=1024, d_model=256, heads=4, layers=4),
        2,
    ),  # fmt: skip
}
QUICK = {"gpt-d64-l2-v1k-t64": (GPTConfig(vocab=1024, context=64, d_model=64, heads=2,
                                          layers=2), 4)}  # fmt: skip
PROVIDERS = ("torch", "lmkernels", "torch.compile", "lmkernels+compile")


def _step_fn(model, batch, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, targets = batch
    losses = []

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(ids, targets)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    step()  # creates the gradients and the optimizer state (held before every timed step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return step, losses


def run_config(name, cfg, batch_size, device, reps, providers=PROVIDERS) -> list[dict]:
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (batch_size, cfg.context), generator=gen).to(device)
    targets = torch.randint(0, cfg.vocab, (batch_size, cfg.context), generator=gen).to(device)
    steps, losses, rows = {}, {}, []
    for p in providers:
        model = copy.deepcopy(base)
        if p.startswith("lmkernels"):
            lmkernels.patch(model)
        if p.endswith("compile"):
            model = torch.compile(model)
        steps[p], losses[p] = _step_fn(model, (ids, targets), device)
    peaks = {p: peak_memory(fn, device) for p, fn in steps.items()}
    timings = time_all(steps, device, reps)
    tokens = batch_size * cfg.context
    ref = timings["torch"].median_ms if "torch" in timings else None
    # every provider has run the same number of steps on the same batch from the same weights
    n = min(len(v) for v in losses.values())
    base_loss = float(losses["torch"][n - 1]) if "torch" in losses else None
    for p in providers:
        t = timings[p]
        loss = float(losses[p][n - 1])
        ok = base_loss is None or abs(loss - base_loss) <= 1e-3 * abs(base_loss)
        rows.append(dict(
            config=name, provider=p, batch=batch_size, tokens=tokens, steps_checked=n,
            median_s=t.median_ms / 1e3, p20_s=t.p20_ms / 1e3, p80_s=t.p80_ms / 1e3,
            tokens_per_s=tokens / (t.median_ms / 1e3),
            vs_torch=(ref / t.median_ms) if ref else None, peak_mib=_mib(peaks[p][0]),
            peak_method=peaks[p][1], loss=loss, status="ok" if ok else "FAILED",
            model=asdict(cfg)))  # fmt: skip
    base_peak = next((r["peak_mib"] for r in rows if r["provider"] == "torch"), None)
    for r in rows:
        r["peak_vs_torch"] = (r["peak_mib"] / base_peak) if base_peak and r["peak_mib"] else None
    return rows


def _mib(b):
    return None if b is None else b / 2**20


def write(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / "e2e.json"
    js.write_text(json.dumps(dict(meta, results=rows), indent=1))
    lines = [
        "# lmkernels end-to-end benchmark: one GPT training step",
        "",
        f"- {meta['created']}, device `{meta['device']}`, torch {meta['torch']}, {meta['machine']}",
        "- model: `lmkernels.models.GPT` (plain torch modules); step: forward, backward, "
        "AdamW; `lmkernels` = after `lmkernels.patch(model)`",
        "- tokens/s from the median step time (p20-p80 in brackets); peak MiB held by one "
        "step beyond the weights, gradients and optimizer state; `vs torch` = ratio to the "
        "unpatched eager model (tokens/s up, memory down is better)",
        "",
        "| config | provider | median s | tokens/s | vs torch | peak MiB | peak vs torch "
        "| loss | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['vs_torch']:.2f}x" if r["vs_torch"] else ""
        pk = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        pv = f"{r['peak_vs_torch']:.2f}" if r["peak_vs_torch"] else ""
        lines.append(f"| {r['config']} | {r['provider']} | {r['median_s']:.3f} "
                     f"({r['p20_s']:.3f}-{r['p80_s']:.3f}) | {r['tokens_per_s']:.0f} | {vs} "
                     f"| {pk} | {pv} | {r['loss']:.5f} | {r['status']} |")  # fmt: skip
    md = out / "e2e.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmkernels.bench e2e",
                                 description="One GPT training step, patched vs not.")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a tiny model, 3 repetitions")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per provider (CPU)")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"a subset of {','.join(PROVIDERS)}")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2]
                    / "benchmarks" / "results" / "e2e")  # fmt: skip
    a = ap.parse_args(argv)
    providers = tuple(p.strip() for p in a.providers.split(",") if p.strip())
    bad = set(providers) - set(PROVIDERS)
    if bad:
        raise SystemExit(f"--providers: unknown {sorted(bad)} (expected some of {PROVIDERS})")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()
    t0 = time.time()
    rows = []
    for name, (cfg, bs) in (QUICK if a.quick else CONFIGS).items():
        rows += run_config(name, cfg, bs, device, a.reps or (3 if a.quick else 7), providers)
    meta = dict(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), elapsed_s=round(time.time() - t0),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, machine=f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} torch threads")  # fmt: skip
    for p in write(rows, meta, a.out):
        print(f"  {p}")
    print(open(a.out / "e2e.md").read())
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0
