"""DeciCoder-1b in the TensorRT-LLM functional API, component by component.

Every function builds part of a network from ``trt_layers.functional`` ops only (no plugins:
each intermediate is a real tensor that can be marked as an output) and returns its taps,
named as in ``reference.taps``, in execution order. The same code builds a TensorRT engine
through TensorRT-LLM or an ONNX graph through the lowering.

Layouts follow the reference: hidden states [b, s, hidden]; q/k/v and caches
[b, heads, s, head_dim]; position ids int32 [b, s].
"""

from __future__ import annotations

import numpy as np
import torch

from reference import COMPONENT_TAPS, DeciCoderConfig
from reference.inputs import past_names
from reference.taps import LAYER_TAPS, component_outputs

from . import functional as F
from . import tensor_parallel
from .quantization import QuantizedWeights, kv_cache_entry, quantized_dense
from .weights import layer_prefix

Taps = dict  # tap name -> Tensor, in execution order
Weights = dict[str, torch.Tensor]  # TensorRT-LLM names (weights.to_trtllm)


def param(weights: Weights, name: str, dtype: torch.dtype):
    """A weight as a named network constant in the model dtype."""
    tensor = F.constant(F.torch_to_numpy(weights[name].to(dtype).contiguous()))
    tensor.name = name
    return tensor


def linear(x, weight):
    """x @ weight^T, weight [out, in] as TensorRT-LLM's Linear stores it."""
    return F.matmul(x, weight, transb=True)


def dense(x, weights: Weights, name: str, dtype: torch.dtype):
    """The linear whose weight is ``name``; one that a quantization mode stores quantized
    (quantization.QuantizedWeights) computes through its layout's Q/DQ ops. A rank's row-parallel
    linear sums its partial output over the ranks (RowLinear's all-reduce)."""
    if isinstance(weights, QuantizedWeights) and weights.is_quantized(name):
        return quantized_dense(x, weights, name, dtype)
    out = linear(x, param(weights, name, dtype))
    mapping = tensor_parallel.mapping_of(weights)
    if mapping.tp_size > 1 and name.endswith(tensor_parallel.ROW_PARALLEL):
        return summed_over_ranks(out, mapping)
    return out


def summed_over_ranks(partial, mapping):
    """A row-parallel linear's partial output [b, s, out] summed over the ranks (RowLinear's all-reduce)."""
    return F.allreduce(partial, mapping.group)


def gathered_logits(logits, mapping, config: DeciCoderConfig):
    """A rank's logits [b, s, padded vocab / tp] gathered from every rank in rank order (ColumnLinear's
    gather_output), the vocabulary's padding dropped: [b, s, vocab]."""
    logits = F.allgather(logits, mapping.group, gather_dim=-1)  # [b, s, padded vocab]
    padding = tensor_parallel.padded_vocab(config.vocab_size, mapping.tp_size) - config.vocab_size
    return F.split(logits, [config.vocab_size, padding], dim=2)[0] if padding else logits


def split_heads(x, num_heads: int, head_dim: int):
    """[b, s, heads * d] -> [b, heads, s, d]."""
    x = x.view(F.concat([F.shape(x, 0), F.shape(x, 1), num_heads, head_dim]))
    return x.permute([0, 2, 1, 3])


def merge_heads(x, hidden: int):
    """[b, heads, s, d] -> [b, s, heads * d]."""
    x = x.permute([0, 2, 1, 3])
    return x.view(F.concat([F.shape(x, 0), F.shape(x, 1), hidden]))


# ---------------------------------------------------------------- repeat_kv

def repeat_kv(x, n_rep: int):
    """[b, kv_heads, s, d] -> [b, kv_heads * n_rep, s, d]: each KV head n_rep times in a row, as HF."""
    if n_rep == 1:
        return x
    return F.repeat_interleave(x, n_rep, 1)


def repeat_kv_graph(inputs, weights, config: DeciCoderConfig, dtype, layer: int = 0) -> Taps:
    n_rep = config.num_key_value_groups
    return {"k_rep": repeat_kv(inputs["k"], n_rep), "v_rep": repeat_kv(inputs["v"], n_rep)}


# ---------------------------------------------------------------- rope

def rotary_tables(config: DeciCoderConfig, dtype: torch.dtype):
    """cos and sin constants [max_positions, head_dim] (rotate-half layout: both halves equal)."""
    d = config.head_dim
    sin_cos = F.RopeEmbeddingUtils.create_sinusoidal_positions(
        config.max_position_embeddings, d, config.rope_theta)[0]  # [positions, d]: sin | cos
    sin, cos = sin_cos[:, : d // 2], sin_cos[:, d // 2:]
    tables = [np.concatenate([half, half], axis=-1) for half in (cos, sin)]
    return [F.constant(F.torch_to_numpy(torch.from_numpy(t).to(dtype))) for t in tables]


def rope_positions(position_ids):
    """The positions whose angles rotate q and k: in decode they continue after the cache."""
    return position_ids


def rotate_half(x):
    return F.RopeEmbeddingUtils.rotate_half(x)


def rope(q, k, position_ids, config: DeciCoderConfig, dtype: torch.dtype) -> Taps:
    cos_table, sin_table = rotary_tables(config, dtype)
    positions = rope_positions(position_ids)
    cos = F.embedding(positions, cos_table)  # [b, s, d]
    sin = F.embedding(positions, sin_table)
    cos_h, sin_h = F.unsqueeze(cos, 1), F.unsqueeze(sin, 1)  # [b, 1, s, d]: broadcast over heads
    q_rot = q * cos_h + rotate_half(q) * sin_h
    k_rot = k * cos_h + rotate_half(k) * sin_h
    return {"cos": cos, "sin": sin, "q_rot": q_rot, "k_rot": k_rot}


def rope_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return rope(inputs["q"], inputs["k"], inputs["position_ids"], config, dtype)


# ---------------------------------------------------------------- attention

def causal_mask(q, k):
    """Additive fp32 mask [s_q, s_kv]: query i sits at position s_kv - s_q + i and sees keys up to it.

    Prefill (s_kv = s_q) gives the usual causal mask; with a cache it is Llama's decode mask,
    all zeros for a single new token.
    """
    s_q, s_kv = F.shape(q, 2), F.shape(k, 2)
    zero = F.constant(np.asarray(0, dtype=np.int64))
    query_pos = F.unsqueeze(F.arange(zero, s_q, "int64"), 1) + (s_kv - s_q)  # [s_q, 1]
    key_pos = F.unsqueeze(F.arange(zero, s_kv, "int64"), 0)  # [1, s_kv]
    return F.where(key_pos > query_pos, float("-inf"), 0.0)


def no_mask(q, k):
    """Deci's decode path: the new tokens attend to every cached key."""
    return None


def kv_cache(x, weights: Weights, prefix: str, dtype: torch.dtype):
    """The new tokens' K or V as the cache stores them: as computed, or through a quantized KV cache's Q/DQ
    (quantization.kv_cache_entry)."""
    if isinstance(weights, QuantizedWeights) and weights.mode.kv is not None:
        return kv_cache_entry(x, weights, prefix, dtype)
    return x


def append_kv(past, new):
    """The cache after this step: [b, kv_heads, past + s, d], past first."""
    return F.concat([past, new], dim=2)


def attention_probs(scores, mask):
    """Softmax in fp32 whatever the model dtype, as the reference (and Llama's eager path) does."""
    scores_fp32 = F.cast(scores, "float32")
    if mask is not None:
        scores_fp32 = scores_fp32 + mask
    return F.cast(F.softmax(scores_fp32, dim=-1), scores.dtype)


def attention(hidden_states, position_ids, weights: Weights, prefix: str, config: DeciCoderConfig,
              dtype: torch.dtype, make_mask, past=None) -> Taps:
    heads, kv_heads = tensor_parallel.rank_heads(config, tensor_parallel.mapping_of(weights))  # this rank's
    d = config.head_dim
    qkv = dense(hidden_states, weights, f"{prefix}attention.qkv.weight", dtype)  # [b, s, (H + 2 KV) d]
    q, k, v = F.split(qkv, [heads * d, kv_heads * d, kv_heads * d], dim=2)
    taps = {"q": split_heads(q, heads, d), "k": split_heads(k, kv_heads, d), "v": split_heads(v, kv_heads, d)}
    rotated = rope(taps["q"], taps["k"], position_ids, config, dtype)
    taps.update(q_rot=rotated["q_rot"], k_rot=rotated["k_rot"])

    # Attention reads the new tokens' K and V as computed and the cached tokens' as the cache holds them (so does
    # TensorRT-LLM's attention, context and generation), and the cache stores the new ones as kv_cache makes them.
    keys, values = taps["k_rot"], taps["v"]
    present_k, present_v = (kv_cache(t, weights, prefix, dtype) for t in (keys, values))
    if past is not None:
        keys, values = append_kv(past[0], keys), append_kv(past[1], values)
        present_k = keys if present_k is taps["k_rot"] else append_kv(past[0], present_k)
        present_v = values if present_v is taps["v"] else append_kv(past[1], present_v)
    n_rep = heads // kv_heads
    taps.update(present_k=present_k, present_v=present_v, k_rep=repeat_kv(keys, n_rep), v_rep=repeat_kv(values, n_rep))
    # Scaling q before Q K^T (TensorRT-LLM's norm_before_bmm1) multiplies [b, H, s, d], not the
    # [b, H, s, kv_len] scores: at 2048 tokens, 16 MiB instead of 512 MiB a layer.
    taps["scores"] = F.matmul(taps["q_rot"] * d**-0.5, taps["k_rep"], transb=True)  # [b, H, s, kv_len]
    taps["probs"] = attention_probs(taps["scores"], make_mask(taps["q_rot"], taps["k_rep"]))
    taps["context"] = F.matmul(taps["probs"], taps["v_rep"])  # [b, H, s, d]
    taps["out"] = dense(merge_heads(taps["context"], heads * d), weights, f"{prefix}attention.dense.weight", dtype)
    return {name: taps[name] for name in COMPONENT_TAPS["gqa_masked"]}


def gqa_masked_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return attention(inputs["hidden_states"], inputs["position_ids"], weights, layer_prefix(layer), config, dtype,
                     causal_mask)


def gqa_unmasked_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return attention(inputs["hidden_states"], inputs["position_ids"], weights, layer_prefix(layer), config, dtype,
                     no_mask, past=(inputs["past_k"], inputs["past_v"]))


# ---------------------------------------------------------------- mlp, rmsnorm

def mlp(x, weights: Weights, prefix: str, dtype: torch.dtype) -> Taps:
    gate = dense(x, weights, f"{prefix}mlp.fc.weight", dtype)  # TensorRT-LLM's fc: the SiLU branch
    up = dense(x, weights, f"{prefix}mlp.gate.weight", dtype)
    act = F.silu(gate) * up
    down = dense(act, weights, f"{prefix}mlp.proj.weight", dtype)
    return {"gate": gate, "up": up, "act": act, "down": down}


def mlp_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return mlp(inputs["hidden_states"], weights, layer_prefix(layer), dtype)


def rmsnorm(x, weights: Weights, name: str, config: DeciCoderConfig, dtype: torch.dtype):
    return F.rms_norm(x, (config.hidden_size,), weight=param(weights, name, dtype), eps=config.rms_norm_eps)


def rmsnorm_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return {"out": rmsnorm(inputs["hidden_states"], weights, f"{layer_prefix(layer)}input_layernorm.weight", config,
                           dtype)}


# ---------------------------------------------------------------- decoder layer, causal LM

def decoder_layer(hidden_states, position_ids, weights: Weights, i: int, config: DeciCoderConfig,
                  dtype: torch.dtype, past=None) -> Taps:
    """One layer, every tap inside it (LAYER_TAPS); with a cache it takes Llama's decode mask."""
    prefix = layer_prefix(i)
    input_norm = rmsnorm(hidden_states, weights, f"{prefix}input_layernorm.weight", config, dtype)
    attn = attention(input_norm, position_ids, weights, prefix, config, dtype, causal_mask, past)
    resid_1 = hidden_states + attn["out"]
    post_norm = rmsnorm(resid_1, weights, f"{prefix}post_layernorm.weight", config, dtype)
    mlp_taps = mlp(post_norm, weights, prefix, dtype)
    taps = {"input_norm": input_norm, **{f"attn.{name}": t for name, t in attn.items()}, "attn_out": attn["out"],
            "resid_1": resid_1, "post_norm": post_norm, **{f"mlp.{name}": t for name, t in mlp_taps.items()},
            "mlp_out": mlp_taps["down"], "out": resid_1 + mlp_taps["down"]}
    return {name: taps[name] for name in LAYER_TAPS}


def decoder_layer_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    past = (inputs["past_k"], inputs["past_v"]) if "past_k" in inputs else None
    taps = decoder_layer(inputs["hidden_states"], inputs["position_ids"], weights, layer, config, dtype, past)
    # A port that rounds its linears' inputs emits them too (the judge rounds the port's own: taps.LINEAR_INPUTS).
    linear_inputs = getattr(weights, "rounds_activations", False)
    return {name: taps[name] for name in component_outputs("decoder_layer", linear_inputs=linear_inputs)}


def embed(input_ids, weights: Weights, dtype):
    return F.embedding(input_ids, param(weights, "transformer.vocab_embedding.weight", dtype))


def head(hidden_states, weights: Weights, config: DeciCoderConfig, dtype) -> Taps:
    final_norm = rmsnorm(hidden_states, weights, "transformer.ln_f.weight", config, dtype)
    logits = dense(final_norm, weights, "lm_head.weight", dtype)  # a rank's: [b, s, padded vocab / tp]
    if (mapping := tensor_parallel.mapping_of(weights)).tp_size > 1:
        logits = gathered_logits(logits, mapping, config)
    return {"final_norm": final_norm, "logits": logits}


def causal_lm_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    """The registry's taps and each layer's present K/V, in execution order."""
    taps = {"embed": embed(inputs["input_ids"], weights, dtype)}
    hidden_states = taps["embed"]
    for i in range(config.num_hidden_layers):
        past_k, past_v = past_names(i)
        past = (inputs[past_k], inputs[past_v]) if past_k in inputs else None
        layer_taps = decoder_layer(hidden_states, inputs["position_ids"], weights, i, config, dtype, past)
        taps[f"layer_{i}.present_k"] = layer_taps["attn.present_k"]
        taps[f"layer_{i}.present_v"] = layer_taps["attn.present_v"]
        hidden_states = taps[f"layer_{i}.out"] = layer_taps["out"]
    return {**taps, **head(hidden_states, weights, config, dtype)}


# The whole model one piece at a time, for streaming: the candidate side of a causal_lm check
# that holds one layer's engine at a time.
def embed_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return {"embed": embed(inputs["input_ids"], weights, dtype)}


def head_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    return head(inputs["hidden_states"], weights, config, dtype)


def layer_graph(inputs, weights, config, dtype, layer: int = 0) -> Taps:
    """decoder layer ``layer`` with every tap inside it (its present K/V among them)."""
    past = (inputs["past_k"], inputs["past_v"]) if "past_k" in inputs else None
    return decoder_layer(inputs["hidden_states"], inputs["position_ids"], weights, layer, config, dtype, past)


PIECE_GRAPHS = {"embed": embed_graph, "layer": layer_graph, "head": head_graph}

COMPONENT_GRAPHS = {
    "repeat_kv": repeat_kv_graph,
    "rope": rope_graph,
    "gqa_masked": gqa_masked_graph,
    "gqa_unmasked": gqa_unmasked_graph,
    "mlp": mlp_graph,
    "rmsnorm": rmsnorm_graph,
    "decoder_layer": decoder_layer_graph,
    "causal_lm": causal_lm_graph,
}
