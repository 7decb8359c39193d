"""Tensor parallelism as TensorRT-LLM 1.2's LLaMA splits a checkpoint and a network across ranks.

A rank's port is the same component code over that rank's weights (``RankWeights``): the checkpoint
conversion (models/llama/convert.py) splits each tensor the way the layer that reads it is parallel,
and the layers add the collectives (layers/linear.py, layers/attention.py):

- ``attention.qkv`` is column-parallel (gather_output=False): each rank holds ``[q_r; k_r; v_r]``, its
  ``heads / tp`` query heads and its KV heads; where TP exceeds the KV heads, each KV head is first
  repeated ``tp / kv_heads`` times in a row (convert.py's dup_kv_weight), so rank r reads KV head
  ``r * kv_heads // tp`` and each rank holds ``(kv_heads + tp - 1) // tp`` of them (Attention's
  num_attention_kv_heads);
- ``attention.dense`` is row-parallel: its weight split along the input, each rank's partial output summed
  by an all-reduce;
- ``mlp.fc`` and ``mlp.gate`` are column-parallel (gather_output=False), ``mlp.proj`` row-parallel with
  an all-reduce;
- the embedding is replicated (use_parallel_embedding=False, the default);
- ``lm_head`` is column-parallel with gather_output=True: the vocabulary padded with zero rows to a
  multiple of tp, split along it, each rank's logits all-gathered along the last dimension.
Norm weights are replicated. A rank's checkpoint keeps TP 1's names (``rank{r}.safetensors``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from reference import DeciCoderConfig

# Linears whose partial outputs an all-reduce sums (RowLinear); lm_head's are all-gathered.
ROW_PARALLEL = ("attention.dense.weight", "mlp.proj.weight")
COLUMN_PARALLEL = ("mlp.fc.weight", "mlp.gate.weight")
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TpMapping:
    """TensorRT-LLM's Mapping, tensor parallelism only: ``tp_size`` ranks of one group, this one ``rank``."""

    tp_size: int = 1
    rank: int = 0

    @property
    def group(self) -> list[int]:
        """The ranks an all-reduce or all-gather spans (Mapping.tp_group)."""
        return list(range(self.tp_size))


SINGLE = TpMapping()


def mapping_of(weights: Mapping[str, torch.Tensor]) -> TpMapping:
    """The mapping a port's weights were split for (TP 1 for weights that were not)."""
    return getattr(weights, "mapping", SINGLE)


def unsupported(config: DeciCoderConfig, tp_size: int) -> str | None:
    """Why ``config`` cannot be split into ``tp_size`` ranks as TensorRT-LLM splits it, or None."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size:
        return f"{heads} attention heads do not split into {tp_size} ranks"
    if kv_heads % tp_size and tp_size % kv_heads:
        return f"{kv_heads} KV heads neither split into {tp_size} ranks nor divide them (to be duplicated)"
    if config.intermediate_size % tp_size:
        return f"intermediate_size {config.intermediate_size} does not split into {tp_size} ranks"
    return None


def rank_heads(config: DeciCoderConfig, mapping: TpMapping) -> tuple[int, int]:
    """(query heads, KV heads) a rank computes: Attention's num_attention_heads // tp_size and
    (num_kv_heads + tp_size - 1) // tp_size."""
    tp = mapping.tp_size
    return config.num_attention_heads // tp, (config.num_key_value_heads + tp - 1) // tp


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """lm_head's rows once padded to a multiple of tp (convert.py pads with zeros)."""
    return math.ceil(vocab_size / tp_size) * tp_size


def _kv_duplicated(weight: torch.Tensor, kv_heads: int, head_dim: int, tp_size: int) -> torch.Tensor:
    """K or V rows [kv_heads * d, hidden] with each head repeated tp / kv_heads times in a row (dup_kv_weight)."""
    if kv_heads >= tp_size:
        return weight
    heads = weight.reshape(kv_heads, head_dim, -1)  # [kv_heads, d, hidden]
    return heads.repeat_interleave(tp_size // kv_heads, dim=0).reshape(-1, weight.shape[-1])


def split_qkv(qkv: torch.Tensor, config: DeciCoderConfig, mapping: TpMapping) -> torch.Tensor:
    """Rank ``mapping.rank``'s ``[q_r; k_r; v_r]`` of the fused QKV [(H + 2 KV) d, hidden]."""
    d, heads, kv_heads, tp = config.head_dim, config.num_attention_heads, config.num_key_value_heads, mapping.tp_size
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d])
    parts = [q, _kv_duplicated(k, kv_heads, d, tp), _kv_duplicated(v, kv_heads, d, tp)]
    return torch.cat([part.chunk(tp)[mapping.rank] for part in parts])


def split(name: str, weight: torch.Tensor, config: DeciCoderConfig, mapping: TpMapping) -> torch.Tensor:
    """Checkpoint tensor ``name`` as rank ``mapping.rank`` holds it."""
    tp, rank = mapping.tp_size, mapping.rank
    if tp == 1:
        return weight
    if name.endswith("attention.qkv.weight"):
        return split_qkv(weight, config, mapping)
    if name.endswith(ROW_PARALLEL):
        return weight.chunk(tp, dim=1)[rank].contiguous()  # [out, in / tp]
    if name.endswith(COLUMN_PARALLEL):
        return weight.chunk(tp, dim=0)[rank]  # [out / tp, in]
    if name == LM_HEAD:
        padding = padded_vocab(weight.shape[0], tp) - weight.shape[0]
        padded = torch.cat([weight, weight.new_zeros(padding, weight.shape[1])]) if padding else weight
        return padded.chunk(tp, dim=0)[rank]
    return weight  # norms and the embedding: replicated


class RankWeights(Mapping[str, torch.Tensor]):
    """One rank's checkpoint over the whole model's (TensorRT-LLM names), each tensor split when read; the
    port's layers read ``mapping`` to add their collectives."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: DeciCoderConfig, mapping: TpMapping):
        self.weights, self.config, self.mapping = weights, config, mapping

    def __getitem__(self, name: str) -> torch.Tensor:
        return split(name, self.weights[name], self.config, self.mapping)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)
