"""Full-size released configs through moekit.hf reproduce the published sizes (the per-family equality with the
calculator is in test_released_configs.py)."""

import torch

import moekit.hf as mhf
from moekit.models.lm import MoELM
from moekit.presets import get_preset


def test_mixtral_8x7b_is_the_published_size():
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(get_preset("mixtral-8x7b"), max_seq_len=16))
    assert round(model.num_params() / 1e9, 1) == 46.7 and round(model.active_params() / 1e9, 1) == 12.9


def test_deepseek_v3_is_the_published_size():
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(get_preset("deepseek-v3"), max_seq_len=16))
    embedding = model.embed.weight.numel()
    assert round(model.num_params() / 1e9) == 671  # the MTP module is not part of the model
    assert round((model.active_params() - embedding) / 1e9) == 37  # DeepSeek counts without the input embedding


def test_phi_3_5_moe_is_the_published_size():
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(get_preset("phi-3.5-moe"), max_seq_len=16))
    assert round(model.num_params() / 1e9, 1) == 41.9 and round(model.active_params() / 1e9, 1) == 6.6


def test_granite_3_0_3b_a800m_is_the_published_size():
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(get_preset("granite-3.0-3b-a800m"), max_seq_len=16))
    embedding = model.embed.weight.numel()  # tied: also the head
    assert round(model.num_params() / 1e9, 1) == 3.3 and round((model.active_params() - embedding) / 1e8) == 8
