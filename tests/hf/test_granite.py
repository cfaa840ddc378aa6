"""GraniteMoe and GraniteMoeShared: the embedding / residual / attention / logit multipliers, top-k-then-softmax
routing, fused expert tensors, the shared MLP; logits, greedy generation and export against transformers on the same
weights; strict loading."""

import json

import pytest
import torch

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, edit_checkpoint, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GraniteMoeConfig, GraniteMoeForCausalLM, GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM,
)  # fmt: skip

CONSTANTS = dict(embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_granite(tmp_path, shared: bool = False, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **CONSTANTS)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    if shared:
        hf = GraniteMoeSharedForCausalLM(GraniteMoeSharedConfig(**{"shared_intermediate_size": 12, **kwargs}))
    else:
        hf = GraniteMoeForCausalLM(GraniteMoeConfig(**kwargs))
    randomize(hf.eval())
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    (False, {}),
    (False, {"attention_bias": True, "tie_word_embeddings": True}),
    (True, {}),
    (True, {"shared_intermediate_size": 0, "num_experts_per_tok": 3}),
]


@pytest.mark.parametrize("shared, overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, shared, overrides):
    hf, folder = tiny_granite(tmp_path, shared, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert model.hf_model_type == ("granitemoeshared" if shared else "granitemoe")
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=9)
    hf_class = GraniteMoeSharedForCausalLM if shared else GraniteMoeForCausalLM
    roundtrip(model, tmp_path / "out", hf_class, ids)


def test_constants_reach_the_model_and_change_the_numbers(tmp_path):
    """The variants above are real tests of the four constants only if each one changes the logits."""
    _, folder = tiny_granite(tmp_path, shared=True)
    model = mhf.load_pretrained(folder)
    assert {k: getattr(model.config, k) for k in CONSTANTS} == CONSTANTS
    assert model.config.moe.softmax_order == "topk_softmax" and model.config.moe.shared_d_ff == 12
    ids = inputs(97)
    with torch.no_grad():
        want = model(ids).logits
        for name in CONSTANTS:
            changed = mhf.load_pretrained(folder)
            setattr(changed.config, name, 1.0)
            for block in changed.blocks:
                block.residual_multiplier = changed.config.residual_multiplier
                block.attn.scale = changed.config.attention_multiplier
            assert (changed(ids).logits - want).abs().max() > 1e-3, name


def test_transformers_default_attention_multiplier_is_one_not_inverse_sqrt_head_dim(tmp_path):
    _, folder = tiny_granite(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["attention_multiplier"]
    (folder / "config.json").write_text(json.dumps(config))
    assert mhf.load_pretrained(folder).config.attention_multiplier == 1.0
    assert GraniteMoeConfig(**{k: v for k, v in config.items() if k != "architectures"}).attention_multiplier == 1.0


def test_an_explicit_null_attention_multiplier_is_the_usual_inverse_sqrt_head_dim(tmp_path):
    hf, folder = tiny_granite(tmp_path, attention_multiplier=None)
    model = mhf.load_pretrained(folder)
    assert model.config.attention_multiplier is None
    assert_same_logits(hf, model, inputs(97))  # transformers' SDPA: scale None = 1/sqrt(head_dim)


def test_transformers_in_memory_names_load_too(tmp_path):
    hf, folder = tiny_granite(tmp_path, shared=True)
    renames = {"router.layer.weight": "router.weight", "input_linear.weight": "experts.gate_up_proj",
               "output_linear.weight": "experts.down_proj"}  # fmt: skip

    def rename(tensors):
        out = {}
        for name, tensor in tensors.items():
            for old, new in renames.items():
                if "block_sparse_moe." + old in name:
                    name = name.replace(old, new)
            out[name] = tensor
        return out

    edit_checkpoint(folder, rename)
    assert_same_logits(hf, mhf.load_pretrained(folder), inputs(97))


def test_missing_shared_mlp_tensor_is_named(tmp_path):
    _, folder = tiny_granite(tmp_path, shared=True)
    dropped = "model.layers.1.shared_mlp.output_linear.weight"
    edit_checkpoint(folder, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.shared_mlp\.output_linear\.weight"):
        mhf.load_pretrained(folder)


def test_formats_without_the_constants_refuse_a_granite_model(tmp_path):
    _, folder = tiny_granite(tmp_path, shared=True)
    model = mhf.load_pretrained(folder)
    with pytest.raises(ValueError, match="GraniteMoe checkpoint has no shared experts"):
        mhf.save_pretrained(model, tmp_path / "x", model_type="granitemoe")
    model.config.moe.num_shared_experts = 0  # (only the config: the refusal below comes first)
    with pytest.raises(ValueError, match="a mixtral checkpoint needs embedding_multiplier=1.0, this model has 3.0"):
        mhf.save_pretrained(model, tmp_path / "x", model_type="mixtral")
