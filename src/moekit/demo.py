"""A one-minute tour of the MoE layer: train it as a drop-in FFN on a task made for experts, beside a dense FFN.

The task: inputs come from `num_clusters` Gaussian clusters and each cluster has its own random nonlinear map to the
target, a "mixture of tasks". A dense FFN and an MoE layer with the same active parameters per token are trained on
the same batches; the demo prints both loss curves, the expert load, what the balancing did, and how purely each
expert's tokens come from one cluster (do the experts specialise?).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers.experts import FFN
from moekit.layers.moe import MoE


@dataclass
class DemoResult:
    dense_loss: float
    moe_loss: float
    dense_params: int
    moe_active_params: int
    moe_total_params: int
    tokens_per_expert: list[int]
    purity: float
    bias: list[float] | None
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _make_task(num_clusters: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, d, generator=g) * 3.0
    maps_in = torch.randn(num_clusters, d, d, generator=g) / d**0.5
    maps_out = torch.randn(num_clusters, d, d, generator=g) / d**0.5

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        cluster = torch.randint(num_clusters, (n,), generator=gen)
        x = centers[cluster] + torch.randn(n, d, generator=gen)
        h = torch.tanh(torch.einsum("nd,nde->ne", x, maps_in[cluster]))
        y = torch.einsum("nd,nde->ne", h, maps_out[cluster])
        return x, y, cluster

    return sample


def run_demo(
    steps: int = 300,
    batch: int = 512,
    d_model: int = 32,
    num_experts: int = 8,
    top_k: int = 2,
    d_ff: int = 32,
    seed: int = 0,
    log=print,
) -> DemoResult:
    """Train a dense FFN and an MoE layer side by side; return final losses and routing statistics.

    Args:
        steps: optimizer steps for each model.
        batch: tokens per step.
        d_model, num_experts, top_k, d_ff: the MoE layer's shape (the dense FFN gets hidden width top_k * d_ff).
        seed: seeds the task, the data and the initialisation.
        log: where progress lines go (print by default).
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    sample = _make_task(num_experts, d_model, seed)
    config = MoEConfig(
        d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, activation="swiglu",
        router="topk", softmax_order="topk_softmax", selection_bias=True, bias_update_rate=1e-3, z_loss_coef=1e-3,
    )
    moe = MoE(config)
    dense = FFN(d_model, top_k * d_ff, "swiglu")
    opt_moe = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    log(f"task: {num_experts} clusters x their own nonlinear map, d={d_model}; {steps} steps of {batch} tokens")
    log(f"dense FFN hidden {top_k * d_ff} vs MoE {num_experts} experts x {d_ff}, top-{top_k} (same active FLOPs)")
    log(f"{'step':>6} {'dense loss':>11} {'moe loss':>10} {'max/mean load':>14}")
    mse = nn.MSELoss()
    for step in range(1, steps + 1):
        x, y, _ = sample(batch, gen)
        loss_dense = mse(dense(x), y)
        opt_dense.zero_grad(set_to_none=True)
        loss_dense.backward()
        opt_dense.step()

        loss_moe = mse(moe(x), y)
        opt_moe.zero_grad(set_to_none=True)
        (loss_moe + moe.last.aux_loss).backward()
        opt_moe.step()
        moe.update_bias()
        if step == 1 or step % max(1, steps // 6) == 0 or step == steps:
            load = moe.last.tokens_per_expert.float()
            log(f"{step:>6} {loss_dense.item():>11.4f} {loss_moe.item():>10.4f} {(load.max() / load.mean()).item():>14.2f}")

    moe.eval()
    dense.eval()
    with torch.no_grad():
        x, y, cluster = sample(4096, gen)
        final_dense = mse(dense(x), y).item()
        final_moe = mse(moe(x), y).item()
        route = moe.router(x)
        first_choice = route.indices[:, 0]
        joint = torch.zeros(num_experts, num_experts).index_put_(
            (first_choice, cluster), torch.ones(len(cluster)), accumulate=True
        )
        purity = (joint.max(dim=1).values.sum() / joint.sum()).item()
        counts = torch.bincount(route.indices.flatten(), minlength=num_experts).tolist()
    routed_params = sum(p.numel() for p in moe.experts.parameters())
    total = sum(p.numel() for p in moe.parameters())
    active = total - routed_params + routed_params * top_k // num_experts
    bias = moe.router.selection_bias.tolist() if moe.router.selection_bias is not None else None
    result = DemoResult(
        final_dense, final_moe, sum(p.numel() for p in dense.parameters()), active, total, counts, purity, bias,
        time.perf_counter() - start,
    )
    log("")
    log(f"held-out loss: dense {final_dense:.4f}  moe {final_moe:.4f}  ({final_dense / max(final_moe, 1e-12):.2f}x lower for MoE)")
    log(f"parameters: dense {result.dense_params:,}; moe {total:,} total, {active:,} active per token")
    log(f"tokens per expert (held-out batch, all {top_k} slots): {counts}")
    log(f"specialisation: {purity:.0%} of each expert's first-choice tokens come from its most common cluster "
        f"(chance: ~{1 / num_experts:.0%})")
    log(f"done in {result.seconds:.1f}s")
    return result

