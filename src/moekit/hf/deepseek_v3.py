"""DeepSeek-V3 (model_type deepseek_v3): the family contract of moekit.hf, bound to its model_type; the mapping
itself is shared with DeepSeek-V2 in hf/deepseek.py (see there)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.hf import deepseek
from moekit.hf.deepseek import config_from_hf, import_weights  # noqa: F401  (the family contract)
from moekit.models.lm import MoELM

MODEL_TYPES = ("deepseek_v3",)
ARCHITECTURE = deepseek.ARCHITECTURES["deepseek_v3"]


def export_weights(model: MoELM) -> dict[str, Tensor]:
    return deepseek.export_weights(model, "deepseek_v3")


def check_exportable(model: MoELM) -> None:
    deepseek.check_exportable(model, "deepseek_v3")


def hf_config(model: MoELM) -> dict[str, Any]:
    return deepseek.hf_config(model, "deepseek_v3")
