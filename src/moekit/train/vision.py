"""Training the vision MoE on the drawn-shapes dataset, and the dense-ViT-vs-V-MoE comparison.

One step: a batch of B images, forward, cross-entropy + the MoE balance losses, backward, clip the gradient norm,
the scheduled learning rate (linear warmup, cosine; `moekit.train.trainer.lr_at`), AdamW with decay on matrices
only, then the aux-loss-free bias update where a router has one. Validation accuracy every `eval_every` steps and at
the end. With `out`, the run directory receives `model.safetensors` + `config.json` (written to temporary names,
then renamed: a killed save never leaves a pair that loads wrong) and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit.config import VisionConfig
from moekit.layers import collect_stats, update_biases
from moekit.models.vision import VisionMoE
from moekit.presets import get_vision_preset
from moekit.train.shapes import make_shapes
from moekit.train.trainer import load_imbalance, lr_at, optimizer_for

VISION_WEIGHTS = "model.safetensors"
VISION_CONFIG = "config.json"


@dataclass
class VisionTrainConfig:
    """A vision training run on `make_shapes` images. The defaults take about 2 minutes on 2 idle CPU cores."""

    preset: str = "tiny-vmoe"  # a name in moekit.presets.VISION_PRESETS
    out: str | None = None  # run directory (model, config, metrics); None = keep nothing on disk
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0  # global gradient-norm clip; 0 = off
    seed: int = 0  # initialisation, the images and the batch order
    train_images: int = 10_000
    val_images: int = 2_000
    eval_every: int = 100

    def __post_init__(self) -> None:
        get_vision_preset(self.preset)  # an unknown name raises, listing the vision presets
        for name in ("steps", "batch_size", "train_images", "val_images", "eval_every", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class VisionResult:
    """A finished run: final validation accuracy and loss, parameter counts, and every metrics record."""

    preset: str
    val_accuracy: float
    val_loss: float
    params: int
    active_params: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    model: VisionMoE, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a labelled set, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size]).logits
        target = labels[start : start + batch_size]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
    model.train(was_training)
    return correct / images.shape[0], loss_sum / images.shape[0]


def train_vision(config: VisionTrainConfig, log: Callable[[str], None] = print) -> VisionResult:
    """Train `config.preset` on drawn shapes; see the module docstring for the step."""
    torch.manual_seed(config.seed)
    model_config = get_vision_preset(config.preset)
    model = VisionMoE(model_config)
    train_x, train_y = make_shapes(config.train_images, model_config.image_size, seed=config.seed)
    val_x, val_y = make_shapes(config.val_images, model_config.image_size, seed=config.seed + 1_000_003)
    optimizer = optimizer_for(model, config)
    order = torch.Generator().manual_seed(config.seed)
    params, active = model.num_params(), model.num_params(active=True)
    log(f"{config.preset}: {params:,} parameters ({active:,} active per token), {config.steps} steps of "
        f"{config.batch_size} images")
    history: list[dict[str, Any]] = []
    start_time = time.perf_counter()
    model.train()
    for step in range(config.steps):
        batch = torch.randint(0, config.train_images, (config.batch_size,), generator=order)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        out = model(train_x[batch], train_y[batch])
        out.loss.backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_biases(model)
        record: dict[str, Any] = {"step": step + 1, "loss": float(out.loss.detach()),
                                  "aux_loss": float(out.aux_loss.detach())}
        stats = collect_stats(model)
        if stats:
            record["imbalance"] = load_imbalance(model)  # max/mean tokens per expert, as the LM trainer reports it
            record["dropped"] = int(sum(int(s.dropped) for s in stats))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record["val_accuracy"], record["val_loss"] = evaluate(model, val_x, val_y)
            log(f"step {step + 1}/{config.steps}  loss {record['loss']:.3f}  val acc {record['val_accuracy']:.3f}"
                + (f"  imbalance {record['imbalance']:.2f}" if record.get("imbalance") is not None else ""))
        history.append(record)
    seconds = time.perf_counter() - start_time
    last = history[-1]
    result = VisionResult(config.preset, last["val_accuracy"], last["val_loss"], params, active, seconds, history)
    if config.out is not None:
        save_vision(model, config, history, Path(config.out))
        log(f"saved {config.out}")
    return result


def save_vision(model: VisionMoE, config: VisionTrainConfig, history: list[dict], run_dir: Path) -> None:
    """model.safetensors, config.json and metrics.jsonl into run_dir, each through a temporary file + rename.

    The model config also travels inside model.safetensors (its metadata), and `load_vision` reads it from there:
    weights and config are replaced together by one rename, whatever point a crash interrupts the save at.
    """
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = {"model": model.config.to_dict(), "train": asdict(config)}
    metrics = "".join(json.dumps(r) + "\n" for r in history)
    for name, write in (
        (VISION_WEIGHTS, lambda p: save_file(state, str(p), metadata={"moekit_vision_config": json.dumps(payload)})),
        (VISION_CONFIG, lambda p: p.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")),
        ("metrics.jsonl", lambda p: p.write_text(metrics)),
    ):
        tmp = run_dir / f".{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, run_dir / name)


def load_vision(run_dir: str | os.PathLike) -> VisionMoE:
    """The model saved by `train_vision(out=...)`, strictly (every tensor present with its shape), with the config
    stored in the weights file itself (config.json is its readable copy).

    Raises:
        FileNotFoundError: run_dir lacks model.safetensors.
        ValueError: the file carries no moekit vision config, or the weights do not fit it (names the tensors).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / VISION_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {VISION_WEIGHTS}: not a vision run directory from `moekit train-vision`"
        )
    with safe_open(str(run_dir / VISION_WEIGHTS), framework="pt") as f:
        stored = (f.metadata() or {}).get("moekit_vision_config")
    if stored is None:
        raise ValueError(
            f"{run_dir / VISION_WEIGHTS} carries no moekit vision config: not saved by `moekit train-vision`"
        )
    model = VisionMoE(VisionConfig.from_dict(json.loads(stored)["model"]))
    state = load_file(str(run_dir / VISION_WEIGHTS))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{run_dir / VISION_WEIGHTS} does not fit its config: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {wrong}")
    model.load_state_dict(state)
    return model.eval()
