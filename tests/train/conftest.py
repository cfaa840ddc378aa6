"""Shared fixtures: a model small enough to train in a blink on 2 cores, and a small two-domain corpus."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from moekit.presets import get_preset


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""


def tiny_model_config(moe: bool = True):
    """tiny-mixtral (or tiny-dense) shrunk to d_model 32, 2 layers: same code paths, a thousandth of the work."""
    base = get_preset("tiny-mixtral" if moe else "tiny-dense")
    moe_cfg = replace(base.moe, d_model=32, d_ff=32, num_experts=4) if moe else None
    return replace(base, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, dense_d_ff=64, max_seq_len=64, moe=moe_cfg)


def write_model_json(path: Path, moe: bool = True) -> str:
    path.write_text(json.dumps(tiny_model_config(moe).to_dict()))
    return str(path)


@pytest.fixture
def tiny_config():
    """The tiny MoE ModelConfig (tests import nothing from conftest: its module name is not unique)."""
    return tiny_model_config()


@pytest.fixture
def tiny_moe_json(tmp_path) -> str:
    return write_model_json(tmp_path / "tiny_moe.json", moe=True)


@pytest.fixture
def tiny_dense_json(tmp_path) -> str:
    return write_model_json(tmp_path / "tiny_dense.json", moe=False)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """Six prose files and two code files, about 20 kB."""
    root = tmp_path / "corpus"
    (root / "docs").mkdir(parents=True)
    (root / "src").mkdir()
    for name in ("if", "while", "for", "try", "with", "function"):
        (root / "docs" / f"{name}.txt").write_text(topics[name])
    (root / "src" / "a.py").write_text(Path(json.__file__).read_text())
    (root / "src" / "b.py").write_text(Path(json.__file__).with_name("decoder.py").read_text())
    return root
