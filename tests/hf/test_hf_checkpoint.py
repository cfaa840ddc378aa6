"""The checkpoint reader: quantized releases dequantized bit-exactly as transformers does; shards; atomic writes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError, write_checkpoint

transformers = pytest.importorskip("transformers")


def test_fp8_blockwise_weights_dequantize_like_transformers(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=gen)  # not multiples of 128: partial tiles at the edges
    padded = torch.zeros(384, 256).index_put_((torch.arange(300)[:, None], torch.arange(200)), weight.abs())
    scale_inv = padded.view(3, 128, 2, 128).amax(dim=(1, 3)) / 448  # as DeepSeek quantizes: tile amax -> 448
    tiles = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    w_fp8 = (weight / tiles).to(torch.float8_e4m3fn)
    save_file({"a.weight": w_fp8, "a.weight_scale_inv": scale_inv, "b.weight": weight}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    got = reader.take("a.weight", torch.float32)
    want = _dequantize_fp8_weight(w_fp8, scale_inv, [128, 128], torch.float32)
    assert torch.equal(got, want)
    assert (got - weight).abs().max() <= 0.07 * weight.abs().max()  # and it is the weight, to fp8 precision
    assert torch.equal(reader.take("b.weight"), weight)  # unquantized tensors pass through
    assert reader.unconsumed() == []  # the scale was consumed with its weight


def test_mxfp4_experts_dequantize_like_transformers(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 48, 2, 16), generator=gen, dtype=torch.uint8)  # E=3, rows 48, 64 values
    scales = torch.randint(120, 134, (3, 48, 2), generator=gen, dtype=torch.uint8)
    save_file({"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path, {"quant_method": "mxfp4"})
    assert "e.gate_up_proj" in reader
    got = reader.take("e.gate_up_proj", torch.float32)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert got.shape == (3, 64, 48) and torch.equal(got, want)
    assert reader.unconsumed() == []


def test_unsupported_quantization_is_named(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="'gptq' is not supported"):
        CheckpointReader(tmp_path, {"quant_method": "gptq"})


def test_write_checkpoint_shards_with_an_index_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(5)}
    write_checkpoint(tmp_path, {"model_type": "x"}, tensors, max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = CheckpointReader(tmp_path)
    assert reader.names() == sorted(tensors)
    assert all(torch.equal(reader.take(n), t) for n, t in tensors.items())
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import moekit.hf.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, {}, {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part-2.safetensors"}}))
    with pytest.raises(HFCheckpointError, match="part-2.safetensors"):
        CheckpointReader(tmp_path)
