"""Tests of the benchmark harness itself (lmkernels.bench): byte models against hand counts,
the roofline copy, peak-memory accounting, the outputs of a quick CLI run, and how skipped and
wrong providers are reported. No timing thresholds: speed lives in the benchmarks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from lmkernels.bench import report, roofline, runner, spec, timing
from lmkernels.bench.__main__ import main
from lmkernels.bench.specs import softmax as softmax_spec

CPU = torch.device("cpu")
F32, BF16 = torch.float32, torch.bfloat16


def _bench(name: str) -> spec.Bench:
    (b,) = [b for b in spec.discover() if b.name == name]
    return b


# ------------------------------------------------------------------------------- byte models


def test_softmax_byte_model_matches_hand_counts():
    n = 4096 * 1024
    sm = _bench("softmax").bytes
    assert sm((4096, 1024), F32, "fwd") == 2 * n * 4  # read x, write y
    assert sm((4096, 1024), F32, "bwd") == 3 * n * 4  # read y, dy; write dx
    assert sm((4096, 1024), F32, "fwdbwd") == 5 * n * 4
    assert sm((4096, 1024), BF16, "fwd") == 2 * n * 2
    assert _bench("log_softmax").bytes((16, 262144), BF16, "bwd") == 3 * 16 * 262144 * 2
    # padding mask: x viewed as (G=4, L=1024, S=1024); one bool per (group, key) read in fwd
    masked = _bench("masked_softmax").bytes
    assert masked((4096, 1024), F32, "fwd") == 2 * n * 4 + 4 * 1024
    assert masked((4096, 1024), F32, "bwd") == 3 * n * 4
    assert masked((4096, 1024), F32, "fwdbwd") == 5 * n * 4 + 4 * 1024
    # causal: the mask comes from indices and moves no bytes
    assert _bench("causal_softmax").bytes((1024, 4096), F32, "fwd") == 2 * 1024 * 4096 * 4


def test_norm_byte_models_match_hand_counts():
    n = 4096 * 1024
    for name in ("layer_norm", "rms_norm"):
        b = _bench(name).bytes
        assert b((4096, 1024), F32, "fwd") == 2 * n * 4  # read x, write y
        assert b((4096, 1024), BF16, "bwd") == 3 * n * 2  # read x, dy; write dx
        assert b((4096, 1024), F32, "fwdbwd") == 5 * n * 4
    for name in ("add_layer_norm", "add_rms_norm"):
        b = _bench(name).bytes
        assert b((4096, 1024), F32, "fwd") == 4 * n * 4  # read x, r; write y, h
        assert b((4096, 1024), BF16, "bwd") == 4 * n * 2  # read h, dy, dh; write dx
        assert b((1024, 4096), F32, "fwdbwd") == 8 * n * 4


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_tuple_output_bench_checks_every_output_and_gradient(mode):
    """add_rms_norm returns (normed, h): both outputs and every input gradient are checked."""
    b = _bench("add_rms_norm")
    inputs = b.make_inputs((16, 64), F32, CPU)
    want = runner.oracle(b, inputs)
    assert len(want.out) == 2 and len(want.grads) == 3
    providers = {p.name: p for p in b.providers(CPU)}
    _, err = runner.build_thunk(providers["torch"], providers["torch"].fn, inputs, mode, want)
    assert err < 1e-5

    # a provider that gets the residual sum wrong is caught
    def wrong(x, r, w):
        y, h = providers["torch"].fn(x, r, w)
        return y, h * 1.01

    _, err = runner.build_thunk(spec.Provider("wrong", wrong), wrong, inputs, mode, want)
    assert err > 5e-3


def test_default_sweep_shapes():
    b = _bench("softmax")
    shapes = b.shapes
    # 16384 token rows over model hidden sizes; attention-score rows of sequence 512 ... 16384
    for s in [(16384, 768), (16384, 4096), (16384, 8192), (32768, 512), (16384, 16384)]:
        assert s in shapes
    assert sorted(c for _, c in shapes) == [512, 768, 1024, 2048, 4096, 8192, 16384]
    for rows, cols in shapes:  # 48 MiB ... 1 GiB per fp32 tensor
        assert 48 * 2**20 <= rows * cols * 4 <= 2**30
    assert b.sweep(CPU) == ((4096, 512), (2048, 2048), (2048, 4096), (1024, 8192))
    assert b.dtypes_on(CPU) == (F32, BF16) and torch.float16 in b.dtypes


def test_attention_views_of_a_shape():
    assert softmax_spec._attn_dims((4096, 1024)) == (4, 1024, 1024)
    assert softmax_spec._attn_dims((16, 262144)) == (1, 16, 262144)
    inp = softmax_spec.padding_inputs((64, 32), F32, CPU)
    x, mask = inp.args
    assert x.shape == (2, 32, 32) and mask.shape == (2, 1, 32) and mask.dtype == torch.bool
    assert not mask.all(-1).any()  # no fully masked row


def test_copy_roofline_moves_the_ops_bytes():
    fn, moved = roofline.copy_callable(2 * 4096 * 1024 * 4, CPU)
    assert moved == 2 * 4096 * 1024 * 4
    fn()
    assert roofline.gbps(10**9, 1000.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name,mem,key",
    [
        ("NVIDIA A100-SXM4-40GB", 40, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 80, "A100-80GB-SXM"),
        ("NVIDIA A100 80GB PCIe", 80, "A100-80GB-PCIe"),
        ("NVIDIA H100 80GB HBM3", 80, "H100-SXM"),
        ("NVIDIA H100 PCIe", 80, "H100-PCIe"),
        ("NVIDIA H200", 141, "H200"),
        ("NVIDIA L4", 24, "L4"),
        ("NVIDIA GeForce RTX 4090", 24, "RTX-4090"),
        ("NVIDIA L40S", 48, None),
    ],
)
def test_gpu_peak_table(name, mem, key):
    assert roofline.gpu_key(name, mem * 2**30) == key


def test_gpu_flop_table_covers_every_known_device():
    """Dense vendor peaks (no sparsity): H100 SXM bf16 989.4 TFLOP/s, A100 312, fp32 on the
    FMA units; one entry per bandwidth-table device."""
    assert set(roofline.GPU_PEAK_TFLOPS) == set(roofline.GPU_PEAK_GBPS)
    for peaks in roofline.GPU_PEAK_TFLOPS.values():
        assert set(peaks) == {"fp16", "bf16", "fp32"}
        assert peaks["fp16"] == peaks["bf16"] > peaks["fp32"] > 0
    assert roofline.GPU_PEAK_TFLOPS["H100-SXM"]["bf16"] == 989.4
    assert roofline.GPU_PEAK_TFLOPS["A100-80GB-SXM"]["fp16"] == 312.0


def test_cpu_rooflines_measure_the_matmul_once_for_every_dtype():
    roof = roofline.rooflines(CPU, ["bf16", "fp32"], need_flops=True)
    assert roof["kind"] == "copy" and "measured" in roof["tflops_source"]
    tf = roof["peak_tflops"]
    assert set(tf) == {"bf16", "fp32"} and tf["bf16"] == tf["fp32"] > 0
    assert "peak_tflops" not in roofline.rooflines(CPU, ["fp32"], need_flops=False)


@pytest.mark.parametrize("known", [True, False])
def test_gpu_rooflines_from_the_tables_or_measured(monkeypatch, known):
    """A device in the tables takes the vendor peaks; one not in them is measured (copy
    bandwidth, an mm per dtype). The device queries are stubbed: no GPU here."""
    cuda = torch.device("cuda")
    key = "H100-SXM" if known else None
    monkeypatch.setattr(
        roofline,
        "gpu_peak_gbps",
        lambda d: (roofline.GPU_PEAK_GBPS[key], key) if key else (None, "unknown"),
    )
    monkeypatch.setattr(roofline, "measured_copy_gbps", lambda d: 123.0)
    monkeypatch.setattr(roofline, "matmul_tflops",
                        lambda d, dtype, n: {F32: 10.0, BF16: 50.0}[dtype])  # fmt: skip
    roof = roofline.rooflines(cuda, ["bf16", "fp32"], need_flops=True)
    assert roof["kind"] == "peak"
    if known:
        assert roof["peak_gbps"] == 3350.0 and roof["gbps_source"] == "vendor table"
        assert roof["peak_tflops"] == {"bf16": 989.4, "fp32": 66.9}
    else:
        assert roof["peak_gbps"] == 123.0 and "measured" in roof["gbps_source"]
        assert roof["peak_tflops"] == {"bf16": 50.0, "fp32": 10.0}
        assert "measured" in roof["tflops_source"]


def test_flop_bench_rows_are_a_fraction_of_the_matmul_roofline():
    """A bench with a FLOP model: of roof = TFLOP/s / the run's matmul peak; the bandwidth
    fraction is kept beside it. A bench without one: of roof = GB/s / the copy's GB/s."""
    cfg = runner.Config(reps=3, device=CPU, ops=["attention", "softmax"], modes=["fwd"],
                        dtypes=[F32], providers=["torch"], quick=True)  # fmt: skip
    doc = runner.run(runner.select(spec.discover(), cfg.ops), cfg, progress=False)
    peak = doc["roofline"]["peak_tflops"]["fp32"]
    rows = [r for r in doc["results"] if r["provider"] == "torch"]
    att = [r for r in rows if r["bench"] == "attention"]
    soft = [r for r in rows if r["bench"] == "softmax"]
    assert att and soft
    for r in att:
        assert r["frac_roofline"] == pytest.approx(r["tflops"] / peak)
        assert r["frac_flops"] == r["frac_roofline"] and r["frac_bandwidth"] > 0
    copy = {tuple(r["shape"]): r for r in doc["results"] if r["provider"] == "copy"}
    for r in soft:
        assert "tflops" not in r
        assert r["frac_roofline"] == pytest.approx(r["gbps"] / copy[tuple(r["shape"])]["gbps"])
    assert "FLOP roofline" in report.markdown(doc)


# ---------------------------------------------------------------------------- timing, memory


def test_percentiles():
    assert timing.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert timing.percentile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    t = timing.summarize([0.001] * 5)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.samples) == (1.0, 1.0, 1.0, 5)


def test_interleaved_timing_runs_every_callable():
    calls = {"a": 0, "b": 0}

    def make(k):
        def f():
            calls[k] += 1

        return f

    out = timing.time_interleaved({k: make(k) for k in calls}, reps=4, min_sample_s=0)
    assert set(out) == {"a", "b"} and all(t.samples == 4 for t in out.values())
    assert all(c >= 4 for c in calls.values())


def test_cpu_peak_memory_of_softmax_is_its_output():
    x = torch.randn(512, 1024)
    peak, how = timing.peak_memory(lambda: torch.softmax(x, -1), CPU)
    assert how == "cpu-profiler"
    assert 4 * x.numel() <= peak <= 4 * x.numel() + 64 * 1024  # the fp32 output (plus slack)
    peak2, _ = timing.peak_memory(lambda: torch.softmax(x, -1).exp(), CPU)
    assert peak2 >= 2 * 4 * x.numel()  # two outputs alive at once


def test_provider_patterns():
    assert runner._match("torch.compile", None)
    assert runner._match("torch", ["torch", "lmkernels-*"])
    assert not runner._match("torch.compile", ["torch", "lmkernels-*"])
    assert not runner._match("torch.compile", ["!torch.compile"])
    assert runner._match("reference", ["!torch.compile"])
    assert [b.name for b in runner.select(spec.discover(), ["softmax.*"])] == [
        "softmax", "log_softmax", "masked_softmax", "causal_softmax"
    ]  # fmt: skip
    assert "causal_softmax" not in [b.name for b in runner.select(spec.discover(), ["!causal*"])]


# -------------------------------------------------------------------- providers: skip / fail


def _toy_bench(providers: list[spec.Provider]) -> spec.Bench:
    return spec.Bench(
        name="toy",
        shapes=((8, 64),),
        quick_shapes=((8, 64),),
        dtypes=(F32,),
        make_inputs=softmax_spec.plain_inputs,
        bytes=softmax_spec.plain_bytes,
        reference=lambda x: torch.softmax(x, -1),
        providers=lambda device: providers,
        family="test",
    )


def test_wrong_provider_is_failed_and_not_timed_and_unavailable_is_skipped():
    calls: dict = {}

    def counted(name, f):
        def g(*a):
            calls[name] = calls.get(name, 0) + 1
            return f(*a)

        return g

    bench = _toy_bench([
        spec.Provider("torch", counted("torch", lambda x: torch.softmax(x, -1))),
        spec.Provider("wrong-axis", counted("wrong-axis", lambda x: torch.softmax(x, 0))),
        spec.Provider("crashes", lambda x: x.view(-1, 3)),
        spec.Provider("missing", reason="not installed here"),
        spec.Provider("no-fp32", counted("no-fp32", torch.exp), supports=lambda s, d: "fp16 only"),
    ])  # fmt: skip
    doc = runner.run([bench], runner.Config(reps=3, device=CPU), progress=False)
    rows = {(r["provider"], r["mode"]): r for r in doc["results"]}
    assert doc["skipped_providers"] == [
        {"bench": "toy", "provider": "missing", "reason": "not installed here"}
    ]
    for mode in spec.MODES:
        assert rows[("torch", mode)]["status"] == "ok" and "median_ms" in rows[("torch", mode)]
        assert rows[("copy", mode)]["status"] == "roofline"
        wrong = rows[("wrong-axis", mode)]
        assert wrong["status"] == "FAILED" and "relative error" in wrong["reason"]
        assert "median_ms" not in wrong and "peak_mib" not in wrong
        crash = rows[("crashes", mode)]
        assert crash["status"] == "FAILED" and "RuntimeError" in crash["reason"]
        skip = rows[("no-fp32", mode)]
        assert skip["status"] == "skipped" and skip["reason"] == "fp16 only"
        assert ("missing", mode) not in rows
    # the wrong provider ran once per mode for its check, never in the timed loop
    assert calls["wrong-axis"] == len(spec.MODES)
    assert calls["torch"] > 3 * len(spec.MODES)
    assert "no-fp32" not in calls
    md = report.markdown(doc)
    assert "| toy | missing | not installed here |" in md
    assert "**FAILED**: max relative error" in md and "**skipped**: fp16 only" in md


def test_attention_flop_model_and_tflops_column():
    """The standard count: 4 B H L S D forward, halved for causal, backward 2.5x; rows of a
    bench with a FLOP model report TFLOP/s = flops / time, and its table has the column."""
    full, causal = _bench("attention").flops, _bench("attention_causal").flops
    fwd = 4 * 4 * 8 * 1024 * 1024 * 64
    assert full((4, 8, 1024, 64), F32, "fwd") == fwd
    assert causal((4, 8, 1024, 64), F32, "fwd") == fwd // 2
    assert full((4, 8, 1024, 64), F32, "bwd") == fwd * 5 // 2
    assert full((4, 8, 1024, 64), BF16, "fwdbwd") == fwd * 7 // 2
    cfg = runner.Config(reps=3, device=CPU, ops=["attention"], modes=["fwd"], dtypes=[F32],
                        providers=["torch"], shapes=[(1, 1, 16, 8)])  # fmt: skip
    doc = runner.run(runner.select(spec.discover(), cfg.ops), cfg, progress=False)
    (row,) = [r for r in doc["results"] if r["provider"] == "torch"]
    assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] * 1e-3) / 1e12)
    assert "| TFLOP/s |" in report.markdown(doc)
    assert "| TFLOP/s |" not in report.markdown(
        {
            **doc,
            "results": [
                {k: v for k, v in r.items() if k not in ("flops", "tflops")} for r in doc["results"]
            ],
        }
    )


def test_lmkernels_providers_report_why_a_backend_is_skipped():
    provs = {p.name: p for p in spec.lmkernels_providers(CPU, lambda x: x)}
    assert set(provs) == {"lmkernels-cpu", "lmkernels-triton", "lmkernels-cuda"}
    assert "CUDA" in provs["lmkernels-cuda"].reason
    # the conftest sets TRITON_INTERPRET=1 on CPU machines: the interpreter is never timed
    assert provs["lmkernels-triton"].fn is None and provs["lmkernels-triton"].reason
    peer = spec.peer("peer", "json", CPU, lambda: spec.Provider("peer", lambda x: x))
    assert peer.fn is None and "CUDA" in peer.reason


# ---------------------------------------------------------------------------- the CLI outputs


def test_quick_cli_run_writes_json_markdown_and_plots(tmp_path, capsys):
    # One tiny shape; torch.compile included but for the fwd mode only (one compile).
    # (--malloc default: the glibc setting would outlive the run in this test process)
    args = ["--ops", "softmax", "--shapes", "8x256", "--dtypes", "fp32,bf16", "--reps", "3",
            "--out", str(tmp_path), "--quick", "--malloc", "default"]  # fmt: skip
    assert main([*args, "--modes", "fwd"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    m = doc["machine"]
    assert m["malloc"] == "default"
    assert m["cpu_count"] >= 1 and m["torch"] == torch.__version__ and "cpu_model" in m
    assert set(m["peers"]) == set(roofline.PEER_DISTRIBUTIONS)  # versions, or None: absent
    skipped = {s["provider"]: s["reason"] for s in doc["skipped_providers"]}
    assert "lmkernels-cuda" in skipped and "liger-kernel" in skipped
    by = {(r["provider"], r["dtype"]): r for r in doc["results"]}
    for d in ("fp32", "bf16"):
        for p in ("torch", "torch.compile", "reference", "copy"):
            r = by[(p, d)]
            assert r["status"] in ("ok", "roofline") and r["p20_ms"] <= r["median_ms"]
            assert r["gbps"] > 0 and r["frac_roofline"] > 0
        assert by[("torch", d)]["peak_mib"] > 0
        if spec.backends.availability("cpu", "cpu") is None:
            ours = by[("lmkernels-cpu", d)]
            assert ours["status"] == "ok"
            assert math.isclose(
                ours["speedup_vs_torch"], by[("torch", d)]["median_ms"] / ours["median_ms"]
            )
            assert "speedup_vs_compile" in ours
    md = (tmp_path / "results.md").read_text()
    assert "- peer libraries: liger-kernel" in md
    assert "### softmax · fwd · fp32" in md and "### softmax · fwd · bf16" in md
    assert "| lmkernels-cuda |" in md  # listed as skipped, with its reason
    assert (tmp_path / "softmax_fwd.png").stat().st_size > 0
    assert "results.json" in capsys.readouterr().out

    # compare: the same run against itself has no regressions; a slower one is flagged (the
    # timing bands are narrowed first: 3 repetitions of a tiny op can be wider than the drop,
    # which compare then calls noise, see test_compare_flags_regressions_beyond_threshold...)
    new = json.loads((tmp_path / "results.json").read_text())
    assert report.compare(doc, new)[1] == 0
    for r in (*doc["results"], *new["results"]):
        if "median_ms" in r:
            r["p20_ms"] = r["p80_ms"] = r["median_ms"]
    for r in new["results"]:
        if "speedup_vs_torch" in r:
            r["speedup_vs_torch"] *= 0.5
    lines, worse = report.compare(doc, new)
    assert worse == (2 if "lmkernels-cpu" not in skipped else 0)
    assert main(["compare", str(tmp_path / "results.json"), str(tmp_path / "results.json")]) == 0


_RSS_DROP = """
import os, sys, torch
from lmkernels.bench import timing
if sys.argv[1] == "keep":
    print(timing.keep_freed_memory())
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t = torch.ones(16 << 20)  # 64 MiB, touched
before = rss()
del t
print((before - rss()) >> 20)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc and /proc are Linux's")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_freed_outputs_resident(mode):
    # glibc's defaults give a freed 64 MiB block back to the OS (its reuse then page-faults
    # again); after keep_freed_memory it stays resident for the next allocation.
    out = subprocess.run([sys.executable, "-c", _RSS_DROP, mode], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    dropped_mib = int(out[-1])
    if mode == "keep":
        if out[0] == "None":
            pytest.skip("the C library is not glibc: keep_freed_memory does nothing")
        assert "M_MMAP_MAX=0" in " ".join(out[:-1])
        assert dropped_mib < 8, dropped_mib
    else:
        assert dropped_mib >= 56, dropped_mib  # the effect exists, so the keep case can fail


def test_cli_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit):
        main(["--dtypes", "fp8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--ops", "nope", "--out", str(tmp_path)])


# ------------------------------------------------------------- compare and README on crafted runs


def _row(provider, median, spread=0.01, mode="fwd", dtype="fp32", shape=(8, 8), **kw):
    return dict(bench="toy", mode=mode, dtype=dtype, shape=list(shape), provider=provider,
                status="ok", median_ms=median, p20_ms=median * (1 - spread),
                p80_ms=median * (1 + spread), **kw)  # fmt: skip


def _run(ours_ms, spread=0.01, status="ok", torch_ms=10.0, compile_ms=5.0):
    rows = [_row("torch", torch_ms, spread), _row("torch.compile", compile_ms, spread),
            _row("lmkernels-cpu", ours_ms, spread, speedup_vs_torch=torch_ms / ours_ms,
                 speedup_vs_compile=compile_ms / ours_ms)]  # fmt: skip
    rows[-1]["status"] = status
    return {"results": rows}


@pytest.mark.parametrize(
    "new_ms, spread, status, flagged",
    [
        (2.0, 0.01, "ok", 0),  # the same
        (1.5, 0.01, "ok", 0),  # faster
        (2.1, 0.01, "ok", 0),  # 5 % slower: under the 10 % threshold
        (3.0, 0.01, "ok", 2),  # 33 % slower, tight timings: both ratios flagged
        (3.0, 0.25, "ok", 0),  # 33 % slower but inside the runs' +-25 % bands
        (2.0, 0.01, "FAILED", 1),  # now failing
    ],
)
def test_compare_flags_regressions_beyond_threshold_and_noise(new_ms, spread, status, flagged):
    old = _run(2.0, spread)
    new = _run(new_ms, spread, status)
    lines, worse = report.compare(old, new, threshold=0.1)
    assert worse == flagged
    assert sum("**worse**" in ln for ln in lines) == (flagged if status == "ok" else 0)
    if new_ms == 3.0 and spread == 0.25:
        assert sum("(within noise)" in ln for ln in lines) == 2


def test_compare_cli_exit_status(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run(2.0)))
    b.write_text(json.dumps(_run(4.0)))
    assert main(["compare", str(a), str(a)]) == 0
    assert main(["compare", str(a), str(b)]) == 1
    assert main(["compare", str(a), str(b), "--threshold", "0.6"]) == 0


def _readme_doc():
    rows = []
    for shape, s_fwd, s_bwd in (((8, 8), 2.0, 1.0), ((16, 16), 8.0, 4.0)):
        for mode, s in (("fwd", s_fwd), ("bwd", s_bwd), ("fwdbwd", s_fwd)):
            rows.append(_row("lmkernels-cpu", 1.0, mode=mode, shape=shape, speedup_vs_torch=s,
                             speedup_vs_compile=s / 2, frac_roofline=s / 10))  # fmt: skip
    rows.append(_row("lmkernels-cpu", 1.0, mode="fwd", shape=(32, 32)) | {"status": "FAILED"})
    rows.append(_row("torch", 1.0, mode="fwd"))
    machine = dict(device="cpu", cpu_model="Toy CPU", cpu_count=2, torch_threads=2,
                   torch="2.13.0", git_revision="0123456789abcdef", git_dirty=False)  # fmt: skip
    return dict(created="2026-11-26T12:00:00+0000", machine=machine,
                config=dict(reps=7, quick=False), results=rows)  # fmt: skip


def test_readme_section_geometric_means_and_machine():
    text = report.readme_section(_readme_doc(), "benchmarks/results/results.json")
    assert "Toy CPU" in text and "2026-11-26T12:00:00" in text and "0123456789" in text
    (row,) = [ln for ln in text.splitlines() if ln.startswith("| toy |")]
    # fwd: geomean(2, 8) = 4; bwd: geomean(1, 4) = 2; compile: half; roof: geomean(.2, .8)
    assert row == "| toy | fp32 | lmkernels-cpu | 2 | 4.00× | 2.00× | 4.00× | 2.00× | 0.40 |"
    assert "FAILED rows in this run: 1." in text


def test_readme_command_replaces_only_the_marked_section(tmp_path):
    readme, res = tmp_path / "README.md", tmp_path / "results.json"
    res.write_text(json.dumps(_readme_doc()))
    readme.write_text(f"# T\n\nbefore\n{report.README_BEGIN}\nold table\n{report.README_END}\n"
                      "after\n")  # fmt: skip
    assert main(["readme", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# T\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "old table" not in text and "| toy | fp32 |" in text
    assert "readme results.json" in text  # the source, relative to the README
    first = text
    assert main(["readme", str(res), "--readme", str(readme)]) == 0  # idempotent
    assert readme.read_text() == first
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        main(["readme", str(res), "--readme", str(readme)])


# ------------------------------------------------------------------ CUDA timing (logic only)


def test_rotation_count_spans_twice_the_l2():
    l2 = 50 << 20  # H100: 50 MiB
    assert timing.rotation_count(1 << 20, l2) == 16  # capped
    assert timing.rotation_count(20 << 20, l2) == 5  # ceil(100 / 20)
    assert timing.rotation_count(100 << 20, l2) == 1
    assert timing.rotation_count(1 << 30, l2) == 1
    assert timing.rotation_count(0, l2) == 16


def test_speedups_compare_like_with_like():
    """Graph replays when both providers were captured, else plain launches, else the median."""
    both = runner.speedup({"graph_ms": 1.0, "launch_ms": 4.0, "median_ms": 1.0},
                          {"graph_ms": 2.0, "launch_ms": 3.0, "median_ms": 2.0})  # fmt: skip
    assert both == 2.0
    base = {"graph_ms": 2.0, "launch_ms": 3.0, "median_ms": 2.0}
    assert runner.speedup({"launch_ms": 4.0, "median_ms": 4.0}, base) == 0.75  # not captured
    assert runner.speedup({"median_ms": 2.0}, {"median_ms": 3.0}) == 1.5
    assert runner.speedup({"median_ms": 2.0}, {}) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rotating_timing_graph_and_fallback():
    """On a GPU: rotating callables are timed as launches and as a captured graph; a callable
    that reads a value back to the host cannot be captured and keeps the launch timing."""
    xs = [torch.randn(1 << 20, device="cuda") for _ in range(3)]
    res = timing.time_cuda_rotating([lambda x=x: x.mul(2.0) for x in xs])
    assert res["launch"].median_ms > 0 and res["graph"].median_ms > 0
    assert "graph_error" not in res
    res = timing.time_cuda_rotating([lambda x=x: float(x.sum()) for x in xs])
    assert res["launch"].median_ms > 0 and "graph" not in res and res["graph_error"]
    # the device is usable after the failed capture
    assert float(torch.ones(4, device="cuda").sum()) == 4.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_times_rotating_copies():
    cuda = torch.device("cuda")
    cfg = runner.Config(reps=3, device=cuda, ops=["softmax"], modes=["fwd", "fwdbwd"],
                        dtypes=[BF16], providers=["torch", "lmkernels-*"], quick=True)  # fmt: skip
    doc = runner.run(runner.select(spec.discover(), cfg.ops), cfg, progress=False)
    timed = [r for r in doc["results"] if "median_ms" in r]
    assert timed and doc["roofline"]["kind"] == "peak"
    for r in timed:
        assert r["rotating_copies"] >= 1 and r["launch_ms"] > 0
        assert r["timed_by"] in ("cuda graph replay", "launches")
        assert r["median_ms"] == r.get("graph_ms", r["launch_ms"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_dist_bench_quick(tmp_path):
    """`python -m lmkernels.bench dist --quick`: 2 spawned gloo ranks; every case checks the
    providers' gradients against each other before timing, lmkernels serves every case."""
    from lmkernels.bench import dist

    assert dist.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "dist.json").read_text())
    rows = {r["case"]: r for r in doc["results"]}
    assert set(rows) == {c[0] for c in dist._cases(True)}
    for r in rows.values():
        assert r["lmkernels"]["status"] == "ok" and r["lmkernels"]["median_ms"] > 0
    assert rows["cross_entropy vocab-parallel"]["torch"]["status"] == "ok"
    assert "| cross_entropy vocab-parallel |" in (tmp_path / "dist.md").read_text()
