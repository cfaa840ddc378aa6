"""Process groups for expert parallelism (EP) times data parallelism (DP), and starting torch.distributed.

A world of W ranks is laid out as a 2-D device mesh ("dp", "ep") of shape (W / ep, ep): rank r sits at
dp index r // ep and ep index r % ep. The ranks of one "ep" row hold different experts and exchange tokens with
all-to-all (consecutive ranks: on GPUs, the ranks of one node, where the all-to-all is fastest); the ranks of one
"dp" column hold the same experts and average their gradients. Parameters outside the experts are replicated on
every rank and averaged over the whole world.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 300.0  # a dead rank or a skipped collective raises after this long instead of hanging forever


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> None:
    """Join the process group that torchrun (or the caller, through MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE)
    describes; a no-op if already joined.

    Args:
        timeout_s: seconds a collective may wait for the other ranks before it raises (gloo and NCCL honour it).
        backend: "gloo", "nccl", or None: NCCL when CUDA is available and LOCAL_RANK is set, gloo otherwise.
    """
    if dist.is_initialized():
        return
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and "LOCAL_RANK" in os.environ else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def build_mesh(ep: int, device_type: str | None = None, timeout_s: float | None = None) -> DeviceMesh:
    """The ("dp", "ep") device mesh over the current world.

    Args:
        ep: expert-parallel ranks; must divide the world size (dp = world / ep).
        device_type: "cpu" or "cuda"; None = what the process group's backend drives (cuda for NCCL).
        timeout_s: how long a collective of the mesh's groups waits before it raises; None = the world group's.
    Returns:
        A DeviceMesh with dims named "dp" and "ep"; `mesh["ep"].get_group()` is this rank's EP group.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call moekit.parallel.init_distributed() first")
    world = dist.get_world_size()
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"ep={ep!r} must be a positive integer dividing the world size {world}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds or None, got {timeout_s!r}")
    backend = dist.get_backend()
    if device_type is None:
        device_type = "cuda" if backend == "nccl" else "cpu"
    timeout = _world_timeout(device_type) if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    # A mesh dim spanning the world reuses the world group; the others are new groups, which torch creates with its
    # own default timeout (30 minutes), not the world's: give them ours, or a skipped collective in an EP x DP run
    # would hang for half an hour.
    shape = {"dp": world // ep, "ep": ep}
    override = {name: _group_options(backend, timeout) for name, size in shape.items() if size != world}
    return init_device_mesh(
        device_type, (shape["dp"], shape["ep"]), mesh_dim_names=("dp", "ep"), backend_override=override or None
    )


def _group_options(backend: str, timeout: datetime.timedelta):
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    return dist.ProcessGroupGloo.Options(backend, timeout)  # Backend.Options: gloo reads only the timeout


def _world_timeout(device_type: str) -> datetime.timedelta:
    try:
        return dist.distributed_c10d._get_default_group()._get_backend(torch.device(device_type)).options._timeout
    except (AttributeError, RuntimeError):  # a backend without options: the value init_distributed defaults to
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
