"""The expert-parallel MoE layer equals the single-process layer: outputs and every gradient.

Each rank builds the same full layer (same seed) as the reference, then a copy whose experts are sharded over the
("dp", "ep") mesh and wrapped for data parallelism exactly as training does. The global batch is split across
ranks; rank r's loss is the mean-type loss of its own tokens, so after DDP's averaging every replicated gradient
must equal the reference layer's on the global batch, each expert's gradient its slice of the reference's, and the
input's gradient W times the reference's (DDP averages parameters, not inputs). Routing cases: uniform,
skewed, every token on one rank's experts, every token on one expert, and a rank with no tokens at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from moekit.config import MoEConfig
from moekit.layers import MoE
from moekit.parallel import build_mesh, data_parallel, expert_parameters, shard_experts

from dist_helpers import run_on_ranks

D, FF = 8, 4
TOL = dict(atol=1e-6, rtol=1e-6)

CASES = {
    "uniform-losses-shared": dict(
        cfg=dict(num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3, cv2_loss_coef=0.1,
                 seq_aux_loss_coef=1e-2, num_shared_experts=1, shared_expert_gate=True),
        tokens=(2, 6),
    ),
    "skewed": dict(cfg=dict(num_experts=8, top_k=2, router_bias=True, expert_bias=True, aux_loss_coef=0.01),
                   bias={0: 3.0, 1: 2.0}, tokens=(2, 6)),
    "all-on-rank-0": dict(cfg=dict(num_experts=8, top_k=2, router_bias=True), bias={0: 50.0, 1: 50.0}, tokens=(2, 6)),
    "all-on-one-expert": dict(cfg=dict(num_experts=8, top_k=1, router_bias=True, activation="gelu", aux_loss_coef=0.01),
                              bias={5: 50.0}, tokens=(2, 6)),
    "rank-without-tokens": dict(cfg=dict(num_experts=8, top_k=2, num_shared_experts=1), tokens=(4, 0)),
    # training-time noise: each rank draws the whole batch's noise and keeps its rows, as one process would
    "noisy-topk": dict(cfg=dict(num_experts=8, top_k=2, router="noisy_topk", cv2_loss_coef=0.1), tokens=(2, 6)),
}


def _reference_and_sharded(case: dict, mesh):
    torch.manual_seed(0)
    ref = MoE(MoEConfig(d_model=D, d_ff=FF, **case["cfg"]))
    with torch.no_grad():
        ref.router.weight.mul_(4)
        for e, b in case.get("bias", {}).items():
            ref.router.bias[e] = b
        for name, p in ref.named_parameters():
            if name.endswith(("b_in", "b_out")):
                p.normal_(0, 0.5)
    ep = shard_experts(copy.deepcopy(ref), mesh)
    return ref, ep, data_parallel(ep, mesh)


def _check_case(rank: int, world: int, mesh, case: dict) -> None:
    ref, ep, ddp = _reference_and_sharded(case, mesh)
    B, S = case["tokens"]
    # B sequences of S tokens per rank; S = 0: even ranks get B * 4 tokens, odd ranks none.
    sizes = [B * S for r in range(world)] if S else [B * 4 if r % 2 == 0 else 0 for r in range(world)]
    torch.manual_seed(1)
    x_global = torch.randn(sum(sizes), D)
    g_global = torch.randn(sum(sizes), D)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    S = case["tokens"][1]
    as_batch = (lambda t: t.view(-1, S, D)) if S else (lambda t: t)  # [B, S, D] for the sequence-wise loss

    # Reference: one process, the global batch as one (ranks' sequences stacked), mean-type loss over ranks.
    x_ref = x_global.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same generator state for both forwards (noisy routing draws from it)
    y_ref = ref(as_batch(x_ref)).reshape(-1, D)
    ref_loss = sum((y_ref[sum(sizes[:r]) : sum(sizes[: r + 1])] * g_global[sum(sizes[:r]) : sum(sizes[: r + 1])]).sum()
                   for r in range(world)) / world + ref.last.aux_loss
    ref_loss.backward()

    x = x_global[rows].clone().requires_grad_(True)
    torch.manual_seed(7)
    y = ddp(as_batch(x)).reshape(-1, D)
    loss = (y * g_global[rows]).sum() + ep.last.aux_loss
    loss.backward()

    torch.testing.assert_close(y, y_ref[rows].detach(), **TOL)
    torch.testing.assert_close(x.grad, world * x_ref.grad[rows], **TOL)
    if S:  # every loss is a mean over tokens or sequences: the ranks' mean is the global batch's loss
        mean_aux = ep.last.aux_loss.detach().clone()
        dist.all_reduce(mean_aux)
        torch.testing.assert_close(mean_aux / world, ref.last.aux_loss.detach(), **TOL)
    torch.testing.assert_close(ep.last.routed_per_expert, ref.last.routed_per_expert)
    sharded = expert_parameters(ep)
    ref_params = dict(ref.named_parameters())
    local = ep.expert_parallel.dispatcher.local_experts
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if name in sharded:
            want = want[local.start : local.stop]
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{name}: {m}")


def _worker(rank: int, world: int, layouts: list[int], cases: list[str]) -> None:
    for ep_size in layouts:
        mesh = build_mesh(ep_size)
        for refused in (dict(capacity_factor=1.25), dict(router="expert_choice")):  # they depend on the whole batch
            with pytest.raises(ValueError, match="not supported over"):
                shard_experts(MoE(MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=2, **refused)), mesh)
        for name in cases:
            try:
                _check_case(rank, world, mesh, CASES[name])
            except AssertionError as err:
                where = f"ep={ep_size}, dp={world // ep_size}, case {name!r}, rank {rank}"
                raise AssertionError(f"{where}: {err}") from None
        dist.barrier()


def test_two_ranks_match_one_process_in_every_routing_case():
    run_on_ranks(_worker, 2, [2], list(CASES))


def test_four_ranks_match_one_process_as_ep4_and_as_ep2_times_dp2():
    run_on_ranks(_worker, 4, [4, 2], ["uniform-losses-shared", "skewed", "all-on-one-expert", "rank-without-tokens",
                                      "noisy-topk"])


def _accumulation_worker(rank: int, world: int) -> None:
    """Two micro-batches, the first under `no_sync`: the gradients equal the reference's accumulated ones, and the
    world DDP reduced buckets during the second backward only."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from moekit.parallel import no_sync

    case = CASES["uniform-losses-shared"]
    ref, ep, ddp = _reference_and_sharded(case, build_mesh(2))
    reductions = []

    def counting_hook(state, bucket):
        reductions.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    B, S = case["tokens"]
    torch.manual_seed(2)
    for micro in range(2):
        x_global, g_global = torch.randn(world * B, S, D), torch.randn(world * B, S, D)
        (ref(x_global) * g_global).sum().div(world).add(ref.last.aux_loss).backward()
        rows = slice(rank * B, (rank + 1) * B)
        with no_sync(ddp) if micro == 0 else torch.enable_grad():
            ((ddp(x_global[rows]) * g_global[rows]).sum() + ep.last.aux_loss).backward()
        if micro == 0:
            assert not reductions, "no_sync still reduced gradients"
    assert reductions, "the last micro-batch's backward reduced nothing"
    sharded, ref_params = expert_parameters(ep), dict(ref.named_parameters())
    local = ep.expert_parallel.dispatcher.local_experts
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if name in sharded:
            want = want[local.start : local.stop]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"rank {rank} {name}: {m}")


def test_gradient_accumulation_under_no_sync_reduces_once_and_matches_one_process():
    run_on_ranks(_accumulation_worker, 2)
