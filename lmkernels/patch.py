"""``patch(model)`` / ``unpatch(model)``: put lmkernels under an existing model, in place.

Each patched module keeps its identity: the object's class is switched to the lmkernels
subclass of its torch class (``lmkernels.nn``), which only overrides ``forward``. So the very
same Parameter and buffer objects stay (an optimizer made before the patch still trains the
model), and so do hooks, device, dtype, train / eval mode and state_dict keys.
``unpatch`` switches the classes back, restoring the original behaviour bit for bit.

Only modules whose class is exactly the torch class are patched: a subclass may have its own
``forward`` (the report lists it as left, with that reason).

transformers models (when transformers is imported) get more, see :mod:`lmkernels.hf`: their
Llama-style RMSNorm classes are switched the same way, attention runs through the registered
``"lmkernels"`` attention implementation, and causal / masked LM losses through
``loss_function``. ``unpatch`` restores the previous attention implementation and loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from lmkernels import hf
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
_BACKEND = hf.BACKEND_ATTR
_ORIGINAL_ATTN = "_lmk_original_attn"  # a transformers model's attn_implementation before
_LOSS = "_lmk_loss"  # set when patch() installed a transformers loss_function


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


def _replacement(cls: type) -> tuple[str, type] | str | None:
    """(ops name, lmkernels class) for a class patch() switches; a reason (str) for one it
    recognises but leaves; None for any other class."""
    if cls in _TABLE:
        return _TABLE[cls]
    if hf.is_transformers_class(cls):
        new = hf.rms_norm_class(cls)
        if new is not None:
            return ("rms_norm", new) if isinstance(new, type) else new
    base = next((t for t in _TABLE if issubclass(cls, t)), None)
    if base is not None:
        return f"a subclass of torch.nn.{base.__name__} (its own forward is kept)"
    return None


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
        found = _replacement(cls)
        if found is None:
            continue
        if isinstance(found, str):
            report.left.append((name, cls.__name__, found))
            continue
        op, new = found
        if ops is not None and op not in ops:
            report.left.append((name, cls.__name__, f"'{op}' is not in ops"))
            continue
        if backend is not None:
            new = _on_backend(new)
            setattr(module, _BACKEND, backend)
        setattr(module, _ORIGINAL, cls)
        module.__class__ = new
        report.replaced.append((name, cls.__name__, f"{new.__module__}.{new.__name__}"))
    if hf.is_pretrained_model(model):
        _patch_transformers(model, ops, backend, report)
    return report


def _patch_transformers(model, ops, backend, report: PatchReport) -> None:
    """A transformers model: its attention implementation and its loss_function."""
    cls = type(model).__name__
    if ops is None or "attention" in ops:
        old = model.config._attn_implementation
        if old == hf.ATTN_NAME:
            report.left.append(("", cls, "attn_implementation is already 'lmkernels'"))
        else:
            try:
                hf.register()
                model.set_attn_implementation(hf.ATTN_NAME)
            except (ValueError, ImportError) as e:  # a model that takes no custom attention
                report.left.append(("", cls, f"attn_implementation kept ({e})"))
            else:
                setattr(model, _ORIGINAL_ATTN, old)
                report.replaced.append(("", cls, f"attn_implementation {old!r} -> 'lmkernels'"))
                if backend is not None:  # the modules that call the attention function
                    for m in model.modules():
                        if type(m).__name__.endswith("Attention"):
                            setattr(m, _BACKEND, backend)
    if ops is None or "cross_entropy" in ops:
        loss = hf.loss_for(model)
        if getattr(model, _LOSS, False):
            report.left.append(("", cls, "loss_function is already lmkernels'"))
        elif loss is None:
            report.left.append(("", cls, f"loss_function kept (no lmkernels loss for "
                                f"loss_type {getattr(model, 'loss_type', None)!r})"))  # fmt: skip
        else:
            model.loss_function = functools.partial(loss, backend=backend)
            setattr(model, _LOSS, True)
            report.replaced.append(("", cls, f"loss_function -> lmkernels.hf.{loss.__name__}"))


def unpatch(model: torch.nn.Module) -> int:
    """Undo :func:`patch`: switch every module it changed back to its original class, and give
    a transformers model back its attention implementation and loss; returns how many modules
    were restored."""
    n = 0
    for module in model.modules():
        module.__dict__.pop(_BACKEND, None)
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is None:
            continue
        module.__class__ = original
        n += 1
    old = model.__dict__.pop(_ORIGINAL_ATTN, None)
    if old is not None:
        model.set_attn_implementation(old)
    if model.__dict__.pop(_LOSS, None):
        model.__dict__.pop("_loss_function", None)
    return n
