"""The MoE layer and its parts, usable alone as a drop-in FFN replacement."""

from moekit.layers.dispatch import DispatchPlan, combine, expert_capacity, plan
from moekit.layers.experts import FFN, Experts, grouped_mm
from moekit.layers.moe import MoE, MoEStats, collect_stats, moe_layers, total_aux_loss, update_biases
from moekit.layers.routing import ROUTER_CLASSES, Router, RouterOutput, build_router

__all__ = [
    "FFN", "DispatchPlan", "Experts", "MoE", "MoEStats", "ROUTER_CLASSES", "Router", "RouterOutput", "build_router",
    "collect_stats", "combine", "expert_capacity", "grouped_mm", "moe_layers", "plan", "total_aux_loss", "update_biases",
]
