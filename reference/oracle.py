"""transformers' Llama as the oracle the reference must agree with.

DeciCoder is a Llama with Deci's attention paths; with the reference's weights loaded into
transformers' own Llama blocks, each component must produce the same numbers. Each case
returns two dicts keyed by tap name: what the reference computes, and what transformers
computes for the taps its blocks expose (a transformers block that only returns its final
output is compared on that output alone).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as hf

from .components import Taps, run_component
from .configuration import DeciCoderConfig
from .inputs import CaseShape, Inputs, make_inputs
from .modeling import DeciCoderForCausalLM, causal_mask, decode_mask

# The KV cache's keyword and output field: ``cache`` since transformers 5.24, ``past_key_values`` before
# (TensorRT-LLM 1.2.1 pins 4.57.3).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def llama_config(config: DeciCoderConfig, attn_implementation: str = "eager") -> LlamaConfig:
    """Llama with DeciCoder's dims; eager attention by default: the explicit math, so attention
    probabilities come back (``sdpa`` is what transformers runs by default)."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,  # transformers 5 turns it into rope_parameters, 4.x keeps it
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation=attn_implementation,
    )


def llama_from_reference(model: DeciCoderForCausalLM, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM over the reference's own weight tensors (names match one to
    one): built on the meta device and given them, so no second weight set and no init time."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config(model.config, attn_implementation)).eval()
    llama.load_state_dict(model.state_dict(), strict=True, assign=True)
    # The rotary frequencies are a buffer, not a weight: computed here in fp32, as from_pretrained keeps them.
    rotary = llama.model.rotary_emb
    default_rope = getattr(rotary, "compute_default_rope_parameters", None) or rotary.rope_init_fn  # 5.x or 4.x
    inv_freq = default_rope(llama.config)[0].to(model.lm_head.weight.device)
    rotary.register_buffer("inv_freq", inv_freq, persistent=False)
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = inv_freq
    return llama


@dataclass
class OracleCase:
    component: str
    reference: Taps
    transformers: Taps

    @property
    def shared_taps(self) -> list[str]:
        """Taps both sides computed, in the reference's execution order."""
        return [name for name in self.reference if name in self.transformers]


def run_case(component: str, model: DeciCoderForCausalLM, llama: LlamaForCausalLM, shape: CaseShape) -> OracleCase:
    """Run ``component`` of the reference and of transformers' Llama on the same seeded inputs."""
    dtype = model.lm_head.weight.dtype
    with torch.no_grad():
        if component == "causal_lm":
            reference, transformers = _generation(model, llama, shape)
        else:
            inputs = make_inputs(component, model.config, shape, dtype)
            reference = run_component(component, model, inputs)
            transformers = _TRANSFORMERS[component](llama, inputs)
    return OracleCase(component, reference, transformers)


def _rmsnorm(llama, inputs):
    return {"out": llama.model.layers[0].input_layernorm(inputs["hidden_states"])}


def _rope(llama, inputs):
    q, k = inputs["q"], inputs["k"]
    cos, sin = llama.model.rotary_emb(q, inputs["position_ids"])
    q_rot, k_rot = hf.apply_rotary_pos_emb(q, k, cos, sin)
    return {"cos": cos, "sin": sin, "q_rot": q_rot, "k_rot": k_rot}


def _repeat_kv(llama, inputs):
    n_rep = llama.config.num_attention_heads // llama.config.num_key_value_heads
    return {"k_rep": hf.repeat_kv(inputs["k"], n_rep), "v_rep": hf.repeat_kv(inputs["v"], n_rep)}


def _cache(llama, inputs):
    cache = DynamicCache(config=llama.config)
    if "past_k" in inputs:
        cache.update(inputs["past_k"], inputs["past_v"], 0)
    return cache


def _mask(inputs: Inputs) -> torch.Tensor | None:
    """The additive mask transformers' blocks receive: causal in prefill, Llama's decode mask with a cache."""
    hidden = inputs["hidden_states"]
    q_len = hidden.shape[1]
    if "past_k" not in inputs:
        return causal_mask(q_len, q_len, hidden.dtype)[None, None]
    mask = decode_mask(q_len, inputs["past_k"].shape[2], hidden.dtype)
    return None if mask is None else mask[None, None]


def _attention(llama, inputs, mask):
    hidden, cache = inputs["hidden_states"], _cache(llama, inputs)
    out, probs = llama.model.layers[0].self_attn(
        hidden, position_embeddings=llama.model.rotary_emb(hidden, inputs["position_ids"]),
        attention_mask=mask, **{CACHE_ARG: cache},
    )
    layer = cache.layers[0]
    return {"probs": probs, "out": out, "present_k": layer.keys, "present_v": layer.values}


def _gqa_masked(llama, inputs):
    return _attention(llama, inputs, _mask(inputs))


def _gqa_unmasked(llama, inputs):
    return _attention(llama, inputs, None)  # the decode path: no mask at all


def _mlp(llama, inputs):
    x, mlp = inputs["hidden_states"], llama.model.layers[0].mlp
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return {"gate": gate, "up": up, "act": mlp.act_fn(gate) * up, "down": mlp(x)}


def _decoder_layer(llama, inputs):
    hidden, position_ids = inputs["hidden_states"], inputs["position_ids"]
    out = llama.model.layers[0](
        hidden, attention_mask=_mask(inputs), position_ids=position_ids, **{CACHE_ARG: _cache(llama, inputs)},
        position_embeddings=llama.model.rotary_emb(hidden, position_ids),
    )
    return {"out": out}


DECODE_STEPS = 3


def _generation(model, llama, shape):
    """causal_lm: prefill ``seq_len`` tokens, then DECODE_STEPS greedy steps through each side's KV cache."""
    ids = make_inputs("causal_lm", model.config, CaseShape(shape.batch, shape.seq_len, 0, shape.seed),
                      model.lm_head.weight.dtype)["input_ids"]
    reference, transformers = {}, {}
    ref_out = model(ids)
    hf_out = llama(ids, use_cache=True)
    reference["prefill.logits"], transformers["prefill.logits"] = ref_out.logits, hf_out.logits
    for step in range(DECODE_STEPS):
        next_ids = ref_out.logits[:, -1:].argmax(-1)  # both sides follow the reference's tokens
        ref_out = model(next_ids, past_key_values=ref_out.past_key_values)
        hf_out = llama(next_ids, **{CACHE_ARG: getattr(hf_out, CACHE_ARG)}, use_cache=True)
        reference[f"decode_{step}.logits"], transformers[f"decode_{step}.logits"] = ref_out.logits, hf_out.logits
    return reference, transformers


_TRANSFORMERS = {
    "rmsnorm": _rmsnorm,
    "rope": _rope,
    "repeat_kv": _repeat_kv,
    "gqa_masked": _gqa_masked,
    "gqa_unmasked": _gqa_unmasked,
    "mlp": _mlp,
    "decoder_layer": _decoder_layer,
}
ORACLE_COMPONENTS = (*_TRANSFORMERS, "causal_lm")
