"""RoPE frequency scaling against transformers' own rope-init functions on the same parameters; RMSNorm and RoPE
against the plain formulas (forward bit for bit, backward and float64 gradcheck)."""

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


def _longrope(head_dim: int, **extra) -> dict:
    half = head_dim // 2
    return {"rope_type": "longrope", "original_max_position_embeddings": 4096,
            "short_factor": [1.0 + 0.01 * i for i in range(half)], "long_factor": [1.0 + 0.5 * i for i in range(half)],
            **extra}  # fmt: skip


@pytest.mark.parametrize("extra", [{"factor": 32.0}, {"attention_factor": 1.3}], ids=str)
@pytest.mark.parametrize("seq_len", [None, 4096, 4097, 131072])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_longrope_frequencies_match_transformers_short_and_long(extra, seq_len, head_dim):
    theta, scaling = 10000.0, _longrope(head_dim, **extra)
    hf_config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                            max_position_embeddings=131072, rope_parameters={"rope_theta": theta, **scaling})
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=seq_len)
    got_freq, got_factor = rope_frequencies(head_dim, theta, scaling, seq_len=seq_len)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=0, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)
    short_freq, _ = rope_frequencies(head_dim, theta, scaling)
    assert (seq_len is not None and seq_len > 4096) == bool((got_freq != short_freq).any())


def test_longrope_with_phimoe_mscales_uses_the_short_or_long_one():
    scaling = _longrope(64, short_mscale=1.1, long_mscale=1.7, factor=32.0)
    assert rope_frequencies(64, 1e4, scaling)[1] == 1.1
    assert rope_frequencies(64, 1e4, scaling, seq_len=4097)[1] == 1.7


def test_longrope_factors_must_cover_half_the_head():
    with pytest.raises(ValueError, match="longrope needs head_dim / 2 = 32 factors, got 16"):
        rope_frequencies(64, 1e4, _longrope(32, factor=2.0))


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
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "original_max_position_embeddings"),
    (_longrope(8), "longrope rope_scaling needs its attention factor"),
    (_longrope(8, factor=2.0, long_factor=[1.0]), "same length"),
    (_longrope(8, factor=2.0, short_factor=[1.0, 0.0, 1.0, 1.0]), "short_factor must be a non-empty list of numbers"),
])
def test_bad_rope_scaling_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(rope_scaling=bad)


# --- the hand-written backwards of RMSNorm and RoPE ---


def _plain_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def test_rmsnorm_equals_torch_forward_bitwise_and_its_gradients(no_kernels):
    # The PyTorch form (the C++ kernel's own agreement with it: tests/layers/test_kernels.py).
    from moekit.layers.attention import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_strided = torch.randn(3, 5, 2, 16)[:, :, 1].requires_grad_(False)  # a non-contiguous input
    for inp in (x, x_strided):
        torch.testing.assert_close(norm(inp), torch.nn.functional.rms_norm(inp, (16,), norm.weight, 1e-5),
                                   atol=0, rtol=0)
    g = torch.randn(3, 5, 16)
    ours = torch.autograd.grad(norm(x), (x, norm.weight), g)
    ref = torch.autograd.grad(torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5), (x, norm.weight), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    from moekit.layers.attention import _RMSNorm

    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x64, w64))
    import moekit.layers.attention as attention_module  # torch < 2.8 has no fused kernel: the fallback's numbers

    fused, attention_module._FUSED_RMS_NORM = attention_module._FUSED_RMS_NORM, None
    try:
        fallback = torch.autograd.grad(norm(x), (x, norm.weight), g)
        torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5))
    finally:
        attention_module._FUSED_RMS_NORM = fused
    for a, b in zip(fallback, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    frozen = torch.randn(2, 16, requires_grad=True)
    norm.weight.requires_grad_(False)  # a frozen weight gets no gradient, the input still does
    norm(frozen).sum().backward()
    assert frozen.grad is not None and norm.weight.grad is None


def test_rope_equals_the_plain_formula_bitwise_and_its_backward_is_the_inverse_rotation():
    from moekit.layers.attention import apply_rope

    torch.manual_seed(0)
    cos, sin = rope_tables(7, 8, 10000.0)
    qkv = torch.randn(2, 7, 5, 8, requires_grad=True)
    qk = qkv.split([3, 2], dim=2)[0]  # a strided view, as the attention passes it
    torch.testing.assert_close(apply_rope(qk, cos, sin), _plain_rope(qk, cos, sin), atol=0, rtol=0)
    g = torch.randn(2, 7, 3, 8)
    ours = torch.autograd.grad(apply_rope(qk, cos, sin), qkv, g)[0]
    ref = torch.autograd.grad(_plain_rope(qk, cos, sin), qkv, g)[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    cos64, sin64 = cos.double(), sin.double()
    x64 = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos64, sin64), (x64,))


def test_heads_major_rope_is_the_same_values_in_per_head_contiguous_storage():
    from moekit.layers.attention import apply_rope

    cos, sin = rope_tables(6, 8, 10000.0)
    x = torch.randn(2, 6, 3, 8)
    out = apply_rope(x, cos, sin, heads_major=True)
    torch.testing.assert_close(out, apply_rope(x, cos, sin), atol=0, rtol=0)
    assert out.transpose(1, 2).is_contiguous() and out[:, :, :2].transpose(1, 2)[0].is_contiguous()
