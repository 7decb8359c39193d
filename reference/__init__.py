"""The golden side: a faithful PyTorch DeciCoder-1b and the tap names every backend emits."""

from .checkpoint import (
    CheckpointError,
    load_model,
    load_pretrained,
    resolve_dtype,
    save_pretrained,
)
from .configuration import PRESETS, ConfigError, DeciCoderConfig
from .modeling import (
    DeciCoderAttention,
    DeciCoderDecoderLayer,
    DeciCoderForCausalLM,
    DeciCoderMLP,
    DeciCoderRMSNorm,
    DeciCoderRotaryEmbedding,
    apply_rotary_pos_emb,
    empty_model,
    random_model,
    repeat_kv,
)
from .taps import COMPONENT_TAPS, COMPONENTS, capture_taps, component_taps

__all__ = [
    "COMPONENTS", "COMPONENT_TAPS", "PRESETS", "CheckpointError", "ConfigError", "DeciCoderAttention",
    "DeciCoderConfig", "DeciCoderDecoderLayer", "DeciCoderForCausalLM", "DeciCoderMLP", "DeciCoderRMSNorm",
    "DeciCoderRotaryEmbedding", "apply_rotary_pos_emb", "capture_taps", "component_taps", "empty_model",
    "load_model", "load_pretrained", "random_model", "repeat_kv", "resolve_dtype", "save_pretrained",
]
