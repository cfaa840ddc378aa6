"""`moekit` end to end with tiny settings: train, generate, compare, the older commands, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from moekit.cli import main
from moekit.presets import get_preset, list_presets


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and lose a lot on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model_json(path: Path, moe: bool) -> str:
    base = get_preset("tiny-mixtral" if moe else "tiny-dense")
    moe_cfg = replace(base.moe, d_model=32, d_ff=32, num_experts=4) if moe else None
    config = replace(base, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_d_ff=64, max_seq_len=64, moe=moe_cfg)
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


@pytest.fixture
def setup(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("if", "while", "for", "try"):
        (corpus / f"{name}.txt").write_text(topics[name])
    (corpus / "code.py").write_text(Path(json.__file__).read_text())
    return corpus, _model_json(tmp_path / "moe.json", True), _model_json(tmp_path / "dense.json", False)


def _train_args(corpus, preset, out, *extra):
    return ["train", "--preset", preset, "--data", str(corpus), "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "3", "--device", "cpu", *extra]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("moekit: error: ") and "Traceback" not in captured.err
    return captured.err


def test_train_then_generate_streams_text_from_the_checkpoint(setup, tmp_path, capsys):
    corpus, moe, _ = setup
    run = tmp_path / "run"
    assert main(_train_args(corpus, moe, run, "--vocab-size", "300")) == 0
    out = capsys.readouterr().out
    assert "step     3/3" in out and "val_loss" in out and "checkpoint" in out
    for name in ("metrics.jsonl", "loss.png", "latest"):
        assert (run / name).exists(), name
    assert json.loads((run / "checkpoints" / "step_000003" / "config.json").read_text())["vocab_size"] == 300

    argv = ["generate", "--checkpoint", str(run), "--prompt", "The ", "--max-new-tokens", "12", "--greedy"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("The ") and "tokens/s" in first.err
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out  # greedy is deterministic

    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "5", "--seed", "1", "--top-k", "20",
                 "--top-p", "0.9"]) == 0


def test_train_json_reports_the_result(setup, tmp_path, capsys):
    corpus, _, dense = setup
    assert main(_train_args(corpus, dense, tmp_path / "run", "--tokenizer", "bytes", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and result["tokens"] == 3 * 2 * 16 and result["active_params"] == result["total_params"]


def test_resume_continues_a_shorter_run(setup, tmp_path, capsys):
    corpus, moe, _ = setup
    run = tmp_path / "run"
    assert main(_train_args(corpus, moe, run, "--tokenizer", "bytes")) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_compare_trains_both_models_and_writes_plot_and_table(setup, tmp_path, capsys):
    corpus, moe, dense = setup
    out = tmp_path / "cmp"
    argv = ["compare", "--moe", moe, "--dense", dense, "--tokens", "128", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "2", "--data", str(corpus), "--tokenizer", "bytes", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model | final val loss | active params | total params | tokens | train FLOPs | time (s) |" in printed
    data = json.loads((out / "compare.json").read_text())
    assert [r["preset"] for r in data["rows"]] == [dense, moe]
    assert all(r["tokens"] == 128 and r["val_loss"] is not None for r in data["rows"])
    assert all(len(curve) == 2 for curve in data["curves"].values())  # validations at steps 2 and 4
    assert (out / "compare.png").stat().st_size > 1000 and (out / "compare.md").exists()


def test_the_demo_and_params_commands_still_work(capsys):
    assert main(["params", "mixtral-8x7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["demo", "--steps", "2", "--batch", "32", "--json"]) == 0
    assert "moe_loss" in json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------------ errors


def test_a_missing_corpus_is_named(tmp_path, capsys):
    err = _error(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert "nope' does not exist" in err


def test_an_empty_corpus_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")])
    assert "empty' has no text" in err


def test_an_unknown_preset_lists_the_available_ones(tmp_path, capsys):
    err = _error(capsys, ["train", "--preset", "tiny-nope", "--out", str(tmp_path / "run"), "--tokenizer", "bytes"])
    assert "unknown preset 'tiny-nope'" in err and all(name in err for name in list_presets())


def test_resuming_as_another_model_is_refused(setup, tmp_path, capsys):
    corpus, moe, dense = setup
    run = tmp_path / "run"
    assert main(_train_args(corpus, moe, run, "--tokenizer", "bytes")) == 0
    err = _error(capsys, [*_train_args(corpus, dense, run, "--tokenizer", "bytes"), "--resume"])
    assert "cannot resume" in err and "preset=" in err


def test_a_truncated_checkpoint_file_is_named(setup, tmp_path, capsys):
    corpus, moe, _ = setup
    run = tmp_path / "run"
    assert main(_train_args(corpus, moe, run, "--tokenizer", "bytes")) == 0
    weights = run / "checkpoints" / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = _error(capsys, ["generate", "--checkpoint", str(run), "--prompt", "x"])
    assert "model.safetensors" in err and "truncated" in err


def test_weights_of_another_model_are_refused_with_shapes(setup, tmp_path, capsys):
    corpus, moe, dense = setup
    assert main(_train_args(corpus, moe, tmp_path / "a", "--tokenizer", "bytes")) == 0
    assert main(_train_args(corpus, dense, tmp_path / "b", "--tokenizer", "bytes")) == 0
    a, b = tmp_path / "a" / "checkpoints" / "step_000003", tmp_path / "b" / "checkpoints" / "step_000003"
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["model.safetensors"] = (a / "model.safetensors").stat().st_size
    (a / "manifest.json").write_text(json.dumps(manifest))
    err = _error(capsys, ["generate", "--checkpoint", str(tmp_path / "a")])
    assert "does not fit this model" in err and "missing blocks.0.ffn.router.weight" in err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    err = _error(capsys, ["generate", "--checkpoint", str(tmp_path / "nothing")])
    assert "nothing' does not exist" in err


def test_errors_from_the_installed_command_have_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"moekit: error: corpus '{tmp_path / 'missing'}' does not exist"


# ------------------------------------------------------------------------------------- expert parallel (--nproc)


def _moekit(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_train_nproc_2_trains_expert_parallel_and_only_rank_0_reports(setup, tmp_path, capsys):
    from moekit.train import load_model
    from moekit.train.trainer import load_metrics

    corpus, _, _ = setup
    args = _train_args(corpus, "tiny-mixtral", tmp_path / "ep", "--tokenizer", "bytes", "--lr", "0.002")
    result = _moekit(*args, "--nproc", "2")  # through torchrun: two processes, ep defaults to 2
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("(2 ranks: expert parallel 2 x data parallel 1)") == 1, out
    assert out.count("step     3/3") == 1 and out.count("done: 3 steps") == 1, out

    model, _, _ = load_model(tmp_path / "ep")  # the single-process layout: all 8 experts in every layer
    assert all(block.ffn.experts.w_in.shape[0] == 8 for block in model.blocks)
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, model.config.vocab_size)

    # The same command in one process computes the same run (the relaunch passed every flag through).
    assert main([*_train_args(corpus, "tiny-mixtral", tmp_path / "one", "--tokenizer", "bytes", "--lr", "0.002")]) == 0
    capsys.readouterr()
    ep, one = load_metrics(tmp_path / "ep"), load_metrics(tmp_path / "one")
    assert [r["step"] for r in ep] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close([r[key] for r in ep], [r[key] for r in one], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(ep[-1]["val_loss"], one[-1]["val_loss"], atol=1e-5, rtol=1e-5)

    result = _moekit("train", "--out", str(tmp_path / "ep"), "--resume", "--steps", "4", "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resumed") == 1 and result.stdout.count("step     4/4") == 1, result.stdout
    assert [r["step"] for r in load_metrics(tmp_path / "ep")] == [1, 2, 3, 4]


def test_a_rank_that_dies_fails_the_nproc_run(setup, tmp_path):
    # Rank 1 exits in the middle of its second step (sitecustomize runs in every process of the launch); torchrun
    # stops rank 0 and exits non-zero, and so does `moekit train --nproc`.
    corpus, moe, _ = setup
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from moekit.train import trainer\n"
        "    step = trainer.Trainer._train_step\n"
        "    def dying_step(self):\n"
        "        if self.step == 1:\n"
        "            os._exit(3)\n"
        "        return step(self)\n"
        "    trainer.Trainer._train_step = dying_step\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    args = _train_args(corpus, moe, tmp_path / "run", "--tokenizer", "bytes", "--steps", "50", "--dist-timeout", "20")
    start = time.monotonic()
    result = _moekit(*args, "--nproc", "2", env=env)
    assert result.returncode != 0
    assert "done:" not in result.stdout and "exitcode  : 3" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_nproc_refuses_what_the_ranks_could_not_run(setup, tmp_path, capsys):
    corpus, moe, dense = setup
    base = _train_args(corpus, moe, tmp_path / "run", "--tokenizer", "bytes")
    assert "--ep 3 must divide --nproc 4" in _error(capsys, [*base, "--nproc", "4", "--ep", "3"])
    assert "--batch-size 2 must be divisible by --nproc 4" in _error(capsys, [*base, "--nproc", "4"])
    err = _error(capsys, [*_train_args(corpus, "tiny-switch", tmp_path / "run"), "--nproc", "2"])
    assert "capacity_factor=1.25 is not supported over 2 ranks" in err
    err = _error(capsys, [*_train_args(corpus, dense, tmp_path / "run"), "--nproc", "2"])
    assert "has no MoE layer" in err
    err = _error(capsys, [*base, "--ep", "2"])  # one process cannot hold two expert-parallel ranks
    assert "ep=2 needs a multiple of 2 processes, this run has 1" in err and "--nproc 2" in err
    assert not (tmp_path / "run").exists()
