"""Generation: greedy equals the step-by-step argmax of the full forward, the filters keep what they promise,
seeded sampling is reproducible, limits are checked."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moekit import MoELM
from moekit.generate import generate, generate_timed, sample_next, top_k_filter, top_p_filter
from moekit.presets import get_preset


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def model() -> MoELM:
    cfg = get_preset("tiny-mixtral")
    moe = dataclasses.replace(cfg.moe, d_model=64, d_ff=96)
    cfg = dataclasses.replace(cfg, vocab_size=61, d_model=64, dense_d_ff=192, max_seq_len=24, moe=moe, init_std=0.2)
    torch.manual_seed(0)
    return MoELM(cfg)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))


def test_greedy_equals_the_argmax_of_the_full_forward_at_every_step(model, prompt):
    out = generate(model, prompt, 8, greedy=True)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 13):
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))
    assert torch.equal(generate(model, prompt, 8, greedy=True), out)  # deterministic
    assert torch.equal(generate(model, prompt, 8, temperature=0), out)
    assert torch.equal(model.generate(prompt, 8, top_k=1, seed=5), out)  # top-1 sampling is greedy


def test_seeded_sampling_is_reproducible_and_seeds_differ(model, prompt):
    a = generate(model, prompt, 10, temperature=1.5, seed=1)
    assert torch.equal(a, generate(model, prompt, 10, temperature=1.5, seed=1))
    others = [generate(model, prompt, 10, temperature=1.5, seed=s) for s in range(2, 6)]
    assert any(not torch.equal(a, o) for o in others)


def test_generate_restores_training_mode_and_streams_each_step(model, prompt):
    model.train()
    seen = []
    out = generate(model, prompt, 4, greedy=True, stream=seen.append)
    assert model.training
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])


def test_eos_stops_when_every_row_is_done_and_pads_finished_rows(model, prompt):
    greedy = generate(model, prompt, 8, greedy=True)
    eos = int(greedy[0, 6])  # row 0 produces it by its second new token
    expected, ends = greedy.clone(), []
    for row in range(2):
        hits = (greedy[row, 5:] == eos).nonzero()
        if len(hits):
            first = 5 + int(hits[0])
            expected[row, first:] = eos
            ends.append(first + 1)
    length = max(ends) if len(ends) == 2 else 13
    assert torch.equal(generate(model, prompt, 8, greedy=True, eos_id=eos), expected[:, :length])


def test_prompt_plus_new_tokens_over_max_seq_len_is_an_error(model, prompt):
    message = r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds the model's max_seq_len=24"
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 20)
    assert generate(model, prompt, 19, greedy=True).shape == (2, 24)


def test_generate_timed_reports_tokens_per_second(model, prompt):
    result = generate_timed(model, prompt, 6, greedy=True)
    assert result.new_tokens == 6 and result.tokens.shape == (2, 11)
    assert result.tokens_per_second > 0 and result.decode_tokens_per_second > 0


# --- the filters ---


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.4, 0.3, 0.2, 0.1], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [
        [False, True, True, False],  # 0.5 + 0.3 reaches 0.75: the 0.15 is not needed
        [True, True, True, False],  # 0.4 + 0.3 = 0.7 < 0.75: the 0.2 is needed too
        [True, False, False, False],  # the top token alone exceeds p
    ]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist()[0] == [False, True, True, True]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum(dim=1).tolist() == [1, 1, 1]  # the top token always
    torch.testing.assert_close(top_p_filter(logits, 0.75)[kept], logits[kept])  # kept logits are untouched


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]]).expand(4000, 3)
    draws = sample_next(logits, generator=torch.Generator().manual_seed(0))
    assert (draws != 2).all() and abs((draws == 1).float().mean().item() - 0.75) < 0.03
    assert (sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(0)) == 1).all()
    assert (sample_next(logits, top_p=0.7, generator=torch.Generator().manual_seed(0)) == 1).all()
