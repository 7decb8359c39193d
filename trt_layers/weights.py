"""Reference (Hugging Face Llama layout) weights -> TensorRT-LLM checkpoint names and layout.

TensorRT-LLM's LLaMA checkpoint fuses Q, K and V into one ``attention.qkv`` weight (rows: all
query heads, then key heads, then value heads) and names the gated MLP's branches
confusingly: ``mlp.fc`` is the SiLU branch (Hugging Face ``gate_proj``) and ``mlp.gate`` the
linear one (``up_proj``). Every weight keeps the ``[out_features, in_features]`` layout that
TensorRT-LLM's Linear multiplies with ``transb=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import torch

from reference import DeciCoderConfig

# Hugging Face name (per layer, with {i}) -> TensorRT-LLM name. q/k/v are fused separately.
HF_TO_TRTLLM = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    "model.layers.{i}.input_layernorm.weight": "transformer.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "transformer.layers.{i}.attention.dense.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "transformer.layers.{i}.post_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "transformer.layers.{i}.mlp.fc.weight",
    "model.layers.{i}.mlp.up_proj.weight": "transformer.layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.down_proj.weight": "transformer.layers.{i}.mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def layer_prefix(i: int) -> str:
    return f"transformer.layers.{i}."


class TrtllmWeights(Mapping[str, torch.Tensor]):
    """TensorRT-LLM names over the reference's own tensors (no copy); a fused q/k/v weight is
    concatenated when read, so a streaming check holds one layer's at a time, not the model's."""

    def __init__(self, sources: dict[str, Callable[[], torch.Tensor]]):
        self._sources = sources

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sources[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _stored(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def to_trtllm(state_dict: dict[str, torch.Tensor], config: DeciCoderConfig) -> TrtllmWeights:
    """The reference's state dict under TensorRT-LLM names, q/k/v fused; every tensor accounted for."""
    remaining = dict(state_dict)
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for i in range(config.num_hidden_layers):
        parts = [remaining.pop(f"model.layers.{i}.self_attn.{p}.weight") for p in QKV_PARTS]
        # [(H + 2 KV) * d, hidden]
        sources[f"{layer_prefix(i)}attention.qkv.weight"] = functools.partial(torch.cat, parts, dim=0)
    for hf_name, trt_name in HF_TO_TRTLLM.items():
        indices = range(config.num_hidden_layers) if "{i}" in hf_name else [None]
        for i in indices:
            source = hf_name.format(i=i)
            if source == "lm_head.weight" and source not in remaining and config.tie_word_embeddings:
                sources[trt_name] = _stored(state_dict["model.embed_tokens.weight"])
                continue
            sources[trt_name.format(i=i)] = _stored(remaining.pop(source))
    if remaining:
        raise KeyError(f"reference weights with no TensorRT-LLM name: {sorted(remaining)}")
    return TrtllmWeights(sources)
