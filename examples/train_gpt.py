"""Train a small GPT on the Python standard library's own source files, with and without
``lmkernels.patch``, and print both loss curves and both speeds.

    python examples/train_gpt.py [--steps 200] [--positions learned|sinusoidal] [--device cpu]

The text is already on every machine that runs Python: the ``.py`` files of the standard
library, read as bytes (a 256-token vocabulary). Both models start from the same weights and see
the same batches; the patched one runs lmkernels' embedding, LayerNorm, attention and
cross-entropy kernels under the very same ``nn.Module`` code (``lmkernels.models.GPT``). The
loss curves agree to rounding; the speeds are whatever this machine gives.
"""

from __future__ import annotations

import argparse
import copy
import sysconfig
import time
from pathlib import Path

import torch

import lmkernels
from lmkernels.models import GPT, GPTConfig


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's top-level .py files, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if not chunks:
        raise SystemExit(f"no .py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, context: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--positions", choices=("learned", "sinusoidal"), default="learned")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--megabytes", type=float, default=4.0, help="how much text to read")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--every", type=int, default=20, help="print the losses every N steps")
    a = ap.parse_args(argv)

    data = stdlib_bytes(int(a.megabytes * 2**20))
    cfg = GPTConfig(vocab=256, context=a.context, d_model=a.d_model, heads=a.heads,
                    layers=a.layers, positions=a.positions)  # fmt: skip
    torch.manual_seed(0)
    plain = GPT(cfg).to(a.device)
    patched = copy.deepcopy(plain)
    print(lmkernels.patch(patched))
    mib = data.numel() / 2**20
    print(f"{mib:.1f} MiB of standard-library source, {a.steps} steps of {a.batch}x{a.context} "
          f"tokens, {a.positions} positions, device {a.device}\n")  # fmt: skip

    models = {"torch": plain, "lmkernels": patched}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=a.lr) for k, m in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    worst = 0.0
    print(f"{'step':>6} {'loss torch':>12} {'loss lmkernels':>15} {'rel. diff':>10}")
    for step, (x, y) in enumerate(batches(data, a.batch, a.context, a.steps, seed=1)):
        x, y = x.to(a.device), y.to(a.device)
        losses = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            opts[name].zero_grad()
            loss = model(x, y)
            loss.backward()
            opts[name].step()
            losses[name] = loss.item()  # (synchronises on a GPU)
            if step > 0:  # the first step pays one-time costs
                seconds[name] += time.perf_counter() - t0
        diff = abs(losses["lmkernels"] - losses["torch"]) / abs(losses["torch"])
        worst = max(worst, diff)
        if step % a.every == 0 or step == a.steps - 1:
            print(f"{step:>6} {losses['torch']:>12.5f} {losses['lmkernels']:>15.5f} "
                  f"{diff:>10.2e}")  # fmt: skip
    tokens = (a.steps - 1) * a.batch * a.context
    print()
    for name in models:
        rate = tokens / seconds[name] if seconds[name] else float("nan")
        print(f"{name:>10}: {rate:10.0f} tokens/s")
    if seconds["lmkernels"]:
        print(f"   speed-up: {seconds['torch'] / seconds['lmkernels']:.2f}x")
    print(f"largest relative loss difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
