"""Multi-head latent attention: its config, the latent KV cache (chunked = whole, with padding), training."""

import math

import pytest
import torch

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.layers.mla import mla_softmax_scale, yarn_mscale
from moekit.models.lm import MoELM

MLA = MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def tiny(**changes) -> MoELM:
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, router="deepseek", score_func="sigmoid",
                    n_group=2, topk_group=1, num_shared_experts=1)  # fmt: skip
    torch.manual_seed(0)
    return MoELM(ModelConfig(**{**dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mla=MLA,
                                       moe=moe), **changes}))  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [({"kv_lora_rank": 0}, "kv_lora_rank"), ({"qk_rope_head_dim": 3}, "even"), ({"q_lora_rank": -1}, "q_lora_rank"),
     ({"latent_norm_eps": 0.0}, "latent_norm_eps")],
)
def test_mla_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        MLAConfig(**{**MLA.__dict__, **change})


def test_model_config_round_trips_mla_and_sizes_rope_by_the_rotary_dims():
    cfg = tiny().config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.rope_dim == 4
    assert tiny().rope_cos.shape == (32, 4)
    with pytest.raises(ValueError, match="unknown MLAConfig"):
        ModelConfig.from_dict({**cfg.to_dict(), "mla": {**cfg.to_dict()["mla"], "rank": 3}})


def test_softmax_scale_takes_yarn_mscale_all_dim_squared():
    assert mla_softmax_scale(12, None) == 12**-0.5
    yarn = {"rope_type": "yarn", "factor": 40.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}
    mscale = 0.1 * 0.707 * math.log(40.0) + 1
    assert mla_softmax_scale(12, yarn) == pytest.approx(12**-0.5 * mscale**2)
    assert yarn_mscale(1.0, 5.0) == 1.0 and mla_softmax_scale(12, {**yarn, "mscale_all_dim": 0}) == 12**-0.5


@torch.no_grad()
def test_chunked_decoding_over_the_latent_cache_equals_one_pass_with_padding():
    model = tiny().eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    whole = model(ids, mask=mask).logits
    cache = model.new_cache(2, 12)
    parts = [model(ids[:, :5], cache=cache, mask=mask[:, :5]).logits]
    parts += [model(ids[:, i : i + 1], cache=cache, start_pos=i, mask=mask[:, i : i + 1]).logits for i in range(5, 9)]
    assert torch.allclose(torch.cat(parts, dim=1)[mask], whole[mask], atol=1e-5)


def test_trains_every_mla_parameter():
    model = tiny()
    ids = torch.randint(0, 61, (2, 8))
    model(ids, targets=ids).loss.backward()
    attn = model.blocks[0].attn
    for p in (attn.q_a_proj.weight, attn.q_b_proj.weight, attn.kv_a_proj.weight, attn.kv_b_proj.weight,
              attn.kv_a_norm.weight, attn.o_proj.weight):  # fmt: skip
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_absorbed_decoding_equals_the_plain_form_step_by_step(q_lora_rank):
    """Decoding without autograd folds W_UK / W_UV around the attention (`_absorbed`); with autograd the same calls
    decompress the cache (the plain form): same logits for a 3-token chunk and single tokens over a cached prefix."""
    mla = MLAConfig(**{**MLA.__dict__, "q_lora_rank": q_lora_rank})
    model = tiny(mla=mla).eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    chunks = [(0, 4), (4, 7), (7, 8), (8, 9), (9, 10)]
    logits = {}
    for absorbed in (True, False):
        cache = model.new_cache(2, 12)
        with torch.set_grad_enabled(not absorbed):
            logits[absorbed] = torch.cat(
                [model(ids[:, a:b], cache=cache, start_pos=a).logits.detach() for a, b in chunks], dim=1
            )
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    from moekit.layers.mla import MultiHeadLatentAttention

    calls = []
    original = MultiHeadLatentAttention._absorbed
    MultiHeadLatentAttention._absorbed = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        with torch.no_grad():
            cache = model.new_cache(2, 12)
            model(ids[:, :4], cache=cache)  # a prefill: the plain form
            assert not calls
            model(ids[:, 4:5], cache=cache, start_pos=4)
            assert len(calls) == len(model.blocks)  # a decoding step: the absorbed form in every layer
            long_ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(3))
            model(long_ids, cache=model.new_cache(2, 30), start_pos=0)
            cache = model.new_cache(2, 30)
            model(ids[:, :4], cache=cache)
            model(long_ids, cache=cache, start_pos=4)  # 17 new tokens over a prefix: past the absorbed form's limit
            assert len(calls) == len(model.blocks)
    finally:
        MultiHeadLatentAttention._absorbed = original


def test_causal_mla_attention_runs_the_attention_kernel_and_equals_sdpa(fused_kernels, no_kernels, monkeypatch):
    from moekit.layers import attention, kernels

    calls = []
    real_apply = attention._CausalAttention.apply
    monkeypatch.setattr(attention._CausalAttention, "apply", lambda *args: calls.append(1) or real_apply(*args))

    def run():
        model = tiny()
        ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
        loss = model(ids, targets=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    kernels._module = fused_kernels  # the fixture `no_kernels` restores the previous state afterwards
    loss, grads = run()
    assert len(calls) == 2  # both layers' attention (v of 6 dims, q/k of 12) took the kernel
    kernels._module = None
    ref_loss, ref_grads = run()  # SDPA
    assert len(calls) == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
