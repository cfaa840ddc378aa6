"""Understanding MoE models: parameter, FLOP and memory accounting (params); routing analysis (routing: the
statistics, plots: the figures, report: JSON + PNG + HTML and `moekit analyze`)."""

from moekit.analysis.arch import ArchSpec, arch_from_config, load_config
from moekit.analysis.params import (
    ParamReport,
    analyze,
    format_comparison,
    format_published_table,
    format_report,
    published_comparison,
)
from moekit.analysis.report import analyze_routing_report, write_report
from moekit.analysis.routing import LayerRouting, RoutingAnalysis, RoutingRecorder, analyze_routing

__all__ = [
    "ArchSpec",
    "LayerRouting",
    "RoutingAnalysis",
    "RoutingRecorder",
    "analyze_routing",
    "analyze_routing_report",
    "write_report",
    "ParamReport",
    "analyze",
    "arch_from_config",
    "format_comparison",
    "format_published_table",
    "format_report",
    "load_config",
    "published_comparison",
]
