"""Drop-in modules: subclasses of the torch modules with the same constructor and state_dict."""

from __future__ import annotations

import torch
from torch import Tensor

from lmkernels import functional as F

__all__ = ["Softmax", "LogSoftmax"]


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` computed by :func:`lmkernels.functional.softmax`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by :func:`lmkernels.functional.log_softmax`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)
