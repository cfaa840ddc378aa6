"""What a training loop needs to run expert-parallel: the mesh, sharding and wrapping, each rank's share of a
batch, reductions of reported numbers, the global gradient norm, and checkpoints in the single-process layout.

`moekit.train.Trainer` uses one `ParallelRun` when it is started by torchrun (or with ep > 1); nothing here knows
about the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.checkpoint import full_model_state, full_optimizer_state, shard_model_state, shard_optimizer_state
from moekit.parallel.expert_parallel import clip_grad_norm_, data_parallel, no_sync, shard_experts
from moekit.parallel.mesh import build_mesh, init_distributed


class ParallelRun:
    """This process's place in an expert-parallel x data-parallel run.

    Args:
        ep: expert-parallel ranks (divides the world size).
        timeout_s: how long a collective waits for the other ranks before raising.
    Raises:
        ValueError: ep does not divide the world (e.g. ep > 1 in a single process).
    """

    def __init__(self, ep: int, timeout_s: float) -> None:
        launched = dist.is_initialized() or "WORLD_SIZE" in os.environ  # torchrun (or the caller) set up the world
        self.world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if ep > self.world or self.world % ep or not launched:
            raise ValueError(
                f"ep={ep} needs a multiple of {ep} processes, this run has {self.world}: launch with "
                f"`moekit train --nproc {ep} ...` (or torchrun --nproc-per-node {ep} -m moekit train ... --ep {ep})"
            )
        init_distributed(timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ep = ep
        self.mesh = build_mesh(ep, timeout_s=timeout_s)

    def describe(self) -> str:
        return f"{self.world} ranks: expert parallel {self.ep} x data parallel {self.world // self.ep}"

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard the experts of `model` (in place) and return the DDP wrapper to run training forwards through."""
        shard_experts(model, self.mesh)
        self.ddp = data_parallel(model, self.mesh)  # kept: its hooks reduce the gradients
        return self.ddp

    def no_sync(self):
        """Context: forwards and backwards inside accumulate gradients without reducing them over the ranks (every
        micro-batch of an optimizer step but the last); `wrap` must have run."""
        return no_sync(self.ddp)

    def my_rows(self, t: Tensor, uneven: bool = False) -> Tensor:
        """This rank's share of a global batch's rows (dim 0): equal shares, or with `uneven` possibly empty ones.

        Raises:
            ValueError: the rows do not split evenly (and `uneven` is False).
        """
        if not uneven and t.shape[0] % self.world:
            raise ValueError(
                f"batch_size={t.shape[0]} must be divisible by the {self.world} ranks (each takes an equal share)"
            )
        return torch.tensor_split(t, self.world)[self.rank]

    def mean(self, t: Tensor) -> Tensor:
        """The mean of `t` over the ranks."""
        return self.sum(t) / self.world

    def sum(self, t: Tensor) -> Tensor:
        """The sum of `t` over the ranks (a new tensor)."""
        t = t.clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_grad_norm_(model, max_norm, self.mesh["ep"].get_group())

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """`save_checkpoint`'s model_state and optimizer_state keyword arguments (a collective), complete on rank 0,
        the rank that writes the checkpoint; the other ranks send their expert shards and hold no full copy."""
        return {
            "model_state": full_model_state(model, dst=0),
            "optimizer_state": full_optimizer_state(optimizer, model, dst=0),
        }

    def shard_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Callable[[dict], dict], Callable[[dict], dict]]:
        """The `shard` functions of `load_weights` and `load_optimizer` for this rank."""
        return (
            (lambda full: shard_model_state(model, full)),
            (lambda full: shard_optimizer_state(optimizer, model, full)),
        )
