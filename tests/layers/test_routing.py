"""Routers: every router is held to a plain, hand-written statement of its paper's rule.

Legend: T tokens, D model dim, E experts, K experts per token, C capacity, G expert groups.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.layers.routing import RouterOutput, build_router

D = 16

PROPERTY = settings(max_examples=40, deadline=None)


def make_router(seed: int = 0, weight_std: float = 1.0, **overrides):
    """A router with N(0, weight_std^2) weights, so that logits are O(1) and top-k choices are clear-cut."""
    fields = dict(d_model=D, d_ff=8, num_experts=8, top_k=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    router = build_router(MoEConfig(**fields))
    with torch.no_grad():
        router.weight.normal_(0.0, weight_std)
    return router


def tokens(num_tokens: int = 32, seed: int = 1, d_model: int = D) -> torch.Tensor:
    return torch.randn(num_tokens, d_model, generator=torch.Generator().manual_seed(seed))


def plain_logits(router, x_TD):
    return x_TD.float() @ router.weight.detach().float().T


def sort_slots(indices_TK, weights_TK):
    """Order each token's slots by expert id, so routers that return unsorted top-k can be compared."""
    order = indices_TK.argsort(dim=-1)
    return indices_TK.gather(1, order), weights_TK.gather(1, order)


# --------------------------------------------------------------------------------------------------------------------
# top-k: both softmax orders
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_softmax_topk_weights_are_full_softmax_probs_gathered_at_the_top_k(norm_topk_prob):
    router = make_router(softmax_order="softmax_topk", norm_topk_prob=norm_topk_prob, top_k=3)
    x = tokens()
    out = router(x)

    probs_ref = plain_logits(router, x).softmax(dim=-1)
    top = probs_ref.topk(3, dim=-1)
    expected = top.values / top.values.sum(-1, keepdim=True) if norm_topk_prob else top.values

    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.weights, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.probs, probs_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, plain_logits(router, x), atol=1e-5, rtol=1e-5)


def test_softmax_topk_with_norm_weights_sum_to_one():
    out = make_router(softmax_order="softmax_topk", norm_topk_prob=True)(tokens())
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(32))


def test_softmax_topk_without_norm_weights_are_raw_probabilities_summing_below_one():
    # Switch / OLMoE: the gate value is the probability itself, so k < E slots hold less than all the mass.
    out = make_router(softmax_order="softmax_topk", norm_topk_prob=False)(tokens())
    assert bool((out.weights.sum(-1) < 1.0).all())
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))


def test_topk_softmax_weights_are_softmax_over_the_k_selected_logits():
    router = make_router(softmax_order="topk_softmax", top_k=3)
    x = tokens()
    out = router(x)

    logits = plain_logits(router, x)
    top = logits.topk(3, dim=-1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.weights, top.values.softmax(dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(32))


def test_topk_softmax_with_norm_equals_softmax_topk_with_norm():
    # Renormalised softmax probabilities over k experts == softmax over those k logits (the partition cancels).
    a = make_router(softmax_order="topk_softmax", top_k=3)
    b = make_router(softmax_order="softmax_topk", norm_topk_prob=True, top_k=3)
    b.load_state_dict(a.state_dict())
    x = tokens()
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a.indices, out_b.indices)
    torch.testing.assert_close(out_a.weights, out_b.weights, atol=1e-6, rtol=1e-5)


@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 8))
@PROPERTY
def test_both_softmax_orders_pick_the_same_experts(seed, top_k):
    a = make_router(seed=seed, softmax_order="topk_softmax", top_k=top_k)
    b = make_router(seed=seed, softmax_order="softmax_topk", top_k=top_k)
    x = tokens(seed=seed)
    assert torch.equal(a(x).indices.sort(-1).values, b(x).indices.sort(-1).values)


def test_topk_router_matches_huggingface_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    ours = make_router(softmax_order="topk_softmax", norm_topk_prob=True, top_k=2)
    hf = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=8, num_experts_per_tok=2))
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
    x = tokens(64)
    _, hf_weights, hf_indices = hf(x)
    out = ours(x)
    assert torch.equal(out.indices, hf_indices)
    torch.testing.assert_close(out.weights, hf_weights.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_topk_router_matches_huggingface_qwen2_moe_and_olmoe_routers(family, norm_topk_prob):
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig as HFConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as HFRouter
    else:
        from transformers import OlmoeConfig as HFConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter as HFRouter

    ours = make_router(softmax_order="softmax_topk", norm_topk_prob=norm_topk_prob, top_k=2)
    hf = HFRouter(HFConfig(hidden_size=D, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob))
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
    x = tokens(64)
    _, hf_weights, hf_indices = hf(x)
    out = ours(x)
    assert torch.equal(out.indices, hf_indices)
    torch.testing.assert_close(out.weights, hf_weights.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_topk_norm_p_divides_the_k_probabilities_by_their_p_norm(p):
    router = make_router(softmax_order="softmax_topk", norm_topk_prob=True, topk_norm_p=p, top_k=3)
    x = tokens()
    top = plain_logits(router, x).softmax(dim=-1).topk(3, dim=-1).values
    expected = top / (top**p).sum(-1, keepdim=True) ** (1 / p)
    torch.testing.assert_close(router(x).weights, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_softmax_topk_with_topk_norm_p_matches_huggingface_dbrx_routing(p):
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    ours = make_router(softmax_order="softmax_topk", norm_topk_prob=True, topk_norm_p=p, top_k=3)
    config = DbrxConfig(d_model=D, n_heads=2, attn_config={"rope_theta": 1e4},
                        ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 8, "moe_top_k": 3,
                                    "moe_normalize_expert_weights": p})  # fmt: skip
    hf = DbrxFFN(config).eval()
    with torch.no_grad():
        hf.router.layer.weight.copy_(ours.weight)
    x = tokens(64)
    hf_weights, hf_indices = hf.route_tokens_to_experts(hf.router(x))
    out = ours(x)
    assert torch.equal(out.indices, hf_indices)
    torch.testing.assert_close(out.weights, hf_weights.float(), atol=1e-6, rtol=0)


def test_input_jitter_changes_the_logits_in_training_only_and_within_its_band():
    router = make_router(input_jitter_eps=0.1)
    x = tokens()
    clean = plain_logits(router, x)
    torch.testing.assert_close(router.eval()(x).logits, clean, atol=1e-5, rtol=1e-5)
    jittered = router.train()(x).logits
    assert (jittered - clean).abs().max() > 1e-3
    # each input element is scaled by a factor in [0.9, 1.1]: |change| <= 0.1 * sum_d |x_d w_ed|
    bound = 0.1 * (x.abs() @ router.weight.detach().abs().T)
    assert bool(((jittered - clean).abs() <= bound + 1e-5).all())


# --------------------------------------------------------------------------------------------------------------------
# sparsemixer (Liu et al. 2024; PhiMoE)
# --------------------------------------------------------------------------------------------------------------------


def sparsemixer_reference(logits_E: list[float], eps: float) -> tuple[list[int], list[float]]:
    """The eval-mode rule, one token, written out: two rounds; a round's softmax runs over the experts still available
    whose relative gap to the round's best logit m, (m - s) / max(|s|, m), is at most 2 eps; the best one is picked."""
    chosen, weights = [], []
    for _ in range(2):
        available = [j for j in range(len(logits_E)) if j not in chosen]
        best = max(available, key=lambda j: (logits_E[j], -j))  # the first index among equal maxima
        m = logits_E[best]
        scales = {j: max(abs(logits_E[j]), m) for j in available}
        kept = [j for j in available if scales[j] == 0 or (m - logits_E[j]) / scales[j] <= 2 * eps]
        weights.append(math.exp(m) / sum(math.exp(logits_E[j]) for j in kept))
        chosen.append(best)
    return chosen, weights


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3, 2.0])
def test_sparsemixer_eval_routing_matches_the_written_out_rule(eps):
    router = make_router(router="sparsemixer", sparsemixer_eps=eps, weight_std=0.5).eval()
    x = tokens(64)
    out = router(x)
    for t, row in enumerate(plain_logits(router, x).double().tolist()):
        want_experts, want_weights = sparsemixer_reference(row, eps)
        assert out.indices[t].tolist() == want_experts
        torch.testing.assert_close(out.weights[t].double(), torch.tensor(want_weights, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_sparsemixer_eps_decides_how_many_experts_share_a_rounds_softmax():
    x = tokens(64)
    tight = make_router(router="sparsemixer", sparsemixer_eps=0.0).eval()(x)
    wide = make_router(router="sparsemixer", sparsemixer_eps=100.0).eval()(x)
    torch.testing.assert_close(tight.weights, torch.ones(64, 2))  # alone in its round: weight 1
    probs = wide.probs
    torch.testing.assert_close(wide.weights[:, 0], probs.gather(1, wide.indices[:, :1]).squeeze(1))  # all experts
    assert torch.equal(wide.indices, probs.topk(2, dim=-1).indices)


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_sparsemixer_eval_matches_huggingface_phimoe(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    router = make_router(router="sparsemixer", sparsemixer_eps=eps, weight_std=0.5).eval()
    x = tokens(64)
    hf_weights, hf_indices = sparsemixer(plain_logits(router, x), jitter_eps=eps, training=False)
    out = router(x)
    assert torch.equal(out.indices, hf_indices)
    torch.testing.assert_close(out.weights, hf_weights, atol=1e-6, rtol=0)


def test_sparsemixer_training_samples_experts_and_passes_the_probability_gradient():
    router = make_router(router="sparsemixer", sparsemixer_eps=0.5, weight_std=0.3).train()
    x = tokens(256)
    torch.manual_seed(0)
    out = router(x)
    argmax = router.eval()(x).indices
    sampled = (out.indices[:, 0] != argmax[:, 0]).float().mean()
    assert 0.05 < sampled < 0.95, "training samples the first expert from its round's softmax, not always the best"
    assert bool((out.indices[:, 0] != out.indices[:, 1]).all())
    # a weight is its probability p in that round's softmax, or p * 0.3333 for a sampled non-argmax expert
    logits = plain_logits(router, x)
    eps2 = 2 * 0.5
    best = logits.max(-1, keepdim=True).values
    kept = ~((best - logits) / logits.abs().clamp(min=best) > eps2)
    p_first = logits.masked_fill(~kept, float("-inf")).softmax(-1).gather(1, out.indices[:, :1]).squeeze(1)
    ratio = out.weights[:, 0].detach() / p_first
    assert bool((((ratio - 1).abs() < 1e-5) | ((ratio - 0.3333).abs() < 1e-5)).all())
    # the gradient is that of p (not of p * scale): d p_j / d logits = p_j (onehot_j - p)
    router.zero_grad()
    x_leaf = x[:1].clone()
    out1 = router.train()(x_leaf)
    out1.weights[0, 0].backward()
    with torch.no_grad():
        l1 = plain_logits(router, x_leaf)[0]
        b1 = l1.max()
        keep1 = ~((b1 - l1) / l1.abs().clamp(min=b1) > eps2)
        p = l1.masked_fill(~keep1, float("-inf")).softmax(-1)
        e = out1.indices[0, 0]
        dlogits = p[e] * (torch.nn.functional.one_hot(e, 8).float() - p)
    torch.testing.assert_close(router.weight.grad, dlogits[:, None] * x_leaf, atol=1e-6, rtol=1e-5)


def test_sparsemixer_needs_two_experts_per_token():
    from moekit.config import MoEConfig as Config

    with pytest.raises(ValueError, match="sparsemixer router picks exactly 2 experts per token, got top_k=3"):
        Config(router="sparsemixer", top_k=3)


# --------------------------------------------------------------------------------------------------------------------
# noisy top-k (Shazeer et al. 2017)
# --------------------------------------------------------------------------------------------------------------------


def test_noisy_topk_in_eval_mode_is_deterministic_and_noise_free():
    router = make_router(router="noisy_topk", top_k=2).eval()
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 10.0)  # would be very noisy in training
    x = tokens()
    first, second = router(x), router(x)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.weights, second.weights)
    assert first.load_probs is None

    top = plain_logits(router, x).topk(2, dim=-1)
    assert torch.equal(first.indices, top.indices)
    torch.testing.assert_close(first.weights, top.values.softmax(-1), atol=1e-6, rtol=1e-5)


def test_noisy_topk_in_training_with_large_noise_selections_vary_between_calls():
    router = make_router(router="noisy_topk", top_k=2).train()
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 10.0)
    x = tokens(64)
    torch.manual_seed(0)
    first = router(x).indices
    second = router(x).indices
    assert not torch.equal(first, second)


def test_noisy_topk_noise_scale_depends_on_the_input():
    # std = softplus(x . w_noise) + eps: with eps = 0, tokens with x . w_noise << 0 get no noise at all, tokens with
    # x . w_noise >> 0 get a lot. Same router, same call: only the second half of the tokens move.
    router = make_router(router="noisy_topk", top_k=2, noise_eps=0.0).train()
    direction = torch.zeros(D)
    direction[0] = 1.0
    with torch.no_grad():
        router.weight[:, 0] = 0.0  # the clean logits do not see the noise direction
        router.noise_weight.copy_(200.0 * direction.expand(8, D))
    x = tokens(64)
    x[:, 0] = torch.where(torch.arange(64) < 32, -1.0, 1.0)
    clean = plain_logits(router, x).topk(2, dim=-1).indices

    torch.manual_seed(0)
    draws = [router(x).indices for _ in range(4)]
    for indices in draws:
        assert torch.equal(indices[:32], clean[:32])
    assert any(not torch.equal(indices[32:], clean[32:]) for indices in draws)


def test_noisy_topk_with_vanishing_noise_equals_the_clean_router():
    router = make_router(router="noisy_topk", top_k=2, noise_eps=0.0).train()
    with torch.no_grad():
        router.noise_weight.fill_(-100.0)  # softplus(-100 * positive) underflows to 0
    x = tokens().abs() + 0.1
    torch.manual_seed(0)
    noisy = router(x)
    clean = router.eval()(x)
    assert torch.equal(noisy.indices, clean.indices)
    torch.testing.assert_close(noisy.weights, clean.weights, atol=1e-6, rtol=0)


def test_noisy_topk_load_probs_are_probabilities_and_carry_gradient_to_noise_weight():
    router = make_router(router="noisy_topk", top_k=2).train()
    x = tokens()
    out = router(x)
    assert out.load_probs is not None and out.load_probs.shape == (32, 8)
    assert bool(((out.load_probs >= 0) & (out.load_probs <= 1)).all())

    load_E = out.load_probs.sum(dim=0)
    cv2 = load_E.var(correction=0) / load_E.mean() ** 2
    cv2.backward()
    assert router.noise_weight.grad is not None
    assert bool(torch.isfinite(router.noise_weight.grad).all())
    assert float(router.noise_weight.grad.abs().sum()) > 0


def test_noisy_topk_cv2_loss_in_moe_trains_noise_weight():
    moe = MoE(MoEConfig(d_model=D, d_ff=8, num_experts=8, top_k=2, router="noisy_topk", cv2_loss_coef=1.0)).train()
    torch.manual_seed(0)
    moe(tokens())
    moe.last.aux_loss.backward()
    assert float(moe.router.noise_weight.grad.abs().sum()) > 0


def test_noisy_topk_load_probs_estimate_the_selection_frequency():
    # load_probs[t, i] = P(i selected | the other experts' noise) (Shazeer 2017 eq. 9); averaged over noise draws it
    # is P(i selected), which is what the empirical selection frequency estimates too.
    router = make_router(router="noisy_topk", top_k=2, num_experts=4, weight_std=0.3).train()
    x = tokens(4)
    draws = 4000
    torch.manual_seed(0)
    with torch.no_grad():
        out = router(x.repeat(draws, 1))  # row r*4 + t is token t under draw r: independent noise per row
    selected = torch.zeros(draws * 4, 4).scatter_(1, out.indices, 1.0).view(draws, 4, 4).mean(0)
    estimated = out.load_probs.view(draws, 4, 4).mean(0)
    assert float((selected - estimated).abs().max()) < 0.04
    torch.testing.assert_close(estimated.sum(0), selected.sum(0), atol=0.06, rtol=0)  # expected count per expert


# --------------------------------------------------------------------------------------------------------------------
# DeepSeek (V3 sigmoid + node-limited groups; V2 softmax group-limited greedy)
# --------------------------------------------------------------------------------------------------------------------


def deepseek_reference(logits_TE, bias_E, n_group, topk_group, top_k, norm, scale, score_func):
    """DeepSeek's gate, one token at a time, written from the papers."""
    T, E = logits_TE.shape
    per_group = E // n_group
    affinity = logits_TE.sigmoid() if score_func == "sigmoid" else logits_TE.softmax(-1)
    chosen_all, weights_all = [], []
    for t in range(T):
        biased = (affinity[t] + bias_E).tolist()
        group_score = []
        for g in range(n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(sum(members[:2]) if score_func == "sigmoid" else members[0])
        if n_group > 1:
            groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        else:
            groups = [0]
        allowed = [e for e in range(E) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:top_k]
        w = [float(affinity[t, e]) for e in chosen]
        if norm:
            w = [v / sum(w) for v in w]
        chosen_all.append(chosen)
        weights_all.append([v * scale for v in w])
    return torch.tensor(chosen_all), torch.tensor(weights_all)


DEEPSEEK_CASES = [
    dict(score_func="sigmoid", n_group=4, topk_group=2, top_k=3, norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(score_func="sigmoid", n_group=4, topk_group=1, top_k=2, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(score_func="sigmoid", n_group=1, topk_group=1, top_k=2, norm_topk_prob=True, routed_scaling_factor=1.0),
    dict(score_func="softmax", n_group=4, topk_group=2, top_k=3, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(score_func="softmax", n_group=2, topk_group=1, top_k=2, norm_topk_prob=True, routed_scaling_factor=16.0),
]


@pytest.mark.parametrize("case", DEEPSEEK_CASES, ids=lambda c: f"{c['score_func']}-g{c['n_group']}-tg{c['topk_group']}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_deepseek_router_matches_a_hand_written_reference_gate(case, with_bias):
    router = make_router(router="deepseek", num_experts=8, selection_bias=True, **case)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(5)) * 0.3 if with_bias else torch.zeros(8)
    router.selection_bias.copy_(bias)
    x = tokens(48)
    out = router(x)

    ref_idx, ref_w = deepseek_reference(
        plain_logits(router, x), bias, case["n_group"], case["topk_group"], case["top_k"], case["norm_topk_prob"],
        case["routed_scaling_factor"], case["score_func"],
    )
    got_idx, got_w = sort_slots(out.indices, out.weights)
    ref_idx, ref_w = sort_slots(ref_idx, ref_w)
    assert torch.equal(got_idx, ref_idx)
    torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_router_matches_huggingface_deepseek_v3_gate_with_correction_bias(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    kw = dict(n_group=4, topk_group=2, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    ours = make_router(router="deepseek", score_func="sigmoid", num_experts=16, top_k=4, selection_bias=True, **kw)
    hf = DeepseekV3TopkRouter(
        DeepseekV3Config(hidden_size=D, n_routed_experts=16, num_experts_per_tok=4, **kw)
    )
    bias = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.2
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
        hf.e_score_correction_bias.copy_(bias)
        ours.selection_bias.copy_(bias)
    x = tokens(64)
    _, hf_weights, hf_indices = hf(x)
    out = ours(x)
    got_idx, got_w = sort_slots(out.indices, out.weights)
    hf_idx, hf_w = sort_slots(hf_indices, hf_weights)
    assert torch.equal(got_idx, hf_idx)
    torch.testing.assert_close(got_w, hf_w, atol=1e-6, rtol=0)


def test_deepseek_experts_lie_only_in_the_top_groups_by_sum_of_top2_biased_scores():
    router = make_router(router="deepseek", score_func="sigmoid", num_experts=16, top_k=4, n_group=4, topk_group=2,
                         selection_bias=True)
    router.selection_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.5)
    x = tokens(64)
    out = router(x)
    biased = plain_logits(router, x).sigmoid() + router.selection_bias
    group_score = biased.view(64, 4, 4).topk(2, dim=-1).values.sum(-1)
    top_groups = group_score.topk(2, dim=-1).indices
    for t in range(64):
        assert set((out.indices[t] // 4).tolist()) <= set(top_groups[t].tolist())


def test_deepseek_bias_changes_selection_but_weights_come_from_unbiased_sigmoid_scores():
    router = make_router(router="deepseek", score_func="sigmoid", num_experts=8, top_k=2, n_group=4, topk_group=2,
                         selection_bias=True, routed_scaling_factor=2.5)
    x = tokens()
    before = router(x)
    router.selection_bias[5] = 10.0
    after = router(x)
    assert bool((after.indices == 5).any(-1).all()), "a large bias must put expert 5 in every token's choice"
    assert not torch.equal(before.indices, after.indices)

    s = plain_logits(router, x).sigmoid()
    chosen = s.gather(1, after.indices)
    torch.testing.assert_close(after.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.weights.sum(-1), torch.full((32,), 2.5), atol=1e-5, rtol=0)


def test_deepseek_sigmoid_probs_are_the_normalised_affinities():
    router = make_router(router="deepseek", score_func="sigmoid")
    x = tokens()
    out = router(x)
    s = plain_logits(router, x).sigmoid()
    torch.testing.assert_close(out.probs, s / s.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# expert choice (Zhou et al. 2022)
# --------------------------------------------------------------------------------------------------------------------


@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.sampled_from([2, 4, 8]),
    top_k=st.integers(1, 2),
    capacity_factor=st.sampled_from([None, 0.5, 1.0, 1.5, 4.0]),
    min_capacity=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
@PROPERTY
def test_expert_choice_gives_every_expert_capacity_tokens(num_tokens, num_experts, top_k, capacity_factor,
                                                          min_capacity, seed):
    router = make_router(seed=seed, router="expert_choice", num_experts=num_experts, top_k=top_k,
                         capacity_factor=capacity_factor, min_capacity=min_capacity)
    x = tokens(num_tokens, seed=seed)
    out = router(x)
    cf = 1.0 if capacity_factor is None else capacity_factor
    capacity = min(num_tokens, max(min_capacity, math.ceil(cf * num_tokens * top_k / num_experts)))

    assert out.expert_choice
    assert out.indices.shape == (num_experts, capacity)
    assert out.weights.shape == (num_experts, capacity)
    probs = plain_logits(router, x).softmax(-1)
    for e in range(num_experts):
        picked = out.indices[e].tolist()
        assert len(set(picked)) == capacity, "an expert picks distinct tokens"
        assert all(0 <= t < num_tokens for t in picked)
        torch.testing.assert_close(out.weights[e], probs[picked, e], atol=1e-6, rtol=1e-5)
        others = [t for t in range(num_tokens) if t not in picked]
        if others:  # an expert's tokens are its top-C by affinity
            assert float(probs[picked, e].min()) >= float(probs[others, e].max()) - 1e-7


def test_expert_choice_never_picks_masked_tokens_and_sizes_capacity_by_real_tokens():
    router = make_router(router="expert_choice", num_experts=4, top_k=2)
    x = tokens(24)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[::3] = True  # 8 real tokens
    with torch.no_grad():
        x[~mask] *= 100.0  # padding that would win every expert's top-C if it were eligible
    out = router(x, mask_T=mask)
    assert out.indices.shape == (4, math.ceil(8 * 2 / 4))
    assert bool(mask[out.indices].all())


def test_expert_choice_has_no_scores_and_is_flagged():
    out = make_router(router="expert_choice")(tokens())
    assert out.expert_choice and out.scores is None


# --------------------------------------------------------------------------------------------------------------------
# dynamic top-p (Huang et al. 2024)
# --------------------------------------------------------------------------------------------------------------------


def top_p_reference(probs_E: list[float], top_p: float, max_k: int) -> list[int]:
    """Experts in probability order until their mass reaches top_p; at least 1, at most max_k."""
    order = sorted(range(len(probs_E)), key=lambda e: -probs_E[e])
    chosen, mass = [], 0.0
    for e in order[:max_k]:
        chosen.append(e)
        mass += probs_E[e]
        if mass >= top_p:
            break
    return chosen


@given(
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(1, 8),
    temperature=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
    seed=st.integers(0, 1000),
    norm=st.booleans(),
)
@PROPERTY
def test_top_p_takes_the_smallest_probability_prefix_reaching_top_p(top_p, top_k, temperature, seed, norm):
    router = make_router(seed=seed, router="top_p", top_p=top_p, top_k=top_k, weight_std=temperature,
                         norm_topk_prob=norm)
    x = tokens(32, seed=seed)
    out = router(x)
    probs = out.probs.double()
    used = (out.indices >= 0).sum(-1)
    assert bool((used >= 1).all()) and bool((used <= top_k).all())
    for t in range(32):
        p = probs[t].tolist()
        mass = sorted(p, reverse=True)
        cumsum = [sum(mass[: i + 1]) for i in range(len(mass))]
        if any(abs(c - top_p) < 1e-5 for c in cumsum):
            continue  # float32 vs float64 prefix sums may disagree exactly at the boundary
        expected = top_p_reference(p, top_p, top_k)
        n = len(expected)
        assert out.indices[t, :n].tolist() == expected
        assert out.indices[t, n:].tolist() == [-1] * (top_k - n), "empty slots are -1"
        assert out.weights[t, n:].tolist() == [0.0] * (top_k - n), "empty slots weigh 0"
        chosen = torch.tensor([p[e] for e in expected], dtype=torch.float64)
        expected_w = chosen / chosen.sum() if norm else chosen
        torch.testing.assert_close(out.weights[t, :n].double(), expected_w, atol=1e-6, rtol=1e-5)


def test_top_p_uses_one_expert_for_a_peaked_token_and_all_k_for_a_flat_one():
    router = make_router(router="top_p", top_p=0.6, top_k=4)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2, 0] = 10.0  # token with x[0] = 1 is almost surely expert 2; x = 0 is uniform
    x = torch.zeros(2, D)
    x[0, 0] = 1.0
    out = router(x)
    assert out.indices[0].tolist() == [2, -1, -1, -1]
    assert (out.indices[1] >= 0).sum() == 4  # 4 of 8 uniform experts hold 0.5 < 0.6: it needs all of top_k


# --------------------------------------------------------------------------------------------------------------------
# hash routing (Roller et al. 2021)
# --------------------------------------------------------------------------------------------------------------------


def test_hash_routing_depends_only_on_token_ids():
    router = make_router(router="hash", top_k=2)
    ids = torch.tensor([5, 17, 5, 3, 17, 5])
    a = router(tokens(6, seed=1), ids)
    b = router(tokens(6, seed=2), ids)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices[0], a.indices[2]) and torch.equal(a.indices[0], a.indices[5])
    assert torch.equal(a.indices[1], a.indices[4])


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_hash_routing_gives_k_distinct_experts_with_equal_weights(top_k):
    router = make_router(router="hash", top_k=top_k)
    ids = torch.arange(200)
    out = router(tokens(200), ids)
    assert out.indices.shape == (200, top_k)
    assert all(len(set(row)) == top_k for row in out.indices.tolist())
    assert bool(((out.indices >= 0) & (out.indices < 8)).all())
    torch.testing.assert_close(out.weights, torch.full((200, top_k), 1.0 / top_k))


def test_hash_routing_is_balanced_over_many_token_ids():
    router = make_router(router="hash", top_k=1, d_model=4)
    out = router(torch.zeros(10_000, 4), torch.arange(10_000))
    load = torch.bincount(out.indices.view(-1), minlength=8).float()
    assert float((load - 1250).abs().max()) <= 125, load.tolist()


def test_hash_routing_with_another_seed_is_another_map():
    ids = torch.arange(1000)
    a = make_router(router="hash", top_k=1, hash_seed=0)(tokens(1000), ids).indices
    b = make_router(router="hash", top_k=1, hash_seed=1)(tokens(1000), ids).indices
    assert float((a != b).float().mean()) > 0.5


def test_hash_routing_without_token_ids_raises_naming_them():
    router = make_router(router="hash")
    with pytest.raises(ValueError, match="token_ids"):
        router(tokens())
    with pytest.raises(ValueError, match="token_ids"):
        MoE(MoEConfig(d_model=D, d_ff=8, router="hash"))(tokens())


def test_hash_routing_rejects_float_token_ids():
    router = make_router(router="hash")
    with pytest.raises(ValueError, match="integer"):
        router(tokens(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(TypeError, match="token_ids"):
        MoE(MoEConfig(d_model=D, d_ff=8, router="hash"))(tokens(4), token_ids=torch.tensor([1.0, 2.0, 3.0, 4.0]))


# --------------------------------------------------------------------------------------------------------------------
# hierarchical routing
# --------------------------------------------------------------------------------------------------------------------


def make_hierarchical(**overrides):
    fields = dict(router="hierarchical", num_experts=12, n_group=3, topk_group=2, top_k=3)
    fields.update(overrides)
    router = make_router(**fields)
    with torch.no_grad():
        router.group_weight.normal_()
    return router


def test_hierarchical_probs_are_group_prob_times_expert_prob_within_group():
    router = make_hierarchical()
    x = tokens()
    out = router(x)
    p_group = (x @ router.group_weight.detach().T).softmax(-1)
    p_within = plain_logits(router, x).view(32, 3, 4).softmax(-1)
    expected = (p_group.unsqueeze(-1) * p_within).view(32, 12)
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(32))


def test_hierarchical_experts_lie_in_the_most_probable_groups():
    router = make_hierarchical()
    x = tokens(64)
    out = router(x)
    top_groups = (x @ router.group_weight.detach().T).topk(2, dim=-1).indices
    for t in range(64):
        assert set((out.indices[t] // 4).tolist()) <= set(top_groups[t].tolist())
    # and within them the k most probable experts, weighted by renormalised p(e)
    masked = out.probs.view(64, 3, 4).clone()
    keep = torch.zeros(64, 3, dtype=torch.bool).scatter_(1, top_groups, True)
    masked[~keep] = -1.0
    top = masked.view(64, 12).topk(3, dim=-1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.weights, top.values / top.values.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------------------------------
# selection bias (aux-loss-free balancing), every token-choice router
# --------------------------------------------------------------------------------------------------------------------


def unbiased_weights(name, out, indices, router):
    """The combine weights each router's rule gives to `indices`, from its own unbiased scores."""
    if name == "topk-topk_softmax" or name == "noisy_topk":
        return out.logits.gather(1, indices).softmax(-1)
    if name == "deepseek-sigmoid":
        s = out.logits.sigmoid().gather(1, indices)
        return s / s.sum(-1, keepdim=True) * router.routed_scaling_factor
    if name == "top_p":
        p = out.probs.gather(1, indices.clamp_min(0)) * (indices >= 0)
        return p / p.sum(-1, keepdim=True)
    p = out.probs.gather(1, indices)  # softmax_topk, deepseek-softmax, hierarchical: renormalised probabilities
    return p / p.sum(-1, keepdim=True)


BIASABLE = {
    "topk-softmax_topk": dict(router="topk", softmax_order="softmax_topk"),
    "topk-topk_softmax": dict(router="topk", softmax_order="topk_softmax"),
    "noisy_topk": dict(router="noisy_topk"),
    "deepseek-sigmoid": dict(router="deepseek", score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "deepseek-softmax": dict(router="deepseek", score_func="softmax", n_group=2, topk_group=1),
    "top_p": dict(router="top_p", top_p=0.5, top_k=3),
    "hierarchical": dict(router="hierarchical", n_group=2, topk_group=2),
}


@pytest.mark.parametrize("name", list(BIASABLE))
def test_a_large_selection_bias_makes_every_token_pick_that_expert_with_unbiased_weights(name):
    router = make_router(selection_bias=True, **BIASABLE[name]).eval()
    x = tokens(48)
    unbiased = router(x)
    assert not bool((unbiased.indices == 6).any(-1).all()), "without the bias expert 6 is not everyone's choice"

    router.selection_bias[6] = 1000.0
    out = router(x)
    assert bool((out.indices == 6).any(-1).all())
    torch.testing.assert_close(out.logits, unbiased.logits)
    torch.testing.assert_close(out.probs, unbiased.probs)
    torch.testing.assert_close(out.weights, unbiased_weights(name, out, out.indices, router), atol=1e-5, rtol=1e-5)
    assert float(out.weights.detach().max()) < 100.0, "the bias never leaks into the combine weights"


# --------------------------------------------------------------------------------------------------------------------
# RouterOutput contract
# --------------------------------------------------------------------------------------------------------------------

ALL_ROUTERS = {
    "topk": dict(router="topk"),
    "noisy_topk": dict(router="noisy_topk"),
    "deepseek": dict(router="deepseek", score_func="sigmoid", n_group=4, topk_group=2),
    "expert_choice": dict(router="expert_choice"),
    "top_p": dict(router="top_p"),
    "hash": dict(router="hash"),
    "hierarchical": dict(router="hierarchical", n_group=2, topk_group=1),
    "sparsemixer": dict(router="sparsemixer"),
}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL_ROUTERS))
def test_router_output_shapes_and_float32_dtypes_whatever_the_input_dtype(name, dtype, training):
    router = make_router(**ALL_ROUTERS[name]).to(dtype).train(training)
    x = tokens(12).to(dtype)
    out = router(x, torch.arange(12))
    assert isinstance(out, RouterOutput)
    assert out.logits.shape == (12, 8) and out.logits.dtype == torch.float32
    assert out.probs.shape == (12, 8) and out.probs.dtype == torch.float32
    assert out.weights.dtype == torch.float32
    assert out.indices.dtype == torch.int64
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(12))
    if name == "expert_choice":
        assert out.expert_choice and out.indices.shape == out.weights.shape == (8, 3)  # C = ceil(12 * 2 / 8)
    else:
        assert not out.expert_choice and out.indices.shape == out.weights.shape == (12, 2)
        assert out.scores.shape == (12, 8)
