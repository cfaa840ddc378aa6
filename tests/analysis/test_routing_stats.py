"""moekit.analysis.routing: every statistic against a hand-computed case, the recorder leaves the model's outputs
alone, and analyze_routing measures a real (tiny) model, warning on a collapsed router and not on a healthy one."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moekit.analysis import routing as R
from moekit.layers.routing import RouterOutput
from moekit.models.lm import MoELM
from moekit.presets import get_preset


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""


def _tiny_lm(vocab_size: int = 64, **moe_changes) -> MoELM:
    base = get_preset("tiny-mixtral")
    moe = replace(base.moe, d_model=32, d_ff=32, num_experts=4, **moe_changes)
    cfg = replace(base, vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_d_ff=64,
                  max_seq_len=64, moe=moe)
    torch.manual_seed(0)
    return MoELM(cfg)


# ---------------------------------------------------------------------------------------------------- load


def test_expert_load_counts_slots_and_skips_empty_ones():
    indices = torch.tensor([[0, 1], [0, 2], [1, -1]])
    assert R.expert_load(indices, 3).tolist() == [2, 2, 1]


def test_imbalance_and_cv_of_a_hand_computed_load():
    load = torch.tensor([2, 2, 1])
    assert R.load_imbalance(load) == pytest.approx(2 / (5 / 3))
    assert R.coefficient_of_variation(load) == pytest.approx(math.sqrt(2) / 5)  # std sqrt(2/9), mean 5/3


def test_balanced_load_has_imbalance_one_and_cv_zero():
    load = torch.tensor([7, 7, 7, 7])
    assert R.load_imbalance(load) == 1.0 and R.coefficient_of_variation(load) == 0.0


def test_entropy_in_bits_of_hand_computed_distributions():
    assert R.entropy_bits(torch.tensor([1, 1, 1, 1])) == pytest.approx(2.0)
    assert R.entropy_bits(torch.tensor([5, 0])) == 0.0
    assert R.entropy_bits(torch.tensor([1, 3])) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_out_of_range_experts_are_named():
    with pytest.raises(ValueError, match=r"experts -1\.\.5: expected -1 \(empty slot\) or 0\.\.3"):
        R.expert_load(torch.tensor([[0, 5], [1, -1]]), 4)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \[2\]"):
        R.mutual_information(torch.tensor([0, 1, 0]), torch.tensor([[0], [1]]), 2, 2)


# ---------------------------------------------------------------------------------------------- co-activation


def test_coactivation_is_symmetric_with_the_right_counts():
    indices = torch.tensor([[0, 1], [0, 1], [1, 2], [2, -1]])
    co = R.coactivation(indices, 3)
    assert co.tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 2]]  # diagonal: tokens per expert
    assert torch.equal(co, co.T)


def test_chance_coactivation_matches_uniform_random_top2():
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20000)])
    share = R.coactivation(indices, 8).double() / 20000
    off = share[~torch.eye(8, dtype=torch.bool)]
    assert R.chance_coactivation(8, 2) == pytest.approx(1 / 28)
    assert off.mean().item() == pytest.approx(1 / 28, rel=1e-6)  # exact: every token adds 2 ordered pairs
    assert (off - 1 / 28).abs().max().item() < 0.006


# ------------------------------------------------------------------------------------------ mutual information


def test_mi_of_perfectly_domain_split_routing_is_the_domain_entropy():
    domains = torch.tensor([0, 0, 0, 1])  # 3 prose, 1 code: H = 0.811 bits
    indices = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 3]])  # prose -> {0, 1}, code -> {2, 3}
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert R.mutual_information(domains, indices, 2, 4) == pytest.approx(h)


def test_mi_of_routing_independent_of_the_domain_is_zero():
    # Both domains see every expert pair equally often: the joint table is the product of its marginals.
    pairs = [[0, 1], [2, 3], [0, 2], [1, 3]]
    domains = torch.tensor([0] * 4 + [1] * 4)
    indices = torch.tensor(pairs + pairs)
    assert R.mutual_information(domains, indices, 2, 4) == pytest.approx(0.0, abs=1e-12)


def test_independent_random_routing_has_mi_near_zero_and_at_its_shuffled_baseline():
    g = torch.Generator().manual_seed(1)
    domains = torch.randint(0, 2, (20000,), generator=g)
    indices = torch.randint(0, 8, (20000, 1), generator=g)
    result = R.shuffled_mutual_information(domains, indices, 2, 8, shuffles=8, generator=g)
    assert result.value < 1e-3
    assert abs(result.excess) < 4 * result.baseline_std + 1e-4
    assert result.shuffles == 8 and result.baseline_std > 0


def test_shuffled_baseline_of_split_routing_is_near_zero_so_the_excess_is_the_entropy():
    domains = torch.tensor([0, 1] * 5000)
    indices = torch.stack([domains * 2, domains * 2 + 1], dim=1)
    result = R.shuffled_mutual_information(domains, indices, 2, 4, shuffles=3)
    assert result.value == pytest.approx(1.0)
    assert result.baseline_mean < 1e-3 and result.excess == pytest.approx(1.0, abs=1e-3)


def test_shuffles_are_reproducible_from_the_seed():
    domains = torch.randint(0, 2, (500,), generator=torch.Generator().manual_seed(0))
    indices = torch.randint(0, 4, (500, 2), generator=torch.Generator().manual_seed(1))
    a = R.shuffled_mutual_information(domains, indices, 2, 4, 4, torch.Generator().manual_seed(3))
    b = R.shuffled_mutual_information(domains, indices, 2, 4, 4, torch.Generator().manual_seed(3))
    assert a == b


# ---------------------------------------------------------------------------------- consistency, repeats, lift


def test_consistency_is_the_share_matching_each_keys_most_frequent_expert():
    keys = torch.tensor([0, 0, 0, 1, 1])
    experts = torch.tensor([2, 2, 3, 1, 0])
    assert R.consistency(keys, experts, 2, 4) == pytest.approx(3 / 5)  # key 0: 2 of 3 on expert 2; key 1: 1 of 2
    assert R.consistency(torch.zeros(5, dtype=torch.long), experts, 1, 4) == pytest.approx(2 / 5)  # busiest expert


def test_repeat_rate_of_consecutive_tokens():
    seq = torch.tensor([[[0, 1], [1, 2], [3, 4], [3, 0]]])
    assert R.repeat_rate(seq, first_choice=True) == pytest.approx(1 / 3)  # only (3, 3)
    assert R.repeat_rate(seq, first_choice=False) == pytest.approx(2 / 3)  # {0,1}&{1,2}, {3,4}&{3,0}


def test_chance_repeat_rates_are_mixtrals_random_baselines():
    assert R.chance_repeat_rate(8, 2, True) == pytest.approx(0.125)
    assert R.chance_repeat_rate(8, 2, False) == pytest.approx(1 - 15 / 28)  # Mixtral §5: 46%


def test_top_tokens_by_lift_finds_the_token_an_expert_takes():
    ids = torch.tensor([5] * 5 + [6] * 5 + [7] * 10)
    indices = torch.tensor([[0]] * 5 + [[1]] * 5 + [[0], [1]] * 5)
    top = R.top_tokens_by_lift(ids, indices, 8, 2, top=2, min_count=1, decode=lambda v: f"<{v}>")
    first = top[0][0]
    # expert 0 takes 10 tokens, 5 of them id 5: P(5|e0) = 0.5, P(5) = 0.25 -> lift 2
    assert (first.token, first.text, first.count, first.total) == (5, "<5>", 5, 5)
    assert first.lift == pytest.approx(2.0)
    assert top[0][1].token == 7 and top[0][1].lift == pytest.approx(1.0)
    assert top[1][0].token == 6
    assert R.top_tokens_by_lift(ids, indices, 8, 2, min_count=6)[0] == []  # no token reaches the minimum count


def test_domain_shares_rows_sum_to_one():
    domains = torch.tensor([0, 0, 1, 1])
    indices = torch.tensor([[0], [0], [0], [1]])
    shares = R.domain_shares(domains, indices, 2, 3)
    assert shares.tolist() == [[2 / 3, 1 / 3], [0.0, 1.0], [0.0, 0.0]]


# ------------------------------------------------------------------------------------------------- collapse


def test_collapse_warning_fires_on_a_collapsed_router():
    top1 = R.expert_load(torch.zeros(100, 1, dtype=torch.long), 8)
    message = R.collapse_warning(top1, 100)
    assert message is not None and "expert 0 takes 100% of tokens" in message and "> 50%" in message
    top2 = R.expert_load(torch.stack([torch.zeros(80, dtype=torch.long), torch.arange(80) % 7 + 1], 1), 8)
    assert R.collapse_warning(top2, 80) is not None  # expert 0 in every token's pair: 4x the mean


def test_collapse_warning_is_silent_on_a_balanced_router():
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(1000)])
    assert R.collapse_warning(R.expert_load(indices, 8), 1000) is None
    # top-2 of 4, balanced: every expert serves 50% of tokens, but only 1x the mean load
    pairs = torch.tensor([[0, 1], [2, 3]] * 50)
    assert R.collapse_warning(R.expert_load(pairs, 4), 100) is None


# ------------------------------------------------------------------------------------------------ recording


def test_expert_choice_decisions_become_token_major():
    route = RouterOutput(torch.ones(2, 2), torch.tensor([[0, 1], [1, 2]]), torch.zeros(3, 2), torch.ones(3, 2) / 2,
                         expert_choice=True)
    assert R.token_major(route, 3, 2).tolist() == [[0, -1], [0, 1], [1, -1]]


def test_recorder_leaves_outputs_unchanged_and_removes_its_hooks():
    model = _tiny_lm().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with R.RoutingRecorder(model) as recorder:
            during = model(ids).logits
            records = recorder.pop(32)
        after = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert len(records) == 2 and records[0]["indices"].shape == (32, 2)
    assert all(not layer.router._forward_hooks for layer in recorder.layers)


def test_a_model_without_moe_layers_is_refused():
    with pytest.raises(ValueError, match="has no MoE layers"):
        R.RoutingRecorder(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------- analysis


def test_analysis_of_a_tiny_model_reports_every_layer():
    model = _tiny_lm()
    ids = torch.randint(0, 64, (1000,), generator=torch.Generator().manual_seed(0))
    domains = (torch.arange(1000) >= 600).long()
    result = R.analyze_routing(model, ids, domains, ["code", "prose"], seq_len=32, batch_size=4, shuffles=3)
    assert result.num_tokens == 1000 and result.domain_tokens == [600, 400]
    assert [layer.layer for layer in result.layers] == [0, 1]
    layer = result.layers[0]
    assert sum(layer.tokens_per_expert) == 2000 and layer.processed_per_expert == layer.tokens_per_expert
    assert 0 < layer.entropy <= math.log(4) + 1e-6
    assert layer.coactivation[0][0] == layer.tokens_per_expert[0]
    assert layer.domain_mi is not None and layer.domain_mi.shuffles == 3
    assert len(layer.domain_shares) == 4 and all(abs(sum(row) - 1) < 1e-9 for row in layer.domain_shares if any(row))
    assert 0 <= layer.repeat_first <= 1 and layer.repeat_first_chance == 0.25
    assert result.warnings == [] and model.training  # the model's mode is restored


def test_uniform_router_has_normalised_entropy_one():
    model = _tiny_lm()
    for block in model.blocks:
        torch.nn.init.zeros_(block.ffn.router.weight)
    result = R.analyze_routing(model, torch.arange(64) % 64, seq_len=32, shuffles=1)
    assert all(layer.entropy_normalised == pytest.approx(1.0) for layer in result.layers)


def test_collapsed_router_is_warned_about():
    model = _tiny_lm(router_bias=True)
    with torch.no_grad():
        model.blocks[1].ffn.router.bias[2] = 100.0  # expert 2 is in every token's top-2 in layer 1
    result = R.analyze_routing(model, torch.arange(200) % 64, seq_len=32, shuffles=1)
    assert result.layers[0].collapse is None
    assert result.layers[1].collapse is not None and "expert 2 takes 100%" in result.layers[1].collapse
    assert result.warnings == [f"layer 1: {result.layers[1].collapse}"]
    assert result.thresholds == {"collapse_token_share": 0.5, "collapse_max_over_mean": 2.0}


def test_bad_arguments_are_named():
    model = _tiny_lm()
    with pytest.raises(ValueError, match=r"seq_len must be in 1\.\.64, got 65"):
        R.analyze_routing(model, torch.arange(100) % 64, seq_len=65)
    with pytest.raises(ValueError, match=r"token ids span 0\.\.99: the model's vocabulary is 64"):
        R.analyze_routing(model, torch.arange(100), seq_len=32)


# -------------------------------------------------------------------------------------- conditional information


def test_domain_adds_nothing_when_the_token_alone_decides_the_expert():
    # Token 0 -> expert 0, token 1 -> expert 1, whatever the domain; the domains use the tokens differently, so the
    # plain MI(domain; expert) is positive, but given the token the domain tells nothing.
    tokens = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
    domains = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    indices = tokens.unsqueeze(1)
    assert R.mutual_information(domains, indices, 2, 2) > 0.1
    assert R.conditional_mutual_information(domains, indices, tokens, 2, 2, 2) == pytest.approx(0.0, abs=1e-12)


def test_conditional_mi_of_a_domain_split_within_every_token_is_the_domain_entropy():
    tokens = torch.tensor([0, 0, 1, 1, 2, 2])
    domains = torch.tensor([0, 1, 0, 1, 0, 1])
    indices = domains.unsqueeze(1)  # the domain decides the expert, within every token id
    assert R.conditional_mutual_information(domains, indices, tokens, 2, 2, 3) == pytest.approx(1.0)
    result = R.shuffled_conditional_mutual_information(domains, indices, tokens, 2, 2, 3, shuffles=4)
    assert result.value == pytest.approx(1.0) and result.shuffles == 4


def test_shuffling_within_groups_keeps_each_groups_labels():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (400,), generator=g)
    domains = (tokens >= 3).long()  # the domain is a function of the token: nothing to learn beyond it
    indices = torch.randint(0, 4, (400, 2), generator=g)
    result = R.shuffled_conditional_mutual_information(domains, indices, tokens, 2, 4, 5, shuffles=3)
    assert result.value == pytest.approx(0.0, abs=1e-12) and result.baseline_mean == pytest.approx(0.0, abs=1e-12)


def test_repeats_are_reported_beside_their_shuffled_order_baseline():
    model = _tiny_lm()
    result = R.analyze_routing(model, torch.arange(512) % 64, seq_len=32, shuffles=2)
    layer = result.layers[0]
    assert 0 <= layer.repeat_first_shuffled <= 1 and 0 <= layer.repeat_any_shuffled <= 1
    assert layer.repeat_any_shuffled >= layer.repeat_first_shuffled
