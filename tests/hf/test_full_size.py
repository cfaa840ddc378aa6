"""Full-size released configs through moekit.hf: the moekit model they build (on the meta device: no memory) has
exactly the parameters the calculator counts and transformers instantiates — three independent routes agreeing."""

import pytest
import torch

import moekit.hf as mhf
from moekit.analysis import params
from moekit.models.lm import MoELM
from moekit.presets import PRESETS, get_preset

HF_PRESETS = [name for name, cfg in PRESETS.items() if isinstance(cfg, dict) and
              cfg.get("model_type") in mhf.supported_model_types()]  # fmt: skip


@pytest.mark.parametrize("name", HF_PRESETS)
def test_moekit_model_of_a_released_config_has_the_calculators_parameters(name):
    hf = get_preset(name)
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(hf, max_seq_len=16))
    report = params.analyze(hf)
    assert model.num_params() == report.total_params
    assert model.active_params() == report.active_params


def test_mixtral_8x7b_is_the_published_size():
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(get_preset("mixtral-8x7b"), max_seq_len=16))
    assert round(model.num_params() / 1e9, 1) == 46.7 and round(model.active_params() / 1e9, 1) == 12.9
