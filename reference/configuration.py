"""DeciCoder configuration: reads the Hugging Face ``config.json`` of DeciCoder-1b.

DeciCoder-1b was published with a transformers 4.31 config (Llama keys plus the
``naive_attention_*`` switches and an ``auto_map`` to Deci's remote code). A checkpoint
re-saved by transformers 5.x writes ``rope_parameters`` instead of ``rope_theta``; both load.
Keys the 4.31-era file lacks take ``LlamaConfig``'s defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json (or preset) that does not describe a DeciCoder model."""


# The published Deci/DeciCoder-1b config.json (transformers 4.31 era), verbatim in content.
DECICODER_1B = {
    "architectures": ["DeciCoderForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_decicoder.DeciCoderConfig",
        "AutoModelForCausalLM": "modeling_decicoder.DeciCoderForCausalLM",
    },
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5888,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "naive_attention_decode_batched": True,
    "naive_attention_decode_single": False,
    "naive_attention_prefill": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 20,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 49152,
}

# Same structure as DeciCoder-1b (GQA 4:1, untied head, bos = eos = 0), small enough for
# a CPU test to build and run every component in milliseconds.
TINY = {
    **DECICODER_1B,
    "hidden_size": 128,
    "intermediate_size": 368,
    "max_position_embeddings": 256,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "torch_dtype": "float32",
    "vocab_size": 512,
}

# tiny with every value a port might hard-code from DeciCoder-1b changed: rope_theta 5e5 (not
# 1e4), rms_norm_eps 1e-6 (not 1e-5), 6 heads of dim 24 (not 32 of 64), GQA 3:1 (not 4:1).
TINY_VARIANT = {
    **TINY,
    "hidden_size": 144,
    "intermediate_size": 400,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
}

PRESETS = {"decicoder-1b": DECICODER_1B, "tiny": TINY, "tiny-variant": TINY_VARIANT}

# LlamaConfig's defaults, for keys a DeciCoder config.json may omit.
LLAMA_DEFAULTS = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class DeciCoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = LLAMA_DEFAULTS["max_position_embeddings"]
    rms_norm_eps: float = LLAMA_DEFAULTS["rms_norm_eps"]
    rope_theta: float = LLAMA_DEFAULTS["rope_theta"]
    tie_word_embeddings: bool = LLAMA_DEFAULTS["tie_word_embeddings"]
    bos_token_id: int | None = LLAMA_DEFAULTS["bos_token_id"]
    eos_token_id: int | None = LLAMA_DEFAULTS["eos_token_id"]
    # Deci's kernel switches. They choose between equivalent implementations of the same
    # math (explicit matmul-softmax vs SDPA); the reference always runs the explicit one,
    # which is what makes scores and probs observable as taps.
    naive_attention_prefill: bool = False
    naive_attention_decode_batched: bool = True
    naive_attention_decode_single: bool = False
    source: str = field(default="<dict>", compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def with_kv_heads(self, kv_heads: int) -> "DeciCoderConfig":
        """The same model with ``kv_heads`` KV heads: every head (MHA), a divisor of them (GQA), or 1 (MQA)."""
        return DeciCoderConfig.from_dict({**self.to_dict(), "num_key_value_heads": kv_heads}, source=self.source)

    @classmethod
    def from_preset(cls, name: str) -> "DeciCoderConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name], source=f"preset {name!r}")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DeciCoderConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> "DeciCoderConfig":
        reader = _KeyReader(raw, source)
        kwargs = {
            "vocab_size": reader.positive_int("vocab_size"),
            "hidden_size": reader.positive_int("hidden_size"),
            "intermediate_size": reader.positive_int("intermediate_size"),
            "num_hidden_layers": reader.positive_int("num_hidden_layers"),
            "num_attention_heads": reader.positive_int("num_attention_heads"),
        }
        kwargs["num_key_value_heads"] = reader.positive_int("num_key_value_heads", kwargs["num_attention_heads"])
        kwargs["max_position_embeddings"] = reader.positive_int(
            "max_position_embeddings", LLAMA_DEFAULTS["max_position_embeddings"]
        )
        kwargs["rms_norm_eps"] = reader.positive_float("rms_norm_eps", LLAMA_DEFAULTS["rms_norm_eps"])
        kwargs["rope_theta"] = reader.rope_theta()
        kwargs["tie_word_embeddings"] = reader.boolean("tie_word_embeddings", LLAMA_DEFAULTS["tie_word_embeddings"])
        kwargs["bos_token_id"] = reader.token_id("bos_token_id", LLAMA_DEFAULTS["bos_token_id"])
        kwargs["eos_token_id"] = reader.token_id("eos_token_id", LLAMA_DEFAULTS["eos_token_id"])
        for switch in ("naive_attention_prefill", "naive_attention_decode_batched", "naive_attention_decode_single"):
            kwargs[switch] = reader.boolean(switch, cls.__dataclass_fields__[switch].default)
        reader.require_llama_architecture(kwargs)
        return cls(**kwargs, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The config.json a DeciCoder checkpoint carries (4.31-era keys, loadable by both eras)."""
        out = {k: v for k, v in asdict(self).items() if k != "source"}
        out.update(architectures=["DeciCoderForCausalLM"], model_type="llama", hidden_act="silu")
        return out


class _KeyReader:
    """Reads typed keys from a raw config dict; every error names the source and the key."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, expected: str) -> ConfigError:
        value = self.raw.get(key, "<missing>")
        return ConfigError(f"{self.source}: key {key!r}: expected {expected}, got {value!r}")

    def positive_int(self, key: str, default: int | None = None) -> int:
        if key not in self.raw and default is not None:
            return default
        value = self.raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, "a positive integer")
        return value

    def positive_float(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(key, "a positive number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def token_id(self, key: str, default: int | None) -> int | None:
        value = self.raw.get(key, default)
        if isinstance(value, list) and len(value) == 1:  # transformers allows a list of eos ids
            value = value[0]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise self.fail(key, "a non-negative integer or null")
        return value

    def rope_theta(self) -> float:
        params = self.raw.get("rope_parameters")
        if params is None:  # transformers 4.x layout
            if self.raw.get("rope_scaling") is not None:
                raise self.fail("rope_scaling", "null (DeciCoder uses plain RoPE)")
            return self.positive_float("rope_theta", LLAMA_DEFAULTS["rope_theta"])
        if not isinstance(params, dict):
            raise self.fail("rope_parameters", "an object")
        if params.get("rope_type", "default") != "default":
            raise self.fail("rope_parameters", "rope_type 'default' (DeciCoder uses plain RoPE)")
        return _KeyReader(params, f"{self.source}: rope_parameters").positive_float(
            "rope_theta", LLAMA_DEFAULTS["rope_theta"]
        )

    def require_llama_architecture(self, kwargs: dict[str, Any]) -> None:
        if self.raw.get("hidden_act", "silu") != "silu":
            raise self.fail("hidden_act", "'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if self.raw.get(key, False) is not False:
                raise self.fail(key, "false (DeciCoder has no projection biases)")
        hidden, heads, kv_heads = kwargs["hidden_size"], kwargs["num_attention_heads"], kwargs["num_key_value_heads"]
        if hidden % heads:
            raise self.fail("num_attention_heads", f"a divisor of hidden_size={hidden}")
        if heads % kv_heads:
            raise self.fail("num_key_value_heads", f"a divisor of num_attention_heads={heads}")
        if (hidden // heads) % 2:
            raise self.fail("num_attention_heads", f"a value giving an even head_dim (rotate-half RoPE); hidden_size={hidden}")
        head_dim = self.raw.get("head_dim")
        if head_dim is not None and head_dim != hidden // heads:
            raise self.fail("head_dim", f"null or hidden_size / num_attention_heads = {hidden // heads}")
