"""Run a function on several CPU processes joined by a gloo process group on loopback.

``run_ranks(fn, *args)`` spawns ``world`` processes, each of which joins the group and calls
``fn(rank, world, *args)``; it returns when all have finished, raises the first failure with
the rank's traceback, and kills every rank that is still running after ``timeout`` seconds (a
hung collective fails the test instead of hanging the suite). ``fn`` must be a module-level
function of an importable module (the spawned processes import it again).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():  # the children import triton; keep it interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2, timeout: float = 240.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks (see the module doc)."""
    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError("torch.distributed with the gloo backend is not available")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _entry, args=(world, store, fn, args), nprocs=world, join=False,
            start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
