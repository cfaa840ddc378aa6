"""Hugging Face interop: load released MoE checkpoints into moekit's own layers, and write them back.

`load_pretrained(folder)` reads `config.json` + safetensors (one file or sharded), builds the moekit model on the
meta device (no memory), reads each tensor lazily from the memory-mapped files, converts it to the target dtype as
it is placed, and fails, naming them, unless every checkpoint tensor is consumed and every parameter is set with
the right shape. `save_pretrained(model, folder)` writes a folder that `transformers` loads into the matching class.

A family is one small module (`hf/mixtral.py`, ...) with:
    MODEL_TYPES: the config.json `model_type` values it reads;
    ARCHITECTURE: the transformers class name written into config.json;
    config_from_hf(c: HFConfig) -> ModelConfig;
    import_weights(model, reader, dtype) -> iterator of (moekit name, tensor, checkpoint name(s));
    export_weights(model) -> {checkpoint name: tensor};
    check_exportable(model): raise ValueError naming what the format cannot express;
    hf_config(model) -> the config.json dict;
    EXTRAS (optional): the fields of `hf.common.PLAIN_FIELDS` the format expresses (norm type, multipliers, ...);
        save_pretrained refuses a model that sets any other.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

import torch

from moekit.analysis.arch import HFConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError, read_config, write_checkpoint
from moekit.hf.common import check_extras, checkpoint_dtype
from moekit.models.lm import MoELM

FAMILY_MODULES = {  # model_type -> module
    "mixtral": "moekit.hf.mixtral",
    "qwen2_moe": "moekit.hf.qwen2_moe",
    "qwen3_moe": "moekit.hf.qwen3_moe",
    "olmoe": "moekit.hf.olmoe",
    "gpt_oss": "moekit.hf.gpt_oss",
    "deepseek_v2": "moekit.hf.deepseek_v2",
    "deepseek_v3": "moekit.hf.deepseek_v3",
    "granitemoe": "moekit.hf.granitemoe",
    "granitemoeshared": "moekit.hf.granitemoeshared",
    "dbrx": "moekit.hf.dbrx",
    "phimoe": "moekit.hf.phimoe",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILY_MODULES)


def family(model_type: str):
    """The family module for a config.json `model_type` (a clear error listing the supported ones)."""
    if model_type not in FAMILY_MODULES:
        raise HFCheckpointError(
            f"unsupported model_type {model_type!r}: moekit.hf loads {', '.join(supported_model_types())}"
        )
    return importlib.import_module(FAMILY_MODULES[model_type])


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None):
    """moekit's ModelConfig for a parsed config.json (either spelling); max_seq_len overrides the context length."""
    model_type = hf.get("model_type")
    config = family(model_type).config_from_hf(HFConfig(hf, model_type))
    return config if max_seq_len is None else dataclasses.replace(config, max_seq_len=max_seq_len)


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> MoELM:
    """Load a Hugging Face MoE checkpoint folder into a moekit `MoELM` (eval mode).

    Args:
        path: folder with config.json and model.safetensors (or model.safetensors.index.json + shards).
        dtype: parameter dtype (torch.dtype or its name); None = the dtype config.json states (float32 if none).
        device: where the parameters live.
        max_seq_len: cap the context (the RoPE table and largest KV cache); None = max_position_embeddings.
    Returns:
        the model; `model.hf_model_type` records the family for `save_pretrained`.
    Raises:
        HFCheckpointError (a ValueError): unsupported model_type, missing files, and any tensor left over,
        missing, or mis-shaped — named.
    """
    hf = read_config(path)
    dtype = _dtype(dtype) if dtype is not None else checkpoint_dtype(hf)
    fam = family(hf.get("model_type"))
    config = config_from_hf(hf, max_seq_len)
    with torch.device("meta"):
        model = MoELM(config)
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    reader = CheckpointReader(path, hf.get("quantization_config"))
    state, problems = {}, []
    try:
        for name, tensor, source in fam.import_weights(model, reader, dtype):
            if name not in expected:
                problems.append(f"{source} maps to {name!r}, which the model does not have")
            elif tuple(tensor.shape) != tuple(expected[name].shape):
                problems.append(
                    f"{source} has shape {tuple(tensor.shape)} but {name} needs {tuple(expected[name].shape)}"
                )
            else:
                keep = expected[name].dtype if not expected[name].is_floating_point() or name.endswith(
                    "selection_bias") else dtype  # the DeepSeek-V3 correction bias stays float32, as released
                state[name] = tensor.to(device=device, dtype=keep)
    except HFCheckpointError as err:  # a tensor the family needs is absent
        raise HFCheckpointError(f"{str(path)!r}: {err}") from None
    finally:
        leftover = reader.unconsumed()
        reader.close()
    missing = sorted(set(expected) - set(state))
    if missing:
        problems.append(f"parameters not set by the checkpoint: {missing}")
    if leftover:
        problems.append(f"checkpoint tensors the model has no place for: {leftover}")
    if problems:
        raise HFCheckpointError(f"cannot load {str(path)!r} as {hf.get('model_type')}: " + "; ".join(problems))
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_buffers(device)
    model.hf_model_type = hf.get("model_type")
    return model.eval()


def save_pretrained(
    model: MoELM, path: str | os.PathLike, model_type: str | None = None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write `model` as a Hugging Face checkpoint folder (config.json + safetensors) that transformers loads.

    Args:
        model: a moekit MoELM.
        path: the folder (created if needed; existing files of the same names are replaced atomically).
        model_type: the family to write; None = the one it was loaded from (`model.hf_model_type`).
        max_shard_bytes: shard above this size (with an index), as transformers does.
    Raises:
        ValueError: no model_type known, or the model has a feature that family's format cannot express.
    """
    model_type = model_type or getattr(model, "hf_model_type", None)
    if model_type is None:
        raise ValueError(
            f"save_pretrained needs model_type= (one of {', '.join(supported_model_types())}) for a model that "
            "was not loaded from a Hugging Face folder"
        )
    fam = family(model_type)
    fam.check_exportable(model)
    check_extras(model, model_type, getattr(fam, "EXTRAS", ()))
    tensors = fam.export_weights(model)
    write_checkpoint(path, fam.hf_config(model), tensors, max_shard_bytes)
    return Path(path)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from moekit.hf.common import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


__all__ = ["load_pretrained", "save_pretrained", "config_from_hf", "supported_model_types", "HFCheckpointError"]


def load_tokenizer(path: str | os.PathLike):
    """The folder's `tokenizer.json` as a moekit Tokenizer, and the ids to put before a prompt.

    EOS and BOS come from generation_config.json, else config.json (`eos_token_id` may be a list: the first is
    used to stop). Returns (Tokenizer, start_ids): start_ids is [bos_token_id], or [] when the model names none.
    Raises HFCheckpointError when there is no tokenizer.json or no EOS id.
    """
    import json

    from moekit.train.data import Tokenizer

    folder = Path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise HFCheckpointError(f"no tokenizer.json in {str(folder)!r}: generating text needs the model's tokenizer")
    ids: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):  # the generation config wins
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            ids.update({k: data[k] for k in ("eos_token_id", "bos_token_id") if data.get(k) is not None})
    eos = ids.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise HFCheckpointError(f"{str(folder)!r} names no eos_token_id in config.json or generation_config.json")
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = Tokenizer(HFTokenizer.from_file(str(file)), eos_id=eos)
    bos = ids.get("bos_token_id")
    return tokenizer, ([bos] if isinstance(bos, int) else [])
