"""Hugging Face checkpoint directories: config.json plus safetensors or PyTorch .bin weights.

Layouts read, in this order of preference: ``model.safetensors.index.json`` (sharded),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded), ``pytorch_model.bin``.
Tensor names follow the Llama layout (``model.layers.N.self_attn.q_proj.weight``, ...).
Loading only reads: every problem is reported with the file and key, and nothing in the
directory is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration import PRESETS, ConfigError, DeciCoderConfig
from .modeling import DeciCoderForCausalLM, assign_parameter, empty_model, random_model

WEIGHT_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Buffers that transformers 4.x wrote into some Llama checkpoints; recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe the model its config.json names."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the file that holds it."""
    for layout in WEIGHT_LAYOUTS:
        candidate = directory / layout
        if not candidate.is_file():
            continue
        if layout.endswith(".index.json"):
            return _read_index(candidate)
        return {name: candidate for name in _tensor_names(candidate)}
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_LAYOUTS)}")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: key 'weight_map' missing") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: key 'weight_map': expected an object")
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    for name, shard in files.items():
        if not shard.is_file():
            raise CheckpointError(f"{index}: key {name!r} points to {shard.name}, which does not exist")
    return files


def _tensor_names(file: Path) -> list[str]:
    return list(_open_tensors(file).keys())


def _open_tensors(file: Path):
    """A name -> tensor mapping over ``file`` that reads lazily where the format allows."""
    try:
        if file.suffix == ".safetensors":
            return _SafetensorsFile(file)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt or truncated file: name it
        raise CheckpointError(f"{file}: cannot read tensors ({type(e).__name__}: {e})") from None


class _SafetensorsFile:
    def __init__(self, file: Path):
        self._handle = safe_open(str(file), framework="pt")

    def keys(self):
        return self._handle.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


def _shape(tensors, name: str) -> tuple[int, ...]:
    return tensors.shape(name) if isinstance(tensors, _SafetensorsFile) else tuple(tensors[name].shape)


def _iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Path, object]]:
    """(name, file, opened file) for each tensor, opening every file once."""
    opened: dict[Path, object] = {}
    for name, file in files.items():
        if file not in opened:
            opened[file] = _open_tensors(file)
        yield name, file, opened[file]


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> DeciCoderForCausalLM:
    dtype = resolve_dtype(dtype)
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (expected config.json and weights inside)")
    try:
        config = DeciCoderConfig.from_json_file(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = empty_model(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    files = weight_files(directory)

    problems, to_load = [], []
    for name, file, tensors in _iter_tensors(files):
        if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name not in expected:
            problems.append(f"{file.name}: key {name!r}: not a DeciCoder parameter")
            continue
        shape = _shape(tensors, name)
        if shape != expected[name]:
            problems.append(f"{file.name}: key {name!r}: shape {list(shape)}, config.json implies {list(expected[name])}")
            continue
        to_load.append((name, file, tensors))
    for name in expected.keys() - files.keys():
        problems.append(f"key {name!r}: missing")
    if problems:
        listed = "\n  ".join(sorted(problems))
        raise CheckpointError(f"{directory}: weights do not match config.json ({len(problems)} problems):\n  {listed}")

    for name, file, tensors in to_load:
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: key {name!r}: dtype {tensor.dtype} is not a floating-point weight")
        assign_parameter(model, name, tensor.to(dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_pretrained(model: DeciCoderForCausalLM, path: str | os.PathLike) -> None:
    """Write config.json and model.safetensors, the layout ``load_pretrained`` and transformers read."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied head appears once
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_model(spec: str, dtype: torch.dtype | str = torch.float32, seed: int = 0) -> DeciCoderForCausalLM:
    """A preset name (seeded random weights) or a checkpoint directory, as the command line takes them."""
    if spec in PRESETS:
        return random_model(DeciCoderConfig.from_preset(spec), seed, resolve_dtype(dtype))
    return load_pretrained(spec, dtype)
