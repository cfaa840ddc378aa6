"""The MoE layer, held to the readable reference implementation.

`reference_moe` (layers/reference.py) computes the same layer with plain per-expert loops from the same router
decision. For every router, activation and capacity mode the fast layer must give the same output and the same
gradients (w.r.t. the input, the expert weights and the router weights). The rest of the file pins down what the
layer promises around that: padding, shared experts, statistics and losses, activation checkpointing, dtypes and
shapes as a drop-in FFN, and that it never materialises a [T, E, D] tensor.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from moekit.config import ACTIVATIONS, MoEConfig
from moekit.layers import MoE, collect_stats, expert_capacity, total_aux_loss, update_biases
from moekit.layers.reference import reference_assignment, reference_moe
from moekit.layers.routing import RouterOutput

# D and F keep the grouped_mm kernel's 16-byte stride rule (float32) so the fast path really runs grouped_mm.
D, FF, E, K = 8, 4, 4, 2

ROUTER_CASES = {
    "topk-softmax_topk-norm": dict(router="topk", softmax_order="softmax_topk", norm_topk_prob=True),
    "topk-softmax_topk-nonorm": dict(router="topk", softmax_order="softmax_topk", norm_topk_prob=False),
    "topk-topk_softmax": dict(router="topk", softmax_order="topk_softmax"),
    "topk-router_bias-selection_bias": dict(router="topk", router_bias=True, selection_bias=True),
    "noisy_topk-train": dict(router="noisy_topk"),
    "deepseek-sigmoid": dict(
        router="deepseek", score_func="sigmoid", n_group=2, topk_group=1, selection_bias=True, routed_scaling_factor=2.5
    ),
    "deepseek-softmax": dict(router="deepseek", score_func="softmax", n_group=2, topk_group=1, norm_topk_prob=False),
    "expert_choice": dict(router="expert_choice"),
    "top_p": dict(router="top_p", top_p=0.6, top_k=3),
    "hash": dict(router="hash"),
    "hierarchical": dict(router="hierarchical", n_group=2, topk_group=1),
}
CAPACITY_MODES = {
    "dropless": dict(capacity_factor=None),
    "drop": dict(capacity_factor=0.5, overflow="drop"),
    "reroute": dict(capacity_factor=1.0, overflow="reroute"),
}


def make_moe(seed=0, **overrides) -> MoE:
    kwargs = dict(d_model=D, d_ff=FF, num_experts=E, top_k=K)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**kwargs))
    with torch.no_grad():
        moe.router.weight.mul_(4)  # decisive, varied routing on tiny inputs
        for name, p in moe.named_parameters():
            if name.endswith(("b_in", "b_out", "bias", "noise_weight")):
                p.normal_(0, 0.5)  # zero-initialised parameters would hide mistakes
        if getattr(moe.router, "selection_bias", None) is not None:
            moe.router.selection_bias.normal_(0, 0.2)
    if moe.config.router == "noisy_topk":
        moe.train()  # noise only in training
    return moe


def inputs_for(moe: MoE, B=2, S=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, moe.config.d_model, generator=g)
    token_ids = torch.randint(0, 100, (B, S), generator=g) if moe.config.router == "hash" else None
    return x, token_ids


def grads_of(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.clone()}
    for name, p in moe.named_parameters():
        out[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return out


def run_fast_and_reference(moe: MoE, x, token_ids=None, mask=None, seed=1234):
    """Output and gradients of the layer and of the reference, from the same router decision."""
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    moe.zero_grad()
    x_fast = x.clone().requires_grad_()
    torch.manual_seed(seed)  # noisy_topk samples its noise inside the router
    y_fast = moe(x_fast, token_ids=token_ids, mask=mask)
    y_fast.backward(g_out)
    fast = grads_of(moe, x_fast)
    stats = moe.last

    moe.zero_grad()
    x_ref = x.clone().requires_grad_()
    torch.manual_seed(seed)
    route = moe.router(
        x_ref.reshape(-1, moe.config.d_model),
        None if token_ids is None else token_ids.reshape(-1),
        None if mask is None else mask.reshape(-1).bool(),
    )
    y_ref = reference_moe(moe, x_ref, route, mask)
    y_ref.backward(g_out)
    ref = grads_of(moe, x_ref)
    return y_fast.detach(), y_ref.detach(), fast, ref, route, stats


def assert_grads_close(fast, ref, atol=1e-5, rtol=1e-4):
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


def masked_route(route: RouterOutput, mask) -> RouterOutput:
    indices = route.indices.clone()
    if mask is not None:
        indices[~mask.reshape(-1).bool()] = -1
    return RouterOutput(route.weights, indices, route.logits, route.probs, route.scores)


def capacity_of(moe: MoE, num_real: int):
    cfg = moe.config
    if cfg.capacity_factor is None:
        return None
    return expert_capacity(num_real, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.min_capacity)


def valid_pairs(routers):
    """(router, capacity mode) pairs; expert choice has no re-route mode (MoEConfig rejects it)."""
    return [
        pytest.param(r, c, id=f"{r}-{c}")
        for r in routers
        for c in CAPACITY_MODES
        if not (r == "expert_choice" and c == "reroute")
    ]


# --- the acceptance grid: every router x activation x capacity mode ------------------------------------------------


GRID = [
    pytest.param(r, a, c, id=f"{r}-{a}-{c}")
    for r in ROUTER_CASES
    for a in ACTIVATIONS
    for c in CAPACITY_MODES
    if not (r == "expert_choice" and c == "reroute")
]


@pytest.mark.parametrize("router,activation,capacity", GRID)
def test_layer_matches_reference_output_and_gradients(router, activation, capacity):
    moe = make_moe(activation=activation, **ROUTER_CASES[router], **CAPACITY_MODES[capacity])
    x, token_ids = inputs_for(moe)
    y, y_ref, g, g_ref, route, stats = run_fast_and_reference(moe, x, token_ids)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_grads_close(g, g_ref)
    # the router weights and every expert matrix really took part
    assert torch.count_nonzero(g["router.weight"]) > 0 or router == "hash"
    assert torch.count_nonzero(g["experts.w_in"]) > 0
    if not route.expert_choice:
        cap = capacity_of(moe, x.shape[0] * x.shape[1])
        _, dropped, rerouted = reference_assignment(route, E, cap, moe.config.overflow)
        assert (int(stats.dropped), int(stats.rerouted)) == (dropped, rerouted)
        if capacity == "drop" and router != "top_p":
            assert dropped > 0, "the capacity case should actually drop slots"


@pytest.mark.parametrize("router", ["topk-softmax_topk-nonorm", "deepseek-sigmoid", "top_p", "hash"])
@pytest.mark.parametrize("capacity", ["drop", "reroute"])
def test_batch_prioritized_routing_matches_reference(router, capacity):
    moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES[capacity], capacity_priority="score")
    x, token_ids = inputs_for(moe, B=3, S=6)
    y, y_ref, g, g_ref, route, stats = run_fast_and_reference(moe, x, token_ids)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_grads_close(g, g_ref)
    cap = capacity_of(moe, x.shape[0] * x.shape[1])
    by_score = reference_assignment(route, E, cap, moe.config.overflow, "score")
    assert (int(stats.dropped), int(stats.rerouted)) == by_score[1:]
    if router in ("topk-softmax_topk-nonorm", "deepseek-sigmoid"):  # the case drops slots: the order matters
        assert by_score[0] != reference_assignment(route, E, cap, moe.config.overflow)[0]


def test_expert_choice_cannot_reroute():
    with pytest.raises(ValueError, match="reroute"):
        MoEConfig(router="expert_choice", capacity_factor=1.0, overflow="reroute")


def test_reroute_grid_actually_reroutes():
    moved = 0
    for router in ("topk-softmax_topk-norm", "deepseek-sigmoid", "hierarchical", "hash"):
        moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES["reroute"])
        x, token_ids = inputs_for(moe)
        moe(x, token_ids=token_ids)
        moved += int(moe.last.rerouted)
    assert moved > 0


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("router", ["topk-softmax_topk-norm", "deepseek-sigmoid", "expert_choice"])
@pytest.mark.parametrize("capacity", ["dropless", "drop"])
def test_shared_experts_and_expert_bias_match_reference(router, gate, capacity):
    moe = make_moe(
        num_shared_experts=2, shared_d_ff=6, shared_expert_gate=gate, expert_bias=True,
        **ROUTER_CASES[router], **CAPACITY_MODES[capacity],
    )
    assert moe.shared_experts is not None and (moe.shared_gate is not None) == gate
    x, token_ids = inputs_for(moe)
    y, y_ref, g, g_ref, _, _ = run_fast_and_reference(moe, x, token_ids)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_grads_close(g, g_ref)
    assert torch.count_nonzero(g["shared_experts.w_in.weight"]) > 0
    assert torch.count_nonzero(g["experts.b_out"]) > 0


def test_shared_experts_are_one_ffn_of_n_times_the_width():
    moe = make_moe(num_shared_experts=3, shared_d_ff=5)
    assert moe.shared_experts.w_out.weight.shape == (D, 15)
    assert make_moe(num_shared_experts=2).shared_experts.w_out.weight.shape == (D, 2 * FF)


# --- padding -------------------------------------------------------------------------------------------------------

MASK_ROUTERS = ["topk-softmax_topk-norm", "deepseek-sigmoid", "expert_choice", "top_p", "hash", "hierarchical"]


def padding_mask():
    return torch.tensor([[True, True, True, True, False, False], [True, True, True, True, True, False]])


@pytest.mark.parametrize("shared", [False, True], ids=["routed_only", "shared"])
@pytest.mark.parametrize("router,capacity", valid_pairs(MASK_ROUTERS))
def test_padding_is_not_routed_and_does_not_change_real_tokens(router, capacity, shared):
    extra = dict(num_shared_experts=1, shared_expert_gate=True) if shared else {}
    moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES[capacity], **extra)
    x, token_ids = inputs_for(moe, B=2, S=6)
    mask = padding_mask()
    y = moe(x, token_ids=token_ids, mask=mask)
    stats = moe.last
    # padded tokens get no routed output: only the shared experts (if any)
    pad = x[~mask]
    expected_pad = torch.zeros_like(pad)
    if shared:
        expected_pad = torch.sigmoid(moe.shared_gate(pad)) * moe.shared_experts(pad)
    torch.testing.assert_close(y[~mask], expected_pad, atol=1e-6, rtol=1e-5)
    # real tokens are exactly as if the padding had never been there
    y_alone = moe(x[mask], token_ids=None if token_ids is None else token_ids[mask])
    torch.testing.assert_close(y[mask], y_alone, atol=1e-5, rtol=1e-4)
    # padding counts nowhere in the statistics
    assert torch.equal(stats.tokens_per_expert, moe.last.tokens_per_expert)
    assert torch.equal(stats.routed_per_expert, moe.last.routed_per_expert)
    assert stats.capacity == moe.last.capacity
    torch.testing.assert_close(stats.entropy, moe.last.entropy)


@pytest.mark.parametrize("router,capacity", valid_pairs(["topk-softmax_topk-norm", "top_p", "expert_choice"]))
def test_padded_layer_matches_reference(router, capacity):
    moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES[capacity], num_shared_experts=1)
    x, token_ids = inputs_for(moe, B=2, S=6)
    mask = padding_mask()
    y, y_ref, g, g_ref, route, stats = run_fast_and_reference(moe, x, token_ids, mask)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_grads_close(g, g_ref)
    if not route.expert_choice:
        final, dropped, rerouted = reference_assignment(
            masked_route(route, mask), E, capacity_of(moe, int(mask.sum())), moe.config.overflow
        )
        kept = sum(e >= 0 for row in final for e in row)
        assert int(stats.tokens_per_expert.sum()) == kept
        assert (int(stats.dropped), int(stats.rerouted)) == (dropped, rerouted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_all_padding_batch_gives_zero_routed_output_and_trains(dtype):
    moe = make_moe().to(dtype)
    x = torch.randn(2, 3, D, dtype=dtype, requires_grad=True)
    y = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.count_nonzero(y) == 0
    assert int(moe.last.tokens_per_expert.sum()) == 0
    (y.sum() + moe.last.aux_loss).backward()


# --- gradients in float64 ------------------------------------------------------------------------------------------


def functional(moe: MoE, names):
    return lambda x, *params: torch.func.functional_call(moe, dict(zip(names, params)), (x,))


@pytest.mark.parametrize(
    "capacity", [dict(capacity_factor=None), dict(capacity_factor=0.5), dict(capacity_factor=1.0, overflow="reroute")],
    ids=["dropless", "drop", "reroute"],
)
def test_gradcheck_float64_expert_parameters(capacity):
    # Float64 runs the loop implementation (grouped_mm has no float64); the combine weights are constants here.
    moe = make_moe(d_model=4, d_ff=3, num_experts=3, expert_bias=True, num_shared_experts=1, **capacity).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    names = [n for n, _ in moe.named_parameters() if not n.startswith("router.")]
    params = tuple(moe.get_parameter(n).detach().clone().requires_grad_() for n in names)
    f = lambda *ps: torch.func.functional_call(moe, dict(zip(names, ps)), (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize(
    "capacity", [dict(capacity_factor=None), dict(capacity_factor=0.5)], ids=["dropless", "drop"]
)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_float64_whole_layer(capacity, activation):
    # Router arithmetic runs in float32 by design (selective precision), so finite differences through the router
    # use a coarser step than the float64 default; the routing decisions stay fixed for this step size.
    moe = make_moe(d_model=4, d_ff=3, num_experts=3, activation=activation, expert_bias=True, **capacity).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    assert "router.weight" in names
    f = functional(moe, names)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-3, atol=5e-4, rtol=1e-3, fast_mode=True)


# --- property test -------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 12),
    E_=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    cf=st.one_of(st.none(), st.floats(0.25, 2.0)),
    overflow=st.sampled_from(["drop", "reroute"]),
    activation=st.sampled_from(ACTIVATIONS),
    router=st.sampled_from(["topk-softmax_topk-norm", "topk-topk_softmax", "deepseek-softmax", "top_p"]),
    seed=st.integers(0, 1000),
)
def test_property_layer_equals_reference(T, E_, k_frac, cf, overflow, activation, router, seed):
    kwargs = dict(ROUTER_CASES[router])
    k = 1 + int(k_frac * (E_ - 1))
    kwargs["top_k"] = k
    if router == "deepseek-softmax":
        kwargs.update(n_group=1, topk_group=1)
    moe = make_moe(seed, num_experts=E_, activation=activation, capacity_factor=cf, overflow=overflow, **kwargs)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    y, y_ref, g, g_ref, route, stats = run_fast_and_reference(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_grads_close(g, g_ref)
    final, dropped, rerouted = reference_assignment(route, E_, capacity_of(moe, T), overflow)
    assert int(stats.tokens_per_expert.sum()) == sum(e >= 0 for row in final for e in row)
    assert (int(stats.dropped), int(stats.rerouted)) == (dropped, rerouted)
    if stats.capacity is not None:
        assert bool((stats.tokens_per_expert <= stats.capacity).all())


# --- statistics and losses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "router,capacity", valid_pairs(["topk-softmax_topk-norm", "deepseek-sigmoid", "top_p", "expert_choice"])
)
def test_statistics_of_the_last_forward(router, capacity):
    moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES[capacity])
    x, _ = inputs_for(moe, B=3, S=4)
    T = 12
    assert moe.last is None
    moe(x)
    s = moe.last
    assert s.router_logits.shape == (T, E) and s.router_logits.dtype == torch.float32
    assert not s.router_logits.requires_grad
    assert s.tokens_per_expert.shape == s.routed_per_expert.shape == (E,)
    assert 0.0 <= float(s.entropy) <= math.log(E) + 1e-6
    route = moe.router(x.reshape(-1, D))
    if route.expert_choice:
        C = route.indices.shape[1]
        assert torch.equal(s.tokens_per_expert, torch.full((E,), C))
        assert int(s.dropped) == 0
    else:
        assert torch.equal(s.routed_per_expert, torch.bincount(route.indices[route.indices >= 0], minlength=E))
        cap = capacity_of(moe, T)
        assert s.capacity == cap
        final, dropped, rerouted = reference_assignment(route, E, cap, moe.config.overflow)
        assert s.tokens_per_expert.tolist() == [sum(e == j for row in final for e in row) for j in range(E)]
        assert (int(s.dropped), int(s.rerouted)) == (dropped, rerouted)
        assert int(s.tokens_per_expert.sum()) + int(s.dropped) == int((route.indices >= 0).sum())


def test_entropy_is_log_e_for_a_uniform_router_and_aux_loss_zero_without_coefficients():
    moe = make_moe()
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(6, D))
    torch.testing.assert_close(moe.last.entropy, torch.tensor(math.log(E)))
    assert float(moe.last.aux_loss) == 0.0 and moe.last.losses == {}


def test_balanced_routing_gives_a_switch_loss_of_one():
    # uniform probabilities: Switch loss E * sum_i f_i P_i = E * sum_i f_i / E = 1 whatever the counts
    moe = make_moe(aux_loss_coef=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(8, D))
    torch.testing.assert_close(moe.last.losses["switch"], torch.tensor(1.0))
    torch.testing.assert_close(moe.last.aux_loss, torch.tensor(0.5))


def three_layer_model(**kwargs):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=K, **kwargs)
    return nn.Sequential(MoE(cfg), nn.Linear(D, D), MoE(cfg), MoE(cfg))


def test_collect_stats_and_total_aux_loss_gather_every_layer():
    model = three_layer_model(aux_loss_coef=1e-2, z_loss_coef=1e-3)
    assert collect_stats(model) == []
    assert float(total_aux_loss(model)) == 0.0
    layers = [model[0], model[2], model[3]]
    model(torch.randn(2, 5, D))
    stats = collect_stats(model)
    assert len(stats) == 3 and all(s is layer.last for s, layer in zip(stats, layers))
    total = total_aux_loss(model)
    torch.testing.assert_close(total, sum(layer.last.aux_loss for layer in layers))
    for layer in layers:
        expected = 1e-2 * layer.last.losses["switch"] + 1e-3 * layer.last.losses["z"]
        torch.testing.assert_close(layer.last.aux_loss, expected)
    total.backward()
    for layer in layers:  # every layer's router gets a gradient from the aux loss
        assert layer.router.weight.grad is not None and torch.count_nonzero(layer.router.weight.grad) > 0


def test_collect_stats_in_a_module_list_model():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            cfg = MoEConfig(d_model=D, d_ff=FF, num_experts=E, z_loss_coef=1.0)
            self.blocks = nn.ModuleList(MoE(cfg) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return x

    model = Model()
    model(torch.randn(4, D))
    assert len(collect_stats(model)) == 3
    torch.testing.assert_close(total_aux_loss(model), sum(b.last.losses["z"] for b in model.blocks))


@pytest.mark.parametrize("router", ["topk", "deepseek"])
def test_update_biases_moves_every_layer_against_its_load(router):
    rate = 0.1
    model = three_layer_model(router=router, selection_bias=True, bias_update_rate=rate)
    layers = [model[0], model[2], model[3]]
    model.train()
    x = torch.randn(4, 6, D)
    model(x)
    load1 = [layer.last.routed_per_expert.float() for layer in layers]
    model(x)
    loads = [l1 + layer.last.routed_per_expert.float() for l1, layer in zip(load1, layers)]
    update_biases(model)
    for layer, load in zip(layers, loads):
        expected = rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(layer.router.selection_bias, expected)
        assert torch.count_nonzero(layer.router.selection_bias) > 0
    before = [layer.router.selection_bias.clone() for layer in layers]
    update_biases(model)  # the accumulated load was consumed: nothing to do
    for layer, b in zip(layers, before):
        assert torch.equal(layer.router.selection_bias, b)
    model.eval()
    model(x)  # evaluation does not accumulate load
    update_biases(model)
    for layer, b in zip(layers, before):
        assert torch.equal(layer.router.selection_bias, b)
    assert all(not p.requires_grad for p in [layer.router.selection_bias for layer in layers])


# --- execution options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk-softmax_topk-norm", "expert_choice"])
@pytest.mark.parametrize("capacity", ["dropless", "drop"])
def test_checkpointing_experts_changes_nothing_but_memory(router, capacity):
    results = []
    for ckpt in (False, True):
        moe = make_moe(**ROUTER_CASES[router], **CAPACITY_MODES[capacity], expert_bias=True, checkpoint_experts=ckpt)
        x, _ = inputs_for(moe)
        x = x.requires_grad_()
        y = moe(x)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        results.append((y.detach(), grads_of(moe, x)))
    assert torch.equal(results[0][0], results[1][0])
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name]), name


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_expert_impls_agree_inside_the_layer(impl):
    base = make_moe(capacity_factor=0.75)
    moe = make_moe(capacity_factor=0.75, expert_impl=impl)
    x, _ = inputs_for(moe)
    torch.testing.assert_close(moe(x), base(x), atol=1e-5, rtol=1e-4)


# --- drop-in FFN ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16)], ids=["BSD", "TD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shared", [0, 1])
def test_drop_in_shape_and_dtype(shape, dtype, shared):
    # bf16 keeps 16-byte strides with D = 16, F = 8 so grouped_mm runs in bf16 too
    moe = make_moe(d_model=16, d_ff=8, num_shared_experts=shared, capacity_factor=1.0).to(dtype)
    x = torch.randn(shape).to(dtype).requires_grad_()
    y = moe(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    assert moe.experts.w_in.grad.dtype == dtype


def test_bfloat16_layer_is_close_to_float32():
    moe = make_moe(d_model=16, d_ff=8, num_shared_experts=1)
    x = torch.randn(10, 16)
    y32 = moe(x)
    y16 = moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert moe.last.router_logits.dtype == torch.float32  # router math stays float32 (selective precision)
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.1)


def test_autocast_bfloat16_runs_forward_and_backward():
    moe = make_moe(d_model=16, d_ff=8, num_shared_experts=1)
    x = torch.randn(2, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.shape == x.shape
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and moe.experts.w_in.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "d_model,d_ff,dtype",
    [(6, 3, torch.float32), (8, 2, torch.float32), (8, 4, torch.bfloat16), (12, 6, torch.bfloat16)],
    ids=["f32-6x3", "f32-8x2", "bf16-8x4", "bf16-12x6"],
)
def test_any_width_works(d_model, d_ff, dtype):
    # Widths the grouped_mm kernel cannot take (16-byte strides) must fall back, not fail: fine-grained experts
    # have small d_ff, and d_model is whatever the host model uses.
    moe = make_moe(d_model=d_model, d_ff=d_ff)
    x = torch.randn(2, 5, d_model)
    expected = reference_moe(moe, x, moe.router(x.reshape(-1, d_model)))
    y = moe.to(dtype)(x.to(dtype).requires_grad_())
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.1)
    torch.testing.assert_close(y.float(), expected, **tol)
    y.float().sum().backward()


def test_no_grad_inference():
    moe = make_moe(checkpoint_experts=True, num_shared_experts=1)
    x, _ = inputs_for(moe)
    with torch.no_grad():
        y = moe(x)
    assert not y.requires_grad and y.shape == x.shape
    torch.testing.assert_close(y, moe(x).detach())


def test_empty_batch_and_single_token():
    moe = make_moe(capacity_factor=1.0)
    x = torch.randn(0, D, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, D)
    assert int(moe.last.tokens_per_expert.sum()) == 0
    one = torch.randn(1, 1, D)
    y_ref = reference_moe(moe, one, moe.router(one.reshape(-1, D)))
    torch.testing.assert_close(moe(one), y_ref, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_rejected_with_clear_errors():
    moe = make_moe()
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(2, 3, D), mask=torch.ones(3, 2, dtype=torch.bool))
    hashed = make_moe(router="hash")
    with pytest.raises(ValueError, match="token_ids"):
        hashed(torch.randn(3, D))


# --- scale: cost grows with T*K, never a [T, E, D] tensor ----------------------------------------------------------


def test_many_experts_never_materialise_a_token_by_expert_by_dim_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    T, E_, D_ = 64, 256, 64
    moe = make_moe(d_model=D_, d_ff=8, num_experts=E_, top_k=2)
    x = torch.randn(T, D_, requires_grad=True)
    with LargestTensor() as mode:
        y = moe(x)
        y.sum().backward()
    # the largest legitimate tensors are the stacked weights and their grads, [E, D, 2F] = T*E*D / 4
    assert mode.largest <= E_ * D_ * 2 * 8 < T * E_ * D_ // 2
    assert int(moe.last.tokens_per_expert.sum()) == T * 2
    with torch.no_grad():  # token by token: y_t = sum_k w_tk * expert_{e_tk}(x_t)
        route = moe.router(x)
        rows = []
        for t in range(T):
            slots = zip(route.weights[t], route.indices[t])
            rows.append(sum(w * moe.experts.expert_forward(int(e), x[t : t + 1])[0] for w, e in slots))
        expected = torch.stack(rows)
    torch.testing.assert_close(y.detach(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("router", ["topk", "top_p", "deepseek"])
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 12])
def test_decode_path_for_few_tokens_matches_the_dispatch_path(activation, router, num_tokens):
    kw = dict(n_group=2, topk_group=1, score_func="sigmoid") if router == "deepseek" else {}
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, router=router, activation=activation,
                    expert_bias=True, num_shared_experts=1, **kw)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(num_tokens, 16)
    y_dispatch = moe(x)  # grad mode: the sort/grouped path
    stats_dispatch = moe.last
    with torch.no_grad():
        y_decode = moe(x)  # inference with T*K <= 16 slots: the direct decode path
    torch.testing.assert_close(y_decode, y_dispatch.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(moe.last.tokens_per_expert, stats_dispatch.tokens_per_expert)
