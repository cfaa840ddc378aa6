"""Load-balancing losses and the auxiliary-loss-free balancer, each held to its paper's formula.

Legend: T tokens, B sequences, S tokens per sequence, E experts, K experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig, update_biases
from moekit.layers import balance

PROPERTY = settings(max_examples=40, deadline=None)


@pytest.fixture
def one_thread():
    """Tiny tensors in a loop of hundreds of steps run faster without intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_routing(seed: int, num_tokens: int, num_experts: int, top_k: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    probs = logits.softmax(-1)
    indices = torch.rand(num_tokens, num_experts, generator=g).argsort(-1)[:, :top_k]
    return logits, probs, indices


def counts_by_hand(indices_TK, num_experts):
    counts = [0.0] * num_experts
    for row in indices_TK.tolist():
        for e in row:
            if e >= 0:
                counts[e] += 1
    return torch.tensor(counts)


def cv2_by_hand(values):
    v = [float(a) for a in values]
    mean = sum(v) / len(v)
    variance = sum((a - mean) ** 2 for a in v) / len(v)
    return variance / mean**2


def pad_with_garbage(tensor, extra, fill):
    """Append `extra` rows of junk that a mask will mark as padding."""
    junk = torch.full((extra, *tensor.shape[1:]), fill, dtype=tensor.dtype)
    return torch.cat([tensor, junk])


# --------------------------------------------------------------------------------------------------------------------
# Switch / GShard auxiliary loss
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 4, 8, 16])
def test_switch_loss_of_perfectly_balanced_routing_is_exactly_one(num_experts):
    probs = torch.full((4 * num_experts, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), 4.0)
    assert float(balance.switch_loss(probs, counts)) == 1.0


@pytest.mark.parametrize("num_experts", [2, 4, 8, 16])
def test_switch_loss_of_a_collapsed_router_is_num_experts(num_experts):
    probs = torch.zeros(10, num_experts)
    probs[:, 0] = 1.0
    counts = torch.zeros(num_experts)
    counts[0] = 10.0
    assert float(balance.switch_loss(probs, counts)) == pytest.approx(num_experts, abs=1e-6)


@given(seed=st.integers(0, 10_000), num_tokens=st.integers(1, 30), num_experts=st.integers(2, 8),
       top_k=st.integers(1, 2))
@PROPERTY
def test_switch_loss_is_num_experts_times_sum_of_routed_fraction_times_mean_probability(seed, num_tokens,
                                                                                        num_experts, top_k):
    _, probs, indices = random_routing(seed, num_tokens, num_experts, top_k)
    counts = counts_by_hand(indices, num_experts)
    f = [c / (num_tokens * top_k) for c in counts.tolist()]
    P = [sum(probs[t, e].item() for t in range(num_tokens)) / num_tokens for e in range(num_experts)]
    expected = num_experts * sum(fi * pi for fi, pi in zip(f, P))
    got = balance.switch_loss(probs, balance.slot_counts(indices, num_experts))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_switch_loss_ignores_masked_padding_tokens():
    _, probs, indices = random_routing(0, 12, 4, 2)
    clean = balance.switch_loss(probs, balance.slot_counts(indices, 4))

    padded_probs = pad_with_garbage(probs, 5, 0.0)
    padded_probs[12:, 3] = 1.0
    padded_indices = pad_with_garbage(indices, 5, 3)
    mask = torch.arange(17) < 12
    padded = balance.switch_loss(padded_probs, balance.slot_counts(padded_indices, 4, mask), mask)
    torch.testing.assert_close(padded, clean)


def test_switch_loss_has_gradient_through_probabilities_only():
    logits = torch.randn(8, 4, requires_grad=True)
    counts = torch.tensor([5.0, 1.0, 1.0, 1.0])
    balance.switch_loss(logits.softmax(-1), counts).backward()
    assert float(logits.grad.abs().sum()) > 0


def test_slot_counts_skip_empty_slots_and_masked_tokens():
    indices = torch.tensor([[0, 1], [1, -1], [2, 2], [3, 0]])
    mask = torch.tensor([True, True, True, False])
    assert balance.slot_counts(indices, 4).tolist() == [2.0, 2.0, 2.0, 1.0]
    assert balance.slot_counts(indices, 4, mask).tolist() == [1.0, 2.0, 2.0, 0.0]


# --------------------------------------------------------------------------------------------------------------------
# CV^2 importance + load loss (Shazeer et al. 2017)
# --------------------------------------------------------------------------------------------------------------------


def test_cv2_loss_of_balanced_routing_is_zero():
    gates = torch.eye(4).repeat(3, 1) * 0.5  # every expert gets the same importance
    load = torch.full((4,), 3.0)
    assert float(balance.cv2_loss(gates, load)) == pytest.approx(0.0, abs=1e-7)


@given(seed=st.integers(0, 10_000), num_tokens=st.integers(2, 30), num_experts=st.integers(2, 8))
@PROPERTY
def test_cv2_loss_is_squared_coefficient_of_variation_of_importance_plus_load(seed, num_tokens, num_experts):
    _, probs, indices = random_routing(seed, num_tokens, num_experts, 2 if num_experts > 2 else 1)
    gates = torch.zeros_like(probs).scatter_(1, indices, probs.gather(1, indices))
    counts = counts_by_hand(indices, num_experts)
    importance = gates.sum(0)
    expected = cv2_by_hand(importance.tolist()) + cv2_by_hand(counts.tolist())
    assert float(balance.cv2_loss(gates, counts)) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_cv2_loss_with_smooth_load_sums_it_over_tokens():
    _, probs, indices = random_routing(1, 10, 4, 2)
    gates = torch.zeros_like(probs).scatter_(1, indices, probs.gather(1, indices))
    load_probs = torch.rand(10, 4, generator=torch.Generator().manual_seed(2))
    expected = cv2_by_hand(gates.sum(0).tolist()) + cv2_by_hand(load_probs.sum(0).tolist())
    assert float(balance.cv2_loss(gates, load_probs)) == pytest.approx(expected, rel=1e-5)


def test_cv2_loss_ignores_masked_padding_tokens():
    _, probs, indices = random_routing(3, 10, 4, 2)
    gates = torch.zeros_like(probs).scatter_(1, indices, probs.gather(1, indices))
    load_probs = torch.rand(10, 4, generator=torch.Generator().manual_seed(4))
    clean = balance.cv2_loss(gates, load_probs)

    mask = torch.arange(16) < 10
    padded = balance.cv2_loss(pad_with_garbage(gates, 6, 7.0), pad_with_garbage(load_probs, 6, 0.9), mask)
    torch.testing.assert_close(padded, clean)


def test_cv_squared_of_a_constant_vector_is_zero_and_of_one_element_is_zero():
    assert float(balance.cv_squared(torch.full((5,), 3.0))) == 0.0
    assert float(balance.cv_squared(torch.tensor([7.0]))) == 0.0
    assert float(balance.cv_squared(torch.tensor([0.0, 2.0]))) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# router z-loss (ST-MoE)
# --------------------------------------------------------------------------------------------------------------------


def test_z_loss_is_mean_squared_logsumexp():
    logits, _, _ = random_routing(0, 9, 5, 1)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 9
    assert float(balance.z_loss(logits)) == pytest.approx(expected, rel=1e-5)


def test_z_loss_of_zero_logits_is_log_num_experts_squared():
    assert float(balance.z_loss(torch.zeros(3, 8))) == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_z_loss_ignores_masked_padding_tokens():
    logits, _, _ = random_routing(1, 9, 5, 1)
    mask = torch.arange(13) < 9
    padded = balance.z_loss(pad_with_garbage(logits, 4, 50.0), mask)
    torch.testing.assert_close(padded, balance.z_loss(logits))


# --------------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 sequence-wise balance loss
# --------------------------------------------------------------------------------------------------------------------


def sequence_loss_by_hand(probs_BSE, indices_BSK):
    """DeepSeek-V3 eq. 17-20 without the alpha factor, averaged over sequences."""
    B, S, E = probs_BSE.shape
    K = indices_BSK.shape[-1]
    per_sequence = []
    for b in range(B):
        counts = [0] * E
        for s in range(S):
            for e in indices_BSK[b, s].tolist():
                if e >= 0:
                    counts[e] += 1
        f = [E / (K * S) * c for c in counts]
        P = [sum(probs_BSE[b, s, e].item() for s in range(S)) / S for e in range(E)]
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, P)))
    return sum(per_sequence) / B


def test_sequence_balance_loss_of_balanced_sequences_is_one():
    B, S, E = 3, 8, 4
    probs = torch.full((B, S, E), 1.0 / E)
    indices = torch.stack([torch.arange(S) % E, (torch.arange(S) + 1) % E], dim=-1).expand(B, S, 2)
    assert float(balance.sequence_balance_loss(probs, indices)) == pytest.approx(1.0, abs=1e-6)


def test_sequence_balance_loss_is_per_sequence_not_per_batch():
    # Each sequence alone is collapsed onto one expert, but the batch as a whole is balanced: the loss must see it.
    B, S, E = 4, 5, 4
    probs = torch.zeros(B, S, E)
    indices = torch.zeros(B, S, 1, dtype=torch.long)
    for b in range(B):
        probs[b, :, b] = 1.0
        indices[b] = b
    assert float(balance.sequence_balance_loss(probs, indices)) == pytest.approx(E, rel=1e-6)


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), S=st.integers(1, 10), E=st.integers(2, 6),
       K=st.integers(1, 2))
@PROPERTY
def test_sequence_balance_loss_matches_deepseek_v3_equations(seed, B, S, E, K):
    _, probs, indices = random_routing(seed, B * S, E, K)
    expected = sequence_loss_by_hand(probs.view(B, S, E), indices.view(B, S, K))
    got = balance.sequence_balance_loss(probs.view(B, S, E), indices.view(B, S, K))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_sequence_balance_loss_ignores_masked_padding_positions():
    B, S, E, K, pad = 2, 6, 4, 2, 3
    _, probs, indices = random_routing(7, B * S, E, K)
    probs, indices = probs.view(B, S, E), indices.view(B, S, K)
    clean = balance.sequence_balance_loss(probs, indices)

    padded_probs = torch.cat([probs, torch.zeros(B, pad, E).index_fill_(2, torch.tensor([0]), 1.0)], dim=1)
    padded_indices = torch.cat([indices, torch.zeros(B, pad, K, dtype=torch.long)], dim=1)
    mask = (torch.arange(S + pad) < S).expand(B, S + pad)
    padded = balance.sequence_balance_loss(padded_probs, padded_indices, mask)
    torch.testing.assert_close(padded, clean)


# --------------------------------------------------------------------------------------------------------------------
# router entropy
# --------------------------------------------------------------------------------------------------------------------


def test_router_entropy_is_log_num_experts_for_uniform_and_zero_for_one_hot():
    assert float(balance.router_entropy(torch.full((5, 8), 1 / 8))) == pytest.approx(math.log(8), rel=1e-6)
    assert float(balance.router_entropy(torch.eye(8)[:5])) == pytest.approx(0.0, abs=1e-6)


def test_router_entropy_ignores_masked_padding_tokens():
    probs = torch.cat([torch.eye(4), torch.full((3, 4), 0.25)])
    mask = torch.arange(7) < 4
    assert float(balance.router_entropy(probs, mask)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3)
# --------------------------------------------------------------------------------------------------------------------


def test_aux_free_bias_update_moves_each_bias_by_rate_toward_the_mean_load():
    bias = torch.tensor([0.5, 0.0, -0.2, 0.1])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    returned = balance.aux_free_bias_update(bias, load, 0.01)
    assert returned is bias, "the update is in place"
    torch.testing.assert_close(bias, torch.tensor([0.49, 0.01, -0.19, 0.11]))


def test_aux_free_bias_update_leaves_a_balanced_load_alone():
    bias = torch.tensor([0.3, -0.1, 0.0])
    balance.aux_free_bias_update(bias, torch.tensor([7.0, 7.0, 7.0]), 0.5)
    assert bias.tolist() == pytest.approx([0.3, -0.1, 0.0])


def skewed_moe(rate: float, **overrides) -> MoE:
    """A layer whose router strongly prefers experts 0 and 1 (a learned router bias of 3 and 1.5)."""
    fields = dict(d_model=8, d_ff=4, num_experts=8, top_k=2, activation="relu", router_bias=True,
                  selection_bias=True, bias_update_rate=rate)
    fields.update(overrides)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**fields)).train()
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([3.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    return moe


def imbalance(load_E):
    return float(load_E.max() / load_E.mean())


def simulate(moe: MoE, steps: int, tokens_per_step: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    loads = []
    with torch.no_grad():
        for _ in range(steps):
            moe(torch.randn(tokens_per_step, 8, generator=g))
            loads.append(moe.last.routed_per_expert.float())
            moe.update_bias()
    return loads


SKEWED_ROUTERS = {
    "topk-softmax_topk": dict(router="topk", softmax_order="softmax_topk"),
    "topk-topk_softmax": dict(router="topk", softmax_order="topk_softmax"),
    "deepseek-sigmoid-grouped": dict(router="deepseek", score_func="sigmoid", n_group=4, topk_group=2),
    "noisy_topk": dict(router="noisy_topk"),
}


@pytest.mark.parametrize("name", list(SKEWED_ROUTERS))
def test_aux_free_bias_updates_bring_a_skewed_router_to_balance(name, one_thread):
    balanced = simulate(skewed_moe(1e-2, **SKEWED_ROUTERS[name]), steps=300)
    assert imbalance(balanced[0]) > 3.0, "the router starts collapsed onto experts 0 and 1"
    assert imbalance(torch.stack(balanced[-50:]).mean(0)) < 1.3

    torch.manual_seed(0)
    untouched = simulate(skewed_moe(0.0, **SKEWED_ROUTERS[name]), steps=300)
    assert imbalance(torch.stack(untouched[-50:]).mean(0)) > 3.0, "without updates it stays collapsed"


def test_micro_batches_accumulate_load_and_one_update_moves_each_bias_by_exactly_rate():
    rate = 0.05
    moe = skewed_moe(rate)
    g = torch.Generator().manual_seed(3)
    total = torch.zeros(8)
    for _ in range(3):  # gradient-accumulation micro-batches of one optimizer step
        moe(torch.randn(16, 8, generator=g))
        total += moe.last.routed_per_expert.float()
    assert torch.equal(moe.router.selection_bias, torch.zeros(8)), "forwards alone never touch the bias"

    moe.update_bias()
    expected = rate * torch.sign(total.mean() - total)
    torch.testing.assert_close(moe.router.selection_bias, expected, atol=1e-7, rtol=0)
    assert bool((moe.router.selection_bias.abs() == rate).any())

    moe.update_bias()  # the accumulated load was consumed: nothing left to apply
    torch.testing.assert_close(moe.router.selection_bias, expected, atol=1e-7, rtol=0)


def test_the_bias_update_uses_the_load_summed_over_all_micro_batches_not_the_last_one():
    # Token j (a one-hot along dimension j) goes to expert j. Micro-batch 1 sends 6 tokens to expert 0, micro-batch 2
    # sends 2 to expert 1: over the step both are overloaded (mean load 1), though the last one alone has expert 0 idle.
    rate = 0.01
    moe = MoE(MoEConfig(d_model=8, d_ff=4, num_experts=8, top_k=1, selection_bias=True, bias_update_rate=rate)).train()
    with torch.no_grad():
        moe.router.weight.copy_(10 * torch.eye(8))
    eye = torch.eye(8)
    moe(eye[[0, 0, 0, 0, 0, 0]])
    moe(eye[[1, 1]])
    moe.update_bias()
    expected = torch.full((8,), rate)
    expected[:2] = -rate
    torch.testing.assert_close(moe.router.selection_bias, expected, atol=1e-7, rtol=0)


def test_eval_forwards_do_not_count_toward_the_bias_update():
    moe = skewed_moe(0.05).eval()
    moe(torch.randn(16, 8))
    moe.update_bias()
    assert torch.equal(moe.router.selection_bias, torch.zeros(8))


def test_update_biases_updates_every_moe_layer_of_a_model():
    model = torch.nn.Sequential(skewed_moe(0.05), skewed_moe(0.05))
    model(torch.randn(16, 8))
    update_biases(model)
    for layer in model:
        assert float(layer.router.selection_bias.abs().sum()) > 0


def test_padding_tokens_do_not_count_as_load_for_the_bias_update():
    moe = skewed_moe(0.05)
    x = torch.randn(2, 8, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :2] = True
    moe(x, mask=mask)
    assert int(moe.step_load.sum()) == 4 * 2  # 4 real tokens, 2 slots each


# --------------------------------------------------------------------------------------------------------------------
# losses inside the MoE layer
# --------------------------------------------------------------------------------------------------------------------

LOSS_COEFS = {"switch": "aux_loss_coef", "cv2": "cv2_loss_coef", "z": "z_loss_coef", "seq": "seq_aux_loss_coef"}


def loss_moe(**coefs) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, **coefs))


def expected_losses(moe: MoE, x_BSD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every loss recomputed from the router's own decision with the plain balance functions."""
    B, S, _ = x_BSD.shape
    with torch.no_grad():
        route = moe.router(x_BSD.reshape(-1, 8))
    counts = balance.slot_counts(route.indices, 4)
    gates = torch.zeros(B * S, 4).scatter_(1, route.indices, route.weights)
    return {
        "switch": balance.switch_loss(route.probs, counts),
        "cv2": balance.cv2_loss(gates, counts),
        "z": balance.z_loss(route.logits),
        "seq": balance.sequence_balance_loss(route.probs.view(B, S, 4), route.indices.view(B, S, 2)),
    }


@pytest.mark.parametrize("enabled", list(LOSS_COEFS))
def test_each_loss_is_computed_exactly_when_its_coefficient_is_non_zero(enabled):
    moe = loss_moe(**{LOSS_COEFS[enabled]: 0.1})
    x = torch.randn(2, 5, 8)
    moe(x)
    assert set(moe.last.losses) == {enabled}
    torch.testing.assert_close(moe.last.losses[enabled], expected_losses(moe, x)[enabled], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moe.last.aux_loss, 0.1 * moe.last.losses[enabled], atol=1e-7, rtol=1e-6)


def test_no_coefficients_means_no_losses_and_a_zero_aux_loss():
    moe = loss_moe()
    moe(torch.randn(2, 5, 8))
    assert moe.last.losses == {}
    assert float(moe.last.aux_loss) == 0.0


def test_aux_loss_is_the_coefficient_weighted_sum_of_the_losses_and_reaches_the_router():
    coefs = dict(aux_loss_coef=0.01, cv2_loss_coef=0.1, z_loss_coef=0.001, seq_aux_loss_coef=0.0001)
    moe = loss_moe(**coefs)
    x = torch.randn(2, 5, 8)
    moe(x)
    assert set(moe.last.losses) == set(LOSS_COEFS)
    expected = expected_losses(moe, x)
    for name, coef in LOSS_COEFS.items():
        torch.testing.assert_close(moe.last.losses[name], expected[name], atol=1e-6, rtol=1e-5)
    weighted = sum(coefs[coef] * moe.last.losses[name] for name, coef in LOSS_COEFS.items())
    torch.testing.assert_close(moe.last.aux_loss, weighted, atol=1e-7, rtol=1e-5)
    assert all(not v.requires_grad for v in moe.last.losses.values()), "reported losses are detached"

    moe.last.aux_loss.backward()
    assert moe.router.weight.grad is not None and float(moe.router.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("enabled", list(LOSS_COEFS))
def test_each_loss_alone_has_a_gradient_into_the_router_weight(enabled):
    moe = loss_moe(**{LOSS_COEFS[enabled]: 1.0})
    moe(torch.randn(2, 5, 8))
    moe.last.aux_loss.backward()
    assert float(moe.router.weight.grad.abs().sum()) > 0


def test_losses_in_the_layer_ignore_padding_tokens():
    coefs = dict(aux_loss_coef=1.0, cv2_loss_coef=1.0, z_loss_coef=1.0)
    moe = loss_moe(**coefs)
    x = torch.randn(12, 8)
    moe(x)
    clean = dict(moe.last.losses)

    mask = torch.arange(16) < 12
    moe(torch.cat([x, 30 * torch.randn(4, 8)]), mask=mask)
    for name in clean:
        torch.testing.assert_close(moe.last.losses[name], clean[name], atol=1e-6, rtol=1e-5)


def test_sequence_loss_in_the_layer_ignores_padding_positions():
    moe = loss_moe(seq_aux_loss_coef=1.0)
    x = torch.randn(2, 5, 8)
    moe(x)
    clean = moe.last.losses["seq"]
    padded_x = torch.cat([x, 30 * torch.randn(2, 3, 8)], dim=1)
    mask = (torch.arange(8) < 5).expand(2, 8)
    moe(padded_x, mask=mask)
    torch.testing.assert_close(moe.last.losses["seq"], clean, atol=1e-6, rtol=1e-5)


def test_sequence_loss_with_expert_choice_routing_is_refused():
    moe = MoE(MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, router="expert_choice", seq_aux_loss_coef=1e-4))
    with pytest.raises(ValueError, match="expert_choice"):
        moe(torch.randn(2, 5, 8))
