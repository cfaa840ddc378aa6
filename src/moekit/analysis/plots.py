"""Figures of a routing analysis, as PNG files (matplotlib, Agg backend: no display needed).

Every function takes the JSON-able dict of a `RoutingAnalysis` (`analysis.to_dict()`, or `analysis.json` read back),
so a figure can be redrawn from the saved numbers alone, and writes one PNG atomically (temp file + rename).

Legend: L MoE layers, E experts, G domains.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

FIGURES = ("load", "entropy", "coactivation", "domains", "specialisation")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _layer_labels(data: dict[str, Any]) -> list[str]:
    return [f"layer {layer['layer']}" for layer in data["layers"]]


def plot_load(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Heatmap layer x expert of the share of tokens routed to each expert (balanced: K/E), with max/mean and CV."""
    plt = _pyplot()
    layers = data["layers"]
    E = max(layer["num_experts"] for layer in layers)
    share_LE = [layer["load_share"] + [math.nan] * (E - layer["num_experts"]) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.5 + 0.7 * E), 1.6 + 0.55 * len(layers)))
    image = ax.imshow(share_LE, cmap="viridis", aspect="auto", vmin=0)
    for i, row in enumerate(share_LE):
        for e, value in enumerate(row):
            if not math.isnan(value):
                ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 * max(
                    v for v in row if not math.isnan(v)) else "black")
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"{lbl}  ({layer['imbalance']:.2f}x, cv {layer['cv']:.2f})"
                        for lbl, layer in zip(_layer_labels(data), layers)])
    balanced = layers[0]["top_k"] / layers[0]["num_experts"]
    ax.set_title(f"share of tokens per expert (balanced = {balanced:.3f}); max/mean, CV")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_entropy(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Mean router entropy per layer (nats), against ln E (uniform routing)."""
    plt = _pyplot()
    layers = data["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = range(len(layers))
    ax.bar(xs, [layer["entropy"] for layer in layers], color="tab:blue", label="mean router entropy")
    for x, layer in zip(xs, layers):
        ax.hlines(math.log(layer["num_experts"]), x - 0.4, x + 0.4, colors="tab:red", linestyles="--",
                  label="ln E (uniform)" if x == 0 else None)
        ax.text(x, layer["entropy"], f"{layer['entropy']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(_layer_labels(data))
    ax.set_ylabel("nats")
    ax.set_title("router entropy per layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_coactivation(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per layer, the share of tokens that choose both experts i and j (diagonal blanked), against chance."""
    plt = _pyplot()
    layers = data["layers"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    vmax = max(
        (v for layer in layers for i, row in enumerate(layer["coactivation_share"]) for j, v in enumerate(row) if i != j),
        default=1.0,
    ) or 1.0
    image = None
    for ax, layer, label in zip(axes.flat, layers, _layer_labels(data)):
        share = [[math.nan if i == j else v for j, v in enumerate(row)] for i, row in enumerate(layer["coactivation_share"])]
        image = ax.imshow(share, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{label} (chance {layer['coactivation_chance']:.3f})", fontsize=9)
        ax.set_xticks(range(layer["num_experts"]))
        ax.set_yticks(range(layer["num_experts"]))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, fraction=0.03)
    fig.suptitle("co-activation: share of tokens choosing both experts")
    return _save(fig, path)


def plot_domains(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Domain specialisation: each expert's share of tokens from the first domain, per layer (against the corpus
    share), and I(domain; expert) per layer against its shuffled-label baseline."""
    plt = _pyplot()
    layers = data["layers"]
    names = data["domain_names"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if len(names) < 2 or layers[0]["domain_shares"] is None:
        for ax in (left, right):
            ax.text(0.5, 0.5, "fewer than two domains in the text", ha="center", va="center")
            ax.axis("off")
        return _save(fig, path)
    focus = names.index("code") if "code" in names else 0
    corpus_share = data["domain_tokens"][focus] / max(1, sum(data["domain_tokens"]))
    E = max(layer["num_experts"] for layer in layers)
    share_LE = [[row[focus] for row in layer["domain_shares"]] + [math.nan] * (E - layer["num_experts"])
                for layer in layers]
    image = left.imshow(share_LE, cmap="coolwarm", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(share_LE):
        for e, value in enumerate(row):
            if not math.isnan(value):
                left.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    left.set_xticks(range(E))
    left.set_xlabel("expert")
    left.set_yticks(range(len(layers)))
    left.set_yticklabels(_layer_labels(data))
    left.set_title(f"share of each expert's tokens that are {names[focus]} (corpus: {corpus_share:.2f})", fontsize=10)
    fig.colorbar(image, ax=left, fraction=0.04)

    xs = list(range(len(layers)))
    value = [layer["domain_mi"]["value"] for layer in layers]
    base = [layer["domain_mi"]["baseline_mean"] for layer in layers]
    std = [layer["domain_mi"]["baseline_std"] for layer in layers]
    right.bar([x - 0.2 for x in xs], value, width=0.4, color="tab:blue", label="I(domain; expert)")
    right.bar([x + 0.2 for x in xs], base, width=0.4, yerr=std, capsize=3, color="tab:gray",
              label="shuffled domains (mean ± std)")
    right.set_xticks(xs)
    right.set_xticklabels(_layer_labels(data))
    right.set_ylabel("bits")
    h = _entropy_bits(data["domain_tokens"])
    right.set_title(f"domain mutual information (H(domain) = {h:.2f} bits)", fontsize=10)
    right.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_specialisation(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Token vs domain: the share of the expert choice's entropy explained by the domain and by the token id (MI
    excess over the shuffled baseline / H(expert)), and first-choice consistency against its shuffled value."""
    plt = _pyplot()
    layers = data["layers"]
    xs = list(range(len(layers)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    token = [layer["token_mi_fraction"] for layer in layers]
    left.bar([x + 0.2 for x in xs], token, width=0.4, color="tab:orange", label="token id")
    if layers[0]["domain_mi_fraction"] is not None:
        domain = [layer["domain_mi_fraction"] for layer in layers]
        left.bar([x - 0.2 for x in xs], domain, width=0.4, color="tab:blue", label="domain")
    left.set_xticks(xs)
    left.set_xticklabels(_layer_labels(data))
    left.set_ylabel("(MI - shuffled MI) / H(expert)")
    left.set_title("how much of the expert choice each label explains", fontsize=10)
    left.legend()
    if layers[0]["token_consistency"] is not None:
        for key, color, offset in (("token_consistency", "tab:orange", 0.2), ("domain_consistency", "tab:blue", -0.2)):
            if layers[0][key] is None:
                continue
            values = [layer[key]["value"] for layer in layers]
            base = [layer[key]["baseline_mean"] for layer in layers]
            label = key.split("_")[0]
            right.bar([x + offset for x in xs], values, width=0.4, color=color, label=f"by {label}")
            right.scatter([x + offset for x in xs], base, color="black", marker="_", s=200, zorder=3,
                          label="shuffled" if key == "token_consistency" else None)
        right.set_ylim(0, 1)
        right.set_ylabel("share of tokens")
        right.set_title("first choice = most frequent first choice of its token id / domain", fontsize=10)
        right.legend()
    else:
        right.text(0.5, 0.5, "no first choice (expert-choice routing)", ha="center", va="center")
        right.axis("off")
    right.set_xticks(xs)
    right.set_xticklabels(_layer_labels(data))
    fig.tight_layout()
    return _save(fig, path)


def _entropy_bits(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0


def plot_all(data: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every figure of FIGURES into out_dir as `<name>.png`. Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw = {
        "load": plot_load,
        "entropy": plot_entropy,
        "coactivation": plot_coactivation,
        "domains": plot_domains,
        "specialisation": plot_specialisation,
    }
    return {name: draw[name](data, out / f"{name}.png") for name in FIGURES}
