"""Reports of a benchmark run: ``results.json`` (everything), ``results.md`` (tables per op,
mode and dtype), PNG plots (time and fraction of the roofline per shape, one line per
provider), and the comparison of two ``results.json`` files.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

EAGER, COMPILE, COPY = "torch", "torch.compile", "copy"


def write_json(doc: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _groups(doc: dict) -> dict:
    """{bench: {mode: {dtype: [rows]}}} in first-seen order."""
    g: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in doc["results"]:
        g[r["bench"]][r["mode"]][r["dtype"]].append(r)
    return g


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"]))


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _md_row(r: dict, flops: bool = False) -> str:
    if r["status"] in ("ok", "roofline"):
        status = "" if r["status"] == "ok" else "roofline"
        cells = [
            _f(r.get("median_ms"), ".3f"),
            f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}" if "p20_ms" in r else "",
            *([_f(r.get("tflops"), ".3f")] if flops else []),
            _f(r.get("gbps"), ".1f"),
            _f(r.get("frac_roofline"), ".2f"),
            _f(r.get("peak_mib"), ".1f"),
            _f(r.get("speedup_vs_torch"), ".2f"),
            _f(r.get("speedup_vs_compile"), ".2f"),
            status,
        ]
    else:
        reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")
        cells = [""] * (8 if flops else 7) + [f"**{r['status']}**: {reason}"]
    return "| " + " | ".join([_shape(r), r["provider"], *cells]) + " |"


def markdown(doc: dict) -> str:
    m, roof = doc["machine"], doc["roofline"]
    lines = [
        "# lmkernels benchmark results",
        "",
        f"- created {doc['created']} in {doc['elapsed_s']} s; device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- CPU {m['cpu_model']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads,"
        f" capability {m['cpu_capability']}",
        f"- torch {m['torch']}, triton {m['triton']}, git {m.get('git_revision', 'unknown')}"
        + (" (dirty)" if m.get("git_dirty") else ""),
        f"- repetitions {doc['config']['reps']}{' (quick)' if doc['config']['quick'] else ''}",
    ]
    if "peers" in m:
        peers = [f"{k} {v}" if v else f"{k} (not installed)" for k, v in m["peers"].items()]
        lines.append("- peer libraries: " + ", ".join(peers))
    if m.get("malloc"):
        lines.append(f"- allocator: {m['malloc']}")
    load = m.get("loadavg_start")
    if load is not None and m["device"] == "cpu":
        busy = load > 0.5 * (m["cpu_count"] or 1)
        lines.append(
            f"- load average {load} at the start, {m.get('loadavg_end')} at the end"
            + (" — **the machine was busy: CPU times are noisy**" if busy else "")
        )
    if roof["kind"] == "copy":
        lines.append(
            "- bandwidth roofline: a same-size copy timed in the same run, interleaved with the "
            "providers (`of roof` = copy time / op time)"
        )
    else:
        peak = roof["peak_gbps"]
        lines.append(
            f"- bandwidth roofline: peak HBM bandwidth of {roof['device_key']}: "
            + (f"{peak:.0f} GB/s ({roof.get('gbps_source', 'vendor table')})" if peak
               else "unknown (no fraction reported)")
        )  # fmt: skip
    if roof.get("peak_tflops"):
        peaks = ", ".join(f"{d} {v:.3g}" for d, v in roof["peak_tflops"].items())
        lines.append(
            f"- FLOP roofline (ops with a FLOP model: `of roof` = TFLOP/s / peak): {peaks} "
            f"TFLOP/s ({roof['tflops_source']})"
        )
    lines += [
        "- times in ms: median and p20–p80; GB/s from the spec's byte model (TFLOP/s from its "
        "FLOP model, for compute-bound ops); peak MiB held "
        "during one call; `vs eager` / `vs compile` = that provider's median / ours",
        "",
    ]
    if doc["skipped_providers"]:
        lines += ["## Skipped providers", "", "| op | provider | reason |", "|---|---|---|"]
        for s in doc["skipped_providers"]:
            lines.append(f"| {s['bench']} | {s['provider']} | {s['reason']} |")
        lines.append("")
    for bench, modes in _groups(doc).items():
        lines += [f"## {bench}", ""]
        for mode, dtypes in modes.items():
            for dtype, rows in dtypes.items():
                flops = any("tflops" in r for r in rows)  # a compute-bound op's FLOP model
                head = (
                    "| shape | provider | median ms | p20–p80 ms | "
                    + ("TFLOP/s | " if flops else "")
                    + "GB/s | of roof | peak MiB | vs eager | vs compile | status |"
                )
                lines += [f"### {bench} · {mode} · {dtype}", "", head]
                lines += ["|" + "---|" * (11 if flops else 10)]
                lines += [_md_row(r, flops) for r in rows]
                lines.append("")
    return "\n".join(lines)


def write_markdown(doc: dict, out: Path) -> Path:
    path = out / "results.md"
    path.write_text(markdown(doc))
    return path


def write_plots(doc: dict, out: Path) -> tuple[list[Path], str | None]:
    """One PNG per (op, mode): time (top) and fraction of the roofline (bottom) per shape,
    a column per dtype, a line per provider. Returns (paths, why none were written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return [], f"plots skipped: matplotlib cannot be imported ({type(e).__name__}: {e})"
    paths = []
    for bench, modes in _groups(doc).items():
        for mode, dtypes in modes.items():
            fig, axes = plt.subplots(
                2, len(dtypes), figsize=(5.5 * len(dtypes), 7), squeeze=False, sharex="col"
            )
            for col, (dtype, rows) in enumerate(dtypes.items()):
                shapes = list(dict.fromkeys(_shape(r) for r in rows))
                by_provider = defaultdict(dict)
                for r in rows:
                    if "median_ms" in r:
                        by_provider[r["provider"]][_shape(r)] = r
                t_ax, f_ax = axes[0][col], axes[1][col]
                for prov, pts in by_provider.items():
                    xs = [i for i, s in enumerate(shapes) if s in pts]
                    style = "k--" if prov == COPY else "o-"
                    t_ax.plot(xs, [pts[shapes[i]]["median_ms"] for i in xs], style, label=prov)
                    if prov != COPY and all("frac_roofline" in pts[shapes[i]] for i in xs):
                        f_ax.plot(xs, [pts[shapes[i]]["frac_roofline"] for i in xs], "o-",
                                  label=prov)  # fmt: skip
                t_ax.set_yscale("log")
                t_ax.set_title(f"{bench} {mode} {dtype}")
                t_ax.set_ylabel("median time (ms)")
                f_ax.set_ylabel("fraction of roofline")
                f_ax.set_ylim(bottom=0)
                f_ax.set_xticks(range(len(shapes)))
                f_ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
                for ax in (t_ax, f_ax):
                    ax.grid(True, alpha=0.3)
                t_ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{bench}_{mode}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths, None


def write_all(doc: dict, out: Path, plots: bool = True) -> tuple[list[Path], str | None]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(doc, out), write_markdown(doc, out)]
    why = "plots skipped: --no-plots"
    if plots:
        pngs, why = write_plots(doc, out)
        paths += pngs
    return paths, why


# ---------------------------------------------------------------------------------- compare


def _spread(r: dict) -> float:
    """The relative half-width of a row's p20-p80 timing band (0 when unknown)."""
    if not r.get("median_ms") or "p20_ms" not in r:
        return 0.0
    return (r["p80_ms"] - r["p20_ms"]) / (2 * r["median_ms"])


def _ratio_noise(run: dict) -> dict:
    """{(key, ratio name): the noise of that lmkernels ratio in ``run``}: the relative spreads
    of the two timings it divides, added."""
    rows = {(r["bench"], r["mode"], r["dtype"], _shape(r), r["provider"]): r
            for r in run["results"]}  # fmt: skip
    out = {}
    for k, r in rows.items():
        for ratio, base in (("speedup_vs_torch", EAGER), ("speedup_vs_compile", COMPILE)):
            if ratio in r:
                out[(k, ratio)] = _spread(r) + _spread(rows.get((*k[:4], base), {}))
    return out


def compare(old: dict, new: dict, threshold: float = 0.1) -> tuple[list[str], int]:
    """Compare the speed-ups of lmkernels providers (vs eager and vs compile) between two runs.

    Ratios measured within one run are robust to machine drift, so they are what is compared.
    A ratio is flagged **worse** when it fell by more than ``threshold`` and by more than the
    noise of the two runs (the p20-p80 half-widths of the four timings behind the two ratios,
    added): a drop inside the timings' own spread is reported but not flagged. A provider that
    passed before and FAILED now is flagged too. Returns (report lines, number flagged).
    """

    def key(r):
        return (r["bench"], r["mode"], r["dtype"], _shape(r), r["provider"])

    before = {key(r): r for r in old["results"]}
    noise_old, noise_new = _ratio_noise(old), _ratio_noise(new)
    lines = ["| op | mode | dtype | shape | provider | ratio | old | new | change | noise |"]
    lines.append("|" + "---|" * 10)
    worse = 0
    for r in new["results"]:
        o = before.get(key(r))
        if o is None or not r["provider"].startswith("lmkernels-"):
            continue
        for ratio in ("speedup_vs_torch", "speedup_vs_compile"):
            if ratio in r and ratio in o:
                change = r[ratio] / o[ratio] - 1
                noise = noise_old.get((key(r), ratio), 0.0) + noise_new.get((key(r), ratio), 0.0)
                flag = ""
                if change < -threshold and -change > noise:
                    worse += 1
                    flag = " **worse**"
                elif change < -threshold:
                    flag = " (within noise)"
                lines.append(
                    f"| {' | '.join(map(str, key(r)))} | {ratio.removeprefix('speedup_')} "
                    f"| {o[ratio]:.2f} | {r[ratio]:.2f} | {change:+.0%}{flag} | ±{noise:.0%} |"
                )
        if r["status"] != o["status"]:
            worse += r["status"] == "FAILED"
            lines.append(
                f"| {' | '.join(map(str, key(r)))} | status | {o['status']} | {r['status']} | | |"
            )
    return lines, worse


# --------------------------------------------------------------------- the README's section

README_BEGIN = "<!-- bench-results:begin -->"
README_END = "<!-- bench-results:end -->"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def readme_section(doc: dict, source: str) -> str:
    """The README's performance table from a results document: per op, dtype and lmkernels
    provider, the geometric mean over the run's shapes of the speed-ups per mode and of the
    fraction of the roofline (fwd+bwd), with the machine and revision it was measured on."""
    m = doc["machine"]
    dev = m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")
    rev = m.get("git_revision", "unknown")[:10] + (" (dirty)" if m.get("git_dirty") else "")
    lines = [
        f"Generated by `python -m lmkernels.bench readme {source}` from the run of "
        f"{doc['created']}: device `{dev}`, CPU {m['cpu_model']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads), torch {m['torch']}, git {rev}, "
        f"{doc['config']['reps']} repetitions{' (quick)' if doc['config']['quick'] else ''}. "
        "Each cell is the geometric mean over the sweep's shapes of torch's time / ours "
        "(`vs eager`, `vs compile`; above 1 = lmkernels faster) or of ours' fraction of the "
        "roofline (bandwidth, or FLOP/s for attention and linear cross-entropy). Per-shape "
        "numbers: `results.md` beside the JSON.",
        "",
        "| op | dtype | provider | shapes | fwd vs eager | bwd vs eager | fwd+bwd vs eager "
        "| fwd+bwd vs compile | fwd+bwd of roof |",
        "|" + "---|" * 9,
    ]
    cells: dict = defaultdict(lambda: defaultdict(list))
    shapes: dict = defaultdict(set)
    for r in doc["results"]:
        if not r["provider"].startswith("lmkernels-") or r["status"] != "ok":
            continue
        k = (r["bench"], r["dtype"], r["provider"])
        shapes[k].add(_shape(r))
        for field in ("speedup_vs_torch", "speedup_vs_compile", "frac_roofline"):
            if field in r:
                cells[k][(r["mode"], field)].append(r[field])
    for k, c in cells.items():
        g = {key: _geomean(v) for key, v in c.items()}
        vals = [g.get(("fwd", "speedup_vs_torch")), g.get(("bwd", "speedup_vs_torch")),
                g.get(("fwdbwd", "speedup_vs_torch")), g.get(("fwdbwd", "speedup_vs_compile")),
                g.get(("fwdbwd", "frac_roofline"))]  # fmt: skip
        fmt = [_f(v, ".2f") + ("×" if v is not None and i < 4 else "") for i, v in enumerate(vals)]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {len(shapes[k])} | " + " | ".join(fmt) + " |")
    failed = [r for r in doc["results"] if r["status"] == "FAILED"]
    lines += ["", f"FAILED rows in this run: {len(failed)}."]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the README's bench-results markers with ``section``."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")
