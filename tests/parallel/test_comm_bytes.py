"""The bytes the dispatcher sends are those of the closed form when routing is exactly uniform.

Token t picks experts t, t+1 (mod E) through a router built for it, so each rank sends exactly T*K/E slots to every
expert and K * (1 - 1/W) * D * b bytes of rows per token leave the rank in each direction (moekit.parallel.projection,
eq. 1), as many again in the backward, plus the float32 combine weights and the E int64 counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.config import MoEConfig
from moekit.layers import MoE
from moekit.parallel import build_mesh, count_bytes, shard_experts
from moekit.parallel.projection import all_to_all_bytes

from dist_helpers import run_on_ranks

D, E, K, T = 16, 8, 2, 32


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=D, d_ff=8, num_experts=E, top_k=K))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E)  # logit of expert e = x[e]
    layer = shard_experts(layer, build_mesh(world))
    x_TD = torch.randn(T, D)
    x_TD[:, :E] = 0
    t = torch.arange(T)
    x_TD[t, t % E], x_TD[t, (t + 1) % E] = 2.0, 1.0
    x_TD.requires_grad_(True)
    with count_bytes() as fwd:
        y_TD = layer(x_TD)
    with count_bytes() as bwd:
        y_TD.square().sum().backward()
    assert layer.last.tokens_per_expert.tolist() == [world * T * K // E] * E  # exactly uniform
    rows = T * all_to_all_bytes(K, world, D, 4)
    assert (fwd.tokens, bwd.tokens) == (2 * rows, 2 * rows), (fwd, bwd, rows)
    assert fwd.weights == T * all_to_all_bytes(K, world, 1, 4) == bwd.weights
    assert fwd.counts == E * (1 - 1 / world) * 8 and bwd.counts == 0
    assert fwd.calls == 4 and bwd.calls == 3  # counts, rows, weights, rows back; the backward has no counts
    dist.barrier()


def test_exactly_uniform_routing_sends_the_closed_form_bytes():
    run_on_ranks(_worker, 2)
