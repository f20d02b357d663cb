"""torch.library registrations of every lmkernels op (imported by the package __init__ so the
fake and autograd implementations exist before opcheck or torch.compile sees an op)."""

from lmkernels.ops import (  # noqa: F401
    attention,
    cross_entropy,
    embedding,
    norm,
    rotary,
    softmax,
)
