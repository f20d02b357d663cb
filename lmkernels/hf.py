"""Hugging Face transformers integration (transformers is optional: only this module imports it).

* :func:`register` adds the attention implementation ``"lmkernels"`` to transformers'
  ``AttentionInterface`` (with sdpa's boolean masks from ``AttentionMaskInterface``), so
  ``from_pretrained(..., attn_implementation="lmkernels")`` and
  ``model.set_attn_implementation("lmkernels")`` work. The forward is
  :func:`lmkernels.functional.scaled_dot_product_attention` with sdpa's rules: padding masks,
  ``is_causal`` for decoder layers when no mask is given, grouped key / value heads natively.
* :func:`rms_norm_class` gives, for a transformers RMSNorm class whose ``forward`` is Llama's
  (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``: Llama, Mistral, Qwen2/3 and the many
  classes copied from it; recognised by their bytecode, not their name), the lmkernels subclass
  that computes it with :func:`lmkernels.functional.rms_norm`. Gemma's (``1 + weight``) and
  others differ and are left alone.
* :func:`causal_lm_loss` / :func:`masked_lm_loss` are transformers' ``ForCausalLM`` /
  ``ForMaskedLM`` losses (shifted labels, ``ignore_index``, ``num_items_in_batch`` for gradient
  accumulation) on :func:`lmkernels.functional.cross_entropy`, without the fp32 copy of the
  logits. transformers' heads compute the logits before this hook, so the fused
  linear + cross-entropy cannot be reached through it.

:func:`lmkernels.patch` uses all three on transformers models.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from lmkernels import functional as LF
from lmkernels.backends import use_backend
from lmkernels.ops import cross_entropy as _ce_ops

ATTN_NAME = "lmkernels"
BACKEND_ATTR = "_lmk_backend"  # set by patch(backend=...) on a module: its forward's backend


def register() -> None:
    """Register ``"lmkernels"`` with transformers' attention and attention-mask interfaces
    (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _on_backend(module, fn, *args, **kwargs):
    backend = getattr(module, BACKEND_ATTR, None)
    if backend is None:
        return fn(*args, **kwargs)
    with use_backend(backend):
        return fn(*args, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, L, D), key / value
    (B, Hk, S, D), an sdpa mask (boolean or additive, broadcastable to (B, Hq, L, S)) or None;
    returns ((B, L, Hq, D), None). Decoder layers without a mask are causal (top-left aligned,
    as sdpa); a single query token attends to every key (decoding with a cache)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("lmkernels attention does not support transformers' `softcap` "
                         "(attention-logit capping); use attn_implementation='eager'")  # fmt: skip
    if kwargs.get("position_bias") is not None:
        raise ValueError("lmkernels attention does not support `position_bias` (T5-style "
                         "relative attention bias); use attn_implementation='sdpa'")  # fmt: skip
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    if causal and kv_len > q_len:  # prefill into an empty static cache: the rest is masked
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = _on_backend(module, LF.scaled_dot_product_attention, query, key, value,
                      attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                      scale=scaling, enable_gqa=query.shape[1] != key.shape[1])  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------ norms


@functools.cache
def _llama_rms_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def _same_code(a, b) -> bool:
    return (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)


def _rms_forward(self, hidden_states: Tensor) -> Tensor:
    w = self.weight
    y = LF.rms_norm(hidden_states, (w.shape[-1],), w, self.variance_epsilon)
    out = torch.promote_types(w.dtype, hidden_states.dtype)  # transformers' result dtype
    return y if y.dtype == out else y.to(out)


_RMS_CLASSES: dict[type, type] = {}


def rms_norm_class(cls: type) -> type | str | None:
    """For a transformers RMSNorm class: its lmkernels subclass, or (a class whose name ends in
    RMSNorm but whose forward is not Llama's) the reason it is left; None for other classes."""
    if not cls.__name__.endswith("RMSNorm") or not is_transformers_class(cls):
        return None
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    if code is None or not _same_code(code, _llama_rms_code()):
        return "its forward is not Llama's RMSNorm formula (e.g. Gemma's 1 + weight)"
    if cls not in _RMS_CLASSES:
        _RMS_CLASSES[cls] = type(cls.__name__, (cls,),
                                 {"forward": _rms_forward, "__module__": __name__})  # fmt: skip
    return _RMS_CLASSES[cls]


# ------------------------------------------------------------------------------------- loss


def _cross_entropy(logits, target, num_items_in_batch, ignore_index, backend):
    # transformers computes this loss on an fp32 copy of the logits and returns it in fp32; the
    # op takes 16-bit logits as they are and returns its fp32 accumulation (no copy, same value)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if logits.stride(-1) != 1 or logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        logits = logits.contiguous()
    with use_backend(backend):
        loss = _ce_ops.cross_entropy_rows(logits, target.long().contiguous(), None,
                                          ignore_index, 0.0, 0.0, 0.0, reduction)  # fmt: skip
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                   num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: Tensor | None = None, backend: str | None = None,
                   **kwargs) -> Tensor:  # fmt: skip
    """transformers' ``ForCausalLMLoss``: token t predicts label t + 1; the 'mean' over the
    labels that are not ``ignore_index``, or the sum / ``num_items_in_batch`` when given."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return _cross_entropy(logits.reshape(-1, vocab_size), shift_labels, num_items_in_batch,
                          ignore_index, backend)  # fmt: skip


def masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                   num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                   backend: str | None = None, **kwargs) -> Tensor:  # fmt: skip
    """transformers' ``ForMaskedLMLoss``: every position against its own label."""
    labels = labels.reshape(-1).to(logits.device)
    return _cross_entropy(logits.reshape(-1, vocab_size), labels, num_items_in_batch,
                          ignore_index, backend)  # fmt: skip


def loss_for(model: torch.nn.Module):
    """The lmkernels loss for a transformers model's ``loss_function``, or None."""
    kind = getattr(model, "loss_type", None)
    name = type(model).__name__
    if kind is None and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        kind = "ForCausalLM"
    return {"ForCausalLM": causal_lm_loss, "ForMaskedLM": masked_lm_loss}.get(kind)


def is_transformers_class(cls: type) -> bool:
    """A class defined in transformers (which is then imported: nothing is imported here)."""
    return cls.__module__.startswith("transformers.")


def is_pretrained_model(model: torch.nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)
