"""Which MoE layer configs a multi-rank run refuses: those whose routing depends on the whole batch."""

from __future__ import annotations

import pytest

from moekit.config import MoEConfig
from moekit.parallel import check_expert_parallel


def layer(**kwargs) -> MoEConfig:
    return MoEConfig(**{"d_model": 8, "d_ff": 4, "num_experts": 8, "top_k": 2, **kwargs})


def test_dropless_token_choice_routers_run_on_any_number_of_ranks():
    for router in ("topk", "noisy_topk", "deepseek", "top_p", "hash", "hierarchical"):
        extra = {"n_group": 2, "topk_group": 1} if router in ("deepseek", "hierarchical") else {}
        check_expert_parallel(layer(router=router, **extra), ep=4, world=8)


def test_capacity_and_expert_choice_are_refused_once_the_batch_is_split():
    with pytest.raises(ValueError, match=r"capacity_factor=1.25 is not supported over 2 ranks.*capacity_factor=None"):
        check_expert_parallel(layer(capacity_factor=1.25), ep=2)
    with pytest.raises(ValueError, match=r"capacity_factor=1.0 is not supported over 4 ranks"):
        check_expert_parallel(layer(capacity_factor=1.0, overflow="reroute"), ep=1, world=4)  # data parallel too
    with pytest.raises(ValueError, match="router='expert_choice' is not supported over 2 ranks"):
        check_expert_parallel(layer(router="expert_choice"), ep=2)
    check_expert_parallel(layer(capacity_factor=1.25), ep=1)  # one process: the layer's own semantics


def test_experts_must_split_evenly_over_the_ep_ranks():
    with pytest.raises(ValueError, match="num_experts=8 must be divisible by the expert-parallel size ep=3"):
        check_expert_parallel(layer(), ep=3, world=3)
