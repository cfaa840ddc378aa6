"""moekit: Mixture-of-Experts for PyTorch — build, train, run, scale and understand MoE models."""

from moekit.config import ModelConfig, MoEConfig
from moekit.layers import MoE, MoEStats, collect_stats, total_aux_loss, update_biases
from moekit.models import MoELM

__version__ = "0.1.0"
__all__ = [
    "MoE", "MoEConfig", "MoELM", "MoEStats", "ModelConfig", "collect_stats", "total_aux_loss", "update_biases",
    "__version__",
]
