"""Models built from the MoE layer: a decoder-only language model with a KV cache, and a vision MoE (V-MoE)."""

from moekit.models.lm import Block, LMOutput, MoELM
from moekit.models.vision import VisionMoE, VisionOutput

__all__ = ["Block", "LMOutput", "MoELM", "VisionMoE", "VisionOutput"]
