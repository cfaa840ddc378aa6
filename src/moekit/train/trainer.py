"""Training a language model from a preset on local text: AdamW, warmup + cosine, clipping, accumulation, bf16,
periodic validation, metrics, plots and atomic checkpoints from which a killed run resumes bit for bit.

Legend: B batch, S sequence length, V vocabulary.

One optimizer step: `grad_accum` micro-batches of B windows each (forward, loss / grad_accum, backward), clip the
global gradient norm, set the scheduled learning rate, `optimizer.step()`, then `update_biases(model)` (the
aux-loss-free balancer's once-per-step update). Under torchrun (`moekit train --nproc N`) the same loop runs with
expert parallelism (`ep` ranks share each layer's experts, see moekit.parallel): `batch_size` stays the global
micro-batch, each rank takes its 1/N of every batch, and losses, gradients, clipping and balancing are reduced over
the ranks, so a run computes what one process would on the same batches (up to float rounding). Everything random
is drawn from two generators, torch's global one (initialisation, routers with noise) and the data sampler's own;
both states go into every checkpoint, with the weights and the AdamW moments, so a resumed run computes the same
floats as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import kernels
from moekit.layers.moe import collect_stats, update_biases
from moekit.train import checkpoint as ckpt
from moekit.train.data import Data, Tokenizer, prepare_data

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class TrainConfig:
    """Everything that defines a training run. Saved in each checkpoint; `--resume` restores it."""

    preset: str = "tiny-mixtral"  # model preset (moekit.presets.list_presets()) or a ModelConfig .json file
    data: str | None = None  # file, folder or JSONL; None = the embedded corpus (Python docs + stdlib sources)
    out: str = "runs/tiny-mixtral"  # run directory: metrics.jsonl, loss.png, checkpoints/, latest
    steps: int = 200  # optimizer steps (the default run: 409,600 tokens, about 1.5 minutes on 2 idle CPU cores)
    batch_size: int = 16  # windows per micro-batch
    seq_len: int = 128  # tokens per window
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate; tiny models tolerate a high one
    min_lr_ratio: float = 0.1  # cosine decays to lr * this (Chinchilla/LLaMA recipe)
    warmup: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # on matrices only (dim >= 2); norms, biases and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95  # 0.95 rather than 0.999: steadier for short LM runs (GPT-3, LLaMA)
    clip: float = 1.0  # global gradient-norm clip; 0 = off
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and optimizer stay float32)
    seed: int = 0  # initialisation, data sampling and the train/validation split
    eval_every: int = 50  # steps between validations (and one at the end)
    eval_windows: int = 32  # validation windows of seq_len tokens, spread evenly over the validation split
    save_every: int = 100  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept; 0 = all
    log_every: int = 0  # steps between printed lines when there is no progress bar; 0 = about 20 lines a run
    tokenizer: str = "bpe"  # "bpe" (trained on the training split) or "bytes"
    vocab_size: int = 4096  # BPE vocabulary
    max_tokens: int | None = None  # use only the first N tokens of the training split
    text_field: str = "text"  # JSONL field holding the text
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    ep: int = 1  # expert-parallel ranks (a divisor of the torchrun world; the rest is data parallel); 1 = off
    dist_timeout: float = 300.0  # seconds a collective waits for the other ranks before raising (a dead rank)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.clip >= 0 and self.weight_decay >= 0):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, clip >= 0 and weight_decay >= 0")
        if self.tokenizer not in ("bpe", "bytes"):
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}: expected 'bpe' or 'bytes'")
        if isinstance(self.ep, bool) or not isinstance(self.ep, int) or self.ep < 1 or not self.dist_timeout > 0:
            raise ValueError(
                f"ep must be a positive integer and dist_timeout > 0, got ep={self.ep!r}, "
                f"dist_timeout={self.dist_timeout!r}"
            )
        if self.max_tokens is not None and self.max_tokens < self.seq_len + 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be at least seq_len + 1 = {self.seq_len + 1}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


# Fields a resumed run may change: they do not touch the numbers of training.
# (ep too: checkpoints hold the single-process layout and the global batch does not depend on the ranks.)
RESUMABLE_CHANGES = frozenset(
    {"out", "steps", "eval_every", "save_every", "keep_checkpoints", "log_every", "device", "ep", "dist_timeout"}
)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio.

    Step i is the (i+1)-th update: warmup gives lr * (i+1)/warmup, so the first update is small but not zero and
    step warmup-1 uses the peak; the cosine then reaches its floor exactly at the last step (Loshchilov & Hutter
    2017, without restarts).
    """
    done = step + 1
    if done <= config.warmup:
        return config.lr * done / config.warmup
    floor = config.lr * config.min_lr_ratio
    progress = min(1.0, (done - config.warmup) / max(1, config.steps - config.warmup))
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """What a finished run reports. `history` holds every metrics.jsonl record of the run (resumed ones included)."""

    run_dir: str
    checkpoint: str
    steps: int
    tokens: int
    final_loss: float
    val_loss: float | None
    total_params: int
    active_params: int
    train_flops: float
    seconds: float
    history: list[dict[str, Any]]


def training_config(options: dict[str, Any], resume: bool = False) -> TrainConfig:
    """The TrainConfig for a run: `options` over the defaults, or, when resuming a run that has a checkpoint, over
    the settings that run was started with (so `--resume` needs no other flag).

    Args:
        options: TrainConfig fields to set (must include "out" to resume anything but the default directory).
        resume: continue the run in options["out"] if it has a checkpoint.

    Raises:
        ValueError: resuming with a different value for a field outside RESUMABLE_CHANGES (it would change the
            numbers of training: the resumed run could no longer match an uninterrupted one).
    """
    out = options.get("out", TrainConfig.out)
    found = ckpt.find_checkpoint(out) if resume and Path(out).exists() else None
    if found is None:
        return TrainConfig(**options)
    saved = TrainConfig(**ckpt.load_state(ckpt.resolve_checkpoint(out))[0]["train_config"])
    conflicts = [
        f"{k}={v!r} (the run used {getattr(saved, k)!r})"
        for k, v in options.items()
        if k not in RESUMABLE_CHANGES and v != getattr(saved, k)
    ]
    if conflicts:
        raise ValueError(f"cannot resume {str(out)!r} with different settings: {', '.join(conflicts)}")
    return replace(saved, **{k: v for k, v in options.items() if k in RESUMABLE_CHANGES})


def run_name(preset: str) -> str:
    """A directory name for a run of `preset`: the preset's name, or a config file's stem."""
    return Path(preset).stem if preset.endswith(".json") else preset


def build_model_config(preset: str, vocab_size: int, seq_len: int):
    """The preset's ModelConfig with the tokenizer's vocabulary and room for seq_len positions.

    Args:
        preset: a tiny preset name, or the path of a JSON file holding a `ModelConfig.to_dict()` (any model size).
        vocab_size: the tokenizer's vocabulary (replaces the preset's).
        seq_len: training window; max_seq_len is raised to it if smaller.
    """
    from moekit.config import ModelConfig
    from moekit.presets import get_preset, list_presets

    if preset.endswith(".json"):
        if not Path(preset).is_file():
            raise ValueError(f"model config file {preset!r} does not exist")
        config = ModelConfig.from_dict(json.loads(Path(preset).read_text(encoding="utf-8")))
    else:
        config = get_preset(preset)  # raises ValueError listing the presets for an unknown name
    if not isinstance(config, ModelConfig):
        raise ValueError(
            f"preset {preset!r} is a published model's config (for `moekit params`), too large to train here: "
            f"choose one of {', '.join(list_presets())}"
        )
    return replace(config, vocab_size=vocab_size, max_seq_len=max(config.max_seq_len, seq_len))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs (torch >= 2.4 on CPU)


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only ([out, in] weights, embeddings, stacked [E, d, f] expert weights).

    On CPU and CUDA it is torch's fused kernel (one pass over each parameter and its two moments instead of a pass
    per arithmetic op; `transformers.Trainer`'s default optimizer on torch >= 2.8 too): tiny-mixtral's step takes
    13 ms instead of the foreach implementation's 42 ms on this project's 2-core CPU. Same update rule; the results
    differ from foreach's in the last bits only.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=True if fused else None
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


def load_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line, from a kill, is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    # A killed run may have logged steps after its last checkpoint; the resumed run logs them again.
    kept = [r for r in load_metrics(run_dir) if r.get("step", 0) <= step]
    tmp = run_dir / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, run_dir / METRICS)
    return kept


def _clear_run(run_dir: Path) -> None:
    # Only what a run writes: a user's other files in the folder stay.
    shutil.rmtree(run_dir / ckpt.CHECKPOINTS, ignore_errors=True)
    for name in (ckpt.LATEST, METRICS, LOSS_PLOT):
        (run_dir / name).unlink(missing_ok=True)


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Training loss (and validation loss where measured) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps, ce = [r["step"] for r in records], [r["ce"] for r in records]
    ax.plot(steps, ce, color="tab:blue", alpha=0.3, lw=0.8)
    window = max(1, len(ce) // 25)  # each step sees a few random windows: a running mean shows the trend
    smooth = [sum(ce[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ce))]
    ax.plot(steps, smooth, color="tab:blue", label=f"train cross-entropy (mean of {window} steps)")
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        val_steps, val_loss = [r["step"] for r in val], [r["val_loss"] for r in val]
        ax.plot(val_steps, val_loss, "o-", color="tab:orange", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Trainer:
    """One training run: data, model, optimizer and the loop. `Trainer(config).train()` or `train(config)`.

    Args:
        config: the run's TrainConfig.
        resume: continue from the run directory's latest checkpoint (if there is none, start fresh).
        overwrite: remove an existing run in `config.out` (its checkpoints, metrics and plot) and start fresh.
        data: prepared data to reuse (compare trains two models on one corpus); built from the config if None.
        log: receives one line of text per report.
        progress: show a tqdm bar; None = only on a terminal and not under CI=true.

    Raises:
        ValueError: the run directory holds a run and neither resume nor overwrite was asked for; a resumed run's
            settings or data differ from the checkpoint's.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        overwrite: bool = False,
        data: Data | None = None,
        log: Callable[[str], None] = print,
        progress: bool | None = None,
    ) -> None:
        from moekit.models.lm import MoELM

        build_model_config(config.preset, 257, config.seq_len)  # an unknown preset fails now, not after the data
        self.config = config
        self.dist = None
        if config.ep > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from moekit.parallel.run import ParallelRun

            self.dist = ParallelRun(config.ep, config.dist_timeout)
        self.is_main = self.dist is None or self.dist.rank == 0
        self.log = log if self.is_main else (lambda *_: None)
        self.progress = (_progress_enabled() if progress is None else progress) and self.is_main
        self.run_dir = Path(config.out)
        self.device = _device(config.device)
        if config.bf16 and self.device.type == "cpu" and kernels.bf16_matmul_emulated():
            self.log(
                "note: --bf16 on a CPU without bfloat16 matrix instructions: PyTorch emulates bfloat16 GEMMs here "
                "(4-30x slower than float32 on the machines measured), so this run will be slower than float32"
            )
        found = ckpt.find_checkpoint(self.run_dir) if self.run_dir.exists() else None
        if found is not None and not resume and not overwrite:
            raise ValueError(f"{str(self.run_dir)!r} already holds a run: pass --resume to continue it or --overwrite")
        if overwrite and not resume:
            found = None
        if resume and found is None:
            self.log(f"no checkpoint in {self.run_dir}: starting a new run")
        if self.is_main:
            if found is None:  # also drops the metrics of a run killed before its first checkpoint
                _clear_run(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist is not None:
            self.dist.barrier()

        saved_state, saved_rng = None, None
        if found is not None:
            found = ckpt.resolve_checkpoint(self.run_dir)
            saved_state, saved_rng = ckpt.load_state(found)
            self._check_resumable(saved_state["train_config"])
            tokenizer: str | Tokenizer = Tokenizer.load(found / ckpt.TOKENIZER_FILE)
        else:
            tokenizer = config.tokenizer
        if data is None:
            data = prepare_data(
                config.data, tokenizer, config.vocab_size, config.text_field, config.max_tokens, config.seed
            )
        self.data = data
        if saved_state is not None and saved_state["data_fingerprint"] != data.train.fingerprint():
            raise ValueError(f"the training data differ from those the run in {str(self.run_dir)!r} was trained on")

        torch.manual_seed(config.seed)  # the same initial weights for the same seed
        self.model_config = build_model_config(config.preset, data.tokenizer.vocab_size, config.seq_len)
        self.model = MoELM(self.model_config).to(self.device)
        self.num_params, self.active_params = self.model.num_params(), self.model.active_params()
        self.flops_per_token = 3 * self.model.flops_per_token(config.seq_len)  # forward + backward (2x forward)
        self.forward = self.model if self.dist is None else self.dist.wrap(self.model)  # experts sharded from here
        self.optimizer = optimizer_for(self.model, config)
        self.generator = torch.Generator().manual_seed(config.seed)  # batches: independent of model randomness
        self.step, self.tokens, self.history = 0, 0, []
        if found is not None:
            self._restore(found, saved_state, saved_rng)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        current = asdict(self.config)
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}"
            for k, v in current.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v
        ]
        if changed:
            raise ValueError(f"cannot resume {str(self.run_dir)!r} with different settings ({'; '.join(changed)})")

    def _restore(self, found: Path, state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
        saved_config = ckpt.load_config(found)
        if saved_config != self.model_config.to_dict():
            diff = [k for k in saved_config if saved_config.get(k) != self.model_config.to_dict().get(k)]
            raise ckpt.CheckpointError(f"{str(found / ckpt.CONFIG_FILE)!r} is for another model (fields {diff} differ)")
        shard = None if self.dist is None else self.dist.shard_state(self.model, self.optimizer)
        ckpt.load_weights(self.model, found, None if shard is None else shard[0])
        ckpt.load_optimizer(self.optimizer, self.model, found, None if shard is None else shard[1])
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["data"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step, self.tokens = state["step"], state["tokens"]
        if self.is_main:  # one writer (the other ranks read what it keeps: the replace is atomic)
            self.history = _truncate_metrics(self.run_dir, self.step)
        else:
            self.history = [r for r in load_metrics(self.run_dir) if r.get("step", 0) <= self.step]
        self.log(f"resumed {self.run_dir} from {found.name} (step {self.step}, {self.tokens:,} tokens)")

    # ------------------------------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        """Run the remaining steps; validate, log, plot and checkpoint on schedule. Returns the TrainResult."""
        cfg = self.config
        log_every = cfg.log_every or max(1, cfg.steps // 20)
        self.log(self.data.summary())
        self.log(
            f"model {cfg.preset}: {self.num_params:,} parameters, {self.active_params:,} active; "
            f"{cfg.steps} steps x {cfg.tokens_per_step:,} tokens on {self.device.type}"
            + ("" if self.dist is None else f" ({self.dist.describe()})")
        )
        bar = self._bar()
        start = time.perf_counter()
        last_saved = self.step if self.step else -1
        with open(self.run_dir / METRICS if self.is_main else os.devnull, "a", encoding="utf-8") as metrics_file:
            while self.step < cfg.steps:
                record = self._train_step()
                if record["step"] % cfg.eval_every == 0 or record["step"] == cfg.steps:
                    record.update(self.evaluate())
                self.history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                self._report(record, bar, log_every)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                    self.save()
                    last_saved = self.step
        if bar is not None:
            bar.close()
        if last_saved != self.step:  # nothing left to run (a finished run resumed): still leave a checkpoint
            self.save()
        if self.is_main:
            plot_losses(self.history, self.run_dir / LOSS_PLOT, self._title())
        last = self.history[-1] if self.history else {}
        val = next((r["val_loss"] for r in reversed(self.history) if r.get("val_loss") is not None), None)
        return TrainResult(
            run_dir=str(self.run_dir),
            checkpoint=str(ckpt.find_checkpoint(self.run_dir)),
            steps=self.step,
            tokens=self.tokens,
            final_loss=last.get("loss", float("nan")),
            val_loss=val,
            total_params=self.num_params,
            active_params=self.active_params,
            train_flops=self.flops_per_token * self.tokens,
            seconds=time.perf_counter() - start,
            history=self.history,
        )

    def _train_step(self) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = ce_sum = aux_sum = 0.0
        imbalances = []
        for micro in range(cfg.grad_accum):
            batch = self.data.train.sample(cfg.batch_size, cfg.seq_len, self.generator)
            x, y = batch.x, batch.y
            if self.dist is not None:  # every rank draws the same global batch and takes its share of the rows
                x, y = self.dist.my_rows(x), self.dist.my_rows(y)
            x, y = x.to(self.device), y.to(self.device)
            # Under expert parallelism the gradients are reduced over the ranks once, by the last micro-batch's
            # backward (the earlier ones accumulate locally).
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if self.dist is None or last else self.dist.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = self.forward(x, targets=y)
                (out.loss / cfg.grad_accum).backward()
            losses = torch.stack([out.loss, out.ce_loss, out.aux_loss]).detach().float()
            if self.dist is not None:  # the global batch's losses: the mean of the ranks' (equal shares)
                losses = self.dist.mean(losses)
            loss, ce, aux = losses.tolist()
            loss_sum, ce_sum, aux_sum = loss_sum + loss, ce_sum + ce, aux_sum + aux
            imbalances.append(load_imbalance(self.model))
        max_norm = cfg.clip if cfg.clip > 0 else float("inf")
        if self.dist is None:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            grad_norm = self.dist.clip_grad_norm_(self.model, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_biases(self.model)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        seconds = time.perf_counter() - t0
        imbalance = None if imbalances[0] is None else sum(imbalances) / len(imbalances)
        n = cfg.grad_accum
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_sum / n,
            "ce": ce_sum / n,
            "aux": aux_sum / n,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tok_per_s": cfg.tokens_per_step / seconds,
            "imbalance": imbalance,
            "flops": self.flops_per_token * self.tokens,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean cross-entropy over the fixed validation windows, overall and per domain. Uses no randomness."""
        cfg = self.config
        self.model.eval()
        names = self.data.val.domain_names
        sums = torch.zeros(len(names), dtype=torch.float64)
        counts = torch.zeros(len(names), dtype=torch.float64)
        for batch in self.data.val.eval_batches(cfg.batch_size, cfg.seq_len, cfg.eval_windows):
            x_BS, y_BS, domains = batch.x, batch.y, batch.domains
            if self.dist is not None:  # a share of the windows each (possibly none: the layers still take part)
                x_BS, y_BS, domains = (self.dist.my_rows(t, uneven=True) for t in (x_BS, y_BS, domains))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits_BSV = self.model(x_BS.to(self.device)).logits
            y_BS = y_BS.to(self.device)
            ce_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten(), reduction="none")
            domains = domains.flatten().long()
            sums.index_add_(0, domains, ce_BS.double().cpu())
            counts.index_add_(0, domains, torch.ones_like(domains, dtype=torch.float64))
        if self.dist is not None:
            sums, counts = self.dist.sum(sums), self.dist.sum(counts)
        self.model.train()
        if counts.sum() == 0:
            return {}
        by_domain = {names[i]: float(sums[i] / counts[i]) for i in range(len(names)) if counts[i] > 0}
        return {"val_loss": float(sums.sum() / counts.sum()), "val_loss_by_domain": by_domain}

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomic; see moekit.train.checkpoint)."""
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {
            "tokens": self.tokens,
            "train_config": asdict(self.config),
            "data_fingerprint": self.data.train.fingerprint(),
        }
        full = {} if self.dist is None else self.dist.full_state(self.model, self.optimizer)  # a collective
        path = self.run_dir / ckpt.CHECKPOINTS / f"step_{self.step:06d}"
        if self.is_main:  # one writer: the files are the single-process layout whatever the ranks
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, self.model, self.model_config.to_dict(), self.data.tokenizer.to_str(),
                self.optimizer, state, rng, self.config.keep_checkpoints, **full,
            )
            plot_losses(self.history, self.run_dir / LOSS_PLOT, self._title())
        if self.dist is not None:
            self.dist.barrier()
        return path

    def _title(self) -> str:
        return f"{run_name(self.config.preset)} on {self.config.data or 'the embedded corpus'}"

    # -------------------------------------------------------------------------------------------------- output

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _report(self, record: dict[str, Any], bar, log_every: int) -> None:
        imbalance = "" if record["imbalance"] is None else f" | imbalance {record['imbalance']:.2f}"
        val = record.get("val_loss")
        if bar is not None:
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_per_s']:,.0f}"}
            if record["imbalance"] is not None:
                postfix["imb"] = f"{record['imbalance']:.2f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if val is not None:
                with bar.external_write_mode(file=sys.stderr):  # clear the bar, log the line, redraw the bar
                    self.log(f"step {record['step']}: val_loss {val:.4f}{_by_domain(record)}")
            return
        if record["step"] % log_every == 0 or record["step"] == self.config.steps or val is not None:
            line = (
                f"step {record['step']:>5}/{self.config.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{record['tok_per_s']:,.0f} tok/s{imbalance}"
            )
            if val is not None:
                line += f" | val_loss {val:.4f}{_by_domain(record)}"
            self.log(line)


def _by_domain(record: dict[str, Any]) -> str:
    by = record.get("val_loss_by_domain") or {}
    return "" if len(by) < 2 else " (" + ", ".join(f"{k} {v:.3f}" for k, v in by.items()) + ")"


def load_imbalance(model: nn.Module) -> float | None:
    """max/mean tokens per expert, averaged over the MoE layers of the last forward; None for a dense model.

    1.0 is perfect balance; E means every token went to one expert.
    """
    values = []
    for stats in collect_stats(model):
        if stats.tokens_per_expert is None:
            continue
        load = stats.tokens_per_expert.float()
        if load.sum() > 0:
            values.append(float(load.max() / load.mean()))
    return sum(values) / len(values) if values else None


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Build a Trainer (keyword arguments as in Trainer) and run it."""
    return Trainer(config, **kwargs).train()

