"""GraniteMoeShared (model_type granitemoeshared): the family contract of moekit.hf, bound to its model_type;
the mapping itself is shared in hf/granite.py (see there)."""

from __future__ import annotations

from typing import Any

from moekit.hf import granite
from moekit.hf.granite import EXTRAS, config_from_hf, export_weights, import_weights  # noqa: F401  (the contract)
from moekit.models.lm import MoELM

MODEL_TYPES = ("granitemoeshared",)
ARCHITECTURE = granite.ARCHITECTURES["granitemoeshared"]


def check_exportable(model: MoELM) -> None:
    granite.check_exportable(model, "granitemoeshared")


def hf_config(model: MoELM) -> dict[str, Any]:
    return granite.hf_config(model, "granitemoeshared")
