"""The examples run end to end (at a tiny size) and report loss curves that agree, and the
end-to-end benchmark's quick run writes its table with every provider's loss in agreement.
The distributed example runs on 2 CPU ranks (gloo on loopback) and reports the losses of a
one-process run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600, **env_vars):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_vars)
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def _worst(out: str) -> float:
    m = re.search(r"largest relative loss difference: (\S+)", out)
    assert m, out[-2000:]
    return float(m.group(1))


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_train_gpt_example(positions):
    out = _run("examples/train_gpt.py", "--steps", "6", "--batch", "4", "--context", "32",
               "--d-model", "32", "--layers", "2", "--megabytes", "0.2", "--every", "1",
               "--positions", positions, "--device", "cpu")  # fmt: skip
    # token (+ position) embedding, 2 x (attention, 2 norms), final norm, loss
    n = 10 if positions == "learned" else 9
    assert f"lmkernels.patch: {n} replaced, 0 left" in out, out
    assert re.search(r"lmkernels:\s+\d+ tokens/s", out)
    assert _worst(out) < 1e-4


_DIST_ARGS = ("examples/train_distributed.py",
              *"--steps 5 --batch 4 --context 32 --d-model 32 --layers 2 --megabytes 0.2 "
               "--every 1".split())  # fmt: skip
_LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _step_losses(out: str) -> list[float]:
    losses = [float(v) for v in re.findall(r"^\s+\d+\s+(\d+\.\d+)$", out, re.M)]
    assert len(losses) == 5, out[-2000:]
    return losses


@pytest.fixture(scope="module")
def one_process_losses():
    """train_distributed.py without torchrun: the same global batches on a group of one."""
    out = _run(*_DIST_ARGS, timeout=300, **_LOOPBACK)
    assert "1 rank(s) on cpu (gloo)" in out, out
    return _step_losses(out)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not in this torch build",
)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_train_distributed_example(parallel, one_process_losses):
    out = _run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               *_DIST_ARGS, "--parallel", parallel, timeout=300, **_LOOPBACK)  # fmt: skip
    assert "lmkernels.patch: 10 replaced, 0 left" in out, out
    assert f"{parallel} fp32: 2 rank(s) on cpu (gloo)" in out, out
    assert re.search(r"\d+ tokens/s over 2 rank\(s\)", out), out
    losses = _step_losses(out)
    assert losses[-1] < losses[0], losses
    # each rank trains on its half of the global batch: the same steps as one process, up to
    # the order of the gradient sums (measured <= 1e-6 at the 6 printed decimals)
    assert max(abs(a - b) for a, b in zip(losses, one_process_losses, strict=True)) < 1e-5, (
        losses, one_process_losses)  # fmt: skip


def test_finetune_bert_example():
    pytest.importorskip("transformers", reason="transformers is not installed")
    out = _run("examples/finetune_bert.py", "--steps", "4", "--batch", "8", "--length", "32",
               "--hidden", "32", "--layers", "1", "--files", "40", "--every", "1",
               "--device", "cpu")  # fmt: skip
    assert "attn_implementation 'sdpa' -> 'lmkernels'" in out, out
    assert out.count("test accuracy") == 2
    assert _worst(out) < 1e-4


def test_e2e_benchmark_quick(tmp_path):
    out = _run("-m", "lmkernels.bench", "e2e", "--quick", "--reps", "2", "--providers",
               "torch,lmkernels", "--out", str(tmp_path))  # fmt: skip
    doc = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["provider"]: r for r in doc["results"]}
    assert set(rows) == {"torch", "lmkernels"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["torch"]["vs_torch"] == 1.0
    assert "| lmkernels |" in (tmp_path / "e2e.md").read_text() and "tokens/s" in out
