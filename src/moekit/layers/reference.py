"""The readable reference MoE: plain Python loops over slots and experts, no sorting tricks.

It is slow on purpose and exists so that tests can hold the fast dispatch engine to it: same router decision in,
same output and gradients out, for every router, activation and capacity mode. It spells out the capacity rules
(slot-major priority, drop, re-route in rounds) the way one would explain them on a whiteboard.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.layers.moe import MoE
from moekit.layers.routing import RouterOutput


def reference_assignment(
    route: RouterOutput, num_experts: int, capacity: int | None, overflow: str, priority: str = "position"
) -> tuple[list[list[int]], int, int]:
    """Final expert of each slot ([T][K], -1 = empty or dropped), number dropped, number re-routed.

    priority "position": tokens in batch order; "score" (V-MoE's batch prioritized routing): tokens by their
    largest combine weight, highest first, ties in batch order.
    """
    T, K = route.indices.shape
    chosen = route.indices.tolist()
    final = [row[:] for row in chosen]
    if capacity is None:
        return final, 0, 0
    token_order = list(range(T))
    if priority == "score":
        weights = route.weights.tolist()
        top = [max((w for w, e in zip(weights[t], chosen[t]) if e >= 0), default=-math.inf) for t in range(T)]
        token_order.sort(key=lambda t: (-top[t], t))
    rank = {t: r for r, t in enumerate(token_order)}
    load = [0] * num_experts
    overflowed = []  # (priority, t, k)
    for k in range(K):  # slot-major priority: all first choices, then all second choices, ...
        for t in token_order:
            e = chosen[t][k]
            if e < 0:
                continue
            if load[e] < capacity:
                load[e] += 1
            else:
                final[t][k] = -1
                overflowed.append((k * T + rank[t], t, k))
    rerouted = 0
    if overflow == "reroute" and overflowed:
        scores = route.scores.tolist()
        used = [set(e for e in chosen[t] if e >= 0) for t in range(T)]
        ranking = {}
        for _, t, _ in overflowed:
            if t not in ranking:
                ranking[t] = sorted(range(num_experts), key=lambda e: (-scores[t][e], e))
        pointer = {(t, k): 0 for _, t, k in overflowed}
        pending = [(t, k) for _, t, k in overflowed]
        while pending:
            used_at_start = [set(u) for u in used]
            proposals, proposed, waiting = [], set(), []
            for t, k in pending:
                r = pointer[(t, k)]
                if r >= num_experts or math.isinf(scores[t][ranking[t][r]]):
                    continue  # out of experts: dropped
                e = ranking[t][r]
                if e in used_at_start[t]:
                    pointer[(t, k)] += 1
                    waiting.append((t, k))
                elif (t, e) in proposed:
                    waiting.append((t, k))
                else:
                    proposed.add((t, e))
                    proposals.append((t, k, e))
            for t, k, e in proposals:
                if load[e] < capacity:
                    load[e] += 1
                    final[t][k] = e
                    used[t].add(e)
                    rerouted += 1
                else:
                    pointer[(t, k)] += 1
                    waiting.append((t, k))
            pending = sorted(waiting, key=lambda tk: tk[1] * T + rank[tk[0]])
    dropped = sum(1 for t in range(T) for k in range(K) if chosen[t][k] >= 0 and final[t][k] < 0)
    return final, dropped, rerouted


def reference_moe(moe: MoE, x: Tensor, route: RouterOutput, mask: Tensor | None = None) -> Tensor:
    """The MoE layer's output computed with per-expert loops.

    Args:
        moe: the layer whose experts and shared experts are used.
        x: [B, S, D] or [T, D] input.
        route: the router's decision for these tokens (compute it once and give it to both implementations).
        mask: optional [B, S] or [T] bool, True for real tokens.
    Returns:
        Output with x's shape.
    """
    cfg = moe.config
    x_TD = x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    out = torch.zeros_like(x_TD)
    experts = moe.experts
    if route.expert_choice:
        for e in range(cfg.num_experts):
            for c in range(route.indices.shape[1]):
                t = int(route.indices[e, c])
                y = experts.expert_forward(e, x_TD[t : t + 1])
                out[t] = out[t] + route.weights[e, c].to(x.dtype) * y[0]
    else:
        indices = route.indices.clone()
        if mask is not None:
            indices[~mask.reshape(-1).bool()] = -1
        masked = RouterOutput(route.weights, indices, route.logits, route.probs, route.scores)
        capacity = None
        if cfg.capacity_factor is not None:
            num_real = T if mask is None else int(mask.sum())
            capacity = max(cfg.min_capacity, math.ceil(cfg.capacity_factor * num_real * cfg.top_k / cfg.num_experts))
        final, _, _ = reference_assignment(masked, cfg.num_experts, capacity, cfg.overflow, cfg.capacity_priority)
        for e in range(cfg.num_experts):  # the per-expert loop of every MoE tutorial
            slots = [(t, k) for t in range(T) for k in range(len(final[t])) if final[t][k] == e]
            if not slots:
                continue
            tokens = torch.tensor([t for t, _ in slots], dtype=torch.long)
            y = experts.expert_forward(e, x_TD[tokens])
            w = torch.stack([route.weights[t, k] for t, k in slots]).to(x.dtype)
            out = out.index_add(0, tokens, w.unsqueeze(1) * y)
    if moe.shared_experts is not None:
        shared = moe.shared_experts(x_TD)
        if moe.shared_gate is not None:
            shared = torch.sigmoid(moe.shared_gate(x_TD)) * shared
        out = out + shared
    return out.view_as(x)
