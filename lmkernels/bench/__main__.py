"""Benchmark CLI (``make bench`` runs it with no arguments).

    python -m lmkernels.bench [--ops PATTERNS] [--modes fwd,bwd,fwdbwd] [--dtypes fp32,bf16,...]
                              [--providers PATTERNS] [--shapes 4096x1024,...] [--quick]
                              [--reps N] [--out DIR] [--device cpu|cuda]
                              [--malloc keep|default] [--no-plots]
                              [--quiet] [--list]
    python -m lmkernels.bench compare OLD.json NEW.json [--threshold 0.1]
    python -m lmkernels.bench readme RESULTS.json [--readme README.md]
    python -m lmkernels.bench e2e [--quick] [--device cpu|cuda] [--reps N] [--out DIR]
    python -m lmkernels.bench dist [--world N] [--quick] [--reps N] [--out DIR]

Benches come from :mod:`lmkernels.bench.specs` (one module per op family; ``--list`` shows them
and their providers). Comma-separated PATTERNS are fnmatch globs; ``!pat`` excludes, e.g.
``--ops 'softmax,log_softmax'``, ``--ops 'softmax.*'`` (a whole family), ``--providers
'!torch.compile'`` (everything but compile), ``--providers 'lmkernels-*,torch'``.

Each (op, shape, dtype, mode) checks every provider against the fp32 reference first (a
provider that fails is reported FAILED and not timed), records its peak memory, then times the
passing providers interleaved with a same-size copy (CPU) or with ``triton.testing.do_bench``
(CUDA). Results go to ``--out`` (default ``benchmarks/results/``): ``results.json``,
``results.md`` and one PNG per op and mode. Unavailable providers are listed as skipped with
the reason. ``--quick`` runs the specs' small shapes with 5 repetitions.

``compare`` matches the rows of two ``results.json`` files and flags lmkernels speed-ups (vs
torch eager and vs torch.compile, ratios measured within one run) that fell by more than the
threshold and by more than the runs' timing noise (their p20-p80 bands); it exits with status
1 when any did.

``readme`` writes the README's performance table (between its ``bench-results`` markers) from
a ``results.json``: per op, dtype and lmkernels provider, the geometric means over the shapes,
with the machine and git revision of the run.

``e2e`` times one training step of the example GPT patched vs unpatched vs torch.compile
(:mod:`lmkernels.bench.e2e`); ``make bench`` runs it after the op benchmarks.

``dist`` times tensor-parallel ops on DTensors across spawned ranks, lmkernels vs torch's own
DTensor paths (:mod:`lmkernels.bench.dist`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _shapes(s: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in p.lower().split("x")) for p in _csv(s)]


def run_parser() -> argparse.ArgumentParser:
    from lmkernels.bench.spec import DTYPE_NAMES, MODES

    ap = argparse.ArgumentParser(
        prog="python -m lmkernels.bench", description="Benchmark lmkernels ops."
    )
    ap.add_argument("--ops", type=_csv, help="bench name globs (default: all)")
    ap.add_argument("--modes", type=_csv, help=f"subset of {','.join(MODES)} (default: all)")
    ap.add_argument("--dtypes", type=_csv, help=f"subset of {','.join(DTYPE_NAMES)}")
    ap.add_argument("--providers", type=_csv, help="provider name globs; !glob excludes")
    ap.add_argument("--shapes", type=_shapes, help="override the shapes, e.g. 4096x1024,16x8192")
    ap.add_argument("--quick", action="store_true", help="small shapes, 5 repetitions")
    ap.add_argument("--reps", type=int, help="timed repetitions per provider (CPU)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    ap.add_argument(
        "--malloc", choices=("keep", "default"), default="keep",
        help="CPU: keep freed memory in the process (default; see lmkernels.bench.timing) or "
        "leave glibc's defaults (outputs then page-fault on most calls)",
    )  # fmt: skip
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="list benches and providers, then exit")
    return ap


def compare_main(argv: list[str]) -> int:
    from lmkernels.bench.report import compare

    ap = argparse.ArgumentParser(prog="python -m lmkernels.bench compare")
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--threshold", type=float, default=0.1, help="relative drop flagged")
    a = ap.parse_args(argv)
    lines, worse = compare(json.loads(a.old.read_text()), json.loads(a.new.read_text()),
                           a.threshold)  # fmt: skip
    print("\n".join(lines))
    print(f"\n{worse} ratio(s) worse by more than {a.threshold:.0%} and the timing noise")
    return 1 if worse else 0


def readme_main(argv: list[str]) -> int:
    from lmkernels.bench.report import readme_section, update_readme

    ap = argparse.ArgumentParser(prog="python -m lmkernels.bench readme")
    ap.add_argument("results", type=Path, help="a results.json of `python -m lmkernels.bench`")
    ap.add_argument("--readme", type=Path, default=DEFAULT_OUT.parents[1] / "README.md")
    a = ap.parse_args(argv)
    doc = json.loads(a.results.read_text())
    try:
        source = a.results.resolve().relative_to(a.readme.resolve().parent)
    except ValueError:
        source = a.results
    try:
        update_readme(a.readme, readme_section(doc, str(source)))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"updated {a.readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["readme"]:
        return readme_main(argv[1:])
    if argv[:1] == ["e2e"]:
        from lmkernels.bench import e2e

        return e2e.main(argv[1:])
    if argv[:1] == ["dist"]:
        from lmkernels.bench import dist

        return dist.main(argv[1:])
    a = run_parser().parse_args(argv)

    from lmkernels.bench import report, runner, spec

    for d in a.dtypes or ():
        if d not in spec.DTYPE_NAMES:
            raise SystemExit(f"--dtypes: unknown {d!r} (expected one of {list(spec.DTYPE_NAMES)})")
    for m in a.modes or ():
        if m not in spec.MODES:
            raise SystemExit(f"--modes: unknown {m!r} (expected one of {list(spec.MODES)})")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    benches = runner.select(spec.discover(), a.ops)
    if not benches:
        raise SystemExit(f"--ops {a.ops} matches no bench (try --list)")
    if a.list:
        for b in benches:
            print(f"{b.family}.{b.name}: {len(b.sweep(device))} shapes, "
                  f"{','.join(map(spec.dtype_name, b.dtypes_on(device)))}")  # fmt: skip
            for p in b.providers(device):
                print(f"    {p.name:16s} {'skipped: ' + p.reason if p.reason else 'available'}")
        return 0
    cfg = runner.Config(
        ops=a.ops,
        modes=a.modes,
        dtypes=[spec.DTYPE_NAMES[d] for d in a.dtypes] if a.dtypes else None,
        providers=a.providers,
        shapes=a.shapes,
        quick=a.quick,
        reps=a.reps,
        malloc=a.malloc,
        device=device,
    )
    doc = runner.run(benches, cfg, progress=not a.quiet)
    paths, why = report.write_all(doc, a.out, plots=not a.no_plots)
    if why and not a.no_plots:
        print(why, file=sys.stderr)
    failed = sum(r["status"] == "FAILED" for r in doc["results"])
    print(f"{len(doc['results'])} measurements ({failed} FAILED) in {doc['elapsed_s']} s; wrote:")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
