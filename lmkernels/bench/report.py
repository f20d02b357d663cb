"""Reports of a benchmark run: ``results.json`` (everything), ``results.md`` (tables per op,
mode and dtype), PNG plots (time and fraction of the roofline per shape, one line per
provider), and the comparison of two ``results.json`` files.
"""

from __future__ import annotations

import json
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
            "- roofline: a same-size copy timed in the same run, interleaved with the providers "
            "(`of roof` = copy time / op time)"
        )
    else:
        peak = roof["peak_gbps"]
        lines.append(
            f"- roofline: peak HBM bandwidth of {roof['device_key']}: "
            + (f"{peak:.0f} GB/s" if peak else "unknown (no fraction reported)")
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


def compare(old: dict, new: dict, threshold: float = 0.1) -> tuple[list[str], int]:
    """Compare the speed-ups of lmkernels providers (vs eager and vs compile) between two runs.

    Ratios measured within one run are robust to machine drift, so they are what is compared.
    Returns (report lines, number of ratios that got worse by more than ``threshold``).
    """

    def key(r):
        return (r["bench"], r["mode"], r["dtype"], _shape(r), r["provider"])

    before = {key(r): r for r in old["results"]}
    lines = ["| op | mode | dtype | shape | provider | ratio | old | new | change |"]
    lines.append("|" + "---|" * 9)
    worse = 0
    for r in new["results"]:
        o = before.get(key(r))
        if o is None or not r["provider"].startswith("lmkernels-"):
            continue
        for ratio in ("speedup_vs_torch", "speedup_vs_compile"):
            if ratio in r and ratio in o:
                change = r[ratio] / o[ratio] - 1
                flag = ""
                if change < -threshold:
                    worse += 1
                    flag = " **worse**"
                lines.append(
                    f"| {' | '.join(map(str, key(r)))} | {ratio.removeprefix('speedup_')} "
                    f"| {o[ratio]:.2f} | {r[ratio]:.2f} | {change:+.0%}{flag} |"
                )
        if r["status"] != o["status"]:
            worse += r["status"] == "FAILED"
            lines.append(
                f"| {' | '.join(map(str, key(r)))} | status | {o['status']} | {r['status']} | |"
            )
    return lines, worse
