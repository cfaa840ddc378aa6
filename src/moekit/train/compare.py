"""The experiment: a dense model and an MoE model with the same active parameters per token, trained on the same
batches for the same tokens; validation loss against training FLOPs.

Both runs share one corpus, one tokenizer, one seed (so the same initialisation stream and the same batches, in the
same order) and one schedule; only the feed-forward differs. At equal active parameters the two cost about the same
FLOPs per token, so at equal tokens they have spent about the same compute, and the MoE model's extra (inactive)
parameters are what the comparison measures (Shazeer et al. 2017; Fedus et al. 2021, Fig. 1).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moekit.train.data import prepare_data
from moekit.train.trainer import TrainConfig, TrainResult, Trainer, run_name

COMPARE_PLOT = "compare.png"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


@dataclass
class CompareConfig:
    """A dense-vs-MoE comparison. The defaults (2 x 655,360 tokens) take about 4 minutes on 2 idle CPU cores."""

    moe: str = "tiny-mixtral"  # the MoE preset
    dense: str = "tiny-dense"  # the dense baseline with the same active parameters
    tokens: int = 655_360  # training tokens per model (640 steps of 16 x 64; 0.75 epoch of the embedded corpus)
    out: str = "runs/compare"  # <out>/<preset>/ holds each run; compare.png/.json/.md the result
    batch_size: int = 16
    seq_len: int = 64  # short windows: most of the signal at this budget is local, and steps are cheaper
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 40  # steps between validations: 16 points per curve with the defaults
    eval_windows: int = 32
    seed: int = 0
    data: str | None = None  # None = the embedded corpus
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    text_field: str = "text"
    bf16: bool = False
    device: str = "auto"

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))


@dataclass
class CompareRow:
    """One model's line of the result table."""

    preset: str
    val_loss: float | None
    active_params: int
    total_params: int
    tokens: int
    train_flops: float
    seconds: float


@dataclass
class CompareResult:
    """Both rows, each run's validation curve [(training FLOPs, val loss)], and where the outputs went."""

    rows: list[CompareRow]
    curves: dict[str, list[tuple[float, float]]]
    out: str

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "curves": self.curves, "out": self.out}

    def markdown(self) -> str:
        lines = [
            "| model | final val loss | active params | total params | tokens | train FLOPs | time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            val = "n/a" if r.val_loss is None else f"{r.val_loss:.4f}"
            lines.append(
                f"| {r.preset} | {val} | {r.active_params:,} | {r.total_params:,} | {r.tokens:,} | "
                f"{r.train_flops:.3g} | {r.seconds:.0f} |"
            )
        return "\n".join(lines)


def compare(config: CompareConfig, log: Callable[[str], None] = print, progress: bool | None = None) -> CompareResult:
    """Train config.dense then config.moe on the same data and batches; write the plot, JSON and markdown table.

    Each run goes to <out>/<preset name>/ (replacing an earlier comparison's run there) with a final checkpoint,
    so `moekit generate --checkpoint <out>/<preset name>` works afterwards.

    Args:
        config: the comparison.
        log: receives progress lines.
        progress: tqdm bars (None: only on a terminal).

    Returns:
        CompareResult; also written to <out>/compare.json, <out>/compare.md and plotted in <out>/compare.png.
    """
    if run_name(config.dense) == run_name(config.moe):
        raise ValueError(f"compare needs two different models, got {config.dense!r} twice")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config.data, config.tokenizer, config.vocab_size, config.text_field, seed=config.seed)
    results: dict[str, TrainResult] = {}
    for preset in (config.dense, config.moe):
        log(f"--- {preset} ---")
        run = TrainConfig(
            preset=preset, data=config.data, out=str(out / run_name(preset)), steps=config.steps,
            batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr,
            warmup=min(config.warmup, config.steps - 1),
            eval_every=config.eval_every, eval_windows=config.eval_windows, save_every=0, keep_checkpoints=1,
            tokenizer=config.tokenizer, vocab_size=config.vocab_size, text_field=config.text_field, seed=config.seed,
            bf16=config.bf16, device=config.device,
        )
        results[preset] = Trainer(run, overwrite=True, data=data, log=log, progress=progress).train()
    dense, moe = results[config.dense], results[config.moe]
    if abs(moe.active_params - dense.active_params) > 0.05 * dense.active_params:
        log(
            f"note: {config.moe} has {moe.active_params:,} active parameters, {config.dense} {dense.active_params:,}: "
            "not an equal-compute comparison"
        )
    rows = [
        CompareRow(name, r.val_loss, r.active_params, r.total_params, r.tokens, r.train_flops, r.seconds)
        for name, r in results.items()
    ]
    curves = {
        name: [(rec["flops"], rec["val_loss"]) for rec in r.history if rec.get("val_loss") is not None]
        for name, r in results.items()
    }
    result = CompareResult(rows, curves, str(out))
    (out / COMPARE_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out / COMPARE_MD).write_text(result.markdown() + "\n", encoding="utf-8")
    plot_compare(result, out / COMPARE_PLOT)
    return result


def plot_compare(result: CompareResult, path: str | os.PathLike) -> None:
    """Validation loss against training FLOPs, one line per model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.rows:
        points = result.curves[row.preset]
        label = f"{row.preset} ({row.active_params / 1e6:.2f}M active / {row.total_params / 1e6:.2f}M total)"
        ax.plot([f for f, _ in points], [v for _, v in points], "o-", ms=3, label=label)
    ax.set_xlabel("training FLOPs (3 x forward FLOPs per token x tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("dense vs MoE at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
