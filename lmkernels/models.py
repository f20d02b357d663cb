"""Small reference models written with plain torch modules, used by ``examples/`` and the
end-to-end benchmark (``python -m lmkernels.bench e2e``). They contain no lmkernels code:
:func:`lmkernels.patch` is what puts the kernels under them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 16384
    context: int = 256
    d_model: int = 256
    heads: int = 4
    layers: int = 4
    positions: str = "learned"  # or "sinusoidal" (a fixed buffer, no parameter)
    dropout: float = 0.0


def sinusoid_table(length: int, dim: int) -> Tensor:
    """The sinusoidal position encoding of "Attention is all you need": (length, dim), sin in
    the even columns, cos in the odd ones."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table.float()


class GPT(nn.Module):
    """A decoder-only language model: token embedding + positions, pre-norm
    ``nn.TransformerEncoderLayer`` blocks with a causal mask (multi-head attention, GELU MLP),
    a final LayerNorm, an output projection and ``nn.CrossEntropyLoss``. ``forward(ids)``
    returns the logits; ``forward(ids, targets)`` the mean loss (targets of -100 ignored)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.context, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoid_table(cfg.context, cfg.d_model), False)
        else:
            raise ValueError(f"GPTConfig.positions must be 'learned' or 'sinusoidal', "
                             f"got {cfg.positions!r}")  # fmt: skip
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model,
                                           dropout=cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.loss = nn.CrossEntropyLoss(ignore_index=-100)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> Tensor:
        t = ids.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"GPT: sequence of {t} tokens, context is {self.cfg.context}")
        if self.cfg.positions == "learned":
            pos = self.pos(torch.arange(t, device=ids.device))
        else:
            pos = self.pos_table[:t]
        h = self.tok(ids) + pos
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        logits = self.head(self.norm(h))
        if targets is None:
            return logits
        return self.loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
