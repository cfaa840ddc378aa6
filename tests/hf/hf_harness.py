"""Shared proof for every family: a tiny random transformers model, saved to a folder, must give moekit the same
logits (<= 1e-4 float32), the same greedy continuation with the KV cache, and survive export back into transformers.

Random init leaves many constants trivial (norm weights 1, biases 0, DeepSeek's correction bias 0, GPT-OSS sinks
0); `randomize` makes every parameter and float buffer non-trivial so a mapping that drops one cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import moekit.hf as mhf

TOL = 1e-4


@torch.no_grad()
def randomize(hf_model, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every parameter and every persistent float buffer: norms around 1, others N(0, scale)-shifted."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in list(hf_model.named_parameters()) + list(hf_model.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name or "rotary" in name:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif "e_score_correction_bias" in name:
            p.copy_(0.5 * noise)  # large enough to change which experts are selected
        else:
            p.add_(scale * noise)


def save_tiny(hf_model, folder) -> None:
    hf_model.save_pretrained(folder)


def edit_checkpoint(folder, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rewrite a tiny single-file checkpoint (folder/model.safetensors) as `edit` returns its tensors."""
    file = Path(folder) / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def inputs(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(hf_model, model, ids: torch.Tensor, tol: float = TOL) -> float:
    want = hf_model(ids).logits.float()
    got = model(ids).logits.float()
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max |logit difference| {diff:.3g} > {tol}"
    return diff


@torch.no_grad()
def assert_same_greedy(hf_model, model, ids: torch.Tensor, new_tokens: int = 8) -> None:
    want = hf_model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
    got = model.generate(ids, new_tokens, temperature=0.0)
    assert got.shape == want.shape and torch.equal(got, want), f"moekit {got.tolist()} != transformers {want.tolist()}"


def roundtrip(model, folder, hf_class, ids: torch.Tensor, tol: float = TOL) -> float:
    """save_pretrained with moekit, load with transformers, compare logits."""
    mhf.save_pretrained(model, folder)
    back = hf_class.from_pretrained(folder, dtype=torch.float32).eval()
    return assert_same_logits(back, model, ids, tol)
