"""RoPE frequency scaling against transformers' own rope-init functions on the same parameters."""

import pytest
import torch

from moekit.config import ModelConfig
from moekit.layers.attention import rope_frequencies, rope_tables

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 1.0},  # DeepSeek-V3's released values
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
     "beta_slow": 1.0, "truncate": False},  # GPT-OSS's released values
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "attention_factor": 0.7},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"] + str(s.get("factor")))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_frequencies_match_transformers(scaling, head_dim):
    theta = 150000.0
    hf_config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                            max_position_embeddings=131072, rope_parameters={"rope_theta": theta, **scaling})
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
    got_freq, got_factor = rope_frequencies(head_dim, theta, scaling)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


def test_rope_tables_carry_the_attention_factor():
    scaling = SCALINGS[3]  # attention_factor 0.7
    cos, sin = rope_tables(16, 64, 10000.0, scaling)
    _, factor = rope_frequencies(64, 10000.0, scaling)
    assert factor == 0.7
    torch.testing.assert_close(cos[0], torch.full((64,), factor))  # position 0: cos = 1 before the factor
    torch.testing.assert_close((cos**2 + sin**2), torch.full_like(cos, factor**2))


@pytest.mark.parametrize("bad, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
    ("yarn", "must be a dict"),
])
def test_bad_rope_scaling_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(rope_scaling=bad)
