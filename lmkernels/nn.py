"""Drop-in modules: subclasses of the torch modules with the same constructor and state_dict."""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import functional as F

__all__ = ["Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "Embedding", "TokenPositionalEmbedding"]


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
