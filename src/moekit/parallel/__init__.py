"""Expert parallelism over torch.distributed: experts split across ranks, tokens moved by all-to-all, combined with
data parallelism for everything else. See docs/expert_parallel.md.

    init_distributed()                     # under torchrun; gloo on CPU, NCCL on GPUs
    mesh = build_mesh(ep=4)                # ("dp", "ep") mesh: world = dp * ep
    shard_experts(model, mesh)             # each rank keeps E/ep experts; MoE layers dispatch by all-to-all
    ddp_model = data_parallel(model, mesh) # gradient averaging: experts over dp, the rest over the world
    with no_sync(ddp_model): ...           # gradient accumulation: reduce only on the last micro-batch
"""

from moekit.parallel.all_to_all import AllToAllDispatcher, CommBytes, count_bytes
from moekit.parallel.checkpoint import full_model_state, full_optimizer_state, shard_model_state, shard_optimizer_state
from moekit.parallel.expert_parallel import (
    ExpertParallel, check_expert_parallel, clip_grad_norm_, data_parallel, expert_parameters, no_sync, shard_experts,
)
from moekit.parallel.mesh import DEFAULT_TIMEOUT_S, build_mesh, init_distributed

__all__ = [
    "AllToAllDispatcher", "CommBytes", "DEFAULT_TIMEOUT_S", "ExpertParallel", "build_mesh", "check_expert_parallel",
    "clip_grad_norm_", "count_bytes", "data_parallel", "expert_parameters", "full_model_state", "full_optimizer_state",
    "init_distributed", "no_sync", "shard_experts", "shard_model_state", "shard_optimizer_state",
]
