"""Greedy generation through trt_layers engines: a prefill graph, then a decode graph fed its own cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reference import DeciCoderConfig
from reference.inputs import past_names

from . import weights as weight_mapping
from .network import Backend, Engine, build_component


@dataclass
class CausalLM:
    """The whole model as two engines: prefill (no cache) and decode (past K/V in, present K/V out)."""

    config: DeciCoderConfig
    prefill: Engine
    decode: Engine

    @classmethod
    def build(cls, config: DeciCoderConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
              backend: Backend) -> "CausalLM":
        weights = weight_mapping.to_trtllm(state_dict, config)
        return cls(config, build_component("causal_lm", config, weights, dtype, backend, decode=False),
                   build_component("causal_lm", config, weights, dtype, backend, decode=True))

    def forward(self, input_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]] | None = None):
        """Logits [b, s, vocab] and the cache after these tokens (per layer: key, value)."""
        batch, seq_len = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if past_len + seq_len > self.config.max_position_embeddings:
            raise ValueError(f"{past_len} cached + {seq_len} new tokens exceed the context of "
                             f"{self.config.max_position_embeddings}")
        positions = np.broadcast_to(np.arange(past_len, past_len + seq_len, dtype=np.int32), (batch, seq_len))
        feed = {"input_ids": input_ids.astype(np.int32), "position_ids": np.ascontiguousarray(positions)}
        for i, layer_past in enumerate(past or []):
            feed.update(zip(past_names(i), layer_past))
        outputs = (self.prefill if past is None else self.decode).infer(feed)
        presents = [(outputs[f"layer_{i}.present_k"], outputs[f"layer_{i}.present_v"])
                    for i in range(self.config.num_hidden_layers)]
        return outputs["logits"], presents

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy decoding of exactly ``max_new_tokens``; returns all tokens and each step's logits."""
        logits, past = self.forward(input_ids)
        tokens, step_logits = [input_ids.astype(np.int64)], [logits]
        for step in range(max_new_tokens):
            next_token = logits[:, -1].astype(np.float32).argmax(-1)[:, None]
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                logits, past = self.forward(next_token, past)
                step_logits.append(logits)
        return np.concatenate(tokens, axis=1), step_logits
