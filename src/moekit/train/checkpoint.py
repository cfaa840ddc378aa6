"""Checkpoints: safetensors + JSON only (never pickle), written atomically, resumable bit for bit.

A run directory looks like this:

    runs/NAME/
      latest                      text file: the name of the last complete checkpoint ("step_000040")
      checkpoints/step_000040/
        model.safetensors         weights (tied weights stored once; `tied` in the metadata names the aliases)
        config.json               ModelConfig.to_dict()
        tokenizer.json            Hugging Face tokenizers format
        optimizer.safetensors     AdamW state per parameter: "<index>.exp_avg", "<index>.exp_avg_sq", "<index>.step"
        optimizer.json            param groups (hyperparameters, parameter names) and non-tensor state
        state.safetensors         RNG states (torch's global generator, the data sampler's generator)
        state.json                trainer state: step, tokens seen, the training config, the data fingerprint
        manifest.json             every file above with its size; written last

Atomicity: everything is written into `checkpoints/.tmp-step_000040-<pid>/`, each file and the directory are
fsync'ed, the directory is renamed into place (`os.replace`, atomic on POSIX and Windows), and only then is
`latest` replaced (itself written to a temp file, fsync'ed and renamed). A kill at any moment leaves `latest` naming
a complete checkpoint; half-written temp directories are never read and are removed by the next save. Loading
checks every file against the manifest, so a truncated file is reported by name instead of loading wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or for a different model. Names the file."""


# ------------------------------------------------------------------------------------------------------ writing


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer_json: str,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    rng: dict[str, Tensor] | None = None,
    keep: int = 2,
    model_state: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and point `latest` at it.

    Args:
        run_dir: the run directory (created if missing).
        step: optimizer steps done; names the checkpoint `step_%06d`.
        model: its `state_dict()` (parameters and persistent buffers) is saved.
        config: the model config as a JSON-able dict (`ModelConfig.to_dict()`).
        tokenizer_json: the tokenizer serialised (`Tokenizer.to_str()`).
        optimizer: an optimizer whose state is all tensors or JSON-able scalars (AdamW), or None.
        state: JSON-able trainer state.
        rng: named generator states (uint8 tensors) to restore on resume.
        keep: how many complete checkpoints to keep (older ones are deleted after `latest` moves); 0 keeps all.
        model_state: the weights to write instead of `model.state_dict()` (an expert-parallel run passes its
            experts gathered to full size: `moekit.parallel.full_model_state`).
        optimizer_state: likewise instead of `optimizer.state_dict()` (`moekit.parallel.full_optimizer_state`).

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    weights = model.state_dict() if model_state is None else model_state
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (MODEL_FILE, lambda p: _save_tensors(p, *_dedup_tied(weights))),
        (CONFIG_FILE, lambda p: _save_json(p, config)),
        (TOKENIZER_FILE, lambda p: p.write_text(tokenizer_json, encoding="utf-8")),
        (STATE_FILE, lambda p: _save_tensors(p, {k: v.contiguous() for k, v in (rng or {}).items()})),
        (STATE_JSON, lambda p: _save_json(p, {"step": step, **(state or {})})),
    ]
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer, model, optimizer_state)
        writers += [
            (OPTIMIZER_FILE, lambda p: _save_tensors(p, tensors)),
            (OPTIMIZER_JSON, lambda p: _save_json(p, meta)),
        ]
    for filename, write in writers:
        write(tmp / filename)
        _fsync_file(tmp / filename)
    _save_json(tmp / MANIFEST, {f: (tmp / f).stat().st_size for f, _ in writers})
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)

    final = root / name
    if final.exists():  # the same step saved again (e.g. a run resumed from it): swap, never leave a gap
        trash = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(Path(run_dir), name)
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale_temps(root: Path) -> None:
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _dedup_tied(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    # safetensors refuses tensors sharing memory (tied embeddings): store each storage once, record the aliases.
    first: dict[tuple[int, int, tuple], str] = {}
    tensors, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, {"tied": json.dumps(tied)}


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory; NTFS journals the rename itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer, model: nn.Module, sd: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict]:
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    meta = {
        "type": type(optimizer).__name__,
        "param_groups": groups,
        "param_names": _param_names(optimizer, model),
        "scalar_state": scalars,
    }
    return tensors, meta


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(params)]


# ------------------------------------------------------------------------------------------------------ reading


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint a path means: a checkpoint directory itself, or the run directory's `latest`; None if none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / CHECKPOINTS / latest.read_text(encoding="utf-8").strip()
        if (target / MANIFEST).is_file():
            return target
        raise CheckpointError(f"{str(latest)!r} names {str(target)!r}, which is not a complete checkpoint")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Like `find_checkpoint`, but verified against its manifest; raises CheckpointError naming the problem."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected a run directory with a {LATEST!r} file or a checkpoint "
            f"directory with {MANIFEST}"
        )
    manifest = _load_json(found / MANIFEST)
    for filename, size in manifest.items():
        file = found / filename
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {str(file)!r} has {file.stat().st_size} bytes, not the {size} it was saved with: "
                "it is truncated or was changed"
            )
    return found


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {err}") from None


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except Exception as err:  # SafetensorError derives from Exception only
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {err}") from None


def load_config(ckpt: Path) -> dict[str, Any]:
    """The model config dict of a (resolved) checkpoint."""
    return _load_json(ckpt / CONFIG_FILE)


def load_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(trainer state from state.json, RNG states from state.safetensors) of a resolved checkpoint."""
    return _load_json(ckpt / STATE_JSON), _load_tensors(ckpt / STATE_FILE)[0]


def load_weights(model: nn.Module, ckpt: Path, shard: Callable[[dict], dict] | None = None) -> None:
    """Load model.safetensors into `model` strictly: same names, same shapes, nothing left over or unset.

    `shard` maps the full tensors to the model's own (an expert-parallel rank's slice: `moekit.parallel.
    shard_model_state`) before the check.

    Raises:
        CheckpointError: listing missing/unexpected names and shape mismatches (a checkpoint of another model).
    """
    path = ckpt / MODEL_FILE
    tensors, meta = _load_tensors(path)
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        if name in tensors:
            tensors[alias] = tensors[name]
    if shard is not None:
        tensors = shard(tensors)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise CheckpointError(f"{str(path)!r} does not fit this model (a checkpoint of another config?): {shown}")
    model.load_state_dict(tensors, strict=True)


def load_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, ckpt: Path, shard: Callable[[dict], dict] | None = None
) -> None:
    """Restore an optimizer saved by `save_checkpoint`; the parameters must be the same, in the same groups.
    `shard` maps the saved state dict to this rank's (`moekit.parallel.shard_optimizer_state`)."""
    path = ckpt / OPTIMIZER_JSON
    meta = _load_json(path)
    tensors, _ = _load_tensors(ckpt / OPTIMIZER_FILE)
    if meta.get("type") != type(optimizer).__name__ or meta.get("param_names") != _param_names(optimizer, model):
        raise CheckpointError(f"{str(path)!r} is the state of a different optimizer or parameter set")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, scalars in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(scalars)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    full = {"state": state, "param_groups": groups}
    optimizer.load_state_dict(full if shard is None else shard(full))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model and tokenizer of a checkpoint, ready for inference.

    Args:
        path: a run directory (its `latest` checkpoint) or a checkpoint directory.
        device: where to put the model; "auto" = cuda if available.

    Returns:
        (MoELM in eval mode, Tokenizer, the resolved checkpoint directory).

    Raises:
        CheckpointError: missing, truncated or corrupt files, or weights that do not fit the saved config.
    """
    from moekit.config import ModelConfig
    from moekit.models.lm import MoELM
    from moekit.train.data import Tokenizer

    found = resolve_checkpoint(path)
    try:
        config = ModelConfig.from_dict(load_config(found))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{str(found / CONFIG_FILE)!r} is not a valid model config: {err}") from None
    model = MoELM(config)
    load_weights(model, found)
    tokenizer = Tokenizer.load(found / TOKENIZER_FILE)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{str(found / TOKENIZER_FILE)!r} has {tokenizer.vocab_size} tokens but the model has {config.vocab_size}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, found
