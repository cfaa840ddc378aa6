"""Training with expert parallelism computes what one process computes on the same global batches.

Two gloo ranks train a tiny DeepSeek-style LM (shared expert, selection bias moved by the aux-loss-free update,
Switch and sequence-wise balance losses, gradient accumulation) with ep=2; one process trains the same config.
Every rank draws the same global batch and takes half of its windows, so the per-step losses, gradient norms and
the validation loss must agree to float rounding, and the EP run's checkpoint (single-process layout) must hold the
single-process run's weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from moekit.presets import get_preset
from moekit.train import TrainConfig, Trainer, load_model
from moekit.train.trainer import load_metrics

from dist_helpers import run_on_ranks


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """One thread, like the ranks (see tests/conftest.py)."""


def tiny_deepseek_json(path: Path) -> str:
    base = get_preset("tiny-mixtral")
    moe = replace(base.moe, d_model=32, d_ff=32, num_experts=4, top_k=2, num_shared_experts=1, aux_loss_coef=0.01,
                  seq_aux_loss_coef=1e-3, selection_bias=True, bias_update_rate=1e-2)
    config = replace(base, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_d_ff=64, max_seq_len=64, moe=moe)
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def train_config(tmp: Path, out: str, ep: int) -> TrainConfig:
    data = tmp / "text.txt"
    if not data.exists():
        data.write_text("".join(topics[name] for name in ("if", "while", "for", "try")))
    return TrainConfig(
        preset=str(tmp / "model.json"), data=str(data), out=str(tmp / out), steps=3, batch_size=4, seq_len=16,
        grad_accum=2, warmup=1, eval_every=3, eval_windows=6, save_every=0, tokenizer="bytes", ep=ep,
        dist_timeout=30.0,
    )


def _train_worker(rank: int, world: int, tmp: str) -> None:
    Trainer(train_config(Path(tmp), "ep2", ep=2), progress=False, log=lambda *_: None).train()


def test_ep2_training_gives_the_single_process_losses_and_weights(tmp_path):
    tiny_deepseek_json(tmp_path / "model.json")
    run_on_ranks(_train_worker, 2, str(tmp_path))
    single = Trainer(train_config(tmp_path, "single", ep=1), progress=False, log=lambda *_: None).train()

    ep_history = load_metrics(tmp_path / "ep2")
    assert [r["step"] for r in ep_history] == [1, 2, 3]
    for key in ("loss", "ce", "aux", "grad_norm", "imbalance"):
        torch.testing.assert_close(
            [r[key] for r in ep_history], [r[key] for r in single.history], atol=2e-6, rtol=2e-6, msg=key
        )
    torch.testing.assert_close(ep_history[-1]["val_loss"], single.val_loss, atol=2e-6, rtol=2e-6)
    ep_model, _, _ = load_model(tmp_path / "ep2")
    one_model, _, _ = load_model(tmp_path / "single")
    for (name, a), (_, b) in zip(ep_model.state_dict().items(), one_model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
