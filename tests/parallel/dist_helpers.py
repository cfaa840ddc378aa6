"""Run a function on N gloo processes on this machine and fail the test with the first rank's error.

Workers must be module-level functions (the processes are spawned, so they import the test module). Each process
uses one thread: on a 2-core machine, N processes of several OpenMP threads each would spin against each other.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30.0  # a hung collective fails the test instead of hanging the suite
JOIN_TIMEOUT_S = 120.0


def _entry(rank: int, world: int, init_file: str, timeout_s: float, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    except BaseException:  # every rank's error in the captured output (spawn re-raises only the first it sees)
        print(f"--- rank {rank} of {world} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Call fn(rank, world, *args) on `world` processes joined in one gloo group (a file rendezvous, so no port
    can collide); re-raise the first failure."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _entry, args=(world, os.path.join(tmp, "rendezvous"), timeout_s, fn, args), nprocs=world, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # False until every rank exited
            if time.monotonic() >= deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} ranks did not finish within {JOIN_TIMEOUT_S} s")
