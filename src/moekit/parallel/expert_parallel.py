"""Expert parallelism for a model's MoE layers, data parallelism for the rest, and the global gradient norm.

Legend: M kept token-slots, R slots received by this rank, D model dim, E experts, L local experts, W = ep.

`shard_experts(model, mesh)` keeps on each rank only the experts it owns (rank w of the "ep" mesh dim: experts
[w*E/W, (w+1)*E/W)) and gives every MoE layer an `ExpertParallel` handle; the layer then runs its experts through
the all-to-all dispatcher instead of locally, and reduces its load counts over all ranks so that balance losses,
statistics and the aux-loss-free bias update see the global batch. `data_parallel(model, mesh)` adds the gradient
reduction, with PyTorch's DistributedDataParallel (DDP) twice:

- expert parameters: each layer's local experts run through a DDP over the "dp" group (the ranks holding the same
  experts), which averages over those dp ranks. But the all-to-all backward already *sums* the gradient
  contributions of the W ranks of an EP group on the expert's owner (each rank's loss is the mean over its own
  tokens), so each backward's expert gradient is first divided by W, by a hook on the parameter that runs before
  the gradient is accumulated: the result is the mean over the global batch, like every other gradient. (Dividing
  inside DDP's communication hook instead would be wrong with gradient accumulation: DDP reduces the accumulated
  .grad at every backward, and would divide the earlier micro-batches' share again.)
- everything else (attention, norms, embeddings, routers, shared experts): one DDP over the whole world that
  ignores the expert parameters, averaging as usual.

Buffers are not broadcast each step (DDP's `forward_sync_buffers=False`): the selection bias moves by the same global
counts on every rank, and the per-step load accumulators are per rank by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from moekit.config import MoEConfig
from moekit.layers.dispatch import DispatchPlan
from moekit.layers.experts import Experts
from moekit.layers.moe import MoE, moe_layers
from moekit.layers.routing import NoisyTopKRouter
from moekit.parallel.all_to_all import AllToAllDispatcher

_EXPERT_TENSORS = ("w_in", "w_out", "b_in", "b_out")  # Experts' stacked [E, ...] parameters


class _LocalExperts(nn.Module):
    """The local experts as the module DDP wraps (activation checkpointing inside, where DDP does not see it)."""

    def __init__(self, experts: Experts, checkpoint_experts: bool) -> None:
        super().__init__()
        self.experts, self.checkpoint_experts = experts, checkpoint_experts

    def forward(self, x_RD: Tensor, counts_L: Tensor, scale_R: Tensor | None) -> Tensor:
        if self.checkpoint_experts and torch.is_grad_enabled():
            return checkpoint(self.experts, x_RD, counts_L, scale_R, use_reentrant=False)
        return self.experts(x_RD, counts_L, scale_R)


class ExpertParallel:
    """An MoE layer's handle on its expert-parallel group (set as `MoE.expert_parallel` by `shard_experts`).

    Args:
        experts: the layer's Experts, already cut down to this rank's experts.
        num_experts: E, experts in all.
        mesh: the ("dp", "ep") DeviceMesh.
        checkpoint_experts: recompute the local experts' activations in backward.
    """

    def __init__(self, experts: Experts, num_experts: int, mesh: DeviceMesh, checkpoint_experts: bool = False) -> None:
        self.dispatcher = AllToAllDispatcher(num_experts, mesh["ep"].get_group())
        self.dp_group = mesh["dp"].get_group()
        self.runner: nn.Module = _LocalExperts(experts, checkpoint_experts)  # DDP-wrapped by data_parallel()

    @property
    def ep_group(self):
        return self.dispatcher.group

    def run_experts(self, x_MD: Tensor, counts_E: Tensor, scale_M: Tensor | None) -> Tensor:
        """The drop-in for `Experts.forward` on the whole expert set: [M, D] rows sorted by global expert ->
        [M, D] outputs (times scale_M), computed on the ranks that own the experts."""
        x_RD, counts_L, scale_R, route = self.dispatcher.dispatch(x_MD, counts_E, scale_M)
        y_RD = self.runner(x_RD, counts_L, scale_R)
        return self.dispatcher.combine(y_RD, route)

    def global_plan(self, plan: DispatchPlan) -> DispatchPlan:
        """The plan with its counts (kept, routed, dropped, re-routed) summed over every rank: one all_reduce."""
        E = plan.counts.numel()
        counts = torch.cat([plan.counts, plan.routed_counts, plan.dropped.view(1), plan.rerouted.view(1)])
        dist.all_reduce(counts)
        return replace(
            plan, counts=counts[:E], routed_counts=counts[E : 2 * E], dropped=counts[2 * E], rerouted=counts[2 * E + 1]
        )

    def sum_over_ranks(self, x: Tensor) -> Tensor:
        """Differentiable sum of `x` over every rank (its backward sums the gradients of every rank's copy)."""
        return dist_fn.all_reduce(x)


def check_expert_parallel(config: MoEConfig, ep: int, world: int | None = None) -> None:
    """Refuse an MoE layer config that a run over several ranks cannot compute as one process would.

    Every rank routes only its own share of the batch. Token-choice routing without capacity decides each token
    alone, so that changes nothing; but a capacity (C = cf * T * K / E, filled in batch order) and expert-choice
    routing (each expert takes its top-C tokens of the batch) depend on the whole batch: each rank would size and
    fill them from its own T/world tokens and keep other slots than one process does.

    Args:
        config: the layer's MoEConfig.
        ep: expert-parallel ranks.
        world: ranks sharing the batch (ep x dp); None = ep.
    Raises:
        ValueError: the experts do not split evenly over ep ranks, or the routing depends on the whole batch.
    """
    if config.num_experts % ep:
        raise ValueError(f"num_experts={config.num_experts} must be divisible by the expert-parallel size ep={ep}")
    world = ep if world is None else world
    if world == 1:
        return
    if config.router == "expert_choice":
        raise ValueError(
            f"router='expert_choice' is not supported over {world} ranks: each expert picks its tokens from the "
            "whole batch, and a rank sees only its share; use a token-choice router (topk, deepseek, ...)"
        )
    if config.capacity_factor is not None:
        raise ValueError(
            f"capacity_factor={config.capacity_factor} is not supported over {world} ranks: each rank would size "
            "the capacity from its own share of the tokens and drop other slots than one process does; use "
            "capacity_factor=None (dropless routing)"
        )


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep only this rank's experts in every MoE layer of `model` and route their tokens with all-to-all.

    Call it on a model built identically on every rank (same seed), after moving it to its device. Parameter
    names do not change; expert tensors become [E/ep, ...] slices. Idempotent per layer.

    Args:
        model: a module holding MoE layers (an MoE itself, or an MoELM).
        mesh: the ("dp", "ep") DeviceMesh from `build_mesh`.
    Returns:
        The same model, modified in place.
    Raises:
        ValueError: the model has no MoE layer; a layer's config fails `check_expert_parallel` (num_experts not
            divisible by the ep size, capacity or expert-choice routing).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("shard_experts: the model has no MoE layer to shard")
    for layer in layers:
        check_expert_parallel(layer.config, mesh["ep"].size(), mesh.size())
    for layer in layers:
        if layer.expert_parallel is not None:
            continue
        handle = ExpertParallel(layer.experts, layer.config.num_experts, mesh, layer.config.checkpoint_experts)
        local = handle.dispatcher.local_experts
        experts = layer.experts
        for name in _EXPERT_TENSORS:
            full = getattr(experts, name)
            if full is not None:
                mine = full.detach()[local.start : local.stop].clone()
                setattr(experts, name, nn.Parameter(mine, full.requires_grad))
        experts.num_experts = len(local)
        layer.expert_parallel = handle
        if isinstance(layer.router, NoisyTopKRouter):  # every token gets the noise one process would draw for it
            layer.router.noise_shard = (dist.get_rank(), dist.get_world_size())
    return model


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The sharded expert parameters of `model` by name (empty for a model without expert parallelism)."""
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MoE) and module.expert_parallel is not None:
            for name in _EXPERT_TENSORS:
                p = getattr(module.experts, name)
                if p is not None:
                    out[f"{module_name}.experts.{name}" if module_name else f"experts.{name}"] = p
    return out


def data_parallel(model: nn.Module, mesh: DeviceMesh) -> DDP:
    """Wrap a `shard_experts`-ed model for training: DDP over the dp group for each layer's experts, DDP over the
    world for everything else (see the module docstring for why the expert gradients are also divided by ep).
    Keep the returned wrapper alive until backward has run: its hooks do the reduction.

    Args:
        model: the sharded model (on its device).
        mesh: the mesh it was sharded with.
    Returns:
        The DDP-wrapped model: call it instead of `model` for training forwards; `.module` is `model`.
    """
    experts = expert_parameters(model)
    if not experts:
        raise ValueError("data_parallel: call shard_experts(model, mesh) first")
    for layer in moe_layers(model):
        handle = layer.expert_parallel
        if not isinstance(handle.runner, DDP):
            handle.runner = DDP(handle.runner, process_group=handle.dp_group, forward_sync_buffers=False)
            ep_size = handle.dispatcher.ep_size
            for p in handle.runner.module.parameters():  # summed over the ep ranks by the all-to-all: make a mean
                p.register_hook(lambda grad_EX: grad_EX / ep_size)
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(experts))
    return DDP(model, forward_sync_buffers=False)


@contextmanager
def no_sync(ddp_model: DDP) -> Iterator[None]:
    """Run forwards and backwards without reducing gradients (gradient accumulation's earlier micro-batches).

    Enters `no_sync` of the world DDP that `data_parallel` returned and of every layer's expert DDP: each rank
    accumulates its own gradients, and the first backward run outside the context reduces the accumulated sums once,
    instead of one all-reduce per micro-batch. The expert gradients' division by ep still applies per backward.
    """
    with ExitStack() as stack:
        stack.enter_context(ddp_model.no_sync())
        for layer in moe_layers(ddp_model.module):
            runner = layer.expert_parallel.runner
            if isinstance(runner, DDP):
                stack.enter_context(runner.no_sync())
        yield


def clip_grad_norm_(model: nn.Module, max_norm: float, ep_group=None) -> Tensor:
    """Clip the gradients of a (sharded) model to a global norm, the same on every rank.

    Replicated parameters count once; expert shards are summed over the ep group (each expert once), so the norm
    equals the single-process model's. Call after backward (after DDP's reductions).

    Args:
        model: the sharded model (not the DDP wrapper, or it: parameters are the same).
        max_norm: the clip; float("inf") only measures.
        ep_group: the expert-parallel group; None = the first MoE layer's.
    Returns:
        The total norm before clipping (0-d float32).
    """
    experts = {id(p) for p in expert_parameters(model).values()}
    params = [p for p in model.parameters() if p.grad is not None]
    if ep_group is None:
        ep_group = next(m.expert_parallel.ep_group for m in moe_layers(model) if m.expert_parallel is not None)
    device = params[0].grad.device if params else torch.device("cpu")

    def sq_norm(grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(grads, 2.0).float() ** 2

    expert_sq = sq_norm([p.grad for p in params if id(p) in experts])
    dist.all_reduce(expert_sq, group=ep_group)
    total = (sq_norm([p.grad for p in params if id(p) not in experts]) + expert_sq).sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
