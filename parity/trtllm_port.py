"""A TensorRT-LLM engine directory as the candidate: the 1.2 line's ``trtllm-build`` output
(``config.json`` and ``rank0.engine``), built with ``--enable_debug_output``, run by TensorRT-LLM's
Python runtime in debug mode.

``--enable_debug_output`` marks every tensor the model registered with
``Module.register_network_output`` as an engine output, named by its module path, and
``ModelRunner.from_dir(debug_mode=True)`` keeps the context step's outputs in
``runner.session.debug_buffer``. TensorRT-LLM's LLaMA registers none itself: a port registers what it
wants to see, e.g. ``self.register_network_output("out", hidden_states)`` at the end of
``LLaMADecoderLayer.forward``. Names of the golden's own taps map by themselves:
``transformer.layers.{i}.<tap>`` (``out``, ``mlp_out``, ``attn.q_rot``, ...) is ``layer_{i}.<tap>``,
``transformer.embed`` and ``transformer.final_norm`` are ``embed`` and ``final_norm``, and the logits
are the context logits of an engine built with ``--gather_context_logits``; ``--tap-map`` names any
other. The engine runs whole, once, on the prompt (one context step): only its outputs can be shown.
One rank is read: tensor- and pipeline-parallel engines are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from reference import DeciCoderConfig
from reference.taps import LAYER_TAPS

from .backends import skip_reason
from .check import UsageError, candidate_stage
from .tapmap import TapMapError, load_tap_map

CONTEXT_LOGITS = "context_logits"  # the runtime's name for the prompt's logits (--gather_context_logits)

# pretrained_config fields that must equal the golden config's fields of the same name
DIMS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "vocab_size")
_DTYPES = {"float32": (torch.float32, "fp32"), "float16": (torch.float16, "fp16"), "bfloat16": (torch.bfloat16, "bf16")}


def _read_config(path: Path) -> dict:
    """The directory's config.json, checked for what a locate needs: one rank, debug outputs."""
    try:
        if not (path / "config.json").is_file():
            raise UsageError(f"--candidate {path}: a directory without config.json, not a TensorRT-LLM engine "
                             "directory (trtllm-build --output_dir)")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        has_engine = (path / "rank0.engine").is_file()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"--candidate {path}: cannot read config.json as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "pretrained_config" not in config:
        raise UsageError(f"--candidate {path}: config.json has no pretrained_config: a checkpoint (Hugging Face's "
                         "or convert_checkpoint's) rather than trtllm-build's engine directory?")
    pretrained, build = config["pretrained_config"], config.get("build_config")
    mapping = pretrained.get("mapping", {}) if isinstance(pretrained, dict) else None
    if not (isinstance(build, dict) and isinstance(mapping, dict)):
        raise UsageError(f"--candidate {path}: config.json is not a TensorRT-LLM engine config (pretrained_config, "
                         "its mapping and build_config are objects)")
    ranks = {key: mapping.get(key, 1) for key in ("world_size", "tp_size", "pp_size")}
    if any(size != 1 for size in ranks.values()):
        raise UsageError(f"--candidate {path}: built for {', '.join(f'{k} {v}' for k, v in ranks.items())}; locate "
                         "reads a single-rank engine")
    if build.get("enable_debug_output") is not True:
        raise UsageError(f"--candidate {path}: built without --enable_debug_output, so no tensor inside it is an "
                         "engine output; rebuild with trtllm-build --enable_debug_output (after "
                         "register_network_output where you want taps)")
    if not has_engine:
        raise UsageError(f"--candidate {path}: no rank0.engine beside config.json")
    return config


class TrtllmEnginePort:
    """The engine directory at ``path``, run by ``ModelRunner`` in debug mode."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = _read_config(self.path)

    @property
    def description(self) -> str:
        import tensorrt_llm

        return (f"TensorRT-LLM engine directory {self.path.name} run by TensorRT-LLM {tensorrt_llm.__version__} "
                "(ModelRunner, debug mode)")

    def check_config(self, config: DeciCoderConfig, dtype: torch.dtype) -> None:
        """The engine's dims and dtype against the golden's: a mismatch is bad usage, not a divergence."""
        pretrained = self.config["pretrained_config"]
        for field in DIMS:
            if field in pretrained and pretrained[field] != getattr(config, field):
                raise UsageError(f"--candidate {self.path}: its {field} is {pretrained[field]}, the golden's "
                                 f"{getattr(config, field)}: build it from the same model")
        built, flag = _DTYPES.get(pretrained.get("dtype"), (dtype, None))
        if built != dtype:
            raise UsageError(f"--candidate {self.path}: built in {pretrained['dtype']}: pass --dtype {flag}")

    def tap_map(self, golden_taps: list[str], num_layers: int, tap_map: str | None) -> dict[str, str]:
        """Golden tap -> engine output: the golden's own names (module docstring), then ``tap_map``'s.
        The tap map is read before the engine is loaded, which needs TensorRT-LLM and a GPU."""
        _read_tap_map(tap_map, None, golden_taps, num_layers)
        if (reason := skip_reason("trtllm")) is not None:
            raise UsageError(f"--candidate {self.path}: a TensorRT-LLM engine directory runs on TensorRT-LLM and a "
                             f"CUDA GPU: {reason}")
        from tensorrt_llm.runtime import ModelRunner

        with candidate_stage(f"{self.path.name} failed to load"):
            runner = ModelRunner.from_dir(str(self.path), debug_mode=True)
        outputs = set(runner.session.debug_tensors)
        if self.config["build_config"].get("gather_context_logits"):
            outputs.add(CONTEXT_LOGITS)
        mapped = {tap: name for tap, name in automatic_names(num_layers).items()
                  if tap in golden_taps and name in outputs}
        return mapped | _read_tap_map(tap_map, outputs, golden_taps, num_layers)

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The prompt's token ids: the runtime makes its own positions (0 on) and masks."""
        return {"input_ids": inputs["input_ids"].numpy().astype(np.int32)}

    def run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One context step on the prompt; of ``outputs``, those the engine gave, as [batch, seq, ...]."""
        from tensorrt_llm.runtime import ModelRunner

        ids = torch.from_numpy(feed["input_ids"])
        with candidate_stage(f"{self.path.name} failed to load or run"):
            runner = ModelRunner.from_dir(str(self.path), debug_mode=True)
            result = runner.generate(list(ids), max_new_tokens=1, end_id=-1, pad_id=0, top_k=1, return_dict=True)
            produced = dict(runner.session.debug_buffer)
        if CONTEXT_LOGITS in result:
            produced[CONTEXT_LOGITS] = result[CONTEXT_LOGITS]
        return {name: as_batch_seq(produced[name], ids.shape) for name in outputs if name in produced}


def _read_tap_map(tap_map: str | None, outputs: set[str] | None, golden_taps: list[str], num_layers: int) -> dict:
    try:
        return {} if tap_map is None else load_tap_map(tap_map, outputs, golden_taps, num_layers)
    except TapMapError as e:
        raise UsageError(str(e)) from None


def automatic_names(num_layers: int) -> dict[str, str]:
    """Golden tap -> the engine output a port registering it under the golden's own name gets."""
    names = {"embed": "transformer.embed", "final_norm": "transformer.final_norm", "logits": CONTEXT_LOGITS}
    names.update((f"layer_{i}.{tap}", f"transformer.layers.{i}.{tap}") for i in range(num_layers) for tap in LAYER_TAPS)
    return names


def as_batch_seq(value, ids_shape: torch.Size) -> np.ndarray:
    """An engine output as [batch, seq, ...] fp32 numpy: without padding (remove_input_padding, the
    plugin's default) its tokens are packed, [batch * seq, ...]; context logits may come per row."""
    if isinstance(value, (list, tuple)):
        value = torch.stack([torch.as_tensor(row) for row in value])
    value = torch.as_tensor(value).float().cpu()
    batch, seq = ids_shape
    if value.shape[:2] != (batch, seq):
        if value.shape[0] == batch * seq:  # [tokens, ...]
            value = value.reshape(batch, seq, *value.shape[1:])
        elif value.shape[:2] == (1, batch * seq):  # [1, tokens, ...]
            value = value.reshape(batch, seq, *value.shape[2:])
    return value.numpy()
