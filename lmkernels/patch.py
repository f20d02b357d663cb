"""``patch(model)`` / ``unpatch(model)``: put lmkernels under an existing model, in place.

Each patched module keeps its identity: the object's class is switched to the lmkernels
subclass of its torch class (``lmkernels.nn``), which only overrides ``forward``. So the very
same Parameter and buffer objects stay (an optimizer made before the patch still trains the
model), and so do hooks, device, dtype, train / eval mode and state_dict keys.
``unpatch`` switches the classes back, restoring the original behaviour bit for bit.

Only modules whose class is exactly the torch class are patched: a subclass may have its own
``forward`` (the report lists it as left, with that reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmkernels import nn as lnn
from lmkernels.backends import BACKENDS, use_backend

# torch class -> (the ops= name, the lmkernels class)
_TABLE: dict[type, tuple[str, type]] = {
    torch.nn.LayerNorm: ("layer_norm", lnn.LayerNorm),
    torch.nn.RMSNorm: ("rms_norm", lnn.RMSNorm),
    torch.nn.Embedding: ("embedding", lnn.Embedding),
    torch.nn.MultiheadAttention: ("attention", lnn.MultiheadAttention),
    torch.nn.Softmax: ("softmax", lnn.Softmax),
    torch.nn.LogSoftmax: ("log_softmax", lnn.LogSoftmax),
    torch.nn.CrossEntropyLoss: ("cross_entropy", lnn.CrossEntropyLoss),
}
OPS = tuple(name for name, _ in _TABLE.values())
_LMK_CLASSES = {cls for _, cls in _TABLE.values()}
_ORIGINAL = "_lmk_original_class"  # the attribute a patched module keeps its class in
_BACKEND = "_lmk_backend"


@dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` and ``left`` hold (qualified module name, class
    name, detail) triples; detail is the new class for replaced modules and the reason for the
    ones left as they were."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lmkernels.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {n or '<root>'} ({c} -> {d})" for n, c, d in self.replaced]
        lines += [f"  left     {n or '<root>'} ({c}): {d}" for n, c, d in self.left]
        return "\n".join(lines)


class _OnBackend:
    """Mixed in front of an lmkernels class when patch() got a backend: forward runs under it."""

    def forward(self, *args, **kwargs):
        with use_backend(getattr(self, _BACKEND)):
            return super().forward(*args, **kwargs)


_ON_BACKEND: dict[type, type] = {}


def _on_backend(cls: type) -> type:
    if cls not in _ON_BACKEND:
        _ON_BACKEND[cls] = type(cls.__name__, (_OnBackend, cls), {"__module__": cls.__module__})
    return _ON_BACKEND[cls]


def _torch_class(cls: type) -> type | None:
    """The torch class a class stands for when it is exactly one (not a user subclass)."""
    return cls if cls in _TABLE else None


def patch(model: torch.nn.Module, *, ops=None, backend: str | None = None) -> PatchReport:
    """Switch, in place, every submodule of ``model`` (itself included) whose class is one of
    torch's LayerNorm, RMSNorm, Embedding, MultiheadAttention (also inside
    TransformerEncoder / DecoderLayer), Softmax, LogSoftmax, CrossEntropyLoss to the lmkernels
    subclass. ``ops``: an iterable of names from :data:`OPS` to limit it to; ``backend``: run
    the patched modules on that backend (else the usual selection). Returns the report."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if ops is not None:
        ops = set(ops)
        unknown = ops - set(OPS)
        if unknown:
            raise ValueError(f"patch: ops must be names from {OPS}, got {sorted(unknown)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"patch: backend must be one of {BACKENDS} or None, got {backend!r}")
    report = PatchReport()
    for name, module in model.named_modules(remove_duplicate=True):
        cls = type(module)
        if hasattr(module, _ORIGINAL):
            report.left.append((name, cls.__name__, "already patched"))
            continue
        if cls in _LMK_CLASSES:
            report.left.append((name, cls.__name__, "already an lmkernels module"))
            continue
        torch_cls = _torch_class(cls)
        if torch_cls is None:
            base = next((t for t in _TABLE if isinstance(module, t)), None)
            if base is not None:
                report.left.append((name, cls.__name__, f"a subclass of torch.nn."
                                    f"{base.__name__} (its own forward is kept)"))  # fmt: skip
            continue
        op, new = _TABLE[torch_cls]
        if ops is not None and op not in ops:
            report.left.append((name, cls.__name__, f"'{op}' is not in ops"))
            continue
        if backend is not None:
            new = _on_backend(new)
            setattr(module, _BACKEND, backend)
        setattr(module, _ORIGINAL, cls)
        module.__class__ = new
        report.replaced.append((name, cls.__name__, f"lmkernels.nn.{new.__name__}"))
    return report


def unpatch(model: torch.nn.Module) -> int:
    """Switch every module :func:`patch` changed back to its original class; returns how many
    were restored."""
    n = 0
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is None:
            continue
        module.__dict__.pop(_BACKEND, None)
        module.__class__ = original
        n += 1
    return n
