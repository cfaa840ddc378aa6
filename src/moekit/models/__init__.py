"""Models built from the MoE layer: a decoder-only language model with a KV cache."""

from moekit.models.lm import Block, LMOutput, MoELM

__all__ = ["Block", "LMOutput", "MoELM"]
