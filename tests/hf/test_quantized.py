"""Quantized releases load as their dequantized weights: GPT-OSS's MXFP4 experts and DeepSeek-V3's FP8 blocks.

Each test writes a tiny checkpoint in the released on-disk format (packed blocks + scales, or float8 weights +
weight_scale_inv, with the quantization_config the releases carry) and compares moekit's logits with transformers
running the same weights dequantized by transformers' own functions.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit.hf as mhf

from hf_harness import assert_same_logits, inputs, randomize

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402


def _rewrite(folder, tensors, quantization):
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))


def test_gpt_oss_mxfp4_experts(tmp_path):
    config = GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4)  # fmt: skip
    torch.manual_seed(0)
    hf = GptOssForCausalLM(config).eval()
    randomize(hf)
    gen = torch.Generator().manual_seed(3)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(layer.mlp.experts, name)  # [E, in, out]; packed transposed: [E, out, in/32, 16]
                E, n_in, n_out = param.shape
                blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=gen, dtype=torch.uint8)
                scales = torch.randint(121, 125, (E, n_out, n_in // 32), generator=gen, dtype=torch.uint8)
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                packed[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
                packed[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items()
               if not k.endswith(("gate_up_proj", "down_proj"))}  # fmt: skip
    _rewrite(folder, {**tensors, **packed}, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]})
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert_same_logits(hf, model, inputs(97))


def test_deepseek_v3_fp8_blocks(tmp_path):
    config = DeepseekV3Config(vocab_size=97, hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                              num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                              qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                              max_position_embeddings=64)  # fmt: skip  (dims past 128: partial FP8 tiles)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(config).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tensors, quantized = load_file(folder / "model.safetensors"), 0
    for name in list(tensors):  # every projection, as in the release (not embeddings, norms, router, head)
        weight = tensors[name]
        if not name.endswith("proj.weight") or weight.dim() != 2:
            continue
        rows, cols = weight.shape
        tiles = (-(-rows // 128), -(-cols // 128))
        padded = torch.zeros(tiles[0] * 128, tiles[1] * 128)
        padded[:rows, :cols] = weight.abs()
        scale_inv = padded.view(tiles[0], 128, tiles[1], 128).amax(dim=(1, 3)).clamp_min(1e-12) / 448
        full = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        tensors[name] = (weight / full).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale_inv
        quantized += 1
    assert quantized > 10
    dequantized = {n: _dequantize_fp8_weight(t, tensors[n + "_scale_inv"], [128, 128], torch.float32)
                   for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}  # fmt: skip
    plain = tmp_path / "dequantized"  # transformers runs the dequantized weights, loaded from its own folder
    hf.save_pretrained(plain)
    save_file({**load_file(plain / "model.safetensors"), **dequantized}, plain / "model.safetensors",
              metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    _rewrite(folder, tensors, {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                               "fmt": "e4m3"})  # fmt: skip
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert_same_logits(hf, model, inputs(97))
