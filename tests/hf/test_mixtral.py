"""Mixtral: logits, greedy generation and export against transformers on the same weights; strict loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402


def tiny_mixtral(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                  rope_theta=5000.0)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": True}, {"head_dim": 16}, {"sliding_window": 4}], ids=str
)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_mixtral(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5])
    roundtrip(model, tmp_path / "out", MixtralForCausalLM, ids)


def test_sharded_checkpoint_and_bf16(tmp_path):
    hf, _ = tiny_mixtral(tmp_path)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model = mhf.load_pretrained(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_logits(hf.to(torch.bfloat16).float(), model.float(), inputs(97))  # same rounded weights


def test_older_config_spelling(tmp_path):
    hf, folder = tiny_mixtral(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_theta=theta, torch_dtype=config.pop("dtype"), num_experts=config.pop("num_local_experts"))
    (folder / "config.json").write_text(json.dumps(config))
    model = mhf.load_pretrained(folder)
    assert model.config.rope_theta == 5000.0 and model.config.moe.num_experts == 4
    assert_same_logits(hf, model, inputs(97))


def _edit(folder, change):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_expert_tensor_is_named(tmp_path):
    _, folder = tiny_mixtral(tmp_path)
    _edit(folder, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        mhf.load_pretrained(folder)


def test_extra_tensor_is_named(tmp_path):
    _, folder = tiny_mixtral(tmp_path)
    _edit(folder, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.zeros(24, 32)}))
    with pytest.raises(HFCheckpointError, match=r"no place for.*experts\.4\.w1\.weight"):
        mhf.load_pretrained(folder)


def test_wrong_shape_is_named(tmp_path):
    _, folder = tiny_mixtral(tmp_path)
    _edit(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 16)}))
    with pytest.raises(HFCheckpointError, match=r"o_proj\.weight has shape \(32, 16\)"):
        mhf.load_pretrained(folder)


def test_wrong_expert_shape_is_named(tmp_path):
    _, folder = tiny_mixtral(tmp_path)
    _edit(folder, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.2.w3.weight": torch.zeros(20, 32)}))
    with pytest.raises(HFCheckpointError, match=r"experts\.2\.w1\.weight \+ .*experts\.2\.w3\.weight"):
        mhf.load_pretrained(folder)


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFCheckpointError, match=r"unsupported model_type 'llama'.*mixtral"):
        mhf.load_pretrained(tmp_path)


def test_missing_folder_pieces_are_named(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        mhf.load_pretrained(tmp_path)
    _, folder = tiny_mixtral(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no safetensors weights"):
        mhf.load_pretrained(folder)


def test_save_needs_a_family_for_native_models(tmp_path):
    from moekit.models.lm import MoELM
    from moekit.presets import get_preset

    model = MoELM(get_preset("tiny-mixtral"))
    with pytest.raises(ValueError, match="needs model_type="):
        mhf.save_pretrained(model, tmp_path / "x")
    mhf.save_pretrained(model, tmp_path / "x", model_type="mixtral")
    back = MixtralForCausalLM.from_pretrained(tmp_path / "x").eval()
    assert_same_logits(back, model, inputs(model.config.vocab_size))
