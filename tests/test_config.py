"""MoEConfig: validated at construction, with errors that name the bad value; and the MoE layer's input checks."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.config import ACTIVATIONS, EXPERT_IMPLS, OVERFLOW_POLICIES, ROUTERS, SCORE_FUNCS, SOFTMAX_ORDERS


def test_defaults_are_a_valid_mixtral_style_layer():
    cfg = MoEConfig()
    assert (cfg.router, cfg.activation, cfg.top_k, cfg.capacity_factor) == ("topk", "swiglu", 2, None)
    assert cfg.gated


def test_top_k_larger_than_num_experts_is_rejected_naming_both():
    with pytest.raises(ValueError, match=r"top_k=9.*num_experts=8"):
        MoEConfig(num_experts=8, top_k=9)


def test_top_k_equal_to_num_experts_is_allowed():
    assert MoEConfig(num_experts=4, top_k=4).top_k == 4


@pytest.mark.parametrize(
    "field, allowed",
    [
        ("router", ROUTERS),
        ("activation", ACTIVATIONS),
        ("softmax_order", SOFTMAX_ORDERS),
        ("score_func", SCORE_FUNCS),
        ("overflow", OVERFLOW_POLICIES),
        ("expert_impl", EXPERT_IMPLS),
    ],
)
def test_unknown_names_are_rejected_listing_the_allowed_values(field, allowed):
    with pytest.raises(ValueError) as info:
        MoEConfig(**{field: "bogus_name"})
    message = str(info.value)
    assert field in message and "'bogus_name'" in message
    for name in allowed:
        assert repr(name) in message


@pytest.mark.parametrize("field, allowed", [("router", ROUTERS), ("activation", ACTIVATIONS)])
def test_every_listed_name_is_accepted(field, allowed):
    for name in allowed:
        extra = dict(n_group=2, topk_group=1) if name in ("deepseek", "hierarchical") else {}
        assert getattr(MoEConfig(**{field: name}, **extra), field) == name


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "1.0", True])
def test_capacity_factor_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=re.escape(f"capacity_factor must be None (dropless) or a number > 0, got {bad!r}")):
        MoEConfig(capacity_factor=bad)


@pytest.mark.parametrize("good", [None, 0.5, 1, 1.25])
def test_capacity_factor_accepts_none_and_positive_numbers(good):
    assert MoEConfig(capacity_factor=good).capacity_factor == good


@pytest.mark.parametrize(
    "field", ["aux_loss_coef", "cv2_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "noise_eps", "bias_update_rate",
              "sparsemixer_eps", "input_jitter_eps"]
)
@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_negative_or_non_finite_coefficients_are_rejected_naming_them(field, bad):
    extra = dict(selection_bias=True) if field == "bias_update_rate" else {}
    with pytest.raises(ValueError, match=re.escape(f"{field} must be a finite number >= 0, got {bad!r}")):
        MoEConfig(**{field: bad}, **extra)


@pytest.mark.parametrize("field", ["d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group", "min_capacity"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_sizes_must_be_positive_integers(field, bad):
    with pytest.raises(ValueError, match=re.escape(f"{field} must be a positive integer, got {bad!r}")):
        MoEConfig(**{field: bad})


@pytest.mark.parametrize("router", ["deepseek", "hierarchical"])
def test_num_experts_must_divide_into_groups(router):
    with pytest.raises(ValueError, match=r"num_experts=10.*n_group=4"):
        MoEConfig(router=router, num_experts=10, n_group=4, score_func="softmax")


@pytest.mark.parametrize("router", ["deepseek", "hierarchical"])
def test_topk_group_cannot_exceed_n_group(router):
    with pytest.raises(ValueError, match=r"topk_group=3.*n_group=2"):
        MoEConfig(router=router, num_experts=8, n_group=2, topk_group=3)


def test_top_k_must_fit_in_the_reachable_groups():
    # 16 experts in 8 groups of 2, a token may use 1 group: at most 2 experts reachable.
    with pytest.raises(ValueError, match=r"top_k=3"):
        MoEConfig(router="deepseek", num_experts=16, n_group=8, topk_group=1, top_k=3)


def test_deepseek_sigmoid_groups_need_two_experts_each():
    with pytest.raises(ValueError, match="top-2"):
        MoEConfig(router="deepseek", score_func="sigmoid", num_experts=4, n_group=4, topk_group=4, top_k=1)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_top_p_must_lie_in_zero_one(bad):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        MoEConfig(router="top_p", top_p=bad)


def test_top_p_of_exactly_one_is_allowed():
    assert MoEConfig(router="top_p", top_p=1.0).top_p == 1.0


def test_bias_update_rate_needs_a_selection_bias():
    with pytest.raises(ValueError, match="selection_bias"):
        MoEConfig(bias_update_rate=1e-3)
    assert MoEConfig(bias_update_rate=1e-3, selection_bias=True).bias_update_rate == 1e-3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "2", True])
def test_topk_norm_p_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=re.escape(f"topk_norm_p must be a finite number > 0, got {bad!r}")):
        MoEConfig(topk_norm_p=bad)


def test_input_jitter_must_keep_the_factor_positive():
    with pytest.raises(ValueError, match="input_jitter_eps must be < 1"):
        MoEConfig(input_jitter_eps=1.0)


@pytest.mark.parametrize("router", ["hash", "expert_choice", "sparsemixer"])
def test_selection_bias_is_refused_where_it_cannot_act(router):
    with pytest.raises(ValueError, match=router):
        MoEConfig(router=router, selection_bias=True)


def test_reroute_does_not_apply_to_expert_choice_with_capacity():
    with pytest.raises(ValueError, match="reroute"):
        MoEConfig(router="expert_choice", overflow="reroute", capacity_factor=1.0)


@pytest.mark.parametrize("bad", [0.0, -2.5, float("nan"), float("inf"), "2.5", None])
def test_routed_scaling_factor_must_be_a_finite_positive_number(bad):
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        MoEConfig(router="deepseek", routed_scaling_factor=bad)


@pytest.mark.parametrize("bad", ["0.5", None])
def test_a_non_numeric_top_p_is_a_value_error_naming_top_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        MoEConfig(router="top_p", top_p=bad)


def test_shared_expert_sizes_are_validated():
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoEConfig(num_shared_experts=-1)
    with pytest.raises(ValueError, match="shared_d_ff"):
        MoEConfig(num_shared_experts=1, shared_d_ff=0)


# --------------------------------------------------------------------------------------------------------------------
# dict round trip
# --------------------------------------------------------------------------------------------------------------------


@given(
    router=st.sampled_from(["topk", "noisy_topk", "top_p", "deepseek"]),
    num_experts=st.sampled_from([4, 8, 16]),
    top_k=st.integers(1, 4),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 4.0)),
    aux_loss_coef=st.floats(0.0, 1.0),
    activation=st.sampled_from(ACTIVATIONS),
    selection_bias=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_to_dict_from_dict_round_trips(router, num_experts, top_k, capacity_factor, aux_loss_coef, activation,
                                       selection_bias):
    cfg = MoEConfig(router=router, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                    aux_loss_coef=aux_loss_coef, activation=activation, selection_bias=selection_bias)
    data = cfg.to_dict()
    assert isinstance(data, dict) and data["num_experts"] == num_experts
    assert MoEConfig.from_dict(data) == cfg


def test_from_dict_rejects_an_unknown_field_naming_it():
    data = MoEConfig().to_dict()
    data["num_expert"] = 8
    with pytest.raises(ValueError, match="num_expert"):
        MoEConfig.from_dict(data)


def test_from_dict_validates_values_too():
    with pytest.raises(ValueError, match="top_k=9"):
        MoEConfig.from_dict({"num_experts": 8, "top_k": 9})


# --------------------------------------------------------------------------------------------------------------------
# MoE input checks
# --------------------------------------------------------------------------------------------------------------------


def small_moe(**overrides) -> MoE:
    fields = dict(d_model=8, d_ff=4, num_experts=4, top_k=2)
    fields.update(overrides)
    return MoE(MoEConfig(**fields))


def test_moe_rejects_a_hidden_size_mismatch_naming_shape_and_expected_size():
    with pytest.raises(ValueError, match=r"\(2, 3, 7\).*8"):
        small_moe()(torch.randn(2, 3, 7))


def test_moe_rejects_inputs_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\(8,\)"):
        small_moe()(torch.randn(8))


def test_moe_rejects_integer_inputs_with_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        small_moe()(torch.ones(2, 3, 8, dtype=torch.long))


@pytest.mark.parametrize("name", ["token_ids", "mask"])
def test_moe_rejects_token_ids_or_mask_of_the_wrong_shape(name):
    moe = small_moe(router="hash") if name == "token_ids" else small_moe()
    bad = torch.ones(2, 4, dtype=torch.long) if name == "token_ids" else torch.ones(2, 4, dtype=torch.bool)
    ok_ids = {"token_ids": torch.ones(2, 3, dtype=torch.long)} if name == "mask" else {}
    with pytest.raises(ValueError, match=rf"{name} has shape \(2, 4\), expected \(2, 3\)"):
        moe(torch.randn(2, 3, 8), **{name: bad}, **ok_ids)


def test_moe_accepts_both_3d_and_2d_inputs_and_keeps_their_shape():
    moe = small_moe()
    assert moe(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert moe(torch.randn(5, 8)).shape == (5, 8)


def test_swiglu_oai_constants_are_validated_and_default_to_gpt_oss():
    cfg = MoEConfig(activation="swiglu_oai")
    assert cfg.gated and (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0)
    for name in ("swiglu_alpha", "swiglu_limit"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            MoEConfig(activation="swiglu_oai", **{name: 0.0})


def test_swiglu_oai_matches_its_formula_in_every_expert_path():
    from moekit.layers.experts import Experts

    torch.manual_seed(0)
    experts = Experts(2, 8, 4, "swiglu_oai", bias=True, swiglu_alpha=1.5, swiglu_limit=0.5)
    with torch.no_grad():
        experts.w_in.mul_(4.0)  # push some pre-activations past the limit
        experts.b_in.normal_()
    x = torch.randn(5, 8)
    h = x @ experts.w_in[1] + experts.b_in[1]
    gate, up = h[:, :4].clamp(max=0.5), h[:, 4:].clamp(-0.5, 0.5)
    want = ((up + 1) * gate * torch.sigmoid(1.5 * gate)) @ experts.w_out[1] + experts.b_out[1]
    assert (h.abs() > 0.5).any()
    torch.testing.assert_close(experts.expert_forward(1, x), want)
    torch.testing.assert_close(experts(x, torch.tensor([0, 5]))[:5], want)
