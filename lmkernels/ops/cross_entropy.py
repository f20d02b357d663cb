"""Cross-entropy (and the fused linear + cross-entropy) as torch.library custom ops.

``lmkernels::cross_entropy_fwd(logits, target, weight, ...)`` takes (rows, cols) logits with
the classes contiguous and validated targets, and returns the reduced loss (in the accumulation
dtype) and, when ``want_grad`` (the 'mean' and 'sum' reductions on CPU tensors), the gradient
of that loss with respect to the logits, computed in the same pass over the logits: the
backward only multiplies it by the incoming gradient. Otherwise (the 'none' reduction, whose
per-row incoming gradient the forward cannot know, and every reduction on a GPU)
``lmkernels::cross_entropy_bwd`` recomputes the rows from the logits with the incoming gradient
folded into the kernel's scale.
Semantics (every backend): csrc/include/lmk/cross_entropy.h.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmkernels import reference
from lmkernels.backends import Impl, dispatch, in_forward_backend, remember_backend
from lmkernels.ops._common import DTYPE_CODE, FLOAT_DTYPES, eager_call, eager_function

REDUCTIONS = ("none", "mean", "sum")  # the reduction argument of the ops: an index into this

# ------------------------------------------------------------------------------- launchers
# launch(logits, target, weight, scale, loss, grad, ignore_index, eps, softcap, z_loss): the
# kernel contract on (rows, cols) logits; weight / scale / loss in the accumulation dtype.


def _cpu(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss):
    torch.ops.lmkernels_cpu.cross_entropy(
        logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss
    )


def _triton(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss):
    from lmkernels.triton_kernels import cross_entropy as k

    k.cross_entropy_fwd(logits, target, weight, loss, grad, ignore_index=ignore,
                        label_smoothing=eps, softcap=softcap, z_loss=z_loss,
                        scale=scale)  # fmt: skip


def _cuda(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss):
    from lmkernels import _cuda

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    with torch.cuda.device(logits.device):
        _cuda.cross_entropy(
            ptr(logits), ptr(target), ptr(weight), ptr(scale), ptr(loss), ptr(grad),
            DTYPE_CODE[logits.dtype], logits.shape[0], logits.shape[1], logits.stride(0),
            0 if grad is None else grad.stride(0),
            0 if scale is None or scale.dim() == 0 else 1,
            ignore, eps, softcap, z_loss, torch.cuda.current_stream(logits.device).cuda_stream,
        )  # fmt: skip


def _reference(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss):
    rows, g = reference.cross_entropy_rows(logits, target, weight, ignore, eps, softcap, z_loss,
                                           scale, grad is not None)  # fmt: skip
    if loss is not None:
        loss.copy_(rows)
    if grad is not None:
        grad.copy_(g)


def _dtypes(*allowed: torch.dtype):
    def supports(logits: Tensor, *_):
        if logits.dtype not in allowed:
            return (f"dtype {logits.dtype} is not supported "
                    f"(supported: {', '.join(map(str, allowed))})")  # fmt: skip
        return None

    return supports


_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAUNCH = {
    "reference": Impl(_reference),
    "cpu": Impl(_cpu, _dtypes(*FLOAT_DTYPES)),
    "triton": Impl(_triton, _dtypes(*_GPU_DTYPES)),
    "cuda": Impl(_cuda, _dtypes(*_GPU_DTYPES)),
}


def launch(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss) -> None:
    """Run the kernel contract on the selected backend (also the linear + cross-entropy's)."""
    if logits.shape[0] == 0:
        return
    fn = dispatch("cross_entropy", _LAUNCH, logits.device, logits)
    fn(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_SUM_BLOCK = 4096  # below torch's parallel-reduction grain (32768): one thread per block sum


def ordered_sum(v: Tensor) -> Tensor:
    """The sum of a 1-D tensor in an order fixed by its length: blocks of _SUM_BLOCK summed by
    one thread each, then the block sums. (torch's CPU sum splits a long vector by the thread
    count, which changes the last bits between thread counts.)"""
    n = v.shape[0]
    if n <= _SUM_BLOCK:
        return v.sum()
    pad = -n % _SUM_BLOCK
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(-1, _SUM_BLOCK).sum(1).sum()


def reduce_rows(loss: Tensor, how: str, denom: Tensor | None) -> Tensor:
    """The row losses reduced: 'none' as they are, 'sum', or 'mean' (divided by ``denom``)."""
    if how == "none":
        return loss
    total = ordered_sum(loss)
    return total / denom if how == "mean" else total


def mean_denominator(target: Tensor, weight: Tensor | None, ignore: int, acc) -> Tensor:
    """'mean''s divisor: the sum of the class weights of the rows not ignored (their count
    without weights), as torch's nll_loss; 0 when every row is ignored (the mean is then NaN)."""
    valid = target != ignore
    if weight is None or weight.numel() == 0:
        return valid.sum(dtype=acc)
    return ordered_sum(torch.where(valid, weight[torch.where(valid, target, 0)], 0).to(acc))


def mean_scale(how: str, target: Tensor, weight: Tensor | None, ignore: int, acc):
    """(divisor, gradient scale 1 / divisor) for 'mean'; (None, None) otherwise. The scale is
    inf when every row is ignored: those rows' gradients are 0 whatever it is."""
    if how != "mean":
        return None, None
    denom = mean_denominator(target, weight, ignore, acc)
    return denom, 1.0 / denom


def check_targets(target: Tensor, classes: int, ignore: int) -> None:
    """IndexError naming the first target that is neither ignore_index nor in [0, classes).
    Inside the ops (not in the public functions), so torch.compile traces no data-dependent
    branch; on a GPU it reads one flag back (a synchronisation) instead of a device assert."""
    bad = (target != ignore) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: target {int(target[i])} (at position {i} of the "
                         f"flattened target) is out of bounds for {classes} classes and is not "
                         f"ignore_index ({ignore})")  # fmt: skip


# ----------------------------------------------------------------------------- registered ops


def _run_fwd(logits, target, weight, ignore, eps, softcap, z_loss, reduction, want_grad):
    check_targets(target, logits.shape[1], ignore)
    acc = acc_dtype(logits.dtype)
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    how = REDUCTIONS[reduction]
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if want_grad else None
    denom, scale = mean_scale(how, target, weight, ignore, acc)
    launch(logits, target, weight, scale, loss, grad, ignore, eps, softcap, z_loss)
    loss = reduce_rows(loss, how, denom)
    return loss, grad if grad is not None else logits.new_empty(0)


def _fwd_outputs(logits, reduction, want_grad):
    acc = acc_dtype(logits.dtype)
    shape = (logits.shape[0],) if REDUCTIONS[reduction] == "none" else ()
    loss = logits.new_empty(shape, dtype=acc)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return loss, grad if want_grad else logits.new_empty(0)


def _run_bwd(logits, target, weight, dloss, ignore, eps, softcap, z_loss):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    scale = dloss.to(acc_dtype(logits.dtype)).contiguous()  # (an expanded gradient: stride 0)
    launch(logits, target, weight, scale, None, grad, ignore, eps, softcap, z_loss)
    return grad


@torch.library.custom_op("lmkernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    reduction: int,
    want_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _run_fwd(logits, target, weight, ignore_index, label_smoothing, softcap, z_loss,
                    reduction, want_grad)  # fmt: skip


@cross_entropy_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, softcap, z_loss, reduction,
      want_grad):  # fmt: skip
    return _fwd_outputs(logits, reduction, want_grad)


@torch.library.custom_op("lmkernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    dloss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
) -> Tensor:
    return _run_bwd(logits, target, weight, dloss, ignore_index, label_smoothing, softcap,
                    z_loss)  # fmt: skip


@cross_entropy_bwd.register_fake
def _(logits, target, weight, dloss, ignore_index, label_smoothing, softcap, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    logits, target, weight, ignore, eps, softcap, z_loss, reduction, want_grad = inputs
    loss, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # no zero (rows, cols) tensor for grad's gradient
    ctx.args = (ignore, eps, softcap, z_loss)
    ctx.dtype, ctx.stored, ctx.reduction = logits.dtype, want_grad, REDUCTIONS[reduction]
    # with the gradient computed in the forward only it is needed; else the backward
    # recomputes from the logits
    ctx.save_for_backward(*((grad,) if want_grad else (logits, target, weight)))


def scaled(grad: Tensor, dloss: Tensor, eager: bool) -> Tensor:
    """``grad * dloss`` (a 0-d incoming gradient), or in a plain eager backward on CPU, when
    ``dloss`` is exactly 1 (``loss.backward()``), ``grad`` itself: no pass over it, no new
    tensor. Safe: the engine releases the saved gradient after this backward unless the graph
    is retained, so AccumulateGrad takes it over; with a retained graph AccumulateGrad copies
    it, and a caller of autograd.grad who writes into it makes a second backward raise (the
    saved tensor's version changed) instead of returning wrong values. A CUDA dloss is not
    read back (that would synchronise): there the product is always formed."""
    if eager and dloss.device.type == "cpu" and float(dloss) == 1.0:
        return grad
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad * dloss.to(acc)).to(grad.dtype)


@in_forward_backend
def _grads(ctx, dloss, bwd, eager=False):
    if ctx.needs_input_grad[2]:
        raise RuntimeError("cross_entropy: the derivative for 'weight' is not implemented "
                           "(as in torch)")  # fmt: skip
    if dloss is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    if ctx.stored:
        (grad,) = ctx.saved_tensors
        dx = scaled(grad, dloss, eager)
    else:
        logits, target, weight = ctx.saved_tensors
        if ctx.reduction == "mean":  # the incoming gradient times 1 / the divisor
            acc = acc_dtype(ctx.dtype)
            dloss = dloss.to(acc) * mean_scale("mean", target, weight, ctx.args[0], acc)[1]
        dx = bwd(logits, target, weight, dloss, *ctx.args)
    return dx, None, None, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(
    lambda ctx, dloss, _dgrad: _grads(ctx, dloss, cross_entropy_bwd),
    setup_context=_setup_context,
)


_CrossEntropyEager = eager_function(
    "_CrossEntropyEager",
    _run_fwd,
    _setup_context,
    lambda ctx, dloss, _dgrad: _grads(ctx, dloss, _run_bwd, True),
)


class _CrossEntropyInplace(torch.autograd.Function):
    """inplace_backward=True: the gradient is written over the logits (marked dirty)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore, eps, softcap, z_loss, reduction):
        # logits: (rows, cols), or (cols,) (one row: its view is made here, as autograd cannot
        # take a view modified in place by a Function with two outputs)
        remember_backend(ctx)
        logits2d = logits.view(1, -1) if logits.dim() == 1 else logits
        check_targets(target, logits2d.shape[1], ignore)
        acc = acc_dtype(logits2d.dtype)
        loss = torch.empty(logits2d.shape[0], dtype=acc, device=logits2d.device)
        how = REDUCTIONS[reduction]
        denom, scale = mean_scale(how, target, weight, ignore, acc)
        launch(logits2d, target, weight, scale, loss, logits2d, ignore, eps, softcap, z_loss)
        loss = reduce_rows(loss, how, denom)
        ctx.mark_dirty(logits)
        ctx.save_for_backward(logits)
        ctx.none = how == "none"
        return loss, logits

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, _dlogits):
        (grad,) = ctx.saved_tensors
        g = dloss.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        dx = grad * (g[:, None] if ctx.none and grad.dim() == 2 else g)
        return dx.to(grad.dtype), None, None, None, None, None, None, None


# ------------------------------------------------------------------------------ entry point


# where the 'mean' / 'sum' forward writes the gradient (see cross_entropy_rows)
STORE_GRAD_DEVICES = ("cpu",)


def cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    reduction: str,
    inplace_backward: bool = False,
) -> Tensor:
    """The reduced loss (accumulation dtype; 'none': per row) of (rows, cols) ``logits`` with
    autograd (with ``inplace_backward``, ``logits`` may also be one (cols,) row; the gradient
    is then written over it). ``target``: int64 (rows,), each ignore_index or in [0, cols);
    ``weight``: None or (cols,) of the accumulation dtype. The public functions call this with
    validated arguments. Plain eager calls run the backend directly; everything else goes
    through the registered op (see :func:`lmkernels.ops._common.eager_call`)."""
    red = REDUCTIONS.index(reduction)
    args = (ignore_index, label_smoothing, softcap, z_loss)
    grad_on = torch.is_grad_enabled() and logits.requires_grad
    eager = eager_call(logits, target, weight)
    if eager and grad_on and inplace_backward:
        return _CrossEntropyInplace.apply(logits, target, weight, *args, red)[0]
    rows = logits.view(1, -1) if logits.dim() == 1 else logits
    # 'mean' / 'sum': on the CPU the forward writes the gradient in its pass over the logits
    # (and an eager backward with dloss = 1 hands it over, see scaled); on a GPU, where the
    # incoming gradient is not read back, the backward recomputes it with dloss folded into the
    # kernel's scale: one pass less, and no saved gradient between forward and backward
    want = grad_on and reduction != "none" and rows.device.type in STORE_GRAD_DEVICES
    if not eager:
        return cross_entropy_fwd(rows, target, weight, *args, red, want)[0]
    if grad_on or (torch.is_grad_enabled() and weight is not None and weight.requires_grad):
        return _CrossEntropyEager.apply(rows, target, weight, *args, red, want)[0]
    return _run_fwd(rows, target, weight, *args, red, False)[0]


# ---------------------------------------------------------------- linear + cross-entropy
# hidden (N, H) @ weight (V, H)^T (+ bias) -> logits -> cross_entropy, chunked over tokens: a
# chunk's (rows, V) logits exist only while it is processed. With the 'mean' / 'sum' reductions
# the forward also computes every gradient (the chunk's logits are overwritten by their
# gradient, which then feeds dhidden = dlogits @ weight, dweight += dlogits^T @ hidden and
# dbias += the column sums); the backward scales them by the incoming gradient. With 'none' the
# backward recomputes the chunks with the per-row incoming gradient (twice the matmul work).

# logits per chunk: tokens = this // vocab. CPU: 2^24 (64 MB in fp32). CUDA: 2^27, since every
# chunk adds its (vocab, hidden) product into the fp32 dW, a pass over 4 * vocab * hidden * 2
# bytes that thin chunks repeat too often (H100, bf16 8192 x 2048 x 128256, fwd+bwd: 164 ms with
# 2^24 and a bf16 product per chunk; 26 ms with 2^27 and the fp32-output addmm; torch 22.6 ms;
# measured 2026-11-26).
LOGITS_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 27}
# bf16 / fp16 inputs with an fp32 product in one cuBLAS call (torch >= 2.8, CUDA only)
_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def chunk_rows(tokens: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is not None:
        return max(1, min(tokens, chunk_size))
    elems = LOGITS_CHUNK_ELEMS.get(device.type, LOGITS_CHUNK_ELEMS["cpu"])
    return max(1, min(tokens, elems // max(vocab, 1)))


def _linear_chunks(hidden, weight, bias, target, cw, args, scale, loss, dh, dw, db, chunk):
    """Run the chunks: loss rows into ``loss`` (or None), and with ``scale`` (or for 'sum',
    scale None but gradients wanted) the gradients into dh / dw / db (each None: not
    wanted)."""
    want = dh is not None or dw is not None or db is not None
    n = hidden.shape[0]
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h = hidden[c0:c1]
        logits = torch.nn.functional.linear(h, weight, bias)
        sc = scale if scale is None or scale.dim() == 0 else scale[c0:c1]
        launch(logits, target[c0:c1], cw, sc, None if loss is None else loss[c0:c1],
               logits if want else None, *args)  # fmt: skip
        if not want:
            continue
        if dh is not None:
            torch.matmul(logits, weight, out=dh[c0:c1])
        if dw is not None:
            if dw.dtype == logits.dtype:
                dw.addmm_(logits.t(), h)
            elif dw.is_cuda and _MM_OUT_DTYPE:  # 16-bit data: products summed in fp32
                torch.addmm(dw, logits.t(), h, out_dtype=dw.dtype, out=dw)
            else:  # 16-bit data: each chunk's product rounded once, summed in fp32
                dw += (logits.t() @ h).to(dw.dtype)
        if db is not None:
            db += logits.sum(0, dtype=db.dtype)


def _or_empty(grad: Tensor | None, like: Tensor | None, hidden: Tensor) -> Tensor:
    """A gradient in its parameter's dtype, or a fresh empty tensor (outputs must not alias)."""
    return hidden.new_empty(0, dtype=torch.float32) if grad is None else grad.to(like.dtype)


def _grad_fakes(hidden, weight, bias, need_dh, need_dw, need_db):
    return tuple(
        torch.empty_like(t) if need else hidden.new_empty(0, dtype=torch.float32)
        for t, need in ((hidden, need_dh), (weight, need_dw), (bias, need_db))
    )


def _run_linear_fwd(hidden, weight, bias, target, cw, ignore, eps, softcap, z_loss, reduction,
                    need_dh, need_dw, need_db, chunk_size):  # fmt: skip
    vocab = weight.shape[0]
    check_targets(target, vocab, ignore)
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    how = REDUCTIONS[reduction]
    want = how != "none"
    loss = torch.empty(n, dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden) if want and need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if want and need_dw else None
    db = torch.zeros(vocab, dtype=acc, device=hidden.device) if want and need_db else None
    denom, scale = mean_scale(how, target, cw, ignore, acc)
    args = (ignore, eps, softcap, z_loss)
    _linear_chunks(hidden, weight, bias, target, cw, args, scale, loss, dh, dw, db,
                   chunk_rows(n, vocab, chunk_size, hidden.device))  # fmt: skip
    loss = reduce_rows(loss, how, denom)
    return (loss, *(_or_empty(g, p, hidden) for g, p in ((dh, hidden), (dw, weight), (db, bias))))


def _linear_fwd_outputs(hidden, weight, bias, reduction, need_dh, need_dw, need_db):
    acc = acc_dtype(hidden.dtype)
    none = REDUCTIONS[reduction] == "none"
    loss = hidden.new_empty((hidden.shape[0],) if none else (), dtype=acc)
    return (loss, *_grad_fakes(hidden, weight, bias, need_dh and not none, need_dw and not none,
                               need_db and not none))  # fmt: skip


def _run_linear_bwd(hidden, weight, bias, target, cw, dloss, ignore, eps, softcap, z_loss,
                    need_dh, need_dw, need_db, chunk_size):  # fmt: skip
    acc = acc_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if need_db else None
    _linear_chunks(hidden, weight, bias, target, cw, (ignore, eps, softcap, z_loss),
                   dloss.to(acc).contiguous(), None, dh, dw, db,
                   chunk_rows(hidden.shape[0], weight.shape[0], chunk_size,
                              hidden.device))  # fmt: skip
    return tuple(_or_empty(g, p, hidden) for g, p in ((dh, hidden), (dw, weight), (db, bias)))


@torch.library.custom_op("lmkernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    reduction: int,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run_linear_fwd(hidden, weight, bias, target, class_weight, ignore_index,
                           label_smoothing, softcap, z_loss, reduction, need_dh, need_dw,
                           need_db, chunk_size)  # fmt: skip


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, softcap, z_loss,
      reduction, need_dh, need_dw, need_db, chunk_size):  # fmt: skip
    return _linear_fwd_outputs(hidden, weight, bias, reduction, need_dh, need_dw, need_db)


@torch.library.custom_op("lmkernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    dloss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_linear_bwd(hidden, weight, bias, target, class_weight, dloss, ignore_index,
                           label_smoothing, softcap, z_loss, need_dh, need_dw, need_db,
                           chunk_size)  # fmt: skip


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, bias, target, class_weight, dloss, ignore_index, label_smoothing, softcap,
      z_loss, need_dh, need_dw, need_db, chunk_size):  # fmt: skip
    return _grad_fakes(hidden, weight, bias, need_dh, need_dw, need_db)


def _linear_setup_context(ctx, inputs, output):
    remember_backend(ctx)
    (hidden, weight, bias, target, cw, ignore, eps, softcap, z_loss, reduction, need_dh, need_dw,
     need_db, chunk_size) = inputs  # fmt: skip
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients' gradients
    ctx.none = REDUCTIONS[reduction] == "none"
    ctx.args = (ignore, eps, softcap, z_loss, need_dh, need_dw, need_db, chunk_size)
    if ctx.none:  # the backward recomputes the chunks
        ctx.save_for_backward(hidden, weight, bias, target, cw)
    else:
        ctx.save_for_backward(dh, dw, db)


@in_forward_backend
def _linear_grads(ctx, dloss, bwd, eager=False):
    if ctx.needs_input_grad[4]:
        raise RuntimeError("linear_cross_entropy: the derivative for 'class_weight' is not "
                           "implemented (as in torch)")  # fmt: skip
    if dloss is None:
        return (None,) * 14
    need_dh, need_dw, need_db = ctx.args[4:7]
    if ctx.none:
        hidden, weight, bias, target, cw = ctx.saved_tensors
        dh, dw, db = bwd(hidden, weight, bias, target, cw, dloss, *ctx.args)
    else:
        dh, dw, db = (scaled(t, dloss, eager) if t.numel() else t for t in ctx.saved_tensors)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            *(None,) * 11)  # fmt: skip


linear_cross_entropy_fwd.register_autograd(
    lambda ctx, dloss, _a, _b, _c: _linear_grads(ctx, dloss, linear_cross_entropy_bwd),
    setup_context=_linear_setup_context,
)


_LinearCrossEntropyEager = eager_function(
    "_LinearCrossEntropyEager",
    _run_linear_fwd,
    _linear_setup_context,
    lambda ctx, dloss, _a, _b, _c: _linear_grads(ctx, dloss, _run_linear_bwd, True),
)


def linear_cross_entropy_rows(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    reduction: str,
    chunk_size: int | None,
) -> Tensor:
    """The reduced loss (accumulation dtype) of cross_entropy(hidden @ weight^T + bias) with
    autograd, for 2-D ``hidden`` and validated arguments (see :func:`cross_entropy_rows`)."""
    red = REDUCTIONS.index(reduction)
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    args = (hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, softcap,
            z_loss, red, *need, chunk_size)  # fmt: skip
    if not eager_call(hidden, weight, bias, target, class_weight):
        return linear_cross_entropy_fwd(*args)[0]
    if any(need) or (grad and class_weight is not None and class_weight.requires_grad):
        return _LinearCrossEntropyEager.apply(*args)[0]
    return _run_linear_fwd(*args)[0]
