"""`moekit analyze` end to end on a tiny checkpoint trained for a few steps: analysis.json, PNGs and report.html
are written, the collapse warning reaches the terminal and the report, `--hf` goes through
`moekit.hf.load_pretrained`, and the HTML renders in a real headless browser with every image loaded and no console
errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moekit.analysis.report import ANALYSIS_JSON, REPORT_HTML, format_summary, write_report
from moekit.analysis.routing import analyze_routing
from moekit.cli import main
from moekit.models.lm import MoELM
from moekit.train import checkpoint as ckpt
from moekit.train.data import Tokenizer
from moekit.train.trainer import TrainConfig, train

FIGURES = ("load", "entropy", "coactivation", "domains", "specialisation")
HEADINGS = ("Routing analysis", "Summary", "Load per expert", "Router entropy", "Expert co-activation",
            "Domain specialisation", "Token vs domain", "Preferred tokens")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""


@pytest.fixture
def run_dir(corpus_dir, tiny_moe_json, tmp_path) -> Path:
    """A tiny MoE LM trained for 3 steps on the two-domain corpus (byte tokenizer)."""
    out = tmp_path / "run"
    cfg = TrainConfig(preset=tiny_moe_json, data=str(corpus_dir), out=str(out), steps=3, batch_size=2, seq_len=32,
                      warmup=1, eval_every=3, eval_windows=2, save_every=0, tokenizer="bytes", device="cpu")
    train(cfg, log=lambda _: None, progress=False)
    return out


def _collapsed_model(tiny_model_config) -> MoELM:
    from dataclasses import replace

    cfg = tiny_model_config()
    cfg = replace(cfg, vocab_size=Tokenizer.bytes().vocab_size, moe=replace(cfg.moe, router_bias=True))
    torch.manual_seed(0)
    model = MoELM(cfg)
    with torch.no_grad():
        model.blocks[1].ffn.router.bias[3] = 50.0  # expert 3 in every token's top-2
    return model


def _analyze(capsys, *argv) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------- the CLI


def test_analyze_writes_json_figures_and_html(run_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, stdout, _ = _analyze(capsys, "--checkpoint", str(run_dir), "--data", str(corpus_dir), "--out", str(out),
                               "--seq-len", "32", "--max-tokens", "2048", "--shuffles", "2")
    assert code == 0
    data = json.loads((out / ANALYSIS_JSON).read_text())
    assert data["num_tokens"] == 2048 and data["domain_names"] == ["code", "prose"]
    assert all(count > 0 for count in data["domain_tokens"])  # windows are spread over both domains
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    layer = data["layers"][0]
    assert sum(layer["tokens_per_expert"]) == 2 * 2048 and layer["domain_mi"]["shuffles"] == 2
    assert len(layer["top_tokens"]) == 4 and data["thresholds"]["collapse_token_share"] == 0.5
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / REPORT_HTML).read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) and "src=\"load.png\"" not in page
    assert "layer max/mean" in stdout and "no router collapse" in stdout and str(out / REPORT_HTML) in stdout
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


def test_analyze_defaults_to_the_embedded_validation_split(run_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, stdout, _ = _analyze(capsys, "--checkpoint", str(run_dir), "--out", str(out), "--seq-len", "32",
                               "--max-tokens", "1024", "--shuffles", "1", "--json")
    assert code == 0 and json.loads(stdout)["warnings"] == []
    data = json.loads((out / ANALYSIS_JSON).read_text())
    assert "validation split" in data["source"]["text"]
    assert data["domain_names"] == ["code", "prose"] and min(data["domain_tokens"]) > 0


def test_a_collapsed_router_is_warned_about_on_the_terminal_and_in_the_report(tiny_model_config, tmp_path, capsys):
    tokenizer = Tokenizer.bytes()
    model = _collapsed_model(tiny_model_config)
    run = tmp_path / "collapsed"
    ckpt.save_checkpoint(run, 0, model, model.config.to_dict(), tokenizer.to_str(), state={"train_config": {"seed": 0}})
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "analysis"
    code, stdout, _ = _analyze(capsys, "--checkpoint", str(run), "--data", str(text), "--out", str(out),
                               "--seq-len", "32", "--shuffles", "1")
    assert code == 0
    assert "WARNING: layer 1: router collapse: expert 3 takes 100% of tokens" in stdout
    assert "WARNING: layer 0" not in stdout
    page = (out / REPORT_HTML).read_text()
    assert 'id="collapse-warning"' in page and "layer 1: router collapse: expert 3 takes 100% of tokens" in page
    data = json.loads((out / ANALYSIS_JSON).read_text())
    assert data["domain_names"] == ["prose"] and data["layers"][0]["domain_mi"] is None  # one domain: no domain MI


def test_hf_folder_saved_by_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.bytes()
    config = transformers.Qwen3MoeConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "hf-model"
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    text = tmp_path / "code.py"
    text.write_text("def f(x):\n    return x + 1\n" * 30)
    out = tmp_path / "a"
    code, stdout, _ = _analyze(capsys, "--hf", str(folder), "--data", str(text), "--out", str(out),
                               "--seq-len", "32", "--shuffles", "1", "--dtype", "float32")
    assert code == 0
    data = json.loads((out / ANALYSIS_JSON).read_text())
    assert len(data["layers"]) == 2 and (out / REPORT_HTML).is_file()


def test_hf_folder_without_tokenizer_is_named(tmp_path, capsys):
    code, _, err = _analyze(capsys, "--hf", str(tmp_path), "--out", str(tmp_path / "a"))
    assert code == 2 and "has no tokenizer.json" in err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    code, _, err = _analyze(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _render(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(the DOM after load, the console lines) of a page in headless Chromium."""
    browser = _chromium()
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return result.stdout, console


@pytest.fixture
def report_dir(tiny_model_config, tmp_path) -> Path:
    model = _collapsed_model(tiny_model_config)
    ids = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0))
    domains = (torch.arange(2048) >= 1024).long()
    analysis = analyze_routing(model, ids, domains, ["code", "prose"], seq_len=32, shuffles=2,
                               decode=lambda v: Tokenizer.bytes().decode([v]))
    assert "router collapse" in format_summary(analysis)
    return write_report(analysis, tmp_path / "report").out_dir


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium): the report's "
                    "browser test needs a real headless browser")
def test_report_renders_in_a_headless_browser_with_every_image_and_no_console_error(report_dir, tmp_path):
    dom, console = _render(report_dir / REPORT_HTML, tmp_path)
    for heading in HEADINGS:
        assert re.search(rf"<h[12][^>]*>{re.escape(heading)}</h[12]>", dom), heading
    assert f'data-images-loaded="{len(FIGURES)}/{len(FIGURES)}"' in dom
    assert "Router collapse warning" in dom
    assert console == []


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium): the report's "
                    "browser test needs a real headless browser")
def test_the_browser_check_catches_a_broken_image_and_a_script_error(report_dir, tmp_path):
    page = (report_dir / REPORT_HTML).read_text()
    broken = page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    broken = broken.replace("</body>", "<script>undefinedFunction();</script></body>")
    path = tmp_path / "broken.html"
    path.write_text(broken)
    dom, console = _render(path, tmp_path)
    assert f'data-images-loaded="{len(FIGURES) - 1}/{len(FIGURES)}"' in dom
    assert any("Uncaught ReferenceError" in line for line in console)
