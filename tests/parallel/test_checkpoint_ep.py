"""Checkpoints move between expert-parallel sizes: an EP=2 run saves the single-process layout, one process loads
it, and an EP=4 run loads the same file into its own shards (weights and AdamW moments)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.distributed as dist

from moekit.models.lm import MoELM
from moekit.parallel import (
    build_mesh, data_parallel, expert_parameters, full_model_state, full_optimizer_state, shard_experts,
    shard_model_state, shard_optimizer_state,
)
from moekit.presets import get_preset
from moekit.train import checkpoint as ckpt

from dist_helpers import run_on_ranks


def tiny_config():
    base = get_preset("tiny-deepseek")  # shared + routed experts, a dense first layer
    moe = replace(base.moe, d_model=16, d_ff=8, num_experts=8, top_k=2)
    return replace(base, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, dense_d_ff=16, vocab_size=64,
                   max_seq_len=16, moe=moe)


def _train_one_step(model, mesh, batch_rows: slice):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (4, 8))
    ddp = data_parallel(model, mesh)  # held until backward is done: its hooks do the gradient reduction
    ddp(ids[batch_rows], targets=ids[batch_rows]).loss.backward()
    optimizer.step()
    return optimizer


def _worker(rank: int, world: int, run_dir: str) -> None:
    torch.manual_seed(0)
    full = MoELM(tiny_config())
    reference = copy.deepcopy(full)

    # EP=2 (x DP=2): train a step so the optimizer has moments, save the single-process layout from rank 0.
    mesh2 = build_mesh(2)
    ep2 = shard_experts(copy.deepcopy(full), mesh2)
    opt2 = _train_one_step(ep2, mesh2, slice(rank, rank + 1))
    state, opt_state = full_model_state(ep2), full_optimizer_state(opt2, ep2)
    # Gathered to rank 0 only (what training saves with): the same tensors there, the shards elsewhere.
    to_0, opt_to_0 = full_model_state(ep2, dst=0), full_optimizer_state(opt2, ep2, dst=0)
    for bad in (world, -1, "0"):  # not a rank of this job: an error on every rank, before any collective
        for call in (lambda: full_model_state(ep2, dst=bad), lambda: full_optimizer_state(opt2, ep2, dst=bad)):
            try:
                call()
            except ValueError as e:
                assert f"dst={bad!r} is not a global rank" in str(e) and f"[0, {world})" in str(e)
            else:
                raise AssertionError(f"dst={bad!r} was accepted")
    sharded = expert_parameters(ep2)
    for name, t in state.items():
        want = t if rank == 0 or name not in sharded else ep2.state_dict()[name]
        torch.testing.assert_close(to_0[name], want, atol=0, rtol=0, msg=lambda m: f"rank {rank} {name}: {m}")
    params = [p for group in opt2.param_groups for p in group["params"]]
    expert_ids = {id(p) for p in sharded.values()}
    for index, entry in opt_state["state"].items():
        local = opt2.state[params[index]]
        for key, value in entry.items():
            moment = isinstance(value, torch.Tensor) and value.dim() > 0
            want = local[key] if rank != 0 and moment and id(params[index]) in expert_ids else value
            torch.testing.assert_close(opt_to_0["state"][index][key], want, atol=0, rtol=0)
    if rank == 0:
        ckpt.save_checkpoint(run_dir, 1, ep2, ep2.config.to_dict(), "{}", opt2, model_state=state,
                             optimizer_state=opt_state)
    dist.barrier()
    found = ckpt.find_checkpoint(run_dir)

    # One process: the file is an ordinary checkpoint; its experts are the EP=2 shards put together.
    single = copy.deepcopy(reference)
    ckpt.load_weights(single, found)
    local2 = {n: p for n, p in ep2.named_parameters()}
    for name, p in single.named_parameters():
        if name in expert_parameters(ep2):
            mine = ep2.get_submodule(name.rsplit(".", 2)[0]).expert_parallel.dispatcher.local_experts
            torch.testing.assert_close(p[mine.start : mine.stop], local2[name], atol=0, rtol=0)
        else:
            torch.testing.assert_close(p, local2[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")

    # EP=4: every rank loads its two of the eight experts, and its slice of the AdamW moments.
    mesh4 = build_mesh(4)
    ep4 = shard_experts(copy.deepcopy(reference), mesh4)
    opt4 = torch.optim.AdamW(ep4.parameters(), lr=1e-2)
    ckpt.load_weights(ep4, found, shard=lambda t: shard_model_state(ep4, t))
    ckpt.load_optimizer(opt4, ep4, found, shard=lambda sd: shard_optimizer_state(opt4, ep4, sd))
    single_params = dict(single.named_parameters())
    for name, p in ep4.named_parameters():
        want = single_params[name]
        if name in expert_parameters(ep4):
            mine = ep4.get_submodule(name.rsplit(".", 2)[0]).expert_parallel.dispatcher.local_experts
            want = want[mine.start : mine.stop]
            index = [q is p for g in opt4.param_groups for q in g["params"]].index(True)
            moments = opt_state["state"][index]["exp_avg"][mine.start : mine.stop]
            torch.testing.assert_close(opt4.state[p]["exp_avg"], moments, atol=0, rtol=0)
        torch.testing.assert_close(p, want, atol=0, rtol=0)
    # ... and gathers back to exactly the file's tensors.
    regathered = full_model_state(ep4)
    for name, t in single.state_dict().items():
        torch.testing.assert_close(regathered[name], t, atol=0, rtol=0)


def test_ep2_checkpoint_loads_into_one_process_and_into_ep4(tmp_path):
    run_on_ranks(_worker, 4, str(tmp_path / "run"))
