"""Seeded inputs for each component, named as the candidate graphs name their inputs.

Golden and candidate run on exactly these tensors: hidden states and cached K/V are unit
normal (the scale real activations have after RMSNorm), positions continue after the cache.
Residual streams are not unit scale, in real checkpoints or here: RMSNorm and decoder-layer
inputs hold tokens of RMS 1e-3 to 10, and whole-model prompts start with SCALED_TOKENS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration import DeciCoderConfig

Inputs = dict[str, torch.Tensor]

# Token id -> RMS of its embedding row in seeded random weights (init_random_weights): a
# real checkpoint's residual stream carries tokens far from RMS 1 (outliers in the hundreds),
# and random weights would not. Whole-model prompts start with these ids, so RMSNorm's eps
# (which moves only small rows) matters, and so does fp16's range (a row of RMS 300 squares
# past fp16's 65504). With a checkpoint's own weights they are ordinary tokens.
SCALED_TOKENS = {1: 1e-3, 2: 1e-2, 3: 300.0}


@dataclass(frozen=True)
class CaseShape:
    batch: int = 2
    seq_len: int = 7
    past_len: int = 0  # cached tokens; components without a cache ignore it
    seed: int = 0


# Components that read a KV cache, and whose decode graph takes past K/V inputs.
DECODE_COMPONENTS = ("gqa_unmasked", "decoder_layer", "causal_lm")


def past_names(layer: int | None = None) -> tuple[str, str]:
    prefix = "" if layer is None else f"layer_{layer}."
    return f"{prefix}past_k", f"{prefix}past_v"


def make_inputs(component: str, config: DeciCoderConfig, shape: CaseShape, dtype: torch.dtype) -> Inputs:
    generator = torch.Generator().manual_seed(shape.seed)
    b, s = shape.batch, shape.seq_len

    def normal(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator).to(dtype)

    def heads(num_heads: int, length: int) -> torch.Tensor:
        return normal(b, num_heads, length, config.head_dim)  # [b, heads, length, head_dim]

    def hidden_states() -> torch.Tensor:
        if component not in ("rmsnorm", "decoder_layer"):
            return normal(b, s, config.hidden_size)  # attention and MLP read RMS-normalised activations
        # A residual stream's tokens differ in scale: per-token RMS log-spaced from 1e-3 (the first
        # token, so every case has one) to 10, so a wrong RMSNorm eps (which only matters for
        # small tokens) moves the output.
        rms = torch.logspace(-3.0, 1.0, b * s).reshape(b, s, 1)
        return (torch.randn(b, s, config.hidden_size, generator=generator) * rms).to(dtype)

    position_ids = torch.arange(shape.past_len, shape.past_len + s).expand(b, s).contiguous()
    if component == "repeat_kv":
        return {"k": heads(config.num_key_value_heads, s), "v": heads(config.num_key_value_heads, s)}
    if component == "rope":
        return {"q": heads(config.num_attention_heads, s), "k": heads(config.num_key_value_heads, s),
                "position_ids": position_ids}
    if component in ("mlp", "rmsnorm"):
        return {"hidden_states": hidden_states()}
    if component == "causal_lm":
        input_ids = torch.randint(0, config.vocab_size, (b, s), generator=generator)
        scaled = torch.tensor([t for t in SCALED_TOKENS if t < config.vocab_size][: b * s], dtype=input_ids.dtype)
        input_ids.view(-1)[: len(scaled)] = scaled  # the first prompt's first tokens
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
        layers = range(config.num_hidden_layers) if shape.past_len else ()
    elif component in ("gqa_masked", "gqa_unmasked", "decoder_layer"):
        inputs = {"hidden_states": hidden_states(), "position_ids": position_ids}
        has_past = component == "gqa_unmasked" or (component == "decoder_layer" and shape.past_len > 0)
        layers = [None] if has_past else ()
    else:
        raise ValueError(f"unknown component {component!r}")
    for layer in layers:
        past_k, past_v = past_names(layer)
        inputs[past_k] = heads(config.num_key_value_heads, shape.past_len)
        inputs[past_v] = heads(config.num_key_value_heads, shape.past_len)
    return inputs
