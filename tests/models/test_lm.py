"""MoELM: shapes, causality, the KV cache, layer placement, losses, init, config, and logits equal to transformers'
MixtralForCausalLM with the same weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moekit import MoE, MoEConfig, MoELM, ModelConfig
from moekit.layers.attention import apply_rope, attention_mask, rope_tables
from moekit.layers.experts import FFN
from moekit.presets import PRESETS, get_preset, list_presets
from moekit.hf.mixtral import mixtral_config_kwargs, mixtral_state_dict

TINY = list_presets()
DROPLESS = [name for name in TINY if (get_preset(name).moe is None or get_preset(name).moe.capacity_factor is None)]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""


def small(name: str, moe_changes: dict | None = None, **changes) -> ModelConfig:
    """A preset shrunk 4x in width for fast tests (same structure: routers, experts, layer placement, GQA)."""
    cfg = get_preset(name)
    moe = cfg.moe and dataclasses.replace(cfg.moe, d_model=64, d_ff=cfg.moe.d_ff // 4, **(moe_changes or {}))
    return dataclasses.replace(
        cfg, vocab_size=97, max_seq_len=32, d_model=64, dense_d_ff=cfg.dense_d_ff // 4, moe=moe, **changes
    )


def model_of(cfg: ModelConfig, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(cfg)


def tokens(B: int, S: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


# --- presets and shapes ---


def test_tiny_presets_exist_and_the_dense_baseline_matches_the_moe_presets_active_params():
    assert set(TINY) == {"tiny-dense", "tiny-mixtral", "tiny-switch", "tiny-deepseek"}
    active = {name: MoELM(get_preset(name)).active_params() for name in TINY}
    dense = active["tiny-dense"]
    for name in TINY:  # only the routers' few thousand weights differ
        assert abs(active[name] - dense) / dense < 0.005, (name, active[name], dense)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="tiny-mixtral") as info:
        get_preset("tiny-nope")
    assert "mixtral-8x7b" in str(info.value)


def test_famous_presets_still_come_back_as_config_dicts():
    assert get_preset("mixtral-8x7b") == PRESETS["mixtral-8x7b"]
    assert isinstance(get_preset("tiny-mixtral"), ModelConfig)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_losses(name):
    model = model_of(small(name))
    ids = tokens(2, 9)
    out = model(ids)
    assert out.logits.shape == (2, 9, 97) and out.loss is None and out.ce_loss is None
    assert out.aux_loss.dim() == 0
    out = model(ids, targets=tokens(2, 9, seed=2))
    assert out.loss.dim() == 0 and torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    assert math.isfinite(out.loss.item())
    assert len(model.moe_stats()) == sum(b.is_moe for b in model.blocks)


def test_ignored_targets_do_not_count_in_the_cross_entropy():
    model = model_of(small("tiny-dense"))
    ids, targets = tokens(1, 8), tokens(1, 8, seed=3)
    partial = targets.clone()
    partial[:, 4:] = -100
    expected = torch.nn.functional.cross_entropy(model(ids).logits[0, :4], targets[0, :4])
    assert torch.allclose(model(ids, targets=partial).ce_loss, expected, atol=1e-6)


# --- causality and the KV cache ---


@pytest.mark.parametrize("name", DROPLESS)
def test_changing_future_tokens_does_not_change_past_logits(name):
    model = model_of(small(name)).eval()
    ids = tokens(3, 16)
    changed = ids.clone()
    changed[:, 10:] = tokens(3, 6, seed=7)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_switch_capacity_is_causal_within_one_sequence_but_couples_the_rows_of_a_batch():
    """Capacity C = ceil(1.25 * T / E) depends on the batch, and earlier tokens (in flattened batch order) take
    the slots first. One sequence alone stays causal (its earlier tokens' drops do not depend on later ones);
    in a batch, a row's early tokens can be dropped because of another row's tokens, future ones included."""
    torch.manual_seed(0)
    model = model_of(small("tiny-switch", moe_changes=dict(capacity_factor=0.5)))
    model.eval()
    ids = tokens(2, 16)
    changed = ids.clone()
    changed[:, 10:] = tokens(2, 6, seed=7)
    with torch.no_grad():
        a, b = model(ids[:1]).logits, model(changed[:1]).logits
        torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
        assert all(int(s.dropped) > 0 for s in model.moe_stats())
        alone = model(ids[1:]).logits
        together = model(ids).logits[1:]
    assert not torch.allclose(alone, together, atol=1e-4)  # row 1 is dropped differently next to row 0


def _cache_config(name: str) -> ModelConfig:
    moe = get_preset(name).moe
    if moe is not None and moe.capacity_factor is not None:
        # Decoding routes one token per step (capacity >= 1, nothing dropped); the full forward drops where
        # capacity binds. They agree where the full forward drops nothing: capacity >= T.
        return small(name, moe_changes=dict(capacity_factor=float(moe.num_experts)))
    return small(name)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_token_by_token_and_chunked_equals_the_full_forward(name):
    model = model_of(_cache_config(name)).eval()
    ids = tokens(2, 14)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20)
        steps = torch.cat([model(ids[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(14)], dim=1)
        cache = model.new_cache(2, 14)
        chunks = torch.cat(
            [model(ids[:, a:b], cache=cache, start_pos=a).logits for a, b in ((0, 5), (5, 6), (6, 11), (11, 14))],
            dim=1,
        )
    assert (steps - full).abs().max() < 1e-5
    assert (chunks - full).abs().max() < 1e-5


def test_padding_mask_keeps_left_padding_out_of_attention_and_routing():
    model = model_of(small("tiny-mixtral")).eval()
    ids = tokens(1, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        alone = model(ids).logits
        with_pad = model(padded, mask=mask).logits[:, 3:]
        stats = model.moe_stats()
        cache = model.new_cache(1, 9)
        model(padded[:, :5], cache=cache, mask=mask[:, :5])
        step = model(padded[:, 5:], cache=cache, start_pos=5).logits  # the cache remembers the padding
    # RoPE is relative: shifting every real token by 3 positions leaves attention scores unchanged.
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(step, alone[:, 2:], atol=1e-5, rtol=0)
    assert all(int(s.tokens_per_expert.sum()) == 6 * 2 for s in stats)


def test_attention_mask_is_none_when_sdpa_can_do_it_alone():
    assert attention_mask(5, 5, None, "cpu") is None  # causal over the chunk
    assert attention_mask(1, 9, None, "cpu") is None  # one new token sees every key
    mask = attention_mask(2, 4, None, "cpu")
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_cache_and_positions_are_checked():
    model = model_of(small("tiny-dense"))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(tokens(1, 33))
    with pytest.raises(ValueError, match="max_len=8"):
        model(tokens(1, 4), cache=model.new_cache(1, 8), start_pos=6)
    with pytest.raises(ValueError, match="batch size 2"):
        model(tokens(1, 4), cache=model.new_cache(2, 8))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        model.new_cache(1, 64)


# --- layer placement ---


def test_first_k_dense_and_moe_every_place_moe_layers():
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2)
    cfg = ModelConfig(
        vocab_size=50, d_model=32, n_layers=7, n_heads=2, dense_d_ff=24, moe=moe, first_k_dense=1, moe_every=2
    )
    assert [cfg.is_moe_layer(i) for i in range(7)] == [False, True, False, True, False, True, False]
    model = MoELM(cfg)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [cfg.is_moe_layer(i) for i in range(7)]
    assert all(isinstance(b.ffn, FFN) for b in model.blocks if not b.is_moe)
    assert not any(ModelConfig(d_model=32, n_heads=2).is_moe_layer(i) for i in range(4))
    deepseek = get_preset("tiny-deepseek")
    assert [deepseek.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_dense_layers_place_dense_layers_anywhere():
    cfg = dataclasses.replace(small("tiny-mixtral"), dense_layers=(3, 1))
    assert cfg.dense_layers == [1, 3] and [cfg.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    model = MoELM(cfg)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [True, False, True, False]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# --- attention variants (HF families) ---


def _variant(**changes) -> ModelConfig:
    return dataclasses.replace(small("tiny-mixtral"), **changes)


@torch.no_grad()
def _perturbed(cfg: ModelConfig) -> MoELM:
    """A model whose biases, norms and sinks are non-trivial (init leaves them 0 or 1)."""
    model = model_of(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith(("bias", "norm.weight", "sinks")):
            p.add_(torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize(
    "changes",
    [
        dict(qkv_bias=True, o_bias=True, attn_sinks=True, sliding_window=3, window_layers=[0, 2]),
        dict(qk_norm="head", clip_qkv=0.5, sliding_window=4),
        dict(qk_norm="proj", attn_sinks=True),
        dict(norm="layernorm", norm_bias=True, lm_head_bias=True, qkv_bias=True, o_bias=True),
        dict(norm="layernorm", embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.02,
             logits_scaling=6.0),
    ],
    ids=str,
)
def test_attention_variants_decode_with_the_cache_like_the_full_forward(changes):
    model = _perturbed(_variant(**changes))
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 12)
        chunks = [model(ids[:, :5], cache=cache).logits]
        chunks += [model(ids[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(5, 12)]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_granite_constants_equal_the_same_scalings_folded_into_the_weights():
    """embedding_multiplier, residual_multiplier, attention_multiplier and logits_scaling do exactly what their names
    say: each equals a plain model whose weights carry the same factor."""
    e, r, a, s = 3.0, 0.5, 0.05, 4.0
    plain = _perturbed(_variant(tie_embeddings=False, qkv_bias=True, o_bias=True))
    scaled = model_of(_variant(tie_embeddings=False, qkv_bias=True, o_bias=True, embedding_multiplier=e,
                               residual_multiplier=r, attention_multiplier=a, logits_scaling=s))  # fmt: skip
    scaled.load_state_dict(plain.state_dict())
    scaled.eval()
    H, X = plain.config.n_heads, plain.config.head_size
    plain.embed.weight.mul_(e)
    for block in plain.blocks:
        block.attn.qkv_proj.weight[: H * X].mul_(a * math.sqrt(X))  # q . k * a == (q a sqrt(X)) . k / sqrt(X)
        block.attn.qkv_proj.bias[: H * X].mul_(a * math.sqrt(X))
        block.attn.o_proj.weight.mul_(r)
        block.attn.o_proj.bias.mul_(r)
        block.ffn.experts.w_out.mul_(r)
    plain.lm_head.weight.div_(s)
    ids = tokens(2, 10)
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_layernorm_and_head_bias_are_parameters_initialised_like_torchs():
    model = model_of(_variant(norm="layernorm", norm_bias=True, lm_head_bias=True, tie_embeddings=False))
    assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.blocks[0].attn_norm, torch.nn.LayerNorm)
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.norm.bias, torch.zeros(64))
    assert model.lm_head.bias.shape == (97,) and torch.equal(model.lm_head.bias, torch.zeros(97))
    no_bias = model_of(_variant(norm="layernorm"))
    assert no_bias.norm.bias is None and no_bias.lm_head.bias is None
    extra = 2 * 64 * (2 * no_bias.config.n_layers + 1) - 64 * (2 * no_bias.config.n_layers + 1) + 97
    assert model.num_params() - no_bias.num_params() == extra + 97 * 64  # + the untied head
    model.lm_head.bias.normal_()
    ids = tokens(1, 5)
    hidden = model.hidden_states(ids)
    torch.testing.assert_close(model(ids).logits, hidden @ model.lm_head.weight.T + model.lm_head.bias)


@torch.no_grad()
def test_longrope_past_the_original_context_runs_the_whole_forward_with_the_long_factors():
    X = 16  # head_dim of the small tiny-mixtral
    short, long = [1.0 + 0.1 * i for i in range(X // 2)], [2.0 + 0.5 * i for i in range(X // 2)]
    base = dict(rope_type="longrope", original_max_position_embeddings=12, short_mscale=1.1, long_mscale=1.3)
    both = _perturbed(_variant(rope_scaling=dict(base, short_factor=short, long_factor=long)))
    assert both.rope_cos.shape[0] == 12 and both.rope_cos_long.shape[0] == 32
    only_short = model_of(_variant(rope_scaling=dict(base, short_factor=short, long_factor=short,
                                                     long_mscale=1.1))).eval()  # fmt: skip
    only_long = model_of(_variant(rope_scaling=dict(base, short_factor=long, long_factor=long,
                                                    short_mscale=1.3))).eval()  # fmt: skip
    for other in (only_short, only_long):
        other.load_state_dict(both.state_dict())
    ids = tokens(2, 20)
    torch.testing.assert_close(both(ids[:, :12]).logits, only_short(ids[:, :12]).logits)
    torch.testing.assert_close(both(ids).logits, only_long(ids).logits)
    assert (both(ids).logits[:, :12] - both(ids[:, :12]).logits).abs().max() > 1e-3  # the switch is real
    assert model_of(_variant(max_seq_len=12, rope_scaling=dict(base, short_factor=short,
                                                               long_factor=long))).rope_cos_long is None  # fmt: skip


def test_sinks_at_minus_infinity_are_plain_attention_and_padding_stays_out():
    plain = _perturbed(_variant(qkv_bias=True))
    sinks = model_of(_variant(qkv_bias=True, attn_sinks=True)).eval()
    sinks.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for block in sinks.blocks:
            block.attn.sinks.fill_(-float("inf"))
        ids = tokens(1, 6)
        assert (sinks(ids).logits - plain(ids).logits).abs().max() < 1e-5
        for block in sinks.blocks:
            block.attn.sinks.fill_(0.5)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        mask = torch.tensor([[False] * 3 + [True] * 6])
        torch.testing.assert_close(sinks(padded, mask=mask).logits[:, 3:], sinks(ids).logits, atol=1e-5, rtol=0)


def test_sliding_window_mask_limits_each_query_to_its_last_w_keys():
    mask = attention_mask(3, 6, None, "cpu", window=2)
    assert mask.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False],
                             [False, False, False, False, True, True]]  # fmt: skip
    assert attention_mask(5, 5, None, "cpu", window=5) is None  # the window reaches every key
    assert attention_mask(1, 9, None, "cpu", window=4)[0].tolist() == [False] * 5 + [True] * 4


# --- training signal ---


def test_loss_decreases_when_overfitting_a_tiny_batch():
    model = model_of(small("tiny-mixtral"))
    ids = tokens(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_aux_loss_is_in_the_loss_and_reaches_the_routers():
    model = model_of(small("tiny-mixtral"))
    ids = tokens(2, 12)
    out = model(ids, targets=ids)
    assert out.aux_loss.item() > 0
    expected = sum(s.aux_loss for s in model.moe_stats())
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    for block in model.blocks:
        assert block.ffn.router.weight.grad is not None and block.ffn.router.weight.grad.abs().sum() > 0


def test_hash_router_gets_the_token_ids():
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=1, router="hash")
    model = MoELM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, dense_d_ff=24, moe=moe))
    ids = torch.full((1, 6), 7)
    model(ids)
    assert all(int((s.tokens_per_expert > 0).sum()) == 1 for s in model.moe_stats())  # one id, one expert


def test_init_follows_gpt2():
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=8, n_heads=4, dense_d_ff=256, init_std=0.02,
                      moe=MoEConfig(d_model=128, d_ff=64, num_experts=8, top_k=2), first_k_dense=1)
    model = model_of(cfg)
    out_std = 0.02 / math.sqrt(16)
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.qkv_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - out_std) < 0.001
    assert abs(model.blocks[0].ffn.w_out.weight.std().item() - out_std) < 0.001
    moe = model.blocks[1].ffn
    assert abs(moe.router.weight.std().item() - 0.02) < 0.003
    assert abs(moe.experts.w_in.std().item() - 0.02) < 0.002
    assert abs(moe.experts.w_out.std().item() - out_std) < 0.001
    assert moe.experts.w_in.shape == (8, 128, 128) and moe.experts.w_out.shape == (8, 64, 128)
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_tied_embeddings_share_one_tensor_counted_once():
    tied = MoELM(small("tiny-dense"))
    untied = MoELM(small("tiny-dense", tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


def test_param_counts_and_flops():
    model = MoELM(get_preset("tiny-mixtral"))
    d, E, k, f, L = 256, 8, 2, 384, 4
    routed = L * E * 3 * d * f
    assert model.active_params() == model.num_params() - routed + routed * k // E
    matrices = 4096 * d + L * (d * 8 * 64 + 4 * 64 * d + E * d) + L * k * 3 * d * f  # head, attention, routers, experts
    assert model.flops_per_token(128) == 2 * matrices + 2 * L * 128 * 4 * 64 * 2


# --- config ---


def test_model_config_round_trips_through_a_dict():
    for name in TINY:
        cfg = get_preset(name)
        data = cfg.to_dict()
        assert ModelConfig.from_dict(data) == cfg
        assert (data["moe"] is None) == (cfg.moe is None)


def test_model_config_from_dict_rejects_unknown_keys_here_and_in_moe():
    data = get_preset("tiny-mixtral").to_dict()
    with pytest.raises(ValueError, match="n_experts"):
        ModelConfig.from_dict({**data, "n_experts": 3})
    data["moe"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(n_heads=3), "d_model=256 is not divisible by n_heads=3"),
        (dict(n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
        (dict(head_dim=33), "head_dim=33 must be even"),
        (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0, got -1.0"),
        (dict(norm_eps=0), "norm_eps must be a finite number > 0, got 0"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(first_k_dense=5), r"first_k_dense must be an integer in \[0, n_layers=4\], got 5"),
        (dict(first_k_dense=4), "no layer is MoE"),
        (dict(moe_every=0), "moe_every must be a positive integer, got 0"),
        (dict(moe=MoEConfig(d_model=128)), "moe.d_model=128 must equal d_model=256"),
        (dict(tie_embeddings="yes"), "tie_embeddings must be a bool"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer, got 2.5"),
        (dict(qk_norm="layer"), "unknown qk_norm 'layer'"),
        (dict(clip_qkv=0.0), "clip_qkv must be None or a finite number > 0, got 0.0"),
        (dict(sliding_window=0), "sliding_window must be a positive integer, got 0"),
        (dict(window_layers=[0]), "window_layers is set but sliding_window is None"),
        (dict(sliding_window=4, window_layers=[4]), r"window_layers must be a list of layer indices in \[0, n_layers"),
        (dict(dense_layers=[1, 1]), "dense_layers lists a layer twice"),
        (dict(dense_layers=[0, 1, 2, 3]), "no layer is MoE"),
        (dict(dense_layers=[0], first_k_dense=1), "leave first_k_dense=0 and moe_every=1"),
        (dict(attn_sinks=1), "attn_sinks must be a bool"),
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'"),
        (dict(norm_bias=True), "norm_bias=True needs norm='layernorm'"),
        (dict(lm_head_bias=1), "lm_head_bias must be a bool"),
        (dict(embedding_multiplier=0.0), "embedding_multiplier must be a finite number > 0, got 0.0"),
        (dict(residual_multiplier=float("inf")), "residual_multiplier must be a finite number > 0"),
        (dict(logits_scaling=-6.0), "logits_scaling must be a finite number > 0, got -6.0"),
        (dict(attention_multiplier=0), "attention_multiplier must be None or a finite number > 0, got 0"),
    ],
)
def test_model_config_errors_name_the_bad_value(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(get_preset("tiny-mixtral"), **changes)


def test_derived_head_sizes_follow_replace():
    cfg = dataclasses.replace(get_preset("tiny-dense"), n_heads=8, n_kv_heads=None)
    assert (cfg.head_size, cfg.kv_heads) == (32, 8)


# --- against the reference implementation ---


def test_rope_matches_transformers_rotate_half_convention():
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    cos, sin = rope_tables(10, 8, 10000.0)
    q, k = torch.randn(2, 10, 3, 8), torch.randn(2, 10, 1, 8)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q.transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k.transpose(1, 2), atol=0, rtol=0)


def to_hf_mixtral(model: MoELM):
    """The same network as a transformers MixtralForCausalLM, weights copied (Mixtral-shaped configs only)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf = MixtralForCausalLM(MixtralConfig(**mixtral_config_kwargs(model))).eval()
    missing, unexpected = hf.load_state_dict(mixtral_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.config.moe.d_ff == hf.model.layers[0].mlp.experts.intermediate_dim
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers_mixtral_with_the_same_weights(tie):
    # A larger init std than training uses gives logits of order 10 and peaked routing; random norm weights
    # make a swapped or misplaced norm visible.
    cfg = dataclasses.replace(get_preset("tiny-mixtral"), vocab_size=300, tie_embeddings=tie, init_std=0.1)
    model = model_of(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf = to_hf_mixtral(model)
    ids = tokens(2, 24, vocab=300)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    with torch.no_grad():  # and step by step through both caches
        ours_next = model.generate(ids[:, :8], 6, greedy=True)
        theirs_next = hf.generate(ids[:, :8], do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(ours_next, theirs_next)
