"""moekit: Mixture-of-Experts for PyTorch — build, train, run, scale and understand MoE models."""

from moekit.config import ModelConfig, MoEConfig, VisionConfig
from moekit.layers import MoE, MoEStats, collect_stats, total_aux_loss, update_biases
from moekit.models import MoELM, VisionMoE

__version__ = "0.1.0"
__all__ = [
    "MoE", "MoEConfig", "MoELM", "MoEStats", "ModelConfig", "VisionConfig", "VisionMoE", "collect_stats",
    "total_aux_loss", "update_biases",
    "load_pretrained", "save_pretrained", "__version__",
]


def __getattr__(name: str):
    """`moekit.load_pretrained` / `moekit.save_pretrained`: Hugging Face interop, imported on first use."""
    if name in ("load_pretrained", "save_pretrained"):
        from moekit import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
