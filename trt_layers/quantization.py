"""Quantized weight layouts, as TensorRT-LLM 1.2's quantized LLaMA checkpoints store them.

A quantization mode is a weight layout plus the Q/DQ ops that read it back (DESIGN.md): the
component code is unchanged, and ``modeling.param`` reads a weight that the layout stores
quantized through ``dequantize``.

int8_wo (TensorRT-LLM's QuantAlgo.W8A16): each linear of the decoder layers (attention.qkv,
attention.dense, mlp.fc, mlp.gate, mlp.proj) is stored as ``<linear>.weight``, int8 [in, out],
and ``<linear>.per_channel_scale``, [out] in the weights' dtype: TensorRT-LLM's converter
(convert_utils.get_tllm_linear_weight) quantizes ``weight.t()`` with
symmetric_quantize_last_axis_of_batched_matrix (``symmetric_quantize``). The embedding and
lm_head stay in full precision (quantize.py's default exclude_modules). The port reads a weight
as TensorRT-LLM's weight_only_quant_matmul does without its plugin, dequantize(weight, scale,
axis=1) in the model dtype, transposed back to Linear's [out, in]. The plugin's preprocessed
(interleaved, GPU-architecture-specific) copy of the same int8 values is not this layout.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F

QUANTIZED_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
# The reference's modules those are (q/k/v each quantize alone: per output channel, fusing changes no scale).
REFERENCE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantMode:
    name: str
    quant_algo: str  # TensorRT-LLM's QuantAlgo
    bits: int
    description: str


MODES = {mode.name: mode for mode in [
    QuantMode("int8_wo", "W8A16", 8, "INT8 weights with a scale per output channel; activations in the model dtype"),
]}


def _quantized_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """symmetric_quantize's values in Linear's layout: (q int8 [out, in], scale [out] in fp32)."""
    w = weight.detach().float()  # [out, in]
    scale = w.abs().amax(1) / 2 ** (bits - 1)  # [out]
    scaled = w / torch.where(scale != 0, scale, 1.0)[:, None]  # a zero row stays 0
    rounded = scaled.abs().add_(0.5).floor_().copysign_(scaled)  # C's round: half away from zero
    return rounded.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8), scale


def symmetric_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [out, in] as TensorRT-LLM's converter quantizes it, before the plugin's
    preprocessing (cutlass_preprocessors.cpp, symmetric_quantize): per output channel, in fp32,
    scale = max |w| / 2^(bits-1), stored in the weight's dtype; q = round(w / scale) with C's round
    (half away from zero), clipped to the signed range. Returns (q int8 [in, out], scale [out])."""
    q, scale = _quantized_rows(weight, bits)
    return q.t().contiguous(), scale.to(weight.dtype)


def dequantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """What the port computes with for ``weight`` [out, in]: its quantized values times their scale (stored in
    the weight's dtype), in the weight's dtype (the golden's weight for a quantized check)."""
    q, scale = _quantized_rows(weight, bits)
    return q.to(weight.dtype) * scale.to(weight.dtype)[:, None]


def _is_quantized_linear(name: str) -> bool:
    """Whether ``name`` is the weight of a linear the layout quantizes (transformer.layers.3.attention.qkv.weight)."""
    stem = name.removesuffix(".weight")
    return name != stem and name.startswith("transformer.layers.") and stem.endswith(
        tuple("." + linear for linear in QUANTIZED_LINEARS))


class QuantizedWeights(Mapping[str, torch.Tensor]):
    """TensorRT-LLM checkpoint names over ``weights`` (weights.to_trtllm), ``mode``'s linears stored
    quantized: ``<linear>.weight`` int8 [in, out] and ``<linear>.per_channel_scale`` [out], computed
    when read (a streaming check holds one layer's)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], mode: QuantMode):
        self.weights, self.mode = weights, mode
        self._sources: dict[str, tuple[str, int | None]] = {}  # name -> (full-precision name, part or None)
        for name in weights:
            if not _is_quantized_linear(name):
                self._sources[name] = (name, None)
            else:
                self._sources[name] = (name, 0)
                self._sources[name.removesuffix(".weight") + ".per_channel_scale"] = (name, 1)
        # A layer's linears are read twice (weight, then scale): keep the last few quantized.
        self._quantized = functools.lru_cache(maxsize=len(QUANTIZED_LINEARS))(self._quantize)

    def _quantize(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return symmetric_quantize(self.weights[name], self.mode.bits)

    def __getitem__(self, name: str) -> torch.Tensor:
        source, part = self._sources[name]
        return self.weights[source] if part is None else self._quantized(source)[part]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def is_quantized(self, name: str) -> bool:
        return self._sources.get(name, (name, None))[1] == 0


def read_quantized(weights: QuantizedWeights, name: str, dtype: torch.dtype):
    """The network's [out, in] weight ``name`` from its stored int8 values and scales, constants named as the
    checkpoint names them (so an engine refits them)."""
    q = F.constant(F.torch_to_numpy(weights[name].contiguous()))  # [in, out] int8
    q.name = name
    scale_name = name.removesuffix(".weight") + ".per_channel_scale"
    scale = F.constant(F.torch_to_numpy(weights[scale_name].to(dtype).contiguous()))  # [out]
    scale.name = scale_name
    return dequantize_weight(q, scale, dtype)


def dequantize_weight(q, scale, dtype: torch.dtype):
    """int8 [in, out] times each output channel's scale, as weight_only_quant_matmul dequantizes without its
    plugin, in the model dtype; transposed to Linear's [out, in]."""
    return F.dequantize(q, scale, 1, str(dtype).removeprefix("torch.")).transpose(0, 1)


class _Dequantized(nn.Module):
    """A parametrization: the weight as the port computes with it."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return dequantized(weight, self.bits)


def quantized_golden(model: nn.Module, mode: QuantMode) -> nn.Module:
    """The quantized golden: ``model`` computing with the weights ``mode`` stores. A copy of its modules
    sharing its parameters (no second weight set), each quantized linear's weight dequantized from its
    quantized values whenever it is read; ``model`` itself stays full precision."""
    golden = copy.deepcopy(model, memo={id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]})
    for layer in golden.model.layers:
        for path in REFERENCE_LINEARS:
            parametrize.register_parametrization(layer.get_submodule(path), "weight", _Dequantized(mode.bits),
                                                 unsafe=True)
    return golden
