"""The training loop: schedule, optimizer groups, learning, reproducibility, exact resume (also after kill -9)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.models.lm import MoELM
from moekit.presets import list_presets
from moekit.train import trainer as trainer_module
from moekit.train.trainer import TrainConfig, Trainer, load_metrics, lr_at, optimizer_for, train, training_config

EXACT_FIELDS = ("step", "tokens", "loss", "ce", "aux", "lr", "grad_norm", "imbalance", "flops", "val_loss")


def _config(corpus_dir, preset, out, **kwargs) -> TrainConfig:
    defaults = dict(
        preset=preset, data=str(corpus_dir), out=str(out), steps=10, batch_size=2, seq_len=32, warmup=3,
        eval_every=5, eval_windows=4, save_every=5, tokenizer="bytes", device="cpu",
    )
    return TrainConfig(**{**defaults, **kwargs})


def _exact(records):
    return [{k: r.get(k) for k in EXACT_FIELDS} for r in records]


# ---------------------------------------------------------------------------------------------------- schedule


def test_warmup_is_linear_up_to_the_peak():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3)
    assert [lr_at(i, cfg) for i in range(10)] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])


def test_cosine_decays_to_the_floor_exactly_at_the_last_step():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(i, cfg) for i in range(100)]
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    done_half = 10 + 45  # halfway through the decay the cosine is at the mean of peak and floor
    assert lr_at(done_half - 1, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))


def test_no_warmup_starts_at_the_peak_of_the_cosine():
    cfg = TrainConfig(steps=1000, warmup=0, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 1000))))


def test_weight_decay_applies_to_matrices_only(tiny_config):
    model = MoELM(tiny_config)
    decay, no_decay = optimizer_for(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p.dim() == 3 for p in decay["params"])  # the stacked [E, D, F] expert weights are decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------- training


def test_loss_decreases_on_a_tiny_corpus(corpus_dir, tiny_moe_json, tmp_path):
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=40, batch_size=8, warmup=5, save_every=0,
                  eval_every=40, lr=5e-3)
    result = train(cfg, log=lambda _: None, progress=False)
    losses = [r["ce"] for r in result.history]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert result.val_loss < losses[0] - 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_metrics_record_every_step_with_the_documented_fields(corpus_dir, tiny_moe_json, tmp_path):
    result = train(_config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=5), log=lambda _: None, progress=False)
    records = load_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records == result.history
    for key in ("step", "tokens", "loss", "ce", "aux", "lr", "tok_per_s", "imbalance", "flops"):
        assert key in records[0], key
    assert records[-1]["tokens"] == 5 * 2 * 32
    assert records[-1]["flops"] == result.train_flops  # training FLOPs so far: 3 x forward FLOPs/token x tokens
    assert records[-1]["imbalance"] >= 1.0
    assert set(records[-1]["val_loss_by_domain"]) == {"code", "prose"}
    assert records[-1]["loss"] == pytest.approx(records[-1]["ce"] + records[-1]["aux"], rel=1e-5)


def test_a_dense_model_has_no_imbalance(corpus_dir, tiny_dense_json, tmp_path):
    result = train(_config(corpus_dir, tiny_dense_json, tmp_path / "run", steps=2), log=lambda _: None, progress=False)
    assert result.history[-1]["imbalance"] is None and result.history[-1]["aux"] == 0.0


def test_grad_accumulation_and_bf16_run(corpus_dir, tiny_moe_json, tmp_path):
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=2, grad_accum=2, bf16=True)
    result = train(cfg, log=lambda _: None, progress=False)
    assert result.tokens == 2 * 2 * 2 * 32 and all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_says_it_will_be_slower(
    corpus_dir, tiny_moe_json, tmp_path, monkeypatch, emulated
):
    monkeypatch.setattr(trainer_module.kernels, "bf16_matmul_emulated", lambda: emulated)
    lines: list[str] = []
    Trainer(_config(corpus_dir, tiny_moe_json, tmp_path / "run", bf16=True), log=lines.append)
    notes = [line for line in lines if "--bf16" in line]
    assert len(notes) == int(emulated) and all("slower than float32" in line for line in notes)


def test_the_same_seed_gives_the_same_losses_and_a_resume_after_a_crash_continues_them_exactly(
    corpus_dir, tiny_moe_json, tmp_path, monkeypatch
):
    reference = train(_config(corpus_dir, tiny_moe_json, tmp_path / "a"), log=lambda _: None, progress=False)
    again = train(_config(corpus_dir, tiny_moe_json, tmp_path / "b"), log=lambda _: None, progress=False)
    assert _exact(again.history) == _exact(reference.history)

    real_step = Trainer._train_step

    def crash_after_step_7(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", crash_after_step_7)
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda _: None, progress=False)
    assert [r["step"] for r in load_metrics(tmp_path / "c")] == list(range(1, 8))  # 6 and 7 are past the checkpoint
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    resumed = train(cfg, resume=True, log=lambda _: None, progress=False)
    assert _exact(resumed.history) == _exact(reference.history)
    assert _exact(load_metrics(tmp_path / "c")) == _exact(reference.history)


# A child that trains like `moekit train` but slowly enough to be killed mid-run (the sleep changes no number).
_SLOW_CHILD = """
import sys, time
import moekit.train.trainer as trainer
real = trainer.update_biases
def slow(model):
    real(model)
    time.sleep(0.04)
trainer.update_biases = slow
from moekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_args(corpus_dir, preset, out, steps=40):
    return [
        "train", "--preset", preset, "--data", str(corpus_dir), "--out", str(out), "--steps", str(steps),
        "--batch-size", "2", "--seq-len", "32", "--warmup", "5", "--eval-every", "10", "--save-every", "5",
        "--tokenizer", "bytes", "--device", "cpu",
    ]


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses_bit_for_bit(corpus_dir, tiny_moe_json, tmp_path):
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, *_cli_args(corpus_dir, tiny_moe_json, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        latest = out / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_000010":
            break
        time.sleep(0.01)
    assert child.poll() is None, child.stderr.read().decode()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = max(r["step"] for r in load_metrics(out))
    assert 10 <= killed_at < 40

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "resumed" in run(*_cli_args(corpus_dir, tiny_moe_json, out), "--resume")
    run(*_cli_args(corpus_dir, tiny_moe_json, tmp_path / "straight"))  # the same run, never stopped
    assert [r["step"] for r in load_metrics(out)] == list(range(1, 41))
    assert _exact(load_metrics(out)) == _exact(load_metrics(tmp_path / "straight"))


# ------------------------------------------------------------------------------------------------------ errors


def test_an_existing_run_is_not_overwritten_without_resume_or_overwrite(corpus_dir, tiny_moe_json, tmp_path):
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=1)
    train(cfg, log=lambda _: None, progress=False)
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        Trainer(cfg, log=lambda _: None)
    result = train(cfg, overwrite=True, log=lambda _: None, progress=False)
    assert result.steps == 1


def test_resuming_with_different_settings_names_them(corpus_dir, tiny_moe_json, tmp_path):
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=1)
    train(cfg, log=lambda _: None, progress=False)
    with pytest.raises(ValueError, match=r"lr=0\.1 \(the run used 0\.003\)"):
        training_config({"out": cfg.out, "lr": 0.1}, resume=True)
    assert training_config({"out": cfg.out, "steps": 3}, resume=True).steps == 3  # training longer is allowed


def test_resuming_on_other_data_is_refused(corpus_dir, tiny_moe_json, tmp_path):
    cfg = _config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=1)
    train(cfg, log=lambda _: None, progress=False)
    for path in (corpus_dir / "docs").iterdir():
        path.write_text("changed " + path.read_text())
    with pytest.raises(ValueError, match="training data differ"):
        Trainer(cfg, resume=True, log=lambda _: None)


def test_an_unknown_preset_lists_the_available_ones(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'tiny-nope'.*" + ".*".join(list_presets())):
        Trainer(_config(corpus_dir, "tiny-nope", tmp_path / "run"), log=lambda _: None)


def test_a_published_model_preset_is_refused_as_too_large(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="mixtral-8x7b.*too large to train here.*tiny-dense"):
        Trainer(_config(corpus_dir, "mixtral-8x7b", tmp_path / "run"), log=lambda _: None)


def test_a_model_config_file_sets_the_model(corpus_dir, tiny_moe_json, tmp_path):
    t = Trainer(_config(corpus_dir, tiny_moe_json, tmp_path / "run"), log=lambda _: None)
    assert t.model_config.d_model == 32 and t.model_config.vocab_size == 257
    assert json.loads(Path(tiny_moe_json).read_text())["d_model"] == 32


def test_the_progress_bar_shows_loss_speed_and_imbalance(corpus_dir, tiny_moe_json, tmp_path, capsys):
    lines = []
    train(_config(corpus_dir, tiny_moe_json, tmp_path / "run", steps=2, eval_every=2), log=lines.append, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "tok/s=" in err and "imb=" in err
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 1 and steps[0].startswith("step 2: val_loss")  # only validations, logged above the bar


def test_progress_bar_is_off_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert trainer_module._progress_enabled() is False
