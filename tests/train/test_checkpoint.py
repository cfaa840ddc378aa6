"""Checkpoints: exact round trip of model and optimizer, atomic saves, strict and named errors, no pickle."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moekit.models.lm import MoELM
from moekit.train import checkpoint as ckpt
from moekit.train.data import Tokenizer
from moekit.train.trainer import TrainConfig, optimizer_for


def _trained(tiny, seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    config = replace(tiny, vocab_size=257)
    model = MoELM(config)
    optimizer = optimizer_for(model, TrainConfig())
    for _ in range(steps):
        x = torch.randint(0, 257, (2, 16))
        model(x, targets=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, config


def _save(run_dir, step, model, optimizer, config, **kwargs):
    rng = {"torch": torch.get_rng_state(), "data": torch.Generator().manual_seed(7).get_state()}
    return ckpt.save_checkpoint(
        run_dir, step, model, config.to_dict(), Tokenizer.bytes().to_str(), optimizer, {"tokens": step}, rng, **kwargs
    )


def test_model_and_optimizer_state_load_back_exactly(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config)
    rng_at_save = torch.get_rng_state()
    _save(tmp_path, 2, model, optimizer, config)
    found = ckpt.resolve_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_000002"

    fresh_model, fresh_opt, _ = _trained(tiny_config, seed=1, steps=0)
    ckpt.load_weights(fresh_model, found)
    ckpt.load_optimizer(fresh_opt, fresh_model, found)
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_model.lm_head.weight is fresh_model.embed.weight  # tied weights stay tied
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)
    state, rng = ckpt.load_state(found)
    assert state == {"step": 2, "tokens": 2}
    assert torch.equal(rng["torch"], rng_at_save) and rng["data"].dtype == torch.uint8


def test_loading_never_unpickles(tiny_config, tmp_path, monkeypatch):
    model, optimizer, config = _trained(tiny_config)
    _save(tmp_path, 2, model, optimizer, config)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, tokenizer, found = ckpt.load_model(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight) and tokenizer.vocab_size == 257
    ckpt.load_optimizer(optimizer_for(loaded, TrainConfig()), loaded, found)


def test_latest_names_the_newest_and_old_checkpoints_are_pruned(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config, steps=0)
    for step in (5, 10, 15):
        _save(tmp_path, step, model, optimizer, config, keep=2)
    assert (tmp_path / "latest").read_text().strip() == "step_000015"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010", "step_000015"]


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_in_use(tiny_config, tmp_path, monkeypatch):
    model, optimizer, config = _trained(tiny_config)
    _save(tmp_path, 5, model, optimizer, config)
    real_fsync = ckpt._fsync_file

    def crash_after_the_weights(path):
        real_fsync(path)
        if path.name == ckpt.OPTIMIZER_FILE:  # model, config, tokenizer and state are already written
            raise OSError("killed")

    monkeypatch.setattr(ckpt, "_fsync_file", crash_after_the_weights)
    x = torch.randint(0, 257, (2, 16))
    model(x, targets=x).loss.backward()
    optimizer.step()
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 10, model, optimizer, config)

    assert ckpt.find_checkpoint(tmp_path).name == "step_000005"
    assert not (tmp_path / "checkpoints" / "step_000010").exists()
    loaded, _, _ = ckpt.load_model(tmp_path)  # loads completely, from the previous save
    assert ckpt.load_state(ckpt.resolve_checkpoint(tmp_path))[0]["step"] == 5

    monkeypatch.setattr(ckpt, "_fsync_file", real_fsync)
    _save(tmp_path, 10, model, optimizer, config)  # the next save clears the half-written directory
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005", "step_000010"]


def test_saving_the_same_step_again_replaces_it(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config)
    _save(tmp_path, 5, model, optimizer, config)
    _save(tmp_path, 5, model, optimizer, config)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000005"]
    ckpt.load_model(tmp_path)


def test_a_truncated_weights_file_is_reported_by_name(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config, steps=0)
    found = _save(tmp_path, 1, model, optimizer, config)
    weights = found / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors.*truncated"):
        ckpt.load_model(tmp_path)


def test_a_corrupt_file_of_the_right_size_is_reported_by_name(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config, steps=0)
    found = _save(tmp_path, 1, model, optimizer, config)
    weights = found / ckpt.OPTIMIZER_FILE
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header length
    weights.write_bytes(bytes(data))
    model2, _, _ = ckpt.load_model(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.safetensors.*corrupt"):
        ckpt.load_optimizer(optimizer_for(model2, TrainConfig()), model2, found)


def test_weights_of_another_model_are_refused_with_the_shapes(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config, steps=0)
    found = _save(tmp_path, 1, model, optimizer, config)
    other = MoELM(replace(config, d_model=48, moe=replace(config.moe, d_model=48)))
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this model.*embed\.weight: checkpoint \[257, 32\]"):
        ckpt.load_weights(other, found)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.resolve_checkpoint(tmp_path)


def test_config_json_is_the_model_config(tiny_config, tmp_path):
    model, optimizer, config = _trained(tiny_config, steps=0)
    found = _save(tmp_path, 1, model, optimizer, config)
    assert json.loads((found / "config.json").read_text()) == config.to_dict()
