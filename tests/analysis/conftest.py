"""The training fixtures of tests/train/conftest.py (tiny model config, two-domain corpus), shared here.

conftest modules all have the module name "conftest", so that file is loaded under a name of its own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_moekit_train_fixtures", Path(__file__).parents[1] / "train" / "conftest.py")
_train_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_fixtures)

corpus_dir = _train_fixtures.corpus_dir
tiny_moe_json = _train_fixtures.tiny_moe_json


@pytest.fixture
def tiny_model_config():
    """The function building the tiny MoE ModelConfig (d_model 32, 2 layers, 4 experts, top-2)."""
    return _train_fixtures.tiny_model_config
