"""Fine-tune a BERT-style encoder (transformers' BertForSequenceClassification, built from a
config: no download) for sentence classification, with and without ``lmkernels.patch``.

    python examples/finetune_bert.py [--steps 150] [--device cpu]

The labelled set is built here from the Python standard library: the first line of every
class docstring (label 1) and function docstring (label 0) in its top-level modules, balanced
and split 80 / 20. Text is read as bytes (256 tokens, plus [CLS] and [PAD]); padded batches
exercise the attention mask. Both models start from the same weights and see the same
batches; the patched one runs lmkernels' attention (transformers' attention interface),
LayerNorm and embedding kernels.
"""

from __future__ import annotations

import argparse
import ast
import copy
import random
import sysconfig
import time
from pathlib import Path

import torch

import lmkernels

CLS, PAD = 256, 257


def docstring_sentences(limit_files: int) -> list[tuple[str, int]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = {0: [], 1: []}
    for path in sorted(root.glob("*.py"))[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                line = doc.strip().splitlines()[0].strip() if doc else ""
                if len(line) >= 8:
                    found[int(isinstance(node, ast.ClassDef))].append(line)
    n = min(len(found[0]), len(found[1]))
    if n < 10:
        raise SystemExit(f"too few docstrings under {root} ({n} per class)")
    rng = random.Random(0)
    pairs = [(s, y) for y in (0, 1) for s in rng.sample(found[y], n)]
    rng.shuffle(pairs)
    return pairs


def encode(sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(sentences), length), PAD, dtype=torch.long)
    for i, s in enumerate(sentences):
        b = [CLS, *s.encode("utf-8")[: length - 1]]
        ids[i, : len(b)] = torch.tensor(b)
    return ids, (ids != PAD).long()


def main(argv=None) -> int:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--files", type=int, default=400, help="standard-library modules to read")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--every", type=int, default=25)
    a = ap.parse_args(argv)

    pairs = docstring_sentences(a.files)
    split = int(0.8 * len(pairs))
    train, test = pairs[:split], pairs[split:]
    cfg = BertConfig(vocab_size=258, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=4, intermediate_size=4 * a.hidden,
                     max_position_embeddings=a.length, num_labels=2, pad_token_id=PAD,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    plain = BertForSequenceClassification(cfg).to(a.device)
    patched = copy.deepcopy(plain)
    print(lmkernels.patch(patched))
    print(f"{len(train)} training and {len(test)} test sentences (class vs function "
          f"docstrings), {a.steps} steps of {a.batch}, device {a.device}\n")  # fmt: skip

    models = {"torch": plain, "lmkernels": patched}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=a.lr) for k, m in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    rng = random.Random(1)
    tokens, worst = 0, 0.0
    print(f"{'step':>6} {'loss torch':>12} {'loss lmkernels':>15}")
    for step in range(a.steps):
        batch = rng.sample(train, min(a.batch, len(train)))
        ids, mask = encode([s for s, _ in batch], a.length)
        labels = torch.tensor([y for _, y in batch])
        ids, mask, labels = ids.to(a.device), mask.to(a.device), labels.to(a.device)
        tokens += int(mask.sum()) if step > 0 else 0
        losses = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            opts[name].zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opts[name].step()
            losses[name] = loss.item()
            if step > 0:
                seconds[name] += time.perf_counter() - t0
        worst = max(worst, abs(losses["lmkernels"] - losses["torch"]) / abs(losses["torch"]))
        if step % a.every == 0 or step == a.steps - 1:
            print(f"{step:>6} {losses['torch']:>12.5f} {losses['lmkernels']:>15.5f}")

    ids, mask = encode([s for s, _ in test], a.length)
    labels = torch.tensor([y for _, y in test])
    print()
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            pred = model(input_ids=ids.to(a.device), attention_mask=mask.to(a.device)).logits
        acc = (pred.argmax(-1).cpu() == labels).float().mean().item()
        rate = tokens / seconds[name] if seconds[name] else float("nan")
        print(f"{name:>10}: test accuracy {acc:.3f}, {rate:8.0f} tokens/s (non-padding)")
    print(f"largest relative loss difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
