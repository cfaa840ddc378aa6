"""The dispatch plan: group token-slots by expert, apply capacity (drop / re-route), combine back in token order.

Router decisions are built by hand here (`RouterOutput`), so every rule is pinned to a concrete case: slot-major
priority, exact capacity, re-routing to the next-best expert with room, empty slots, the empty batch. The re-route
rules are also held to `reference_assignment`, the whiteboard version of them, on random cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.config import MoEConfig
from moekit.layers import MoE, RouterOutput, combine, expert_capacity, plan
from moekit.layers.reference import reference_assignment

SETTINGS = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def route_of(indices, scores=None, weights=None, num_experts=None) -> RouterOutput:
    """A token-choice router decision from explicit indices [T, K] (and optionally scores [T, E] / weights)."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    T, K = indices.shape
    if scores is not None:
        scores = torch.as_tensor(scores, dtype=torch.float32)
        E = scores.shape[1]
    else:
        E = num_experts
    if weights is None:
        weights = torch.rand(T, K) * (indices >= 0)
    logits = torch.zeros(T, E)
    return RouterOutput(torch.as_tensor(weights, dtype=torch.float32), indices, logits, logits.softmax(-1), scores)


def assignment(p, num_experts: int) -> torch.Tensor:
    """The final expert of every [T, K] slot according to a plan (-1: empty or dropped)."""
    final = torch.full((p.num_tokens * p.slots_per_token,), -1, dtype=torch.long)
    expert_M = torch.repeat_interleave(torch.arange(num_experts), p.counts)
    final[p.slot_index] = expert_M
    return final.view(p.num_tokens, p.slots_per_token)


def check_plan_is_consistent(p, route: RouterOutput, num_experts: int) -> None:
    """Invariants every token-choice plan satisfies, whatever the capacity mode."""
    T, K = route.indices.shape
    M = int(p.counts.sum())
    assert p.token_index.shape == p.slot_index.shape == p.weights.shape == (M,)
    assert p.counts.shape == p.routed_counts.shape == (num_experts,)
    assert p.counts.dtype == torch.long and p.token_index.dtype == torch.long
    assert p.num_tokens == T and p.slots_per_token == K
    # every kept slot appears once, and it belongs to the token the plan says
    assert p.slot_index.unique().numel() == M
    assert torch.equal(p.token_index, p.slot_index // K)
    # kept slots were real slots, and their combine weight is the router's
    assert bool((route.indices.reshape(-1)[p.slot_index] >= 0).all())
    torch.testing.assert_close(p.weights, route.weights.reshape(-1)[p.slot_index].float(), rtol=0, atol=0)
    # routed counts are the router's choice before capacity; empty slots count nowhere
    valid = route.indices[route.indices >= 0]
    assert torch.equal(p.routed_counts, torch.bincount(valid, minlength=num_experts))
    assert int(p.dropped) + M == valid.numel()


# --- dropless ------------------------------------------------------------------------------------------------------


def test_dropless_plan_keeps_every_slot_grouped_by_expert():
    torch.manual_seed(0)
    indices = [[2, 0], [1, 2], [2, 3], [0, 1], [3, 2]]
    route = route_of(indices, num_experts=4)
    p = plan(route, 4)
    check_plan_is_consistent(p, route, 4)
    assert p.capacity is None and int(p.dropped) == 0 and int(p.rerouted) == 0
    assert torch.equal(p.counts, torch.tensor([2, 2, 4, 2]))
    assert torch.equal(p.counts, p.routed_counts)
    assert sorted(p.slot_index.tolist()) == list(range(10))
    # token_index is sorted by expert: segment e holds exactly the tokens that chose e
    start = 0
    for e, n in enumerate(p.counts.tolist()):
        seg_tokens = sorted(p.token_index[start : start + n].tolist())
        assert seg_tokens == sorted(t for t, row in enumerate(indices) if e in row)
        start += n
    assert torch.equal(assignment(p, 4), torch.tensor(indices))


def test_empty_slots_are_never_dispatched():
    route = route_of([[1, -1, -1], [0, 2, -1], [-1, -1, -1], [2, 1, 0]], num_experts=3)
    for capacity in (None, 1, 2):
        p = plan(route, 3, capacity)
        check_plan_is_consistent(p, route, 3)
        assert 2 not in p.token_index.tolist()
        assert torch.equal(p.routed_counts, torch.tensor([2, 2, 2]))
    p = plan(route, 3, None)
    assert int(p.counts.sum()) == 6
    assert torch.equal(assignment(p, 3), route.indices)
    # a capacity of 1 drops real slots only: 6 real slots, 3 experts x 1
    p = plan(route, 3, 1)
    assert int(p.dropped) == 3 and int(p.counts.sum()) == 3


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_empty_batch(capacity, overflow):
    route = route_of(torch.zeros(0, 2, dtype=torch.long), scores=torch.zeros(0, 3))
    p = plan(route, 3, capacity, overflow)
    assert p.token_index.numel() == 0 and torch.equal(p.counts, torch.zeros(3, dtype=torch.long))
    assert int(p.dropped) == 0
    assert combine(torch.zeros(0, 5), p).shape == (0, 5)


def test_unknown_overflow_policy_is_rejected():
    with pytest.raises(ValueError, match="overflow"):
        plan(route_of([[0]], num_experts=2), 2, 1, "spill")


def test_reroute_without_scores_is_rejected_when_something_overflows():
    with pytest.raises(ValueError, match="scores"):
        plan(route_of([[0], [0]], num_experts=2), 2, 1, "reroute")


# --- capacity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,K,E,cf,min_cap,expected",
    [
        (8, 2, 4, 1.0, 1, 4),  # 8*2/4 = 4 exactly
        (10, 2, 4, 1.0, 1, 5),
        (10, 1, 4, 1.0, 1, 3),  # ceil(2.5)
        (10, 2, 4, 1.25, 1, 7),  # ceil(6.25)
        (3, 1, 8, 0.5, 1, 1),  # ceil(0.1875) = 1
        (3, 1, 8, 0.5, 4, 4),  # min_capacity wins
        (0, 2, 4, 1.0, 1, 1),
        (2048, 1, 1, 1.0, 1, 2048),
    ],
)
def test_expert_capacity_is_ceil_of_cf_times_slots_per_expert(T, K, E, cf, min_cap, expected):
    c = expert_capacity(T, K, E, cf, min_cap)
    assert isinstance(c, int) and c == expected
    assert c == max(min_cap, math.ceil(cf * T * K / E))


def test_priority_is_slot_major_first_choices_before_second_choices():
    # capacity 2 per expert. First choices: t0->0, t1->1, t2->0, t3->0; second: t0->1, t1->0, t2->1, t3->1.
    # Slot-major: expert 0 takes t0, t2 (first choices; t3's first choice overflows), then t1's second choice finds
    # expert 0 full; expert 1 takes t1 (first) and t0 (second); t2's and t3's second choices overflow.
    # (Token-major order would instead give t0 both experts and t1 both experts.)
    route = route_of([[0, 1], [1, 0], [0, 1], [0, 1]], num_experts=2)
    p = plan(route, 2, capacity=2, overflow="drop")
    check_plan_is_consistent(p, route, 2)
    assert torch.equal(assignment(p, 2), torch.tensor([[0, 1], [1, -1], [0, -1], [-1, -1]]))
    assert int(p.dropped) == 4 and int(p.rerouted) == 0
    assert torch.equal(p.counts, torch.tensor([2, 2]))
    assert torch.equal(p.routed_counts, torch.tensor([4, 4]))


def test_earlier_tokens_win_within_a_choice_rank():
    route = route_of([[1], [1], [1], [0], [1]], num_experts=2)
    p = plan(route, 2, capacity=2)
    assert torch.equal(assignment(p, 2).squeeze(1), torch.tensor([1, 1, -1, 0, -1]))


def test_positions_are_exact_integers_far_past_256():
    # All 2048 tokens pick expert 0 first and expert 1 second; capacity 1000. Float (bf16) position counting would
    # collide above 256; integer ranks keep exactly the first 1000 tokens of each choice.
    T, C = 2048, 1000
    indices = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], dim=1)
    route = route_of(indices, weights=torch.full((T, 2), 0.5, dtype=torch.bfloat16), num_experts=3)
    p = plan(route, 3, capacity=C)
    assert torch.equal(p.counts, torch.tensor([C, C, 0]))
    assert int(p.dropped) == 2 * (T - C)
    final = assignment(p, 3)
    assert torch.equal(final[:C], indices[:C]) and bool((final[C:] == -1).all())
    # reroute: the overflow of experts 0 and 1 fills expert 2 (the only one with room), again exactly C
    scores = torch.tensor([3.0, 2.0, 1.0]).expand(T, 3)
    p = plan(route_of(indices, scores=scores), 3, capacity=C, overflow="reroute")
    assert torch.equal(p.counts, torch.tensor([C, C, C]))
    assert int(p.rerouted) == C and int(p.dropped) == 2 * (T - C) - C
    # the first overflowing token (by priority: first-choice overflow of token C) gets the free expert first
    assert torch.equal(assignment(p, 3)[C : 2 * C, 0], torch.full((C,), 2))


# --- re-route ------------------------------------------------------------------------------------------------------


def test_reroute_moves_overflow_to_next_best_expert_with_room():
    # capacity 1, everyone picks expert 0 first.
    # t0 keeps expert 0. t1 and t2 both prefer expert 1 next: t1 (earlier) gets it, t2 goes on to expert 2.
    # t3's next-best (expert 1) is full and it may not use expert 2 (score -inf): dropped.
    scores = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.5], [3.0, 2.0, float("-inf")]]
    route = route_of([[0], [0], [0], [0]], scores=scores)
    p = plan(route, 3, capacity=1, overflow="reroute")
    check_plan_is_consistent(p, route, 3)
    assert torch.equal(assignment(p, 3).squeeze(1), torch.tensor([0, 1, 2, -1]))
    assert int(p.rerouted) == 2 and int(p.dropped) == 1
    assert torch.equal(p.counts, torch.tensor([1, 1, 1]))
    assert torch.equal(p.routed_counts, torch.tensor([4, 0, 0]))
    final, dropped, rerouted = reference_assignment(route, 3, 1, "reroute")
    assert final == [[0], [1], [2], [-1]] and (dropped, rerouted) == (1, 2)


def test_reroute_never_uses_a_forbidden_expert_even_with_room():
    # Group-limited routing (DeepSeek) marks unreachable experts -inf: they stay unreachable for re-routing.
    scores = [[3.0, 2.0, 1.0], [3.0, float("-inf"), float("-inf")], [3.0, float("-inf"), 0.5]]
    route = route_of([[0], [0], [0]], scores=scores)
    p = plan(route, 3, capacity=1, overflow="reroute")
    assert torch.equal(assignment(p, 3).squeeze(1), torch.tensor([0, -1, 2]))
    assert int(p.rerouted) == 1 and int(p.dropped) == 1
    assert torch.equal(p.counts, torch.tensor([1, 0, 1]))  # expert 1 had room and was still not used


def test_reroute_never_gives_a_token_an_expert_it_already_uses():
    # t1's two slots both overflow. Its next-best experts after 0 is 1 - but 1 is its own (overflowed) second choice,
    # so its first slot goes to 2, and its second slot finds nothing left: dropped, not a duplicate expert.
    scores = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    route = route_of([[0, 1], [0, 1]], scores=scores)
    p = plan(route, 3, capacity=1, overflow="reroute")
    final = assignment(p, 3)
    assert torch.equal(final, torch.tensor([[0, 1], [2, -1]]))
    assert int(p.rerouted) == 1 and int(p.dropped) == 1
    assert reference_assignment(route, 3, 1, "reroute") == ([[0, 1], [2, -1]], 1, 1)


def test_two_overflowing_slots_of_one_token_never_land_on_the_same_expert():
    # capacity 2; t2's both slots overflow and both would like expert 2 next (room 2). The earlier slot takes it;
    # the later one waits a round, then skips expert 2 (now the token's own) and lands on expert 3.
    scores = [[4.0, 3.0, 2.0, 1.0]] * 3
    route = route_of([[0, 1]] * 3, scores=scores)
    p = plan(route, 4, capacity=2, overflow="reroute")
    assert torch.equal(assignment(p, 4), torch.tensor([[0, 1], [0, 1], [2, 3]]))
    assert int(p.rerouted) == 2 and int(p.dropped) == 0
    assert reference_assignment(route, 4, 2, "reroute") == ([[0, 1], [0, 1], [2, 3]], 0, 2)


def test_reroute_keeps_the_combine_weight_of_the_original_slot():
    scores = [[3.0, 2.0], [3.0, 2.0]]
    weights = torch.tensor([[0.7], [0.6]])
    p = plan(route_of([[0], [0]], scores=scores, weights=weights), 2, capacity=1, overflow="reroute")
    assert torch.equal(assignment(p, 2).squeeze(1), torch.tensor([0, 1]))
    assert torch.equal(p.token_index, torch.tensor([0, 1]))
    assert torch.equal(p.weights, torch.tensor([0.7, 0.6]))


def test_drop_policy_never_reroutes():
    scores = [[3.0, 2.0, 1.0]] * 3
    p = plan(route_of([[0]] * 3, scores=scores), 3, capacity=1, overflow="drop")
    assert torch.equal(assignment(p, 3).squeeze(1), torch.tensor([0, -1, -1]))
    assert int(p.rerouted) == 0 and int(p.dropped) == 2


@st.composite
def token_choice_cases(draw):
    T = draw(st.integers(0, 40))
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    cf = draw(st.floats(0.25, 2.0))
    overflow = draw(st.sampled_from(["drop", "reroute"]))
    ties = draw(st.booleans())
    forbid = draw(st.sampled_from([0.0, 0.3, 0.6]))  # fraction of -inf scores (group-limited routing)
    empty = draw(st.sampled_from([0.0, 0.3]))  # fraction of trailing empty slots (top-p routing)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    if ties:
        scores = scores.round()
    if forbid and E > K:
        forbidden = torch.rand(T, E, generator=g) < forbid
        # keep at least K allowed experts per token, like a router that only limits to reachable groups
        keep = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
        forbidden.scatter_(1, keep, False)
        scores = scores.masked_fill(forbidden, float("-inf"))
    indices = scores.topk(K, dim=1).indices if T else torch.zeros(0, K, dtype=torch.long)
    if empty and K > 1:
        drop_tail = (torch.rand(T, K, generator=g) < empty).cumsum(1) > 0
        drop_tail[:, 0] = False
        indices = indices.masked_fill(drop_tail, -1)
    weights = torch.rand(T, K, generator=g) * (indices >= 0)
    route = RouterOutput(weights, indices, torch.zeros(T, E), torch.full((T, E), 1.0 / E), scores)
    return route, E, expert_capacity(T, K, E, cf), overflow


@SETTINGS
@given(token_choice_cases())
def test_capacity_is_never_exceeded_and_slots_are_conserved(case):
    route, E, C, overflow = case
    p = plan(route, E, C, overflow)
    check_plan_is_consistent(p, route, E)
    assert p.capacity == C
    assert bool((p.counts <= C).all())
    assert int(p.rerouted) <= int(p.counts.sum())
    # without re-routing, an expert keeps min(C, what it was sent), and nothing moves
    if overflow == "drop":
        assert torch.equal(p.counts, p.routed_counts.clamp(max=C))
        assert int(p.rerouted) == 0
    else:
        assert bool((p.counts >= p.routed_counts.clamp(max=C)).all())


@SETTINGS
@given(token_choice_cases())
def test_plan_matches_reference_assignment(case):
    route, E, C, overflow = case
    p = plan(route, E, C, overflow)
    final, dropped, rerouted = reference_assignment(route, E, C, overflow)
    assert assignment(p, E).tolist() == final
    assert (int(p.dropped), int(p.rerouted)) == (dropped, rerouted)


@SETTINGS
@given(token_choice_cases())
def test_reroute_targets_are_distinct_allowed_experts(case):
    route, E, C, _ = case
    p = plan(route, E, C, "reroute")
    final = assignment(p, E)
    T, K = final.shape
    for t in range(T):
        kept = [e for e in final[t].tolist() if e >= 0]
        assert len(kept) == len(set(kept)), "a token got the same expert twice"
        for k in range(K):
            e, chosen = int(final[t, k]), int(route.indices[t, k])
            if chosen < 0:
                assert e == -1, "an empty slot was dispatched"
            elif e >= 0 and e != chosen:
                assert math.isfinite(float(route.scores[t, e])), "re-routed to an expert the token may not use"
    dropless = plan(route, E, None)
    assert int(dropless.dropped) == 0 and torch.equal(assignment(dropless, E), route.indices)


# --- combine -------------------------------------------------------------------------------------------------------
# The combine weights are 1 here so that these tests pin down the summation (which rows go to which token) whether
# the weights are applied by combine() or before it; the weighting itself is held to the reference in test_moe.py.


def unit_route(indices, num_experts):
    indices = torch.as_tensor(indices)
    return route_of(indices, scores=torch.randn(indices.shape[0], num_experts), weights=(indices >= 0).float())


@pytest.mark.parametrize("capacity", [None, 1, 2])
def test_combine_sums_each_tokens_kept_slots_in_token_order(capacity):
    torch.manual_seed(0)
    T, K, E, D = 6, 2, 3, 5
    indices = torch.randn(T, E).topk(K, dim=1).indices
    indices[4, 1] = -1
    p = plan(unit_route(indices, E), E, capacity, "drop")
    y = torch.randn(int(p.counts.sum()), D)
    expected = torch.zeros(T, D)
    for m in range(y.shape[0]):
        expected[int(p.slot_index[m]) // K] += y[m]
    out = combine(y, p)
    assert out.shape == (T, D) and out.dtype == y.dtype
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if capacity == 1:  # dropped slots contribute nothing: at most E rows survive
        assert y.shape[0] == E and int(p.dropped) == T * K - 1 - E


def test_combine_of_expert_outputs_is_the_moe_sum_over_slots():
    # gather -> per-slot function -> combine: token t gets sum over its kept slots k of f(x_t, expert of slot k)
    torch.manual_seed(0)
    T, K, E, D = 5, 2, 4, 3
    indices = torch.randn(T, E).topk(K, dim=1).indices
    p = plan(unit_route(indices, E), E)
    x = torch.randn(T, D)
    expert_M = torch.repeat_interleave(torch.arange(E), p.counts)
    y = x[p.token_index] * (expert_M.float() + 1).unsqueeze(1)
    expected = torch.stack([sum(x[t] * (int(e) + 1) for e in indices[t]) for t in range(T)])
    torch.testing.assert_close(combine(y, p), expected, atol=1e-6, rtol=1e-6)


def test_combine_backward_sends_each_tokens_gradient_to_its_rows():
    route = unit_route([[0, 2], [1, 0], [2, 1]], 3)
    p = plan(route, 3, capacity=1)
    y = torch.randn(int(p.counts.sum()), 4, requires_grad=True)
    g = torch.randn(3, 4)
    combine(y, p).backward(g)
    torch.testing.assert_close(y.grad, g[p.token_index])


def test_combine_keeps_the_expert_output_dtype():
    p = plan(unit_route([[0, 1], [1, 0]], 2), 2)
    assert combine(torch.randn(4, 3, dtype=torch.bfloat16), p).dtype == torch.bfloat16


def test_expert_choice_plan_gives_every_expert_its_c_tokens_and_combine_adds_them_up():
    torch.manual_seed(0)
    T, E, C, D = 5, 3, 2, 4
    tokens_EC = torch.tensor([[0, 3], [3, 1], [4, 3]])  # token 3 picked by all experts, token 2 by none
    weights_EC = torch.rand(E, C)
    route = RouterOutput(weights_EC, tokens_EC, torch.zeros(T, E), torch.full((T, E), 1 / E), None, expert_choice=True)
    p = plan(route, E, capacity=1)  # capacity is the router's business under expert choice
    assert torch.equal(p.counts, torch.full((E,), C))
    assert torch.equal(p.token_index, tokens_EC.reshape(-1))
    assert torch.equal(p.weights, weights_EC.reshape(-1))
    assert int(p.dropped) == 0
    unit = plan(RouterOutput(torch.ones(E, C), tokens_EC, route.logits, route.probs, None, expert_choice=True), E)
    y = torch.randn(E * C, D)
    expected = torch.zeros(T, D)
    for e in range(E):
        for c in range(C):
            expected[tokens_EC[e, c]] += y[e * C + c]
    out = combine(y, unit)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(out[2]) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(capacity_factor=0.75),
        dict(capacity_factor=1.0, overflow="reroute"),
        dict(router="expert_choice"),
        dict(router="deepseek", score_func="sigmoid", n_group=2, topk_group=1, num_shared_experts=1),
    ],
    ids=["dropless", "drop", "reroute", "expert_choice", "deepseek"],
)
def test_moe_forward_and_backward_are_bitwise_deterministic(kwargs):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, **kwargs))
    x = torch.randn(3, 7, 16)
    runs = []
    for _ in range(2):
        moe.zero_grad()
        x_ = x.clone().requires_grad_()
        y = moe(x_)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        runs.append((y.detach(), x_.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2].keys() == runs[1][2].keys() and runs[0][2]
    for name in runs[0][2]:
        assert torch.equal(runs[0][2][name], runs[1][2][name]), name


# --- batch prioritized routing (V-MoE): priority="score" ---------------------------------------------------------


def test_score_priority_keeps_the_confident_tokens():
    # three tokens want expert 0 (capacity 1): by position token 0 keeps it, by score the most confident (token 2)
    route = route_of([[0], [0], [0]], weights=[[0.2], [0.5], [0.9]], num_experts=2)
    by_position = plan(route, 2, capacity=1, overflow="drop")
    by_score = plan(route, 2, capacity=1, overflow="drop", priority="score")
    assert assignment(by_position, 2).tolist() == [[0], [-1], [-1]]
    assert assignment(by_score, 2).tolist() == [[-1], [-1], [0]]
    assert int(by_score.dropped) == 2
    check_plan_is_consistent(by_score, route, 2)


def test_score_priority_is_slot_major():
    # every first choice comes before any second choice, whatever the scores
    route = route_of([[1, 0], [0, 1]], weights=[[0.9, 0.1], [0.6, 0.4]], num_experts=2)
    p = plan(route, 2, capacity=1, overflow="drop", priority="score")
    assert assignment(p, 2).tolist() == [[1, -1], [0, -1]]


def test_score_priority_ranks_tokens_without_slots_last():
    route = route_of([[-1], [0], [0]], weights=[[0.0], [0.3], [0.1]], num_experts=1)
    p = plan(route, 1, capacity=1, priority="score")
    assert assignment(p, 1).tolist() == [[-1], [0], [-1]]


def test_unknown_priority_is_named():
    with pytest.raises(ValueError, match="'confidence'.*'position', 'score'"):
        plan(route_of([[0]], num_experts=1), 1, capacity=1, priority="confidence")
    with pytest.raises(ValueError, match="capacity_priority 'first'"):
        MoEConfig(capacity_priority="first")


@SETTINGS
@given(token_choice_cases())
def test_score_priority_plan_matches_reference_assignment(case):
    route, E, C, overflow = case
    p = plan(route, E, C, overflow, priority="score")
    check_plan_is_consistent(p, route, E)
    assert bool((p.counts <= C).all())
    final, dropped, rerouted = reference_assignment(route, E, C, overflow, priority="score")
    assert assignment(p, E).tolist() == final
    assert (int(p.dropped), int(p.rerouted)) == (dropped, rerouted)
    # dropless: the priority changes nothing
    assert torch.equal(assignment(plan(route, E, None, priority="score"), E), route.indices)
