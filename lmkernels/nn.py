"""Drop-in modules: subclasses of the torch modules with the same constructor and state_dict."""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import functional as F

__all__ = ["Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "Embedding"]


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
