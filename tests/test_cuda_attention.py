"""The CUDA flash-attention kernels (csrc/cuda/attention.cu) through their launchers
``lmkernels.ops.attention._cuda_fwd`` / ``_cuda_bwd``, on a GPU, against
``lmkernels.reference.attention_fwd / attention_bwd``; and the argument checks of the
``lmkernels._cuda.attention_*`` bindings, which need only the built module.

Forward: fp16 / bf16 on tensor cores (head dims padded to 64 / 128 / 256), fp32 in SIMT; every
head-dim bucket and the padded ones (80, 96, odd widths, E != Ev), L != S and odd lengths,
causal / sliding windows aligned top-left and bottom-right, bool and additive masks (broadcast
and transposed views), fully masked rows (zeros and lse = -inf), GQA / MQA, packed varlen
batches with sequences of length 0 and 1. Outputs sit in sentinel-filled buffers in the
(B, L, H, D) layout the op allocates (a write past the end is caught). Tolerances: the
reference is fp32 math rounded once; the tensor-core kernels round P to the data dtype before
P V, so a few ulp of the output dtype.
Backward: the same geometry against the reference, and bit-for-bit repeatable (no atomics).
Dropout (forward and backward, the reference's lmk/philox.h keep bits: the same seed gives the same
bits, varlen counters at the packed positions) and fp32 additive masks on fp16 / bf16 data.
Without a GPU the same tests run on the CPU against a host emulation of the kernels (below).
"""

from __future__ import annotations

import math

import cuda_emulation
import pytest
import torch

from lmkernels import reference

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA attention kernels need one to run"
)

DEVICE = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F16, BF16, F32]
SENTINEL = 7.0
TAIL = 64
# |ours - reference| <= atol + rtol * |reference| for out and the gradients (scaled by the
# gradient's largest magnitude); lse within LSE_TOL (fp32, MUFU exp2 / log2)
_TOL = {F32: (2e-5, 2e-5), F16: (2e-3, 4e-3), BF16: (1.6e-2, 3e-2)}
LSE_TOL = 2e-4


def _cuda_module():
    try:
        from lmkernels import _cuda
    except ImportError as e:
        pytest.skip(f"CUDA module not built here: {e}")
    return _cuda


def _launchers():
    _cuda_module()
    from lmkernels.ops import attention as a

    return a._cuda_fwd, a._cuda_bwd, a.AttnOptions


def _blhd(b, h, n, d, dtype, gen):
    """A (b, h, n, d) view of (b, n, h, d) memory (the layout of the ops and of torch's flash)."""
    return torch.randn(b, n, h, d, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)


def _out(b, h, n, d, dtype, offset=0):
    """A (b, h, n, d) output view in the (b, n, h, d) layout inside a sentinel-filled buffer."""
    size = b * n * h * d
    buf = torch.full((size + offset + TAIL,), SENTINEL, dtype=dtype, device=DEVICE)
    return buf[offset : offset + size].view(b, n, h, d).transpose(1, 2), buf[offset + size :]


def _run_fwd(q, k, v, mask, opts, out_offset=0):
    fwd, _, _ = _launchers()
    b, hq, length, _ = q.shape
    out, tail = _out(b, hq, length, v.shape[-1], q.dtype, out_offset)
    lse = torch.full((b, hq, length), SENTINEL, dtype=torch.float32, device=DEVICE)
    fwd(q, k, v, mask, out, lse, opts)
    assert bool((tail == SENTINEL).all()), "write past the end of out"
    return out, lse


def _close(what, ours, want, dtype, scale=None):
    atol, rtol = _TOL[dtype]
    ours, want = ours.float().cpu(), want.float().cpu()
    assert ours.shape == want.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    if scale is not None:  # gradients: relative to their largest magnitude
        atol = atol * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
    err = (ours - want).abs() - (atol + rtol * want.abs())
    if err.numel() and float(err.max()) > 0:
        at = int(err.flatten().argmax())
        got, ref = float(ours.flatten()[at]), float(want.flatten()[at])
        raise AssertionError(
            f"{what}: {int((err > 0).sum())} elements off; worst at flat {at}: {got} vs {ref}"
        )


def _check_fwd(what, q, k, v, mask=None, scale=None, wl=-1, wr=-1, br=False, cu_q=None, cu_k=None,
               max_q=0, max_k=0, out_offset=0, drop=0.0, seed=0):  # fmt: skip
    _, _, AttnOptions = _launchers()
    scale = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else scale
    opts = AttnOptions(scale, wl, wr, br, cu_q, cu_k, max_q, max_k, drop, seed)
    out, lse = _run_fwd(q, k, v, mask, opts, out_offset)
    ro, rl = reference.attention_fwd(q, k, v, mask, scale, wl, wr, br, cu_q, cu_k,
                                     drop_threshold=opts.drop_threshold, seed=seed)  # fmt: skip
    _close(f"{what} out", out, ro, q.dtype)
    empty = torch.isneginf(rl)
    assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse -inf rows differ"
    assert bool((out.float()[empty] == 0).all()), f"{what}: rows without keys must be zeros"
    fin = torch.isfinite(rl)
    if fin.any():
        err = float((lse[fin] - rl[fin]).abs().max())
        assert err <= LSE_TOL * (1 + float(rl[fin].abs().max())), f"{what}: lse off by {err}"
    return out, lse, opts


# ----------------------------------------------------------------------------------- forward


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("e,ev", [(64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (32, 96),
                                  (200, 40), (33, 17), (1, 1), (0, 8)])  # fmt: skip
def test_forward_head_dims(dtype, e, ev):
    gen = torch.Generator(device=DEVICE).manual_seed(e * 1000 + ev)
    for length, s in ((67, 131), (130, 61), (1, 1), (128, 128)):
        q, k, v = (_blhd(2, 3, length, e, dtype, gen), _blhd(2, 3, s, e, dtype, gen),
                   _blhd(2, 3, s, ev, dtype, gen))  # fmt: skip
        _check_fwd(f"{dtype} E={e} Ev={ev} L={length} S={s}", q, k, v)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("length,s", [(70, 130), (130, 70), (64, 64), (1, 200), (200, 1),
                                      (257, 255)])  # fmt: skip
def test_forward_causal_and_windows(dtype, length, s):
    gen = torch.Generator(device=DEVICE).manual_seed(length * 7 + s)
    for e in (64, 128):
        q, k, v = (_blhd(1, 2, length, e, dtype, gen), _blhd(1, 2, s, e, dtype, gen),
                   _blhd(1, 2, s, e, dtype, gen))  # fmt: skip
        for wl, wr, br in ((-1, 0, False), (-1, 0, True), (10, 0, False), (5, 7, True),
                           (0, 0, False), (3, -1, False), (100, 3, True), (64, 64, False),
                           (1 << 40, 1 << 40, True)):  # fmt: skip
            _check_fwd(f"{dtype} E={e} L={length} S={s} window=({wl}, {wr}) br={br}", q, k, v,
                       wl=wl, wr=wr, br=br)  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_masks_and_fully_masked_rows(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    length, s = 75, 90
    for e in (64, 80, 256):
        q, k, v = (_blhd(2, 4, length, e, dtype, gen), _blhd(2, 2, s, e, dtype, gen),
                   _blhd(2, 2, s, e, dtype, gen))  # fmt: skip
        keep = torch.rand(2, 1, length, s, generator=gen, device=DEVICE) > 0.3
        keep[:, :, 5] = False  # fully masked rows
        keep[1, :, 40:] = False
        out, lse, _ = _check_fwd(f"{dtype} E={e} bool mask, broadcast heads", q, k, v,
                                 mask=keep.expand(2, 4, length, s))  # fmt: skip
        assert bool(torch.isneginf(lse[:, :, 5]).all()) and bool((out[:, :, 5] == 0).all())
        add = (torch.randn(1, 4, length, s, generator=gen, device=DEVICE) * 2).to(dtype)
        add[0, 1, 3] = float("-inf")
        _check_fwd(f"{dtype} E={e} additive mask, causal", q, k, v,
                   mask=add.expand(2, 4, length, s), wr=0)  # fmt: skip
        # a transposed view: the key stride is not 1
        tr = (torch.rand(2, 4, s, length, generator=gen, device=DEVICE) > 0.5).transpose(2, 3)
        _check_fwd(f"{dtype} E={e} transposed bool mask, window", q, k, v, mask=tr, wl=20, wr=5)
        row = torch.rand(s, generator=gen, device=DEVICE) > 0.5  # one key mask for every row
        _check_fwd(f"{dtype} E={e} key mask (zero strides)", q, k, v,
                   mask=row.expand(2, 4, length, s))  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_gqa_mqa_and_layouts(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    for hq, hk in ((8, 2), (6, 1), (3, 3)):
        q, k, v = (_blhd(2, hq, 40, 64, dtype, gen), _blhd(2, hk, 50, 64, dtype, gen),
                   _blhd(2, hk, 50, 64, dtype, gen))  # fmt: skip
        _check_fwd(f"{dtype} Hq={hq} Hk={hk}", q, k, v, wr=0, out_offset=1)
    # contiguous (B, H, L, D), an unaligned base pointer (element loads), broadcast batch (zero
    # strides)
    base = torch.randn(2 * 2 * 33 * 64 + 1, generator=gen, device=DEVICE).to(dtype)
    q = base[1:].view(2, 2, 33, 64)
    k = torch.randn(1, 2, 45, 64, generator=gen, device=DEVICE).to(dtype).expand(2, 2, 45, 64)
    v = torch.randn(2, 2, 45, 64, generator=gen, device=DEVICE).to(dtype)
    _check_fwd(f"{dtype} mixed layouts", q, k, v)


def _varlen(lq, lk, hq, hk, e, ev, dtype, gen):
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)  # fmt: skip
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)  # fmt: skip
    tq, tk = sum(lq), sum(lk)

    def packed(total, h, d):  # (1, h, total, d) view of (total, h, d), as varlen_attention makes
        t = torch.randn(total, h, d, generator=gen, device=DEVICE).to(dtype)
        return t.transpose(0, 1)[None]

    return packed(tq, hq, e), packed(tk, hk, e), packed(tk, hk, ev), cu_q, cu_k


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_varlen_with_empty_and_single_sequences(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    lq, lk = [5, 0, 1, 70, 3, 0, 129], [9, 4, 1, 66, 0, 0, 130]
    for hq, hk, e in ((4, 2, 64), (2, 2, 80), (2, 1, 256)):
        q, k, v, cu_q, cu_k = _varlen(lq, lk, hq, hk, e, e, dtype, gen)
        for wl, wr in ((-1, -1), (-1, 0), (4, 0), (10, 10)):
            _check_fwd(f"{dtype} varlen Hq={hq} Hk={hk} E={e} window=({wl}, {wr})", q, k, v,
                       wl=wl, wr=wr, br=True, cu_q=cu_q, cu_k=cu_k, max_q=max(lq),
                       max_k=max(lk) + 3)  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_no_keys_and_special_values(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    q = _blhd(1, 2, 9, 64, dtype, gen)
    k, v = _blhd(1, 2, 0, 64, dtype, gen), _blhd(1, 2, 0, 64, dtype, gen)
    out, lse, _ = _check_fwd(f"{dtype} S=0", q, k, v)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    # a NaN in q reaches its row only
    q = _blhd(1, 1, 20, 64, dtype, gen)
    k, v = _blhd(1, 1, 30, 64, dtype, gen), _blhd(1, 1, 30, 64, dtype, gen)
    q[0, 0, 3, 7] = float("nan")
    _, _, AttnOptions = _launchers()
    out, _ = _run_fwd(q, k, v, None, AttnOptions(0.125))
    assert bool(torch.isnan(out[0, 0, 3]).all())
    assert not bool(torch.isnan(out[0, 0, :3]).any()) and not bool(torch.isnan(out[0, 0, 4:]).any())


# ---------------------------------------------------------------------------------- backward


def _check_bwd(what, q, k, v, mask=None, wl=-1, wr=-1, br=False, cu_q=None, cu_k=None, max_q=0,
               max_k=0, scale=None, drop=0.0, seed=0):  # fmt: skip
    _, bwd, AttnOptions = _launchers()
    scale = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else scale
    opts = AttnOptions(scale, wl, wr, br, cu_q, cu_k, max_q, max_k, drop, seed)
    out, lse = _run_fwd(q, k, v, mask, opts)
    gen = torch.Generator(device=DEVICE).manual_seed(99)
    dout = _blhd(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], q.dtype, gen)
    grads = []
    for _ in range(2):
        dq, dk, dv = (torch.full_like(t, SENTINEL) for t in (q, k, v))
        bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, opts)
        grads.append((dq, dk, dv))
    want = reference.attention_bwd(dout, q, k, v, out, lse, mask, scale, wl, wr, br, cu_q, cu_k,
                                   drop_threshold=opts.drop_threshold, seed=seed)  # fmt: skip
    for name, ours, again, ref in zip(("dq", "dk", "dv"), grads[0], grads[1], want, strict=True):
        _close(f"{what} {name}", ours, ref, q.dtype, scale=True)
        assert torch.equal(ours, again), f"{what} {name}: not bit-for-bit repeatable"
    return grads[0]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("e,ev", [(64, 64), (80, 80), (128, 128), (256, 256), (33, 17), (0, 8)])
def test_backward_head_dims(dtype, e, ev):
    gen = torch.Generator(device=DEVICE).manual_seed(e + 7 * ev)
    for length, s in ((67, 131), (130, 61)):
        q, k, v = (_blhd(2, 2, length, e, dtype, gen), _blhd(2, 2, s, e, dtype, gen),
                   _blhd(2, 2, s, ev, dtype, gen))  # fmt: skip
        _check_bwd(f"{dtype} E={e} Ev={ev} L={length} S={s}", q, k, v)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_backward_windows_masks_gqa_varlen(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    q, k, v = (_blhd(1, 4, 70, 64, dtype, gen), _blhd(1, 2, 130, 64, dtype, gen),
               _blhd(1, 2, 130, 64, dtype, gen))  # fmt: skip
    for wl, wr, br in ((-1, 0, False), (-1, 0, True), (5, 7, True), (0, 0, False)):
        _check_bwd(f"{dtype} GQA window=({wl}, {wr}) br={br}", q, k, v, wl=wl, wr=wr, br=br)
    keep = torch.rand(1, 4, 70, 130, generator=gen, device=DEVICE) > 0.3
    keep[:, :, 9] = False
    _check_bwd(f"{dtype} bool mask", q, k, v, mask=keep)
    add = torch.randn(1, 1, 70, 130, generator=gen, device=DEVICE).to(dtype).expand(1, 4, 70, 130)
    _check_bwd(f"{dtype} additive mask", q, k, v, mask=add, wr=0)
    lq, lk = [5, 0, 1, 70, 3], [9, 4, 1, 66, 0]
    q, k, v, cu_q, cu_k = _varlen(lq, lk, 4, 2, 64, 64, dtype, gen)
    _check_bwd(f"{dtype} varlen causal", q, k, v, wr=0, br=True, cu_q=cu_q, cu_k=cu_k,
               max_q=max(lq), max_k=max(lk))  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=lambda d: str(d)[6:])
def test_backward_head_dims_over_128_on_tensor_cores(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    # the 256 bucket of the tensor-core backward (dk / dv: 32 keys per CTA split over the warps,
    # P^T / dS^T through shared memory; dq: key tiles of 32): padded widths, E != Ev across 128,
    # several key blocks and query tiles, GQA; causal bottom-right, a window, every mask kind,
    # dropout, varlen
    keep = torch.rand(1, 4, 20, 37, generator=gen, device=DEVICE) > 0.3
    keep[:, :, 4] = False
    for e, ev, length, s, wl, wr, mask in ((160, 160, 41, 70, -1, 0, None),
                                           (192, 96, 33, 40, 6, 2, None),
                                           (100, 256, 20, 37, -1, -1, keep)):  # fmt: skip
        q, k, v = (_blhd(1, 4, length, e, dtype, gen), _blhd(1, 2, s, e, dtype, gen),
                   _blhd(1, 2, s, ev, dtype, gen))  # fmt: skip
        _check_bwd(f"{dtype} E={e} Ev={ev} L={length} S={s} window=({wl}, {wr}) mask", q, k, v,
                   mask=mask, wl=wl, wr=wr, br=True)  # fmt: skip
    q, k, v = (_blhd(2, 2, 23, 256, dtype, gen), _blhd(2, 1, 35, 256, dtype, gen),
               _blhd(2, 1, 35, 136, dtype, gen))  # fmt: skip
    add = torch.randn(2, 1, 23, 35, generator=gen, device=DEVICE).to(dtype).expand(2, 2, 23, 35)
    _check_bwd(f"{dtype} E=256 additive mask", q, k, v, mask=add, wr=0)
    add32 = (torch.randn(1, 2, 23, 35, generator=gen, device=DEVICE) * 3).expand(2, 2, 23, 35)
    _check_bwd(f"{dtype} E=256 f32 mask dropout", q, k, v, mask=add32, drop=0.2, seed=_SEED + 1)
    lq, lk = [5, 0, 1, 40, 3], [9, 4, 1, 37, 0]  # odd packed key offsets: per-element dropout
    q, k, v, cu_q, cu_k = _varlen(lq, lk, 2, 1, 192, 200, dtype, gen)
    _check_bwd(f"{dtype} E=192 Ev=200 varlen causal dropout", q, k, v, wr=0, br=True, cu_q=cu_q,
               cu_k=cu_k, max_q=max(lq), max_k=max(lk), drop=0.3, seed=_SEED + 2)  # fmt: skip


# ------------------------------------------------------------- dropout and fp32 masks

_SEED = 0xF00D_CAFE_1234_8765  # above 2^63: passes through the binding as uint64


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_dropout(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    # every head-dim bucket of the tensor-core forward (80: padded), odd lengths, several key
    # blocks; causal / window / bottom-right; GQA
    for e, length, s in ((64, 37, 75), (80, 21, 33), (128, 19, 70), (256, 17, 40)):
        q, k, v = (_blhd(1, 4, length, e, dtype, gen), _blhd(1, 2, s, e, dtype, gen),
                   _blhd(1, 2, s, e, dtype, gen))  # fmt: skip
        for wl, wr, br in ((-1, -1, False), (-1, 0, True), (9, 3, False)):
            _check_fwd(f"{dtype} dropout E={e} L={length} S={s} window=({wl}, {wr})", q, k, v,
                       wl=wl, wr=wr, br=br, drop=0.2, seed=_SEED + e)  # fmt: skip
    # the same seed gives the same bits, another seed other ones; p = 0 is no dropout
    q, k, v = (_blhd(2, 2, 24, 64, dtype, gen), _blhd(2, 2, 40, 64, dtype, gen),
               _blhd(2, 2, 40, 64, dtype, gen))  # fmt: skip
    a, _, _ = _check_fwd(f"{dtype} dropout seed 1", q, k, v, drop=0.3, seed=1)
    b, _, _ = _check_fwd(f"{dtype} dropout seed 1 again", q, k, v, drop=0.3, seed=1)
    c, _, _ = _check_fwd(f"{dtype} dropout seed 2", q, k, v, drop=0.3, seed=2)
    plain, _, _ = _check_fwd(f"{dtype} dropout p=0", q, k, v, drop=0.0, seed=1)
    assert torch.equal(a, b), "same seed, different output"
    assert not torch.equal(a, c), "different seeds, same output"
    assert not torch.equal(a, plain)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_backward_dropout(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(22)
    # tensor-core backward (64, 80, 128 with the dropout tiles and 256), SIMT (fp32)
    for e, length, s in ((64, 37, 70), (80, 20, 33), (128, 35, 67), (256, 9, 21)):
        q, k, v = (_blhd(1, 4, length, e, dtype, gen), _blhd(1, 2, s, e, dtype, gen),
                   _blhd(1, 2, s, e, dtype, gen))  # fmt: skip
        for wl, wr, br in ((-1, -1, False), (5, 0, True)):
            _check_bwd(f"{dtype} dropout E={e} L={length} S={s} window=({wl}, {wr})", q, k, v,
                       wl=wl, wr=wr, br=br, drop=0.25, seed=_SEED - e)  # fmt: skip
    q, k, v = (_blhd(1, 2, 20, 64, dtype, gen), _blhd(1, 2, 30, 64, dtype, gen),
               _blhd(1, 2, 30, 64, dtype, gen))  # fmt: skip
    g1 = _check_bwd(f"{dtype} dropout seed 5", q, k, v, drop=0.4, seed=5)
    g2 = _check_bwd(f"{dtype} dropout seed 6", q, k, v, drop=0.4, seed=6)
    assert not torch.equal(g1[2], g2[2]), "different seeds, same dv"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dropout_varlen_uses_packed_positions(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    # odd packed offsets (a key sequence starting at an odd row takes the per-element path)
    lq, lk = [5, 0, 1, 19, 3, 8], [9, 4, 1, 21, 0, 7]
    for e in (64, 128):
        q, k, v, cu_q, cu_k = _varlen(lq, lk, 4, 2, e, e, dtype, gen)
        for wl, wr in ((-1, -1), (-1, 0)):
            kw = dict(wl=wl, wr=wr, br=True, cu_q=cu_q, cu_k=cu_k, max_q=max(lq), max_k=max(lk),
                      drop=0.3, seed=_SEED)  # fmt: skip
            _check_fwd(f"{dtype} varlen dropout E={e} window=({wl}, {wr})", q, k, v, **kw)
            _check_bwd(f"{dtype} varlen dropout E={e} window=({wl}, {wr})", q, k, v, **kw)


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=lambda d: str(d)[6:])
def test_f32_mask_on_16bit_data(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(24)
    for e, length, s in ((64, 29, 70), (128, 17, 33), (256, 11, 21)):
        q, k, v = (_blhd(2, 2, length, e, dtype, gen), _blhd(2, 1, s, e, dtype, gen),
                   _blhd(2, 1, s, e, dtype, gen))  # fmt: skip
        # values a 16-bit mask could not hold (the kernels add them unrounded)
        add = torch.randn(2, 1, length, s, generator=gen, device=DEVICE) * 3 + 1e-3
        add[0, 0, 2] = float("-inf")
        add = add.expand(2, 2, length, s)
        _check_fwd(f"{dtype} f32 mask E={e}", q, k, v, mask=add)
        _check_bwd(f"{dtype} f32 mask E={e}", q, k, v, mask=add, wr=0)
        _check_fwd(f"{dtype} f32 mask E={e} dropout", q, k, v, mask=add, drop=0.1, seed=3)


@needs_gpu
def test_through_the_registered_op_on_the_cuda_backend():
    import lmkernels
    from lmkernels.backends import BackendUnavailable
    from lmkernels.functional import scaled_dot_product_attention

    _cuda_module()
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    q, k, v = (_blhd(2, 4, 50, 64, F16, gen).requires_grad_(),
               _blhd(2, 4, 60, 64, F16, gen).requires_grad_(),
               _blhd(2, 4, 60, 64, F16, gen).requires_grad_())  # fmt: skip
    try:
        with lmkernels.use_backend("cuda"):
            out = scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
    except BackendUnavailable as e:
        pytest.skip(f"the cuda backend does not serve attention yet: {e}")
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    want.sum().backward()
    _close("sdpa out", out, want, F16)
    for name, ours, ref in (("dq", q.grad, q2.grad), ("dk", k.grad, k2.grad),
                            ("dv", v.grad, v2.grad)):  # fmt: skip
        _close(f"sdpa {name}", ours, ref, F16, scale=True)


def test_cuda_backend_takes_dropout_and_f32_masks():
    from lmkernels.ops import attention as a

    q = torch.zeros(1, 2, 4, 64, dtype=BF16)
    k = v = torch.zeros(1, 2, 5, 64, dtype=BF16)
    drop = a.AttnOptions(0.125, dropout_p=0.1, seed=(1 << 64) - 1)
    for fwd_bwd in (a._FWD, a._BWD):
        supports = fwd_bwd["cuda"].supports
        assert supports(q, k, v, None, drop) is None
        assert supports(q, k, v, torch.zeros(1, 2, 4, 5), drop) is None  # fp32 mask
        assert supports(q, k, v, torch.zeros(1, 2, 4, 5, dtype=torch.bool), drop) is None
        assert "mask" in supports(q, k, v, torch.zeros(1, 2, 4, 5, dtype=F16), drop)
        assert "dtype" in supports(q.double(), k.double(), v.double(), None, drop)
    assert a._cuda_dropout(drop) == ((1 << 64) - 1, drop.drop_threshold, drop.drop_scale)
    assert a._cuda_dropout(a.AttnOptions(0.125, seed=5)) == (0, 0, 1.0)


# --------------------------------------------------------------- bindings (no GPU needed)

_P = 256  # a fake device pointer: validation passes, the launch itself needs a GPU
_S3 = [4096, 64, 256]
_FWD_OK = dict(q=_P, k=_P, v=_P, out=_P, lse=_P, mask=0, dtype=1, mask_dtype=4, q_strides=_S3,
               k_strides=_S3, v_strides=_S3, out_strides=_S3, mask_strides=[0, 0, 0, 0], B=2,
               Hq=4, Hk=2, L=16, S=16, E=64, Ev=64, scale=0.125, window_left=-1,
               window_right=-1, bottom_right=False, cu_q=0, cu_k=0, seed=0, drop_threshold=0,
               drop_scale=1.0, stream=0)  # fmt: skip
_BWD_OK = dict(_FWD_OK, dout=_P, dq=_P, dk=_P, dv=_P, workspace=_P, dout_strides=_S3,
               dq_strides=_S3, dk_strides=_S3, dv_strides=_S3)  # fmt: skip
_COMMON_BAD = [
    (dict(dtype=3), "dtype"),  # F64
    (dict(dtype=4), "dtype"),
    (dict(B=-1), "B"),
    (dict(Hq=-1), "Hq"),
    (dict(Hk=3), "Hk"),  # not a divisor of Hq
    (dict(Hk=0), "Hk"),
    (dict(L=-1), "L"),
    (dict(S=-2), "S"),
    (dict(E=-1), "E"),
    (dict(E=257), "E"),
    (dict(Ev=300), "Ev"),
    (dict(window_left=-2), "window_left"),
    (dict(window_right=-5), "window_right"),
    (dict(cu_q=_P), "cu_k"),  # only one of them
    (dict(cu_k=_P), "cu_q"),
    (dict(cu_q=_P + 2, cu_k=_P), "cu_q"),  # not int32-aligned
    (dict(mask=_P, cu_q=_P, cu_k=_P), "mask"),  # no mask with varlen
    (dict(mask=_P, mask_dtype=2), "mask_dtype"),  # bf16 mask for fp16 data
    (dict(mask=_P, mask_dtype=3), "mask_dtype"),  # f64 mask
    (dict(mask=_P, mask_dtype=7), "mask_dtype"),
    (dict(mask=_P, mask_dtype=1, dtype=0), "mask_dtype"),  # fp16 mask for fp32 data
    (dict(mask=_P + 2, mask_dtype=0), "mask"),  # misaligned fp32 mask
    (dict(drop_threshold=-1), "drop_threshold"),
    (dict(drop_threshold=1 << 32), "drop_threshold"),
    (dict(drop_threshold=5, drop_scale=0.5), "drop_scale"),
    (dict(drop_threshold=5, drop_scale=float("nan")), "drop_scale"),
    (dict(mask=_P + 1, mask_dtype=1), "mask"),  # misaligned fp16 mask
    (dict(mask_strides=[0, 0, 0]), "mask_strides"),
    (dict(q_strides=[1, 2]), "q_strides"),
    (dict(k_strides=[1, -2, 3]), "k_strides"),
    (dict(v_strides=[1, 2, 3, 4]), "v_strides"),
    (dict(out_strides=[]), "out_strides"),
    (dict(q=0), "q"),
    (dict(k=0), "k"),
    (dict(v=0), "v"),
    (dict(q=_P + 1), "q"),  # not aligned to its 2-byte elements
    (dict(lse=_P + 2), "lse"),
]
_BAD = ([("attention_fwd", c, a) for c, a in _COMMON_BAD]
        + [("attention_fwd", dict(out=0), "out"), ("attention_fwd", dict(lse=0), "lse")]
        + [("attention_bwd", c, a) for c, a in _COMMON_BAD]
        + [("attention_bwd", {name: 0}, name)
           for name in ("dout", "out", "lse", "dq", "dk", "dv", "workspace")]
        + [("attention_bwd", dict(dq_strides=[1]), "dq_strides"),
           ("attention_bwd", dict(dout_strides=[1, 2, -3]), "dout_strides"),
           ("attention_bwd", dict(dv=_P + 1), "dv")])  # fmt: skip


@pytest.mark.parametrize("op,change,arg", _BAD,
                         ids=[f"{op}-" + "-".join(f"{k}={v}" for k, v in c.items())
                              for op, c, _ in _BAD])  # fmt: skip
def test_bad_arguments_name_the_argument(op, change, arg):
    _cuda = _cuda_module()
    ok = _FWD_OK if op == "attention_fwd" else _BWD_OK
    with pytest.raises(ValueError, match=rf"lmkernels\._cuda\.{op}: {arg}: "):
        getattr(_cuda, op)(**{**ok, **change})


def test_empty_calls_launch_nothing_and_no_gpu_is_a_clear_error():
    _cuda = _cuda_module()
    assert {"attention_fwd", "attention_bwd"} <= set(_cuda.build_info()["ops"])
    nulls = dict(q=0, k=0, v=0, out=0, lse=0)
    bwd_nulls = dict(nulls, dout=0, dq=0, dk=0, dv=0, workspace=0)
    # nothing to do: returns before any CUDA call, even with null pointers
    for change in ({"B": 0}, {"Hq": 0, "Hk": 0}, {"L": 0}):
        _cuda.attention_fwd(**{**_FWD_OK, **nulls, **change})
    for change in ({"B": 0}, {"Hq": 0, "Hk": 0}, {"L": 0, "S": 0}):
        _cuda.attention_bwd(**{**_BWD_OK, **bwd_nulls, **change})
    if torch.cuda.is_available():
        return
    # valid calls (the launch finds no driver): no keys, no head dim, windows, a bool mask,
    # varlen, fp32 and bf16 data, and the backward with no query rows (dk / dv still written)
    for change in (
        {},
        {"S": 0, "k": 0, "v": 0},
        {"E": 0, "q": 0, "k": 0},
        {"window_left": 1 << 40, "window_right": 0, "bottom_right": True},
        {"mask": _P, "mask_dtype": 4, "mask_strides": [0, 0, 0, 1]},
        {"mask": _P, "mask_dtype": 1, "mask_strides": [1, 2, 3, 4]},
        {"mask": _P, "mask_dtype": 0, "mask_strides": [1, 2, 3, 4]},  # fp32 mask, fp16 data
        {"dtype": 2, "mask": _P, "mask_dtype": 0, "mask_strides": [0, 0, 0, 1]},
        {"seed": (1 << 64) - 1, "drop_threshold": (1 << 32) - 1, "drop_scale": float(1 << 32)},
        {"seed": 1 << 63, "drop_threshold": 1 << 30, "drop_scale": 4 / 3, "cu_q": _P, "cu_k": _P},
        {"cu_q": _P, "cu_k": _P + 4},
        {"dtype": 0, "E": 256, "Ev": 256},
        {"dtype": 2, "E": 80, "Ev": 17},
    ):
        with pytest.raises(RuntimeError, match="attention_fwd.*no usable NVIDIA GPU"):
            _cuda.attention_fwd(**{**_FWD_OK, **change})
        with pytest.raises(RuntimeError, match="attention_bwd.*no usable NVIDIA GPU"):
            _cuda.attention_bwd(**{**_BWD_OK, **change})
    with pytest.raises(RuntimeError, match="attention_bwd.*no usable NVIDIA GPU"):
        _cuda.attention_bwd(**{**_BWD_OK, "L": 0, "dout": 0, "q": 0, "out": 0, "lse": 0, "dq": 0,
                               "workspace": 0})  # fmt: skip


# ------------------------------------------------------------- the kernels on a CPU (no GPU)
#
# The emulation test compiles csrc/cuda/attention.cu as host C++ (g++, the CUDA headers)
# with the harness below standing in for the device primitives (LMK_ATTN_EMULATE): every CTA runs
# as cooperative threads, ldmatrix / mma / shuffles are computed from the PTX fragment layouts and
# cp.async lands at wait_group. The GPU tests above then run on CPU tensors through the real
# launchers, with the binding replaced by the emulated entry points (its argument checks are the
# tests above that need no GPU). About 1.5 minutes, in `make test` by default
# (LMKERNELS_EMULATE_CUDA=0 turns it off).

_EMU_SOURCE = r"""
// Host emulation of csrc/cuda/attention.cu (built by tests/test_cuda_attention.py): each CTA runs
// as cooperative fibers (ucontext), one per thread; warp collectives (shuffles, ldmatrix, mma)
// gather all 32 lanes and compute from the PTX fragment layouts; cp.async copies are deferred to
// the issuing thread's wait_group (or done at once); barriers and collectives that can never
// complete abort with a message, as do ldmatrix / cp.async accesses outside the CTA's shared
// memory or misaligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __launch_bounds__(...)

namespace emu {

struct Range {
  uintptr_t lo, hi;
};
std::vector<Range> g_ranges;
int g_order = 0;  // 0 forward, 1 reverse, 2 random, 3 / 4 priority (see run_cta)
bool g_lazy = false;
std::mt19937 g_rng(1);

[[noreturn]] void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "EMU FAIL: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  fflush(stderr);
  abort();
}

void check_global(const void* p, size_t n, const char* what) {
  if (g_ranges.empty()) return;  // not checked
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (const Range& r : g_ranges) {
    if (a >= r.lo && a + n <= r.hi) return;
  }
  fail("%s: global access %p (+%zu) outside every tensor", what, p, n);
}

struct Cp {
  void* dst;
  const void* src;
  bool valid;
  int group;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int state = 0;  // 0 runnable, 1 block barrier, 2 warp collective, 3 done
  std::vector<Cp> pend;
  int open_group = 0;
};

struct WarpSlot {
  int tag = -1;
  int count = 0;
  void* args[32];
};

struct Cta {
  std::vector<Fiber> f;
  std::vector<uint4> smem;
  size_t smem_bytes = 0;
  int bar = 0;
  int nthreads = 0;
  WarpSlot w[32];
  uint3 bidx;
};

Cta g_cta;
int g_cur = 0;
ucontext_t g_sched;
dim3 g_grid, g_block;
std::function<void()> g_body;

inline Fiber& me() { return g_cta.f[g_cur]; }
inline void yield() { swapcontext(&me().ctx, &g_sched); }

void do_copy(const Cp& c) {
  if (c.valid) {
    memcpy(c.dst, c.src, 16);
  } else {
    memset(c.dst, 0, 16);
  }
}

void entry() {
  g_body();
  me().state = 3;
}

void check_smem(const void* p, size_t n, const char* what) {
  const auto* base = reinterpret_cast<const unsigned char*>(g_cta.smem.data());
  const auto* q = reinterpret_cast<const unsigned char*>(p);
  if (q < base || q + n > base + g_cta.smem_bytes) {
    fail("%s: shared access at offset %ld (+%zu) outside %zu bytes", what, (long)(q - base), n,
         g_cta.smem_bytes);
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("%s: misaligned shared address", what);
}

void run_cta(const uint3& bidx) {
  const int n = static_cast<int>(g_block.x * g_block.y * g_block.z);
  g_cta.nthreads = n;
  g_cta.bidx = bidx;
  g_cta.bar = 0;
  for (auto& w : g_cta.w) w.count = 0;
  if (static_cast<int>(g_cta.f.size()) != n) g_cta.f.resize(n);
  // poison shared memory
  memset(g_cta.smem.data(), 0x7f, g_cta.smem.size() * sizeof(uint4));
  for (int t = 0; t < n; ++t) {
    Fiber& f = g_cta.f[t];
    if (f.stack.empty()) f.stack.resize(256 * 1024);
    f.state = 0;
    f.pend.clear();
    f.open_group = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, entry, 0);
  }
  std::vector<int> order(n);
  if (g_order >= 3) {  // priority: the lowest (3) or highest (4) runnable thread runs next, so a
                       // warp runs ahead of the others as far as it can (exposes missing barriers)
    for (;;) {
      int next = -1;
      for (int i = 0; i < n && next < 0; ++i) {
        const int t = g_order == 3 ? i : n - 1 - i;
        if (g_cta.f[t].state == 0) next = t;
      }
      if (next < 0) break;
      g_cur = next;
      swapcontext(&g_sched, &g_cta.f[next].ctx);
    }
    for (int t = 0; t < n; ++t) {
      if (g_cta.f[t].state != 3) fail("deadlock in block (%u,%u,%u)", bidx.x, bidx.y, bidx.z);
    }
    return;
  }
  for (;;) {
    for (int t = 0; t < n; ++t) order[t] = t;
    if (g_order == 1) std::reverse(order.begin(), order.end());
    if (g_order == 2) std::shuffle(order.begin(), order.end(), g_rng);
    bool any = false, all_done = true;
    for (int t : order) {
      if (g_cta.f[t].state == 0) {
        g_cur = t;
        swapcontext(&g_sched, &g_cta.f[t].ctx);
        any = true;
      }
    }
    for (int t = 0; t < n; ++t) all_done = all_done && g_cta.f[t].state == 3;
    if (all_done) break;
    if (!any) {
      int waiting_bar = 0, waiting_warp = 0, done = 0;
      for (int t = 0; t < n; ++t) {
        waiting_bar += g_cta.f[t].state == 1;
        waiting_warp += g_cta.f[t].state == 2;
        done += g_cta.f[t].state == 3;
      }
      fail("deadlock in block (%u,%u,%u): %d at a barrier, %d in a warp op, %d exited", bidx.x,
           bidx.y, bidx.z, waiting_bar, waiting_warp, done);
    }
  }
}

template <class F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
  g_grid = grid;
  g_block = block;
  g_body = body;
  g_cta.smem.assign((smem + 15) / 16 + 1, uint4{});
  g_cta.smem_bytes = smem;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_cta(uint3{x, y, z});
}

template <class F>
void warp_op(int tag, void* arg, F&& fn) {
  WarpSlot& w = g_cta.w[g_cur / 32];
  if (w.count == 0) {
    w.tag = tag;
  } else if (w.tag != tag) {
    fail("warp %d: lanes in different collectives (%d vs %d)", g_cur / 32, w.tag, tag);
  }
  w.args[g_cur % 32] = arg;
  if (++w.count == 32) {
    fn(w.args);
    w.count = 0;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = g_cta.f[(g_cur / 32) * 32 + l];
      if (f.state == 2) f.state = 0;
    }
  } else {
    me().state = 2;
    yield();
  }
}

inline uint3 tidx() {
  const unsigned t = static_cast<unsigned>(g_cur);
  return uint3{t % g_block.x, (t / g_block.x) % g_block.y, t / (g_block.x * g_block.y)};
}

}  // namespace emu

#define threadIdx (::emu::tidx())
#define blockIdx (::emu::g_cta.bidx)
#define gridDim (::emu::g_grid)
#define blockDim (::emu::g_block)

// ------------------------------------------------------------------ primitives

inline void block_sync() {
  emu::Cta& c = emu::g_cta;
  if (++c.bar == c.nthreads) {
    c.bar = 0;
    for (auto& f : c.f) {
      if (f.state == 1) f.state = 0;
    }
  } else {
    emu::me().state = 1;
    emu::yield();
  }
}

struct ShflArg {
  float v, out;
  int m;
};
inline float shfl_xor(float v, int m) {
  ShflArg a{v, 0.f, m};
  emu::warp_op(20, &a, [](void** args) {
    const int m0 = static_cast<ShflArg*>(args[0])->m;
    for (int l = 0; l < 32; ++l) {
      auto* x = static_cast<ShflArg*>(args[l]);
      if (x->m != m0) emu::fail("shfl_xor: lanes disagree on the mask");
      x->out = static_cast<ShflArg*>(args[l ^ m0])->v;
    }
  });
  return a.out;
}
inline float shfl_idx(float v, int src) {
  ShflArg a{v, 0.f, src};
  emu::warp_op(21, &a, [](void** args) {
    for (int l = 0; l < 32; ++l) {
      auto* x = static_cast<ShflArg*>(args[l]);
      x->out = static_cast<ShflArg*>(args[x->m & 31])->v;
    }
  });
  return a.out;
}

inline unsigned char* smem_base() {
  return reinterpret_cast<unsigned char*>(emu::g_cta.smem.data());
}

struct LdsmArg {
  const void* p;
  uint32_t* r;
};
inline void ldsm_impl(uint32_t* r, const void* p, bool trans) {
  LdsmArg arg{p, r};
  emu::warp_op(trans ? 2 : 1, &arg, [trans](void** args) {
    const uint16_t* rowp[32];
    for (int l = 0; l < 32; ++l) {
      auto* x = static_cast<LdsmArg*>(args[l]);
      emu::check_smem(x->p, 16, "ldmatrix");
      rowp[l] = static_cast<const uint16_t*>(x->p);
    }
    uint32_t out[32][4];
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
          lo = rowp[8 * i + l / 4][2 * (l % 4)];
          hi = rowp[8 * i + l / 4][2 * (l % 4) + 1];
        } else {
          lo = rowp[8 * i + 2 * (l % 4)][l / 4];
          hi = rowp[8 * i + 2 * (l % 4) + 1][l / 4];
        }
        out[l][i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) static_cast<LdsmArg*>(args[l])->r[i] = out[l][i];
    }
  });
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, true); }

inline float b16_to_float(uint16_t b, bool bf) {
  if (bf) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}

struct MmaArg {
  float* d;
  const uint32_t* a;
  uint32_t b0, b1;
};
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool bf = std::is_same_v<T, __nv_bfloat16>;
  MmaArg arg{d, a, b0, b1};
  emu::warp_op(bf ? 11 : 10, &arg, [](void** args) {
    float A[16][16], B[16][8], C[16][8];
    auto lo = [](uint32_t v) { return b16_to_float(static_cast<uint16_t>(v & 0xffffu), bf); };
    auto hi = [](uint32_t v) { return b16_to_float(static_cast<uint16_t>(v >> 16), bf); };
    for (int l = 0; l < 32; ++l) {
      auto* x = static_cast<MmaArg*>(args[l]);
      const int g = l / 4, t = l % 4;
      A[g][2 * t] = lo(x->a[0]);
      A[g][2 * t + 1] = hi(x->a[0]);
      A[g + 8][2 * t] = lo(x->a[1]);
      A[g + 8][2 * t + 1] = hi(x->a[1]);
      A[g][2 * t + 8] = lo(x->a[2]);
      A[g][2 * t + 9] = hi(x->a[2]);
      A[g + 8][2 * t + 8] = lo(x->a[3]);
      A[g + 8][2 * t + 9] = hi(x->a[3]);
      B[2 * t][g] = lo(x->b0);
      B[2 * t + 1][g] = hi(x->b0);
      B[2 * t + 8][g] = lo(x->b1);
      B[2 * t + 9][g] = hi(x->b1);
      C[g][2 * t] = x->d[0];
      C[g][2 * t + 1] = x->d[1];
      C[g + 8][2 * t] = x->d[2];
      C[g + 8][2 * t + 1] = x->d[3];
    }
    float Dm[16][8];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        float acc = C[i][j];
        for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
        Dm[i][j] = acc;
      }
    }
    for (int l = 0; l < 32; ++l) {
      auto* x = static_cast<MmaArg*>(args[l]);
      const int g = l / 4, t = l % 4;
      x->d[0] = Dm[g][2 * t];
      x->d[1] = Dm[g][2 * t + 1];
      x->d[2] = Dm[g + 8][2 * t];
      x->d[3] = Dm[g + 8][2 * t + 1];
    }
  });
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  emu::check_smem(dst, 16, "cp.async dst");
  if (valid) {
    emu::check_global(src, 16, "cp.async src");
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async src not 16-byte aligned");
  }
  emu::Cp c{dst, src, valid, emu::me().open_group};
  if (emu::g_lazy) {
    emu::me().pend.push_back(c);
  } else {
    emu::do_copy(c);
  }
}
inline void cp_async_commit() { ++emu::me().open_group; }
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::me();
  std::vector<emu::Cp> keep;
  for (const emu::Cp& c : f.pend) {
    if (c.group < f.open_group - N) {
      emu::do_copy(c);
    } else {
      keep.push_back(c);
    }
  }
  f.pend.swap(keep);
}

inline float fast_exp2(float x) { return exp2f(x); }
inline float mul_rn(float a, float b) { return a * b; }  // g++ for x86-64 has no FMA here
inline float fast_log2(float x) { return log2f(x); }

template <typename V>
inline V ld_g(const V* p) {
  emu::check_global(p, sizeof(V), "load");
  return *p;
}
template <typename V>
inline void st_g(V* p, V v) {
  emu::check_global(p, sizeof(V), "store");
  *p = v;
}

#define LMK_ATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(dim3(grid), dim3(block), (smem), [=] { kernel(__VA_ARGS__); })

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int value) {
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}

#define LMK_ATTN_EMULATE 1
#include ATTN_CU

// ------------------------------------------------------------------ C API for ctypes

extern "C" {

void emu_set_ranges(const uint64_t* lohi, int n) {
  emu::g_ranges.clear();
  for (int i = 0; i < n; ++i) emu::g_ranges.push_back({lohi[2 * i], lohi[2 * i + 1]});
}

void emu_set_mode(int order, int lazy, int seed) {
  emu::g_order = order;
  emu::g_lazy = lazy != 0;
  emu::g_rng.seed(seed);
}

// iv: dtype, mask_dtype, B, Hq, Hk, L, S, E, Ev, wl, wr, bottom_right, then strides
//     q(3) k(3) v(3) o(3) m(4) do(3) dq(3) dk(3) dv(3)
// pv: q, k, v, o, lse, mask, cu_q, cu_k, dout, dq, dk, dv, workspace
int emu_attn(int bwd, const int64_t* iv, double scale, const uint64_t* pv, uint64_t seed,
             int64_t drop_threshold, double drop_scale) {
  lmk::AttnBwdParams bp;
  lmk::AttnParams& p = bp.fwd;
  p.dtype = static_cast<lmk::DType>(iv[0]);
  p.mask_dtype = static_cast<lmk::DType>(iv[1]);
  p.seed = seed;
  p.drop_threshold = static_cast<uint32_t>(drop_threshold);
  p.drop_scale = drop_scale;
  p.B = iv[2], p.Hq = iv[3], p.Hk = iv[4], p.L = iv[5], p.S = iv[6], p.E = iv[7], p.Ev = iv[8];
  p.window_left = iv[9], p.window_right = iv[10], p.bottom_right = iv[11] != 0;
  const int64_t* s = iv + 12;
  p.q_sb = s[0], p.q_sh = s[1], p.q_sl = s[2];
  p.k_sb = s[3], p.k_sh = s[4], p.k_sl = s[5];
  p.v_sb = s[6], p.v_sh = s[7], p.v_sl = s[8];
  p.o_sb = s[9], p.o_sh = s[10], p.o_sl = s[11];
  p.m_sb = s[12], p.m_sh = s[13], p.m_sl = s[14], p.m_ss = s[15];
  bp.do_sb = s[16], bp.do_sh = s[17], bp.do_sl = s[18];
  bp.dq_sb = s[19], bp.dq_sh = s[20], bp.dq_sl = s[21];
  bp.dk_sb = s[22], bp.dk_sh = s[23], bp.dk_sl = s[24];
  bp.dv_sb = s[25], bp.dv_sh = s[26], bp.dv_sl = s[27];
  p.scale = scale;
  p.q = reinterpret_cast<const void*>(pv[0]);
  p.k = reinterpret_cast<const void*>(pv[1]);
  p.v = reinterpret_cast<const void*>(pv[2]);
  p.o = reinterpret_cast<void*>(pv[3]);
  p.lse = reinterpret_cast<void*>(pv[4]);
  p.mask = reinterpret_cast<const void*>(pv[5]);
  p.cu_q = reinterpret_cast<const int32_t*>(pv[6]);
  p.cu_k = reinterpret_cast<const int32_t*>(pv[7]);
  bp.dout = reinterpret_cast<const void*>(pv[8]);
  bp.dq = reinterpret_cast<void*>(pv[9]);
  bp.dk = reinterpret_cast<void*>(pv[10]);
  bp.dv = reinterpret_cast<void*>(pv[11]);
  if (bwd) {
    return static_cast<int>(
        lmk::attention_bwd_cuda(bp, reinterpret_cast<float*>(pv[12]), nullptr));
  }
  return static_cast<int>(lmk::attention_fwd_cuda(p, nullptr));
}
}
"""

_EMU_FWD_ARGS = ("q k v out lse mask dtype mask_dtype q_strides k_strides v_strides out_strides "
                 "mask_strides B Hq Hk L S E Ev scale window_left window_right bottom_right cu_q "
                 "cu_k seed drop_threshold drop_scale stream").split()  # fmt: skip
_EMU_BWD_ARGS = ("dout q k v out lse mask dq dk dv workspace dtype mask_dtype dout_strides "
                 "q_strides k_strides v_strides out_strides dq_strides dk_strides dv_strides "
                 "mask_strides B Hq Hk L S E Ev scale window_left window_right bottom_right cu_q "
                 "cu_k seed drop_threshold drop_scale stream").split()  # fmt: skip


def _emulated_module(tmp_dir):
    """A stand-in for lmkernels._cuda whose attention entry points run the emulated kernels."""
    import ctypes
    import types

    emu = cuda_emulation.build(tmp_dir, "attention", _EMU_SOURCE, "ATTN_CU", std="c++20")
    emu.emu_attn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_double,
                             ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint64, ctypes.c_int64,
                             ctypes.c_double]  # fmt: skip
    emu.emu_set_ranges.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
    emu.emu_set_mode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    emu.emu_set_ranges(None, 0)  # global accesses unchecked (the tests' sentinels catch writes)

    def call(bwd, a):
        if a["B"] == 0 or a["Hq"] == 0 or (not bwd and a["L"] == 0):
            return
        z3 = [0, 0, 0]
        iv = [a["dtype"], a["mask_dtype"], a["B"], a["Hq"], a["Hk"],
              a["L"], a["S"], a["E"], a["Ev"], a["window_left"], a["window_right"],
              int(a["bottom_right"])]  # fmt: skip
        for name in ("q", "k", "v", "out"):
            iv += a[f"{name}_strides"]
        iv += a["mask_strides"]
        for name in ("dout", "dq", "dk", "dv"):
            iv += a.get(f"{name}_strides", z3)
        pv = [a.get(n, 0) for n in ("q", "k", "v", "out", "lse", "mask", "cu_q", "cu_k", "dout",
                                    "dq", "dk", "dv", "workspace")]  # fmt: skip
        rc = emu.emu_attn(bwd, (ctypes.c_int64 * len(iv))(*iv), a["scale"],
                          (ctypes.c_uint64 * len(pv))(*pv), a["seed"], a["drop_threshold"],
                          a["drop_scale"])  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"emulated attention_{'bwd' if bwd else 'fwd'}: cudaError {rc}")

    mod = types.ModuleType("lmkernels._cuda")
    mod.attention_fwd = lambda *args: call(0, dict(zip(_EMU_FWD_ARGS, args, strict=True)))
    mod.attention_bwd = lambda *args: call(1, dict(zip(_EMU_BWD_ARGS, args, strict=True)))
    # schedules: (thread order, cp.async deferred, seed); order 2 is random, 3 / 4 let the lowest /
    # highest warp run ahead until a barrier (a missing __syncthreads shows as a wrong result),
    # deferred copies land at wait_group (a missing wait shows)
    mod.emu_set_mode = emu.emu_set_mode
    return mod


def test_kernels_under_host_emulation(monkeypatch, tmp_path):
    import contextlib
    import os
    import sys
    import types

    import lmkernels

    if os.environ.get("LMKERNELS_EMULATE_CUDA", "1") == "0":
        pytest.skip("LMKERNELS_EMULATE_CUDA=0: the CUDA attention kernels' host emulation "
                    "(about 1.5 minutes) is turned off")  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this file's other tests run the CUDA kernels themselves "
                    "(the host emulation is their stand-in on machines without one)")  # fmt: skip
    mod = _emulated_module(tmp_path)
    monkeypatch.setitem(sys.modules, "lmkernels._cuda", mod)
    monkeypatch.setattr(lmkernels, "_cuda", mod, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda dev=None: types.SimpleNamespace(cuda_stream=0))  # fmt: skip
    monkeypatch.setitem(globals(), "DEVICE", "cpu")
    # every kernel family: tensor-core forward and backward (each head-dim bucket), the SIMT
    # forward and backward (fp32), under several schedules
    mod.emu_set_mode(3, 0, 1)
    test_forward_head_dims(F16, 64, 64)
    test_forward_head_dims(BF16, 80, 80)
    test_forward_head_dims(F16, 256, 256)
    test_forward_head_dims(F32, 33, 17)
    mod.emu_set_mode(4, 1, 1)
    test_forward_causal_and_windows(BF16, 130, 70)
    test_forward_causal_and_windows(F32, 70, 130)
    test_forward_masks_and_fully_masked_rows(F16)
    test_forward_gqa_mqa_and_layouts(BF16)
    test_forward_varlen_with_empty_and_single_sequences(F16)
    test_forward_no_keys_and_special_values(F32)
    mod.emu_set_mode(2, 1, 7)
    test_backward_head_dims(F16, 128, 128)
    test_backward_head_dims(BF16, 33, 17)
    test_backward_head_dims(F32, 64, 64)
    mod.emu_set_mode(3, 0, 1)
    test_backward_windows_masks_gqa_varlen(BF16)
    mod.emu_set_mode(4, 1, 5)
    test_backward_head_dims_over_128_on_tensor_cores(F16)
    # dropout (tensor-core and SIMT, forward and backward, varlen) and fp32 masks on 16-bit data
    mod.emu_set_mode(4, 1, 3)
    test_forward_dropout(F16)
    test_forward_dropout(F32)
    test_dropout_varlen_uses_packed_positions(BF16)
    mod.emu_set_mode(2, 1, 11)
    test_backward_dropout(F32)  # the SIMT backward (tensor cores: varlen above, E > 128 before)
    mod.emu_set_mode(3, 0, 1)
    test_f32_mask_on_16bit_data(F16)
