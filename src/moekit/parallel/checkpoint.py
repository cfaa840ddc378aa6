"""Checkpoints of an expert-parallel model in the single-process layout, and back.

Saving gathers every sharded expert tensor ([E/ep, ...] per rank) over the ep group into the full stacked [E, ...]
tensor (in training on the writing rank only), so the files an EP run writes (through the ordinary atomic
`moekit.train.checkpoint`, on rank 0) are exactly those of a one-process run: any ep size, or none, loads them.
Loading slices this rank's experts out of the full tensors. AdamW's moments have the shape of their parameter and
are gathered and sliced the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.layers.moe import MoE
from moekit.parallel.expert_parallel import _EXPERT_TENSORS


def _expert_ranges(model: nn.Module) -> dict[str, tuple[range, Any]]:
    """Name of every sharded expert tensor -> (this rank's global expert range, the ep group)."""
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MoE) and module.expert_parallel is not None:
            handle = module.expert_parallel
            prefix = f"{module_name}.experts." if module_name else "experts."
            for name in _EXPERT_TENSORS:
                if getattr(module.experts, name) is not None:
                    out[prefix + name] = (handle.dispatcher.local_experts, handle.ep_group)
    return out


def _gather(shard: Tensor, group, dst: int | None = None) -> Tensor:
    """The full [E, ...] tensor from the ep group's shards: on every rank (dst None), or on global rank `dst` only
    (the group's other ranks send theirs and keep their shard; groups without dst do nothing)."""
    shard = shard.detach().contiguous()
    if dst is None:
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard, group=group)
        return torch.cat(parts, dim=0)
    ranks = dist.get_process_group_ranks(group)
    if dst not in ranks:
        return shard
    parts = [torch.empty_like(shard) for _ in ranks] if dist.get_rank() == dst else None
    dist.gather(shard, parts, dst=dst, group=group)
    return torch.cat(parts, dim=0) if parts is not None else shard


def _check_dst(dst: int | None) -> None:
    """dst must name a rank of the job: a typo would otherwise leave every rank with its shards and no full copy."""
    if dst is None:
        return
    world = dist.get_world_size()
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world:
        raise ValueError(f"dst={dst!r} is not a global rank of this job: expected None or an integer in [0, {world})")


def full_model_state(model: nn.Module, dst: int | None = None) -> dict[str, Tensor]:
    """The single-process state dict of a sharded model (a collective: every rank must call it).

    Args:
        model: the sharded model (not a DDP wrapper).
        dst: None = the full tensors on every rank; a global rank = only that rank gets them (the one that writes
            the checkpoint; the others' expert tensors stay their shards, and no rank but dst holds a full copy).
    Returns:
        `model.state_dict()` with every expert tensor gathered to its full [E, ...] shape.
    """
    _check_dst(dst)
    state = model.state_dict()
    for name, (_, group) in sorted(_expert_ranges(model).items()):
        state[name] = _gather(state[name], group, dst)
    return state


def shard_model_state(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's slice of a single-process state dict, ready for `model.load_state_dict` (no communication)."""
    local = dict(full)
    for name, (experts, _) in _expert_ranges(model).items():
        if name in local:
            local[name] = local[name][experts.start : experts.stop]
    return local


def _optimizer_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "") for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, dst: int | None = None) -> dict[str, Any]:
    """`optimizer.state_dict()` with the per-parameter tensors of expert parameters gathered to full shape
    (a collective; `dst` as in `full_model_state`). Scalars and 0-d tensors (AdamW's step) are left as they are."""
    _check_dst(dst)
    state = optimizer.state_dict()
    ranges = _expert_ranges(model)
    for index, name in enumerate(_optimizer_names(optimizer, model)):
        if name in ranges and index in state["state"]:
            entry = state["state"][index]
            for key in sorted(entry):
                if isinstance(entry[key], Tensor) and entry[key].dim() > 0:
                    entry[key] = _gather(entry[key], ranges[name][1], dst)
    return state


def shard_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, full: dict[str, Any]
) -> dict[str, Any]:
    """This rank's slice of a full optimizer state dict, for `optimizer.load_state_dict`."""
    ranges = _expert_ranges(model)
    state = {"state": {}, "param_groups": full["param_groups"]}
    for index, name in enumerate(_optimizer_names(optimizer, model)):
        if index not in full["state"]:
            continue
        entry = dict(full["state"][index])
        if name in ranges:
            experts = ranges[name][0]
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    entry[key] = value[experts.start : experts.stop]
        state["state"][index] = entry
    return state
