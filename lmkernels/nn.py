"""Drop-in modules: subclasses of the torch modules with the same constructor and state_dict."""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import functional as F

__all__ = [
    "Softmax",
    "LogSoftmax",
    "LayerNorm",
    "RMSNorm",
    "Embedding",
    "TokenPositionalEmbedding",
    "MultiheadAttention",
    "CrossEntropyLoss",
]


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` computed by :func:`lmkernels.functional.softmax`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by :func:`lmkernels.functional.log_softmax`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same constructor, parameters and state_dict keys) computed by
    :func:`lmkernels.functional.layer_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same constructor, parameters and state_dict keys) computed by
    :func:`lmkernels.functional.rms_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class Embedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` (same constructor, ``from_pretrained``, parameters and state_dict
    keys) computed by :func:`lmkernels.functional.embedding`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip


class TokenPositionalEmbedding(torch.nn.Module):
    """The input layer of a transformer: ``scale * token_weight[ids] + P[positions]`` computed by
    :func:`lmkernels.functional.token_positional_embedding` in one pass.

    ``P`` is a learned ``pos_weight`` of ``max_positions`` rows, or with ``sinusoidal=True``
    (and no ``max_positions``) the sinusoidal encoding computed on the fly (no parameter, no
    buffer). Both tables are initialised N(0, 1) like ``torch.nn.Embedding``, the
    ``padding_idx`` row of ``token_weight`` zeroed. ``forward(ids, positions=None)``: positions
    default to ``0 .. seq-1`` along the last dim of ``ids``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_positions: int | None = None,
        *,
        sinusoidal: bool = False,
        scale: float = 1.0,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = "lmkernels.nn.TokenPositionalEmbedding"
        if sinusoidal == (max_positions is not None):
            raise ValueError(
                f"{name}: give max_positions for a learned positional table, or sinusoidal=True "
                f"without it (got max_positions={max_positions}, sinusoidal={sinusoidal})"
            )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"{name}: padding_idx must be within num_embeddings")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.max_positions, self.sinusoidal = max_positions, sinusoidal
        self.scale, self.padding_idx = float(scale), padding_idx
        kw = dict(device=device, dtype=dtype)
        self.token_weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw))
        if sinusoidal:
            self.register_parameter("pos_weight", None)
        else:
            self.pos_weight = torch.nn.Parameter(torch.empty(max_positions, embedding_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.token_weight)
        if self.pos_weight is not None:
            torch.nn.init.normal_(self.pos_weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.token_weight[self.padding_idx].fill_(0)

    def forward(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return F.token_positional_embedding(
            ids, self.token_weight, positions, self.pos_weight, sinusoidal=self.sinusoidal,
            scale=self.scale, padding_idx=self.padding_idx,
        )  # fmt: skip

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        s += ", sinusoidal=True" if self.sinusoidal else f", max_positions={self.max_positions}"
        if self.scale != 1.0:
            s += f", scale={self.scale:g}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


def _keep_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch.nn.MultiheadAttention's mask convention (bool True = ignore, or additive float)
    as scaled_dot_product_attention's (bool True = take part, or additive of ``dtype``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask.to(dtype)


def _merge_masks(a: Tensor | None, b: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    to_add = [m if m.dtype != torch.bool else
              torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
              for m in (a, b)]  # fmt: skip
    return to_add[0] + to_add[1]


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (same constructor, parameters and state_dict keys) whose
    attention runs :func:`lmkernels.functional.scaled_dot_product_attention`.

    ``batch_first``, unbatched inputs, ``kdim`` / ``vdim``, ``key_padding_mask`` and
    ``attn_mask`` (bool True = ignore, or additive; (L, S) or (N * num_heads, L, S)) and the
    ``is_causal`` hint follow torch (``is_causal`` needs ``attn_mask``, which it then replaces
    unless there is a key_padding_mask). The heads are strided views of the projections (no
    copies); when both masks are given they are merged into one (N, num_heads, L, S) mask, as
    torch does. ``need_weights=True`` (torch's default), ``add_bias_kv`` and ``add_zero_attn``
    run torch's own implementation, which returns the attention weights exactly.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "lmkernels.nn.MultiheadAttention: is_causal is a hint that attn_mask is the "
                "causal mask; pass attn_mask too (as torch requires)"
            )
        self_attention = query is key and key is value  # before the views below
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, e = query.shape
        s, h = key.shape[1], self.num_heads
        hd = e // h
        if self._qkv_same_embed_dim and self_attention:
            # self-attention: one (3 * e, e) product, as torch does; q, k, v are views of it
            qkv = torch.nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.view(n, length, 3, h, hd).unbind(2)
        else:
            if self._qkv_same_embed_dim:
                wq, wk, wv = self.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bq = bk = bv = None
            if self.in_proj_bias is not None:
                bq, bk, bv = self.in_proj_bias.chunk(3)
            q = torch.nn.functional.linear(query, wq, bq)
            k = torch.nn.functional.linear(key, wk, bk)
            v = torch.nn.functional.linear(value, wv, bv)
            q, k, v = (t.view(n, t.shape[1], h, hd) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = is_causal and key_padding_mask is None
        mask = None
        if not causal:
            am = _keep_mask(attn_mask, q.dtype)
            if am is not None:
                am = am.view(1, 1, length, s) if am.dim() == 2 else am.view(n, h, length, s)
            kpm = _keep_mask(key_padding_mask, q.dtype)
            if kpm is not None:
                kpm = kpm.view(n, 1, 1, s)
            mask = _merge_masks(am, kpm, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(n, length, e)
        out = torch.nn.functional.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor and buffers) computed by
    :func:`lmkernels.functional.cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction,
                               label_smoothing=self.label_smoothing)  # fmt: skip
