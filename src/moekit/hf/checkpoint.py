"""Reading and writing Hugging Face checkpoint folders: `config.json` + safetensors (one file or sharded).

`CheckpointReader` opens the safetensors files memory-mapped and hands out tensors one at a time, each converted to
the target dtype as it is taken, and records which names were consumed, so a loader can prove that every tensor in
the checkpoint found a home (`unconsumed()`). Per-expert tensors are stacked into a preallocated [E, ...] tensor
slice by slice (`take_stacked`): the model never exists twice in memory.

Quantized releases are dequantized as they are read, so the families never see them: DeepSeek-V3's FP8 weights
(`float8_e4m3fn` with a `weight_scale_inv` per 128x128 block, quant_method "fp8") and GPT-OSS's MXFP4 experts
(`*_blocks` packed 4-bit values, two per byte, and `*_scales` power-of-two exponents biased by 127 per 32 values,
quant_method "mxfp4"). Both are bit-exact with transformers' own dequantization (tested).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


class HFCheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as asked: missing files, tensors or keys, wrong shapes."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a model folder (a clear error when absent or not a JSON object)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFCheckpointError(f"{str(path)!r} is not a Hugging Face model folder: no config.json in it")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{str(file)!r} holds a JSON {type(data).__name__}, not a config object")
    return data


QUANT_METHODS = ("fp8", "mxfp4")  # quantization_config.quant_method values that are dequantized on load

# The 16 values of an FP4 (E2M1) code, low nibble first (OCP Microscaling spec; transformers' FP4_VALUES).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """FP8 block-quantized [N, K] weight -> float32: every (block[0] x block[1]) tile times its scale_inv entry
    ([ceil(N/b0), ceil(K/b1)]; DeepSeek-V3's layout)."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """MXFP4 [..., R, G, 16] uint8 blocks (32 4-bit codes per group, low nibble first) and [..., R, G] uint8
    exponents (bias 127) -> float32 [..., G*32, R]: the layout of the unquantized GPT-OSS expert tensors, whose
    packed form is stored transposed."""
    if blocks.shape[:-1] != scales.shape:
        raise HFCheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2).transpose(-1, -2).contiguous()  # [..., R, G*32] -> [..., G*32, R]


class CheckpointReader:
    """Lazy, consumption-tracking access to the tensors of a safetensors checkpoint folder.

    Args:
        path: a folder with `model.safetensors`, or `model.safetensors.index.json` and its shards (any other
            single `*.safetensors` file is accepted too when it is the only one).
        quantization: the config's `quantization_config` (None = unquantized): "fp8" and "mxfp4" are dequantized
            as tensors are taken; any other method is refused with a clear error.
    """

    def __init__(self, path: str | os.PathLike, quantization: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.quant_method = None
        if quantization:
            method = quantization.get("quant_method")
            if method not in QUANT_METHODS:
                raise HFCheckpointError(
                    f"quantization_config.quant_method {method!r} is not supported: moekit dequantizes "
                    f"{', '.join(QUANT_METHODS)} checkpoints on load (or use an unquantized release)"
                )
            self.quant_method = method
            self.fp8_block = tuple(quantization.get("weight_block_size") or (128, 128))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{str(index)!r} is not a safetensors index (weight_map): {err}") from None
            self._file_of = {name: self.path / shard for name, shard in weight_map.items()}
            missing = sorted({str(f.name) for f in self._file_of.values() if not f.is_file()})
            if missing:
                raise HFCheckpointError(f"{str(index)!r} names shard file(s) that do not exist: {missing}")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise HFCheckpointError(
                    f"no safetensors weights in {str(self.path)!r} (expected model.safetensors or "
                    "model.safetensors.index.json; pickle .bin checkpoints are not loaded, for safety)"
                )
            if len(files) > 1 and not (self.path / "model.safetensors").is_file():
                raise HFCheckpointError(
                    f"{str(self.path)!r} has {len(files)} safetensors files but no model.safetensors.index.json"
                )
            single = self.path / "model.safetensors" if (self.path / "model.safetensors").is_file() else files[0]
            with safe_open(single, framework="pt") as handle:
                self._file_of = {name: single for name in handle.keys()}
        self._handles: dict[Path, Any] = {}
        self._consumed: set[str] = set()

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of or (
            self.quant_method == "mxfp4" and name + "_blocks" in self._file_of and name + "_scales" in self._file_of
        )

    def _handle(self, name: str):
        if name not in self._file_of:
            raise HFCheckpointError(f"the checkpoint in {str(self.path)!r} has no tensor {name!r}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`, without reading it."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def take(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read tensor `name` (dequantized if stored quantized; converted to dtype if given); mark it consumed."""
        if name not in self._file_of and self.quant_method == "mxfp4" and name in self:
            tensor = dequantize_mxfp4(self._read(name + "_blocks"), self._read(name + "_scales"))
            return tensor if dtype is None else tensor.to(dtype)
        tensor = self._read(name)
        scale_name = name.removesuffix("weight") + "weight_scale_inv" if name.endswith("weight") else None
        if self.quant_method == "fp8" and scale_name in self._file_of and tensor.dtype.itemsize == 1:
            tensor = dequantize_fp8(tensor, self._read(scale_name), self.fp8_block)
        return tensor if dtype is None else tensor.to(dtype)

    def _read(self, name: str) -> Tensor:
        tensor = self._handle(name).get_tensor(name)
        self._consumed.add(name)
        return tensor

    def take_stacked(
        self,
        groups: Iterable[str | tuple[str, ...]],
        dtype: torch.dtype | None = None,
        transform: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Stack one tensor per group into [n, *shape], filling a preallocated result one group at a time.

        A group is a name, or a tuple of names whose tensors `transform` receives as separate arguments (e.g. an
        expert's gate and up projections, concatenated and transposed into moekit's layout); `transform` defaults
        to the identity. Every transformed piece must have the same shape. Marks the names consumed.
        """
        groups = [(g,) if isinstance(g, str) else tuple(g) for g in groups]
        if not groups:
            raise ValueError("take_stacked needs at least one name")
        out = None
        for i, group in enumerate(groups):
            pieces = [self.take(name) for name in group]
            piece = transform(*pieces) if transform is not None else pieces[0]
            if out is None:
                out = torch.empty((len(groups), *piece.shape), dtype=dtype or piece.dtype)
            elif piece.shape != out.shape[1:]:
                raise HFCheckpointError(
                    f"{' + '.join(group)} gives shape {tuple(piece.shape)}, expected {tuple(out.shape[1:])} "
                    f"like {' + '.join(groups[0])}"
                )
            out[i].copy_(piece)
        return out

    def skip(self, names: Iterable[str]) -> None:
        """Mark `names` consumed without reading them: tensors a family drops on purpose (and documents why)."""
        for name in names:
            self._handle(name)  # an unknown name is an error, as for take
            self._consumed.add(name)

    def unconsumed(self) -> list[str]:
        """The names nothing has taken yet (after a load: tensors the model has no place for)."""
        return sorted(set(self._file_of) - self._consumed)

    def close(self) -> None:
        self._handles.clear()


def write_checkpoint(
    path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, Tensor], max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write `config.json` and the tensors as `model.safetensors` (or shards + index above max_shard_bytes).

    Every file is written to a temporary name in the folder and renamed into place, so a crash never leaves a
    half-written file under a real name. Tensors are made contiguous; tied (shared-storage) tensors are written once
    per name, as safetensors requires, by cloning.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size, seen = 0, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic(folder / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic(folder / file, lambda tmp, shard=shard: save_file(shard, tmp, metadata=meta))
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(folder / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))


def _atomic(target: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
