"""Autoregressive generation over the KV cache: one prefill of the prompt, then one token per step.

Legend: B batch, S prompt length, V vocabulary.

Sampling follows the usual order (as in transformers' logits processors): temperature, then top-k, then top-p
(nucleus, Holtzman et al. 2020), then a draw from the remaining distribution; temperature 0 or greedy=True takes
the argmax instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def top_k_filter(logits_BV: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the others to -inf (ties at the k-th value are all kept).

    Args:
        logits_BV: [B, V].
        k: >= 1; k >= V keeps everything.
    Returns:
        [B, V].
    """
    if k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = logits_BV.topk(k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: Tensor, p: float) -> Tensor:
    """Keep each row's nucleus: the fewest most-probable tokens whose probability mass reaches p; -inf elsewhere.

    A token is kept when the mass of the tokens ranked before it is < p, so the most probable token is always kept
    and the nucleus is minimal.

    Args:
        logits_BV: [B, V].
        p: in (0, 1]; 1 keeps everything.
    Returns:
        [B, V].
    """
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.float().softmax(dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= p
    drop_sorted_BV[:, 0] = False
    drop_BV = drop_sorted_BV.scatter(1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample_next(
    logits_BV: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token of each row from its last-position logits [B, V] -> [B] int64."""
    if greedy or temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        logits_BV = top_k_filter(logits_BV, top_k)
    if top_p is not None and top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, top_p)
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)


@dataclass
class GenerationResult:
    """Tokens and timings of one `generate_timed` call.

    Attributes:
        tokens: [B, S + n] prompt followed by the n generated tokens.
        new_tokens: n, generated per sequence (< max_new_tokens when every sequence hit eos_id).
        prefill_seconds: time of the prompt's forward (and the first token's sampling).
        decode_seconds: time of the remaining n - 1 steps.
    """

    tokens: Tensor
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the whole call, all sequences of the batch counted."""
        total = self.prefill_seconds + self.decode_seconds
        return self.tokens.shape[0] * self.new_tokens / total if total > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode steps alone (after the first token), all sequences counted."""
        steps = self.new_tokens - 1
        if steps < 1 or self.decode_seconds <= 0:
            return float("nan")
        return self.tokens.shape[0] * steps / self.decode_seconds


def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    seed: int | None = None,
    stream: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Continue each prompt of a batch, reusing the KV cache (in eval mode, under torch.inference_mode).

    Args:
        model: an `MoELM` (anything with `config.max_seq_len`, `new_cache`, `hidden_states` and `logits`).
        input_ids: [B, S] prompt token ids (all prompts the same length: no padding).
        max_new_tokens: tokens to add; S + max_new_tokens must be <= model.config.max_seq_len.
        temperature: softmax temperature; 0 means greedy.
        top_k: sample among the k most probable tokens only.
        top_p: sample from the nucleus of mass top_p only.
        greedy: take the argmax (ignores temperature, top_k, top_p, seed).
        eos_id: stop when every sequence has produced it; a finished sequence is padded with eos_id.
        seed: seeds the sampling generator (reproducible draws); None uses torch's global generator.
        stream: called with each step's new tokens [B] as they are produced.
    Returns:
        [B, S + n] int64, n <= max_new_tokens.
    """
    return generate_timed(
        model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
        eos_id=eos_id, seed=seed, stream=stream,
    ).tokens


def generate_timed(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    seed: int | None = None,
    stream: Callable[[Tensor], None] | None = None,
) -> GenerationResult:
    """`generate`, also returning prefill and decode times (see `GenerationResult.tokens_per_second`)."""
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    B, S = input_ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        # inference_mode: no_grad without autograd's view and version bookkeeping (about 10% of a CPU decode step)
        with torch.inference_mode():
            start = time.perf_counter()
            cache = model.new_cache(B, S + max_new_tokens)
            tokens_BT = input_ids.new_empty(B, S + max_new_tokens)
            tokens_BT[:, :S] = input_ids
            finished_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            logits_BV = model.logits(model.hidden_states(input_ids, cache=cache, start_pos=0)[:, -1])
            prefill_seconds, n = None, 0
            for n in range(1, max_new_tokens + 1):
                next_B = sample_next(logits_BV, temperature, top_k, top_p, greedy, generator)
                if eos_id is not None:
                    next_B = next_B.masked_fill(finished_B, eos_id)
                    finished_B |= next_B == eos_id
                tokens_BT[:, S + n - 1] = next_B
                if stream is not None:
                    stream(next_B)
                if prefill_seconds is None:
                    prefill_seconds = time.perf_counter() - start
                    start = time.perf_counter()
                if n == max_new_tokens or (eos_id is not None and bool(finished_B.all())):
                    break
                hidden_B1D = model.hidden_states(next_B[:, None], cache=cache, start_pos=S + n - 1)
                logits_BV = model.logits(hidden_B1D[:, -1])
            decode_seconds = time.perf_counter() - start if max_new_tokens > 1 else 0.0
    finally:
        model.train(was_training)
    tokens_BT = tokens_BT[:, : S + n].clone()  # a normal tensor again: inference tensors cannot be saved for backward
    return GenerationResult(tokens_BT, n, prefill_seconds or 0.0, decode_seconds)


def _check_args(model, input_ids: Tensor, max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a non-empty [B, S] tensor of prompts, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.max_seq_len
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = "
            f"{input_ids.shape[1] + max_new_tokens} exceeds the model's max_seq_len={limit}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
