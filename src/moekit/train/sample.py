"""Text in, text out: prompt a trained checkpoint and stream the continuation as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moekit.train.data import StreamDecoder, Tokenizer


@dataclass
class GeneratedText:
    """The continuation and its speed.

    Attributes:
        text: the generated text (the prompt not included).
        new_tokens: tokens generated (fewer than asked when EOS came first).
        prompt_tokens: tokens of the prompt the model saw (a long prompt keeps only its end).
        seconds: wall time of generation (prefill + decode).
    """

    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    start_ids: list[int] | None = None,
) -> GeneratedText:
    """Continue `prompt` with the model, stopping at EOS or after max_new_tokens.

    Args:
        model: an MoELM.
        tokenizer: its tokenizer.
        prompt: text to continue; "" starts a new document (the prompt is the EOS separator).
        max_new_tokens, temperature, top_k, top_p, greedy, seed: as in `moekit.generate.generate`.
        on_text: called with each piece of newly complete text as it is generated (never half a character).
        start_ids: ids put before the prompt; None = [EOS] (moekit's models saw every document start after an EOS;
            a released model wants its BOS, or nothing).

    Returns:
        GeneratedText. A prompt longer than max_seq_len - max_new_tokens keeps only its last tokens.
    """
    from moekit.generate import generate_timed

    limit = model.config.max_seq_len
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below the model's max_seq_len={limit}")
    ids = ([tokenizer.eos_id] if start_ids is None else list(start_ids)) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("an empty prompt needs start_ids (e.g. the model's BOS token) to start from")
    ids = ids[-(limit - max_new_tokens) :]
    device = next(model.parameters()).device
    decoder = StreamDecoder(tokenizer)

    def stream(next_B: torch.Tensor) -> None:
        token = int(next_B.reshape(-1)[0])
        if token != tokenizer.eos_id:
            piece = decoder.push([token])
            if piece and on_text is not None:
                on_text(piece)

    result = generate_timed(
        model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, greedy=greedy, eos_id=tokenizer.eos_id, seed=seed, stream=stream,
    )
    rest = decoder.flush()
    if rest and on_text is not None:
        on_text(rest)
    return GeneratedText(decoder.emitted, result.new_tokens, len(ids), result.prefill_seconds + result.decode_seconds)
