"""Quantized weight layouts, as TensorRT-LLM 1.2's quantized LLaMA checkpoints store them.

A quantization mode is a weight layout plus the Q/DQ ops that read it back (DESIGN.md): the
component code is unchanged, and ``modeling.dense`` computes a linear that the layout stores
quantized through the layout's ``read``, which dequantizes it.

Each linear of the decoder layers (attention.qkv, attention.dense, mlp.fc, mlp.gate, mlp.proj)
is quantized; the embedding and lm_head stay in full precision (quantize.py's default
exclude_modules).

int8_wo (QuantAlgo.W8A16): ``<linear>.weight``, int8 [in, out], and ``<linear>.per_channel_scale``,
[out] in the weights' dtype: TensorRT-LLM's converter (convert_utils.get_tllm_linear_weight)
quantizes ``weight.t()`` with symmetric_quantize_last_axis_of_batched_matrix (``symmetric_quantize``).
The port reads a weight as weight_only_quant_matmul does without its plugin, dequantize(weight,
scale, axis=1) in the model dtype. The plugin's preprocessed (interleaved, GPU-architecture-specific)
copy of the same int8 values is not this layout.

int4_wo (QuantAlgo.W4A16_AWQ), the checkpoint ModelOpt's AWQ export writes for TensorRT-LLM:
``<linear>.weight``, int8 [out / 2, in], two int4 values per byte along out (the even output channel
in the low nibble); ``<linear>.weights_scaling_factor``, [out, in / 128] in the weights' dtype, each
group's max |w| / 7; ``<linear>.prequant_scaling_factor``, [in] in the weights' dtype, which
multiplies the activations before the matmul (AWQ scales salient input channels of the weight up by
its inverse). The port makes the weights a TensorRT INT4 constant [in, out] (constant(as_dtype=int4))
and reads it with a blocked dequantize along in: the same numbers as TensorRT-LLM's groupwise plugin,
without the plugin. An input size that is not a multiple of 128 is padded with zero weights to the
next one, as WeightOnlyGroupwiseQuantLinear pads in_features (weight [out / 2, in padded], scales
[out, in padded / 128]; the pre-quant scale keeps [in]); the port drops the padded rows after dequantizing.

fp8 (QuantAlgo.FP8): ``<linear>.weight``, fp8 e4m3 [out, in]; ``<linear>.weights_scaling_factor`` and
``<linear>.activation_scaling_factor``, [1] fp32 each: max |w| / 448, and max |x| / 448 of the linear's input over
the calibration prompt (FP8Linear's parameters; the fused QKV has one of each). The port reads a linear as
FP8Linear does without the fp8 gemm plugin: the input quantized to e4m3 and dequantized with the activation scale,
the weight dequantized with its own, both scales cast to the model dtype, then a matmul in the model dtype.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F

# TensorRT-LLM's quantized linears of a decoder layer, and the reference's modules each is made of.
QUANTIZED_LINEARS = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- int8_wo

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


def dequantize_weight(q, scale, dtype: torch.dtype):
    """int8 [in, out] times each output channel's scale, as weight_only_quant_matmul dequantizes without its
    plugin, in the model dtype; transposed to Linear's [out, in]."""
    return F.dequantize(q, scale, 1, _dtype_name(dtype)).transpose(0, 1)


class PerChannelInt8:
    """int8_wo's layout: one scale per output channel."""

    suffixes = ("weight", "per_channel_scale")
    rounds_activations = False

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = symmetric_quantize(weight, 8)
        return {"weight": q, "per_channel_scale": scale}

    def golden(self, weights: list[torch.Tensor], activation_scale: None = None) -> tuple[Callable, Callable | None]:
        """The quantized golden's linear: its weight as the port computes with it; its input as it is."""
        return self.dequantized, None

    def dequantized(self, weight: torch.Tensor, input_scale: None = None) -> torch.Tensor:
        q, scale = _quantized_rows(weight, 8)
        return q.to(weight.dtype) * scale.to(weight.dtype)[:, None]

    def engine_array(self, suffix: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored if suffix == "weight" else stored.to(dtype)

    def read(self, x, weights: QuantizedWeights, stem: str, dtype: torch.dtype):
        """x @ W^T, W read back from the int8 values and their scales."""
        weight = dequantize_weight(weights.constant(f"{stem}.weight", dtype),
                                   weights.constant(f"{stem}.per_channel_scale", dtype), dtype)
        return F.matmul(x, weight, transb=True)


# ---------------------------------------------------------------- int4_wo

GROUP_SIZE = 128  # ModelOpt's int4_awq block size; TensorRT-LLM's default group_size


def _padded(size: int) -> int:
    return math.ceil(size / GROUP_SIZE) * GROUP_SIZE


def awq_input_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """The pre-quant scale [in] (fp32) of a linear made of ``weights`` (q, k and v share one input and one scale).
    AWQ searches it on calibration activations, which a random-weight model has none of; this deterministic
    stand-in has its form and effect: each input channel's max |w| over their mean, so the weight's columns are
    equalized before quantization and a port that drops or misplaces the scale is off by up to tens of percent."""
    column_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)  # [in]
    return (column_max / column_max.mean()).clamp_min(1e-3)


def awq_quantize(weight: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [out, in] as ModelOpt's int4 AWQ export quantizes it (to_quantized_weight): the weight
    times 1 / input_scale, the input padded with zeros to whole groups of GROUP_SIZE, each group's scale
    max |w| / 7 in the weight's dtype, q = round(w / scale) (half to even) clipped to [-8, 7], in fp32.
    Returns (q int8 [out, in padded], scale [out, groups])."""
    out_features, in_features = weight.shape
    w = torch.zeros(out_features, _padded(in_features))
    w[:, :in_features] = weight.detach().float() / input_scale
    groups = w.view(out_features, -1, GROUP_SIZE)  # [out, groups, GROUP_SIZE]
    scale = (groups.abs().amax(-1) / 7).to(weight.dtype)  # [out, groups]
    divisor = torch.where(scale != 0, scale.float(), 1.0)[..., None]  # an all-zero group stays 0
    q = (groups / divisor).round_().clamp_(-8, 7).to(torch.int8)
    return q.view(out_features, -1), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] (int8 in [-8, 7]) packed two per byte along out: [out / 2, in], output channel 2k in
    the low nibble of row k, 2k + 1 in the high one (ModelOpt's export)."""
    return ((q[0::2] & 0x0F) | (q[1::2] << 4)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: [out / 2, in] -> int8 values [out, in], each nibble sign-extended."""
    low, high = (packed << 4) >> 4, packed >> 4  # arithmetic shifts sign-extend
    return torch.stack([low, high], dim=1).flatten(0, 1)


class GroupwiseInt4:
    """int4_wo's layout: AWQ, groups of GROUP_SIZE input channels, a pre-quant scale on the activations."""

    suffixes = ("weight", "weights_scaling_factor", "prequant_scaling_factor")
    rounds_activations = False

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        prequant = awq_input_scale([weight]).to(weight.dtype)  # stored in the weights' dtype, and used as stored
        q, scale = awq_quantize(weight, prequant.float())
        return {"weight": pack_int4(q), "weights_scaling_factor": scale, "prequant_scaling_factor": prequant}

    def golden(self, weights: list[torch.Tensor], activation_scale: None = None) -> tuple[Callable, Callable | None]:
        """The dequantized weight, and the input times the pre-quant scale (the fused QKV's for q, k and v)."""
        input_scale = awq_input_scale(weights)
        return (functools.partial(self.dequantized, input_scale=input_scale),
                lambda x: x * input_scale.to(x.dtype))

    def dequantized(self, weight: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        """The weight [out, in] the port multiplies the scaled activations by, in the weight's dtype."""
        q, scale = awq_quantize(weight, input_scale.to(weight.dtype).float())
        return (q.to(weight.dtype) * scale.repeat_interleave(GROUP_SIZE, 1))[:, :weight.shape[1]]

    def engine_array(self, suffix: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the network's constant holds (TensorRT-LLM's postprocess of the checkpoint tensor)."""
        if suffix == "weight":
            return int4_engine_weight(stored)
        return group_scales_engine(stored) if suffix == "weights_scaling_factor" else stored.to(dtype)

    def read(self, x, weights: QuantizedWeights, stem: str, dtype: torch.dtype):
        """(x * pre-quant scale) @ W, W [in, out] dequantized from INT4 in blocks of GROUP_SIZE along in."""
        scale = weights.constant(f"{stem}.weights_scaling_factor", dtype)  # [groups, out]
        in_padded, out_features = scale.shape[0] * GROUP_SIZE, scale.shape[1]
        q = weights.constant(f"{stem}.weight", dtype, as_dtype=F.int4, as_shape=(in_padded, out_features))
        weight = dequantize_groups(q, scale, dtype)  # [in padded, out]
        in_features = x.shape[-1]
        if in_features != in_padded:  # drop the zero rows that pad in_features to whole groups
            weight = F.split(weight, [in_features, in_padded - in_features], dim=0)[0]
        return F.matmul(x * weights.constant(f"{stem}.prequant_scaling_factor", dtype), weight)


def int4_engine_weight(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight [out / 2, in] transposed, [in, out / 2]: TensorRT packs an INT4 constant's consecutive
    elements two to a byte, low nibble first, so these bytes are the [in, out] INT4 tensor."""
    return packed.t().contiguous()


def group_scales_engine(scale: torch.Tensor) -> torch.Tensor:
    """The group scales [out, groups] as the blocked dequantize of an [in, out] weight takes them: [groups, out]."""
    return scale.t().contiguous()


def dequantize_groups(q, scale, dtype: torch.dtype):
    """INT4 [in, out] times its group's scale [in / GROUP_SIZE, out]: TensorRT's blocked dequantize along in
    (axis 0), the block size taken from the two shapes."""
    return F.dequantize(q, scale, 0, _dtype_name(dtype))


# ---------------------------------------------------------------- fp8

FP8_LARGEST = 448.0  # e4m3's largest finite value


def fp8_values(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as IQuantizeLayer's fp8 output: divided in fp32, saturated to e4m3's range, rounded half to even."""
    return (x.float() / scale.float()).clamp_(-FP8_LARGEST, FP8_LARGEST).to(torch.float8_e4m3fn)


def fp8_dequantized(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values times ``scale`` in ``dtype`` (DequantizeLinear's product in the scale's type)."""
    return x.to(dtype) * scale.to(dtype)


def weight_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """The per-tensor scale [1] (fp32) of a linear made of ``weights``: max |w| / 448 (an all-zero weight keeps 1)."""
    amax = torch.stack([w.detach().float().abs().amax() for w in weights]).amax().reshape(1)
    return torch.where(amax > 0, amax / FP8_LARGEST, 1.0)


class PerTensorFp8:
    """fp8's layout: the weight and the linear's input each in e4m3 with one scale."""

    suffixes = ("weight", "weights_scaling_factor")
    # Each linear's input is rounded to e4m3 too: a correct port's input differs from the golden's in last ulps,
    # and a value beside a rounding boundary rounds either way (a 6-12% step), so the judge rounds the port's own
    # input where it passes (parity.quantized.teacher_forced).
    rounds_activations = True

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """ModelOpt's per-tensor fp8 weight: e4m3 values of weight / scale, the scale max |w| / 448 in fp32."""
        scale = weight_scale([weight])
        return {"weight": fp8_values(weight.detach(), scale), "weights_scaling_factor": scale}

    def golden(self, weights: list[torch.Tensor], activation_scale: torch.Tensor) -> tuple[Callable, Callable]:
        """The dequantized weight (q, k and v sharing the fused QKV's scale), and the input rounded to e4m3 and back
        with the calibrated activation scale."""
        scale = weight_scale(weights)

        def dequantized(weight: torch.Tensor) -> torch.Tensor:
            return fp8_dequantized(fp8_values(weight, scale), scale.to(weight.dtype), weight.dtype)

        def input_rounded(x: torch.Tensor) -> torch.Tensor:
            x_scale = activation_scale.to(x.device, x.dtype)  # the port casts the fp32 scale to the model dtype first
            return fp8_dequantized(fp8_values(x, x_scale), x_scale, x.dtype)

        return dequantized, input_rounded

    def engine_array(self, suffix: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored  # e4m3 weights; fp32 scales, which the port casts

    def read(self, x, weights: QuantizedWeights, stem: str, dtype: torch.dtype):
        """FP8Linear without the fp8 gemm plugin: x and W each through quantize/dequantize, then x @ W^T."""
        dtype_name = _dtype_name(dtype)
        x_scale = F.cast(weights.constant(f"{stem}.activation_scaling_factor", torch.float32), dtype_name)
        x_rounded = F.dequantize(quantize_input(x, x_scale), x_scale, -1, dtype_name)
        w_scale = F.cast(weights.constant(f"{stem}.weights_scaling_factor", torch.float32), dtype_name)
        weight = F.dequantize(weights.constant(f"{stem}.weight", dtype), w_scale, -1, dtype_name)  # [out, in]
        return F.matmul(x_rounded, weight, transb=True)


def quantize_input(x, scale):
    """A linear's input in e4m3: x / its activation scale (IQuantizeLayer's fp8)."""
    return F.quantize(x, scale, "fp8")


# ---------------------------------------------------------------- KV cache

KV_CACHE_SCALE = "attention.kv_cache_scaling_factor"  # [1] fp32 a layer, after transformer.layers.{i}.
CALIBRATION_TOKENS = 64  # the seeded prompt a KV cache's and fp8 activations' scales are calibrated on


@dataclass(frozen=True)
class KvCache:
    """A quantized KV cache (kv_cache_quant_algo INT8 or FP8): each layer's K and V stored as ``dtype`` values of
    x / kv_cache_scaling_factor and read back times it, the scale ModelOpt calibrates: the larger of K's and V's
    max |x| over the calibration prompt, over the format's largest value (127, 448)."""

    dtype: str  # TensorRT-LLM's name of the cache's dtype: int8, fp8
    largest: float

    def stored(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``x`` as the cache stores it and a later step reads it back, in x's dtype (the golden's)."""
        scaled = x.float() / torch.tensor(scale, dtype=torch.float32)
        if self.dtype == "int8":
            values = scaled.round().clamp(-128, 127)
        else:
            values = scaled.clamp(-self.largest, self.largest).to(torch.float8_e4m3fn).float()
        return (values * scale).to(x.dtype)


def activation_scale_name(layer: int, linear: str) -> str:
    return f"transformer.layers.{layer}.{linear}.activation_scaling_factor"


def kv_cache_scale_name(layer: int) -> str:
    return f"transformer.layers.{layer}.{KV_CACHE_SCALE}"


def calibrate(model: nn.Module, mode: QuantMode) -> dict[str, torch.Tensor]:
    """The scales ``mode`` calibrates, as checkpoint tensors ([1] fp32 each), from full-precision ``model`` over a
    seeded prompt of CALIBRATION_TOKENS random tokens (a random-weight model has no calibration set to take):
    each layer's kv_cache_scaling_factor (a quantized KV cache), each linear's activation_scaling_factor (a layout
    that rounds activations: its input's max |x| / 448)."""
    rounds = mode.layout is not None and mode.layout.rounds_activations
    if mode.kv is None and not rounds:
        return {}
    amax: dict[str, float] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:
        amax[name] = float(args[0].abs().max())

    hooks = [layer.get_submodule(paths[0]).register_forward_pre_hook(functools.partial(record, activation_scale_name(
             i, linear))) for i, layer in enumerate(model.model.layers) if rounds
             for linear, paths in QUANTIZED_LINEARS.items()]  # q, k and v share one input, fc and gate another
    device = model.lm_head.weight.device
    tokens = torch.randint(model.config.vocab_size, (1, CALIBRATION_TOKENS), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            presents = model(tokens.to(device), use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
    scales = {name: max(value, 1e-12) / FP8_LARGEST for name, value in amax.items()}  # an all-zero input keeps a scale
    if mode.kv is not None:
        scales.update({kv_cache_scale_name(i): max(float(k.abs().max()), float(v.abs().max())) / mode.kv.largest
                       for i, (k, v) in enumerate(presents)})
    return {name: torch.tensor([scale], dtype=torch.float32) for name, scale in scales.items()}


class RoundedCache:
    """The quantized golden's KV cache (the reference's ``kv_cache`` hook): K and V rounded as the cache stores
    them. It keeps the values it last rounded, so that the judge can admit the rounding of any value within
    tolerance of them (parity.quantized.admit_cache_rounding): a value a last ulp from a rounding boundary
    rounds either way, and a correct port's K differs from the golden's by its last ulps."""

    def __init__(self, kv: KvCache, scale: float):
        self.kv, self.scale = kv, scale
        self.rounded: dict[str, torch.Tensor] = {}  # "k", "v" -> the new tokens' values before rounding

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        self.rounded[name] = x
        return self.kv.stored(x, self.scale)

    def window(self, name: str, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The least and greatest stored value of a value within ``delta`` of the last rounded ``name``
        (rounding is monotone), in fp32."""
        x = self.rounded[name].float()
        return self.kv.stored(x - delta, self.scale), self.kv.stored(x + delta, self.scale)


def kv_cache_entry(x, weights: QuantizedWeights, prefix: str, dtype: torch.dtype):
    """The new tokens' K or V [b, kv_heads, s, d] as the quantized cache stores them and a later step reads them
    back: quantize/dequantize in fp32, the type of the layer's scale."""
    scale = kv_cache_scale(weights, prefix)
    stored = store_kv(F.cast(x, "float32"), scale, weights.mode.kv.dtype)
    return F.cast(F.dequantize(stored, scale, -1, "float32"), _dtype_name(dtype))


def kv_cache_scale(weights: QuantizedWeights, prefix: str):
    return weights.constant(prefix + KV_CACHE_SCALE, torch.float32)  # [1]


def store_kv(x, scale, dtype: str):
    return F.quantize(x, scale, dtype)


# ---------------------------------------------------------------- modes

@dataclass(frozen=True)
class QuantMode:
    name: str
    quant_algo: str  # TensorRT-LLM's QuantAlgo and KV cache quant algo
    description: str
    layout: PerChannelInt8 | GroupwiseInt4 | PerTensorFp8 | None  # the weights' (None: full precision)
    kv: KvCache | None = None  # the KV cache's (None: the model dtype)

    def touches(self, component: str) -> bool:
        """Whether ``component``'s check computes anything this mode quantizes (a linear; a tapped KV cache)."""
        linears = self.layout is not None and component in ("gqa_masked", "gqa_unmasked", "mlp", "decoder_layer",
                                                            "causal_lm")
        return linears or (self.kv is not None and component in ("gqa_masked", "gqa_unmasked", "causal_lm"))

    def unsupported(self, config) -> str | None:
        """Why this mode cannot store ``config``'s weights, or None."""
        if not isinstance(self.layout, GroupwiseInt4):
            return None
        outputs = {"the fused QKV": (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim,
                   "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size}
        odd = [f"{name} {size}" for name, size in outputs.items() if size % 2]
        return f"INT4 packs two output channels a byte: {', '.join(odd)} odd" if odd else None


_WEIGHT_MODES = [
    QuantMode("int8_wo", "W8A16", "INT8 weights with a scale per output channel; activations in the model dtype",
              PerChannelInt8()),
    QuantMode("int4_wo", "W4A16_AWQ", f"INT4 weights with a scale per {GROUP_SIZE} input channels and AWQ's "
              "pre-quant scale on the activations", GroupwiseInt4()),
    QuantMode("fp8", "FP8", "FP8 (e4m3) weights and linear inputs, one scale per tensor each", PerTensorFp8()),
]
_KV_MODES = [
    QuantMode("int8_kv", "kv INT8", "the KV cache in INT8, one scale a layer", None, KvCache("int8", 127.0)),
    QuantMode("fp8_kv", "kv FP8", "the KV cache in FP8 (e4m3), one scale a layer", None, KvCache("fp8", 448.0)),
]
MODES = {mode.name: mode for mode in [
    *_WEIGHT_MODES, *_KV_MODES,
    *(QuantMode(f"{w.name}+{kv.name}", f"{w.quant_algo} + {kv.quant_algo}", f"{w.description}; {kv.description}",
                w.layout, kv.kv) for w in _WEIGHT_MODES for kv in _KV_MODES)]}


def _quantized_stem(name: str) -> str | None:
    """The linear whose weight ``name`` is, if the layouts quantize it (transformer.layers.3.attention.qkv)."""
    stem = name.removesuffix(".weight")
    quantized = name != stem and name.startswith("transformer.layers.") and stem.endswith(
        tuple("." + linear for linear in QUANTIZED_LINEARS))
    return stem if quantized else None


class QuantizedWeights(Mapping[str, torch.Tensor]):
    """TensorRT-LLM checkpoint names over ``weights`` (weights.to_trtllm), ``mode``'s linears stored quantized
    (``<linear>.weight`` and the layout's scales), computed when read (a streaming check holds one layer's)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], mode: QuantMode, calibrated: Mapping[str, torch.Tensor]):
        self.weights, self.mode = weights, mode
        self._sources: dict[str, tuple[str, str | None]] = {}  # name -> (full-precision name, stored suffix or None)
        for name in weights:
            stem = _quantized_stem(name) if mode.layout is not None else None
            self._sources.update({name: (name, None)} if stem is None else
                                 {f"{stem}.{suffix}": (name, suffix) for suffix in mode.layout.suffixes})
        self._calibrated = dict(calibrated)  # the scales calibrate() finds, [1] fp32 each
        # A layer's linears are read a tensor at a time: keep the last few quantized.
        self._quantized = functools.lru_cache(maxsize=len(QUANTIZED_LINEARS))(self._quantize)

    def _quantize(self, name: str) -> dict[str, torch.Tensor]:
        return self.mode.layout.quantize(self.weights[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._calibrated:
            return self._calibrated[name]
        source, suffix = self._sources[name]
        return self.weights[source] if suffix is None else self._quantized(source)[suffix]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._sources, *self._calibrated])

    def __len__(self) -> int:
        return len(self._sources) + len(self._calibrated)

    @property
    def rounds_activations(self) -> bool:
        """Whether the port rounds each quantized linear's input (its graphs then emit those inputs)."""
        return self.mode.layout is not None and self.mode.layout.rounds_activations

    def is_quantized(self, name: str) -> bool:
        return self._sources.get(name, (name, None))[1] == "weight"

    def engine_array(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The array the network's constant ``name`` is built from (and refitted with): the layout's view of a
        stored tensor, TensorRT-LLM's postprocess; floats in the model dtype."""
        if name in self._calibrated:
            return self._calibrated[name]  # fp32 whatever the model dtype
        source, suffix = self._sources[name]
        if suffix is None:
            return self.weights[source].to(dtype).contiguous()
        return self.mode.layout.engine_array(suffix, self[name], dtype)

    def constant(self, name: str, dtype: torch.dtype, **kwargs):
        """The network constant ``name``, named as the checkpoint names it (so an engine refits it)."""
        tensor = F.constant(F.torch_to_numpy(self.engine_array(name, dtype)), **kwargs)
        tensor.name = name
        return tensor


def quantized_dense(x, weights: QuantizedWeights, name: str, dtype: torch.dtype):
    """x @ W^T for the linear whose weight ``name`` the layout stores quantized."""
    return weights.mode.layout.read(x, weights, name.removesuffix(".weight"), dtype)


# ---------------------------------------------------------------- the quantized golden

class _Dequantized(nn.Module):
    """A parametrization: the weight as the port computes with it."""

    def __init__(self, weight: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.weight = weight

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.weight(weight)


def _on_input(transform: Callable[[torch.Tensor], torch.Tensor], forced: dict[nn.Module, Callable]):
    """The pre-hook transforming a quantized linear's input; ``forced`` may first pick another input for the module
    (the judge's teacher forcing: parity.quantized.teacher_forced)."""
    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        x = forced[module](args[0]) if module in forced else args[0]
        return (transform(x), *args[1:])
    return pre_hook


def quantized_golden(model: nn.Module, mode: QuantMode) -> nn.Module:
    """The quantized golden: ``model`` computing with the weights ``mode`` stores. A copy of its modules
    sharing its parameters (no second weight set), each quantized linear's weight dequantized from its
    quantized values whenever it is read, its input transformed first where the layout does (AWQ's
    pre-quant scale, q, k and v sharing the fused QKV's; fp8's rounding), and K and V rounded as a quantized
    KV cache stores them (RoundedCache); ``model`` itself stays full precision. ``golden.quant_mode`` is
    ``mode``; ``golden.forced_inputs`` (module -> input picker, empty) is where a judge forces linear inputs."""
    golden = copy.deepcopy(model, memo={id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]})
    golden.quant_mode, golden.forced_inputs = mode, {}
    calibrated = calibrate(model, mode)
    for i, layer in enumerate(golden.model.layers):
        if mode.kv is not None:
            layer.self_attn.kv_cache = RoundedCache(mode.kv, float(calibrated[kv_cache_scale_name(i)]))
        if mode.layout is None:
            continue
        for linear, paths in QUANTIZED_LINEARS.items():
            modules = [layer.get_submodule(path) for path in paths]
            weight, on_input = mode.layout.golden([module.weight for module in modules],
                                                  calibrated.get(activation_scale_name(i, linear)))
            for module in modules:
                parametrize.register_parametrization(module, "weight", _Dequantized(weight), unsafe=True)
                if on_input is not None:
                    module.register_forward_pre_hook(_on_input(on_input, golden.forced_inputs))
    return golden
