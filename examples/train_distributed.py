"""Train the small GPT of ``train_gpt.py`` with ``lmkernels.patch`` under torch.distributed:
DistributedDataParallel or FSDP2 (``fully_shard``), optionally compiled and in bf16.

    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel fsdp2 --steps 20
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ddp --compile --bf16
    python examples/train_distributed.py --parallel ddp        (one process: a group of one)

The model is patched first, then wrapped: ``--parallel ddp`` wraps it in
``DistributedDataParallel``; ``--parallel fsdp2`` shards each transformer block and then the
root with ``fully_shard``. ``--bf16``: DDP runs the forward under ``torch.autocast`` (bf16),
FSDP2 computes with bf16 parameters and reduces the gradients in fp32
(``MixedPrecisionPolicy``); the optimizer keeps fp32 weights either way. ``--compile``
(``--compile-backend``, default inductor): ``torch.compile`` of the DDP model; with FSDP2, of
each block before it is sharded and of the sharded root (compiling only the root would leave
the blocks uncompiled: dynamo runs torch.nn frames eagerly after the graph breaks at FSDP2's
hooks).

Every rank draws the same global batches of the standard library's source (``train_gpt.py``'s
loader) and trains on its own ``batch / world`` rows, so a run on any number of ranks sees the
same data as one process: the losses printed (the mean over ranks, on rank 0) agree with a
one-process run up to the order of the gradient sums (fp32; AdamW). Without a GPU the ranks
run on CPU and talk over gloo (on a machine without network, set ``GLOO_SOCKET_IFNAME=lo``);
with GPUs each rank takes the GPU of its ``LOCAL_RANK`` and nccl.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lmkernels
from lmkernels.models import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpt import batches, stdlib_bytes  # noqa: E402


def _init() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment (or a group of one)."""
    if "RANK" not in os.environ:  # not under torchrun: one process on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _wrap(model: GPT, a, device: torch.device):
    """The model under DDP or FSDP2 (and torch.compile); the module to run and the autocast
    setting of its forward."""
    if a.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        autocast = a.bf16  # bf16 matmuls in the forward, fp32 weights and gradients
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
        if a.bf16:  # bf16 parameters in forward / backward, fp32 gradient reduction
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)  # fmt: skip
        for i, block in enumerate(model.blocks.layers):
            if a.compile:  # compile each block, then shard it: FSDP2's hooks run around it
                block = model.blocks.layers[i] = torch.compile(block, backend=a.compile_backend)
            fully_shard(block, **kw)
        net = fully_shard(model, **kw)
        autocast = False
    if a.compile:  # DDP: dynamo splits the graph at the gradient buckets
        net = torch.compile(net, backend=a.compile_backend)
    return net, autocast


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    ap.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (see the doc)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="the global batch, over all ranks")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--megabytes", type=float, default=4.0, help="how much text to read")
    ap.add_argument("--every", type=int, default=20, help="print the loss every N steps")
    a = ap.parse_args(argv)

    rank, world, device = _init()
    try:
        if a.batch % world:
            raise SystemExit(f"--batch {a.batch} does not split over {world} ranks")
        say = print if rank == 0 else (lambda *args, **kw: None)
        data = stdlib_bytes(int(a.megabytes * 2**20))
        cfg = GPTConfig(vocab=256, context=a.context, d_model=a.d_model, heads=a.heads,
                        layers=a.layers)  # fmt: skip
        torch.manual_seed(0)  # the same initial weights on every rank
        model = GPT(cfg).to(device)
        say(lmkernels.patch(model))  # patch first, then wrap
        net, autocast = _wrap(model, a, device)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr)  # after fully_shard: the shards
        per = a.batch // world
        say(f"{a.parallel}{' compiled' if a.compile else ''}{' bf16' if a.bf16 else ' fp32'}: "
            f"{world} rank(s) on {device.type} ({dist.get_backend()}), {a.steps} steps of "
            f"{a.batch}x{a.context} tokens ({per} rows per rank)\n")  # fmt: skip
        say(f"{'step':>6} {'loss':>10}")
        losses, seconds = [], 0.0
        for step, (x, y) in enumerate(batches(data, a.batch, a.context, a.steps, seed=1)):
            x = x[rank * per : (rank + 1) * per].to(device)
            y = y[rank * per : (rank + 1) * per].to(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = net(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().float()
            dist.all_reduce(mean)  # (SUM: gloo has no AVG) also waits for every rank
            losses.append(mean.item() / world)
            if step > 0:  # the first step pays one-time costs (compilation, allocation)
                seconds += time.perf_counter() - t0
            if step % a.every == 0 or step == a.steps - 1:
                say(f"{step:>6} {losses[-1]:>10.6f}")
        rate = (a.steps - 1) * a.batch * a.context / seconds if seconds else float("nan")
        say(f"\n{rate:.0f} tokens/s over {world} rank(s)")
        say(f"final loss {losses[-1]:.6f} (first {losses[0]:.6f}), {a.steps} steps")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
