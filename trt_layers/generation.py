"""Generation through trt_layers engines: a prefill graph, then a decode graph fed its own cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reference import DeciCoderConfig
from reference.inputs import past_names
from reference.taps import real_outputs

from . import weights as weight_mapping
from .network import Backend, Engine, build_component


@dataclass(frozen=True)
class Sampling:
    """Temperature / top-k sampling; ``None`` in place of a Sampling means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0


@dataclass
class CausalLM:
    """The whole model as two engines: prefill (no cache) and decode (past K/V in, present K/V out)."""

    config: DeciCoderConfig
    prefill: Engine
    decode: Engine

    @classmethod
    def build(cls, config: DeciCoderConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
              backend: Backend, taps: bool = False) -> "CausalLM":
        """Engines with only logits and present K/V as outputs (``taps``: every tap too)."""
        weights = weight_mapping.to_trtllm(state_dict, config)
        marked = None if taps else list(real_outputs("causal_lm", config.num_hidden_layers))
        return cls(config, *(build_component("causal_lm", config, weights, dtype, backend, decode=decode, marked=marked)
                             for decode in (False, True)))

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

    def generate(self, input_ids: np.ndarray, max_new_tokens: int,
                 sampling: Sampling | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Exactly ``max_new_tokens`` new tokens (greedy unless ``sampling``); all tokens and each step's
        last-position logits [b, vocab]."""
        rng = None if sampling is None else np.random.default_rng(sampling.seed)
        logits, past = self.forward(input_ids)
        tokens, step_logits = [input_ids.astype(np.int64)], []
        for step in range(max_new_tokens):
            last = logits[:, -1].astype(np.float32)
            step_logits.append(last)
            next_token = (last.argmax(-1) if sampling is None else _sample(last, sampling, rng))[:, None]
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                logits, past = self.forward(next_token, past)
        return np.concatenate(tokens, axis=1), step_logits


def _sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits / temperature), restricted to the top-k."""
    scaled = logits / max(sampling.temperature, 1e-6)
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])
