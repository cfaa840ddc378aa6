"""Understanding MoE models: parameter, FLOP and memory accounting (params), routing analysis (later)."""

from moekit.analysis.arch import ArchSpec, arch_from_config, load_config
from moekit.analysis.params import (
    ParamReport,
    analyze,
    format_comparison,
    format_published_table,
    format_report,
    published_comparison,
)

__all__ = [
    "ArchSpec",
    "ParamReport",
    "analyze",
    "arch_from_config",
    "format_comparison",
    "format_published_table",
    "format_report",
    "load_config",
    "published_comparison",
]
