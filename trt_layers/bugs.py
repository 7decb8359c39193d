"""A catalog of realistic porting bugs, injectable into the trt_layers side.

Each bug replaces one named piece of the port (a helper in ``modeling.py`` or an entry of the
weight mapping) while it is injected, so the component code itself carries no bug switches.
Each names the component check that must catch it, the case that exposes it, the first
tap where the divergence must be reported and the diagnosis it must get there (a
parity.diagnose hypothesis); and where it can show at all (``Shows``): a check
outside that computes the same numbers with and without the bug, so ``locate`` refuses to
inject it there rather than print a PASS that checked nothing. The tests and the command line
use this one catalog.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import ChainMap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from reference import DeciCoderConfig
from reference.inputs import CaseShape

from . import functional as F
from .quantization import GROUP_SIZE


def _linear_inputs(component: str, config: DeciCoderConfig) -> tuple[int, ...]:
    """The input sizes of the quantized linears ``component`` runs (0 for none)."""
    attention, mlp = (config.hidden_size,), (config.hidden_size, config.intermediate_size)
    return {"gqa_masked": attention, "gqa_unmasked": attention, "mlp": mlp}.get(
        component, attention + mlp if component in ("decoder_layer", "causal_lm") else (0,))


@dataclass(frozen=True)
class Shows:
    """The checks in which a bug can show: its components, and what the case and model must have."""

    components: tuple[str, ...]
    min_seq_len: int = 1  # new tokens: a mask over one token masks nothing
    min_past_len: int = 0  # 1: decode, with a cache (rope: positions that continue after one)
    min_positions: int = 1  # past_len + seq_len: RoPE at position 0 rotates by nothing
    grouped_kv: bool = False  # 1 < KV heads < heads (a rank's): MHA repeats nothing, one KV head tiles as it repeats
    harmless_with: tuple[tuple[str, float], ...] = ()  # (config key, value) with which the bug computes the same
    cache_only: bool = False  # changes only the K/V cache's layout, which attention reads order-free: never logits
    quant: str | None = None  # the quantization mode whose layout it misreads: shows only with --quant using it
    many_groups: bool = False  # int4_wo: a linear of the check takes more inputs than one group (128)
    tp: bool = False  # misreads tensor parallelism: shows only where ranks split the model (--tp N, N > 1)
    kv_duplicated: bool = False  # shows only where TP exceeds 2 or more KV heads (each duplicated onto ranks)
    why: str = ""  # why it shows nowhere else, where that is not plain

    def allows(self, component: str, shape: CaseShape, config: DeciCoderConfig, quant: str | None = None,
               tp: int = 1) -> bool:
        kv_heads = config.num_key_value_heads
        uses = self.quant is None or self.quant in (quant or "").split("+")  # int4_wo+int8_kv uses int8_kv
        split = (not self.tp or tp > 1) and (not self.kv_duplicated or tp > kv_heads > 1)
        return (component in self.components and shape.seq_len >= self.min_seq_len and uses and split
                and shape.past_len >= self.min_past_len and shape.past_len + shape.seq_len >= self.min_positions
                and (not self.grouped_kv or 1 < -(-kv_heads // tp) < config.num_attention_heads // tp)  # a rank's
                and (not self.many_groups or max(_linear_inputs(component, config)) > GROUP_SIZE)
                and all(getattr(config, key) != value for key, value in self.harmless_with))

    def describe(self) -> str:
        """Where, in locate's options: 'rope, causal_lm with --past-len >= 1 (decode)'."""
        needs = [f"--seq-len >= {self.min_seq_len}"] if self.min_seq_len > 1 else []
        needs += [f"--past-len >= {self.min_past_len} (decode)"] if self.min_past_len else []
        needs += [f"--past-len + --seq-len >= {self.min_positions}"] if self.min_positions > 1 else []
        needs += ["grouped KV heads (1 < --kv-heads < heads; with --tp N, on each rank)"] if self.grouped_kv else []
        needs += [f"{key} other than {value:g}" for key, value in self.harmless_with]
        needs += [f"a linear of more than {GROUP_SIZE} inputs (several INT4 groups)"] if self.many_groups else []
        needs += [f"--quant {self.quant}"] if self.quant else []
        needs += ["--tp N, N > 1"] if self.tp and not self.kv_duplicated else []
        needs += ["--tp N beyond 2 or more KV heads"] if self.kv_duplicated else []
        where = ", ".join(self.components) + (f" with {', '.join(needs)}" if needs else "")
        return f"{where} ({self.why})" if self.why else where


@dataclass(frozen=True)
class Bug:
    name: str
    description: str
    target: str  # "module:attribute" replaced while injected
    patch: Callable  # original attribute -> replacement
    component: str  # the component check that catches it
    first_tap: str  # where that check must report the first divergence
    shows: Shows  # every check that can catch it
    shape: CaseShape = CaseShape(batch=2, seq_len=7)  # a case of ``component`` that exposes it (GQA, 2 KV heads)
    tp_size: int = 1  # the tensor-parallel size of that case
    first_rank: int = 0  # the rank where that case's first divergence is reported
    # The parity.diagnose hypothesis that must explain it at first_tap ("no_known_pattern" where none does; None
    # for a tensor-parallel bug: a TP check is not diagnosed).
    hypothesis: str | None = field(kw_only=True)

    @contextlib.contextmanager
    def injected(self) -> Iterator[None]:
        module_name, attribute = self.target.split(":")
        module = importlib.import_module(module_name)
        original = getattr(module, attribute)
        setattr(module, attribute, self.patch(original))
        try:
            yield
        finally:
            setattr(module, attribute, original)


def _rotate_every_two(original):
    def rotate_half(x):
        return F.RopeEmbeddingUtils.rotate_every_two(x)
    return rotate_half


def _positions_from_zero(original):
    def rope_positions(position_ids):
        zero = F.constant(np.asarray(0, dtype=np.int32))
        positions = F.unsqueeze(F.arange(zero, F.shape(position_ids, 1), "int32"), 0)  # [1, s]: 0..s-1
        return F.expand(positions, F.concat([F.shape(position_ids, 0), F.shape(position_ids, 1)]))
    return rope_positions


def _tiled_repeat_kv(original):
    def repeat_kv(x, n_rep):
        return x if n_rep == 1 else F.concat([x] * n_rep, dim=1)  # heads 0,1,0,1 instead of 0,0,1,1
    return repeat_kv


def _no_causal_mask(original):
    from .modeling import no_mask

    return no_mask


def _causal_decode(original):
    from .modeling import causal_mask

    return causal_mask


def _append_before_past(original):
    def append_kv(past, new):
        return F.concat([new, past], dim=2)
    return append_kv


def _swapped(a: str, b: str):
    def patch(table):
        return {**table, a: table[b], b: table[a]}
    return patch


def _default_eps(original):
    def rmsnorm(x, weights, name, config, dtype):
        from .modeling import param

        return F.rms_norm(x, (config.hidden_size,), weight=param(weights, name, dtype))  # eps left at 1e-6
    return rmsnorm


def _tied_lm_head(original):
    def to_trtllm(state_dict, config):
        weights = original(state_dict, config)
        return ChainMap({"lm_head.weight": weights["transformer.vocab_embedding.weight"]}, weights)
    return to_trtllm


def _first_channel_scale(original):
    def dequantize_weight(q, scale, dtype):
        # One scale for the tensor, the first output channel's, where the checkpoint stores one per channel.
        first = F.split(scale, [1, scale.shape[0] - 1], 0)[0]  # [1]
        return F.dequantize(q, first, 1, str(dtype).removeprefix("torch.")).transpose(0, 1)
    return dequantize_weight


def _nibbles_swapped(original):
    def int4_engine_weight(packed):
        return original((packed << 4) | ((packed >> 4) & 0x0F))  # each byte's high nibble read first
    return int4_engine_weight


def _scales_reshaped(original):
    def group_scales_engine(scale):
        return scale.reshape(scale.shape[1], scale.shape[0])  # [out, groups] reshaped where it needs a transpose
    return group_scales_engine


# A quantized cache changes what the cache holds, not what attention reads this step (the new tokens' K and V as
# computed): it shows in the taps of the cache, which the decoder_layer check does not tap.
_CACHE_ONLY = "it changes only the cache, which the decoder_layer check does not tap"


def _kv_scale_dropped(original):
    def kv_cache_scale(weights, prefix):
        original(weights, prefix)  # the engine holds the layer's kv_cache_scaling_factor, and never applies it
        return F.constant(np.ones(1, np.float32))
    return kv_cache_scale


def _kv_scale_multiplied(original):
    def store_kv(x, scale, dtype):
        return original(x * scale * scale, scale, dtype)  # stores x * scale where x / scale belongs
    return store_kv


def _input_scale_multiplied(original):
    def quantize_input(x, scale):
        return original(x * scale * scale, scale)  # quantizes x * scale where x / scale belongs
    return quantize_input


def _row_split_as_column(original):
    def split(name, weight, config, mapping):
        if mapping.tp_size > 1 and name.endswith("attention.dense.weight"):
            # The rank's output rows (a column-parallel split) in the row-parallel [hidden, hidden / tp] shape.
            return weight.chunk(mapping.tp_size, dim=0)[mapping.rank].reshape(weight.shape[0], -1)
        return original(name, weight, config, mapping)
    return split


def _kv_heads_tiled(original):
    def kv_duplicated(weight, kv_heads, head_dim, tp_size):
        if kv_heads >= tp_size:
            return weight
        heads = weight.reshape(kv_heads, head_dim, -1)
        return heads.repeat(tp_size // kv_heads, 1, 1).reshape(-1, weight.shape[-1])  # rank r: head r mod n
    return kv_duplicated


def _fused_qkv_sliced(original):
    def split_qkv(qkv, config, mapping):
        return qkv.chunk(mapping.tp_size)[mapping.rank]  # a slice of the fused rows, not each part's
    return split_qkv


def _no_allreduce(original):
    def summed_over_ranks(partial, mapping):
        return partial
    return summed_over_ranks


def _allreduce_twice(original):
    def summed_over_ranks(partial, mapping):
        return original(original(partial, mapping), mapping)
    return summed_over_ranks


def _logits_reversed(original):
    def gathered_logits(logits, mapping, config):
        gathered = F.allgather(logits, mapping.group, gather_dim=-1)
        chunks = F.split(gathered, logits.shape[-1], dim=2)  # one per rank
        reordered = F.concat(chunks[::-1], dim=2)  # rank tp-1's vocabulary first
        padding = reordered.shape[-1] - config.vocab_size
        return F.split(reordered, [config.vocab_size, padding], dim=2)[0] if padding else reordered
    return gathered_logits


def _scale_dropped(original):
    def dequantize_weight(q, scale, dtype):
        return F.cast(q, str(dtype).removeprefix("torch.")).transpose(0, 1)  # the int8 values, never scaled
    return dequantize_weight


_DECODE = CaseShape(batch=2, seq_len=7, past_len=5)
_ROPE = ("rope", "gqa_masked", "gqa_unmasked", "decoder_layer", "causal_lm")  # checks that rotate q and k
_REPEAT_KV = ("repeat_kv", "gqa_masked", "gqa_unmasked", "decoder_layer", "causal_lm")
_LAYER = ("decoder_layer", "causal_lm")
_TP_ATTENTION = ("gqa_masked", "gqa_unmasked", *_LAYER)

BUGS: dict[str, Bug] = {bug.name: bug for bug in [
    Bug("rope_interleaved", "GPT-J interleaved rotation (TensorRT-LLM's default rope_gptj) instead of rotate-half",
        "trt_layers.modeling:rotate_half", _rotate_every_two, "rope", "q_rot", Shows(_ROPE, min_positions=2),
        hypothesis="rope_layout"),
    Bug("rope_offset_forgotten", "decode positions restart at 0 instead of continuing after the cache",
        "trt_layers.modeling:rope_positions", _positions_from_zero, "rope", "cos",
        Shows(("rope", "gqa_unmasked", *_LAYER), min_past_len=1), _DECODE, hypothesis="rope_positions"),
    Bug("repeat_kv_tiled", "KV heads tiled (0,1,0,1) instead of each repeated in place (0,0,1,1)",
        "trt_layers.modeling:repeat_kv", _tiled_repeat_kv, "repeat_kv", "k_rep", Shows(_REPEAT_KV, grouped_kv=True),
        hypothesis="head_order"),
    # causal_mask builds every mask that masks something: prefill's, and inside a layer Llama's
    # decode mask over several new tokens; the bare decode attention (gqa_unmasked) runs none.
    Bug("causal_mask_missing", "prefill attention without the causal mask",
        "trt_layers.modeling:causal_mask", _no_causal_mask, "gqa_masked", "probs",
        Shows(("gqa_masked", *_LAYER), min_seq_len=2), hypothesis="attention_mask"),
    Bug("decode_masked", "decode attention masked causally, though Deci's decode path has no mask",
        "trt_layers.modeling:no_mask", _causal_decode, "gqa_unmasked", "probs",
        Shows(("gqa_unmasked",), min_seq_len=2,
              why="inside a layer, decode takes Llama's decode mask: causal over cache and new tokens, all zeros "
                  "for one token, which is what the bug computes"), _DECODE, hypothesis="attention_mask"),
    Bug("kv_append_reversed", "new K/V concatenated before the cache instead of after it",
        "trt_layers.modeling:append_kv", _append_before_past, "gqa_unmasked", "present_k",
        Shows(("gqa_unmasked", *_LAYER), min_past_len=1, cache_only=True), _DECODE, hypothesis="sequence_order"),
    Bug("mlp_gate_up_swapped", "HF gate_proj mapped to TensorRT-LLM's mlp.gate (it belongs in mlp.fc)",
        "trt_layers.weights:HF_TO_TRTLLM",
        _swapped("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "mlp", "gate",
        Shows(("mlp", *_LAYER)), hypothesis="other_tap"),
    Bug("rmsnorm_default_eps", "rms_norm called with TensorRT-LLM's default eps 1e-6, not the config's 1e-5",
        "trt_layers.modeling:rmsnorm", _default_eps, "rmsnorm", "out",
        Shows(("rmsnorm", *_LAYER), harmless_with=(("rms_norm_eps", 1e-6),)), hypothesis="norm_eps"),
    # The rmsnorm check runs input_layernorm, which now holds post_attention_layernorm's weight.
    Bug("layernorms_swapped", "input_layernorm and post_attention_layernorm weights exchanged",
        "trt_layers.weights:HF_TO_TRTLLM",
        _swapped("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        "decoder_layer", "input_norm", Shows(("rmsnorm", *_LAYER)), hypothesis="other_weight"),
    # Quantized layouts misread (--quant): the first linear each check runs is q (attention) or gate (MLP).
    Bug("int8_scale_per_tensor", "int8_wo weights dequantized with one scale, the first output channel's, where the "
        "checkpoint stores one per channel", "trt_layers.quantization:dequantize_weight", _first_channel_scale,
        "mlp", "gate", Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), quant="int8_wo"), hypothesis="scale"),
    Bug("int8_scale_missing", "int8_wo weights used as their int8 values, per_channel_scale never applied",
        "trt_layers.quantization:dequantize_weight", _scale_dropped, "mlp", "gate",
        Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), quant="int8_wo"), hypothesis="scale"),
    Bug("int4_nibbles_swapped", "int4_wo weights unpacked high nibble first, where the checkpoint packs the even "
        "output channel in the low one", "trt_layers.quantization:int4_engine_weight", _nibbles_swapped, "mlp",
        "gate", Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), quant="int4_wo"), hypothesis="channel_pairs"),
    Bug("int4_scales_reshaped", "int4_wo group scales [out, groups] reshaped to [groups, out] where they need a "
        "transpose: the scales land on the wrong groups and channels", "trt_layers.quantization:group_scales_engine",
        _scales_reshaped, "mlp", "down",
        Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), many_groups=True, quant="int4_wo",
              why="with one group a linear's [out, 1] reshapes as it transposes: tiny's attention takes 128 inputs"),
        hypothesis="no_known_pattern"),
    Bug("kv_cache_scale_missing", "int8 KV cache written and read without its kv_cache_scaling_factor: K and V "
        "rounded to whole numbers", "trt_layers.quantization:kv_cache_scale", _kv_scale_dropped, "gqa_masked",
        "present_k", Shows(("gqa_masked", "gqa_unmasked", "causal_lm"), quant="int8_kv", why=_CACHE_ONLY),
        hypothesis="cache_scale"),
    Bug("fp8_kv_scale_multiplied", "fp8 KV cache stored as x * kv_cache_scaling_factor where TensorRT-LLM stores "
        "x / it (the quant scale is its inverse)", "trt_layers.quantization:store_kv", _kv_scale_multiplied,
        "gqa_masked", "present_k", Shows(("gqa_masked", "gqa_unmasked", "causal_lm"), quant="fp8_kv", why=_CACHE_ONLY),
        hypothesis="cache_scale"),
    Bug("fp8_input_scale_multiplied", "fp8 linear inputs quantized as x * activation_scaling_factor where "
        "TensorRT-LLM quantizes x / it (the quant scale is its inverse)", "trt_layers.quantization:quantize_input",
        _input_scale_multiplied, "mlp", "gate", Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), quant="fp8"),
        hypothesis="no_known_pattern"),
    # Tensor-parallel ports (--tp N): each rank judged against its slice of the golden.
    Bug("o_proj_column_parallel", "attention dense split by output rows (column-parallel) where TensorRT-LLM's "
        "RowLinear splits its input columns: harmless at TP 1", "trt_layers.tensor_parallel:split",
        _row_split_as_column, "gqa_masked", "out", Shows(_TP_ATTENTION, tp=True), tp_size=2,
        hypothesis=None),
    Bug("kv_heads_tiled_across_ranks", "KV heads duplicated in tiled order: rank r takes KV head r mod n instead "
        "of r div (tp / n)", "trt_layers.tensor_parallel:_kv_duplicated", _kv_heads_tiled, "gqa_masked", "k",
        Shows(_TP_ATTENTION, tp=True, kv_duplicated=True), tp_size=4, first_rank=1, hypothesis=None),
    Bug("qkv_split_fused", "fused QKV split as a slice of the fused rows instead of each of q, k and v per rank",
        "trt_layers.tensor_parallel:split_qkv", _fused_qkv_sliced, "gqa_masked", "q", Shows(_TP_ATTENTION, tp=True),
        tp_size=2, first_rank=1, hypothesis=None),
    Bug("allreduce_missing", "a row-parallel linear's partial output used without the all-reduce",
        "trt_layers.modeling:summed_over_ranks", _no_allreduce, "mlp", "down",
        Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), tp=True), tp_size=2, hypothesis=None),
    Bug("allreduce_twice", "a row-parallel linear's output all-reduced twice (tp times the sum)",
        "trt_layers.modeling:summed_over_ranks", _allreduce_twice, "mlp", "down",
        Shows(("gqa_masked", "gqa_unmasked", "mlp", *_LAYER), tp=True), tp_size=2, hypothesis=None),
    Bug("logits_gathered_reversed", "lm_head logits gathered in reverse rank order", "trt_layers.modeling:"
        "gathered_logits", _logits_reversed, "causal_lm", "logits", Shows(("causal_lm",), tp=True), tp_size=2,
        hypothesis=None),
    Bug("lm_head_tied", "lm_head tied to the token embedding (DeciCoder's is a separate weight)",
        "trt_layers.weights:to_trtllm", _tied_lm_head, "causal_lm", "logits", Shows(("causal_lm",)),
        hypothesis="other_weight"),
]}
