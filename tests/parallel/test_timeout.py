"""A rank that hangs or dies makes the others raise within `dist_timeout`, instead of hanging the run.

The ranks join through moekit's own path (`ParallelRun`: env:// rendezvous, `init_distributed`, `build_mesh`) with
a 3 s timeout and run a sharded MoE layer; rank 1 misbehaves before the layer's all-to-all: it sleeps (a skipped
collective) or exits (a dead rank). The survivors report back through a queue; the test waits for them with its
own deadline and kills every process it started, so it cannot hang whatever the ranks do.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from moekit.config import MoEConfig
from moekit.layers import MoE
from moekit.parallel.run import ParallelRun

TIMEOUT_S = 3.0  # the configured dist_timeout
DEADLINE_S = 30.0  # a survivor must have raised by then (process start-up included)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, ep: int, fault: str, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    run = ParallelRun(ep, timeout_s=TIMEOUT_S)
    torch.manual_seed(0)
    layer = run.wrap(MoE(MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2)))
    if rank == 1:
        if fault == "exit":
            os._exit(1)
        time.sleep(10 * DEADLINE_S)  # skips the collective; the test kills it
    start = time.monotonic()
    try:
        layer(torch.randn(2, 8, 8)).sum().backward()
        queue.put((rank, "finished", time.monotonic() - start, ""))
    except Exception as err:  # noqa: BLE001 - the error is what is being tested
        queue.put((rank, "raised", time.monotonic() - start, f"{type(err).__name__}: {err}"))
    queue.close()
    queue.join_thread()  # the report is sent before the process ends
    os._exit(0)  # no process-group teardown: its peers may be gone


def _run(world: int, ep: int, fault: str) -> dict[int, tuple[str, float, str]]:
    """Start `world` ranks, collect the reports of every rank but 1, kill them all."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_worker, args=(r, world, port, ep, fault, queue)) for r in range(world)]
    for p in procs:
        p.start()
    reports = {}
    try:
        deadline = time.monotonic() + DEADLINE_S + 60  # + start-up of `world` interpreters on a busy machine
        while len(reports) < world - 1:
            try:
                rank, outcome, seconds, message = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                codes = {r: p.exitcode for r, p in enumerate(procs)}
                raise AssertionError(f"no report from every survivor: got {reports}, exit codes {codes}") from None
            reports[rank] = (outcome, seconds, message)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return reports


@pytest.mark.parametrize("fault", ["skip", "exit"])
def test_a_rank_that_skips_the_all_to_all_or_dies_makes_its_peer_raise(fault):
    outcome, seconds, message = _run(2, 2, fault)[0]
    assert outcome == "raised", message
    assert seconds < DEADLINE_S
    if fault == "skip":  # nothing tells rank 0 but the clock: it waits out the configured timeout, no longer
        assert seconds >= TIMEOUT_S * 0.9 and "Timed out" in message, (seconds, message)


def test_the_ep_groups_of_an_ep_x_dp_run_have_the_configured_timeout():
    # ep=2 x dp=2: the all-to-all runs on a sub-group, which torch would create with a 30-minute timeout.
    reports = _run(4, 2, "skip")
    outcome, seconds, message = reports[0]
    assert outcome == "raised" and "Timed out" in message, message
    assert TIMEOUT_S * 0.9 <= seconds < DEADLINE_S
    # Ranks 2 and 3 form the other EP group: their all-to-all completes, then the world all_reduce of the load
    # counts waits for rank 1 and times out too.
    for rank in (2, 3):
        outcome, seconds, message = reports[rank]
        assert outcome == "raised" and seconds < DEADLINE_S, (rank, reports[rank])
