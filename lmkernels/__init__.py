"""lmkernels: fused transformer kernels for PyTorch with exact torch semantics.

    import lmkernels.functional as LF
    y = LF.softmax(x, dim=-1)                      # drop-in for torch.nn.functional.softmax
    with lmkernels.use_backend("reference"):        # pick a backend explicitly
        ...

Backends: reference, cpu, triton, cuda (see :mod:`lmkernels.backends`).
"""

import torch  # noqa: F401  (libtorch must be loaded before the compiled modules)

from lmkernels import (
    distributed,
    functional,
    nn,
    ops,  # noqa: F401  (registers the torch.library ops, fakes and autograd)
)
from lmkernels.backends import BackendUnavailable, info, selected_backend, use_backend
from lmkernels.patch import PatchReport, patch, unpatch

distributed.install()  # DTensor sharding rules, now or when torch.distributed.tensor is imported

try:  # the CPU kernels; their absence is reported by `python -m lmkernels info`
    from lmkernels import _C  # noqa: F401
except ImportError:
    pass

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable",
    "PatchReport",
    "functional",
    "info",
    "nn",
    "patch",
    "selected_backend",
    "unpatch",
    "use_backend",
]
