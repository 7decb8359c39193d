"""transformers' Llama as the oracle the reference must agree with.

DeciCoder is a Llama with Deci's attention paths; with the reference's weights loaded into
transformers' own Llama blocks, each component must produce the same numbers. Each case
returns two dicts keyed by tap name: what the reference computes, and what transformers
computes for the taps its blocks expose (a transformers block that only returns its final
output is compared on that output alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as hf

from . import modeling
from .configuration import DeciCoderConfig
from .modeling import DeciCoderForCausalLM, causal_mask, decode_mask
from .taps import capture_taps, component_taps

Taps = dict[str, torch.Tensor]


def llama_config(config: DeciCoderConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="eager",  # the explicit math, so attention probabilities come back
    )


def llama_from_reference(model: DeciCoderForCausalLM) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM holding the reference's weights (names match one to one)."""
    llama = LlamaForCausalLM(llama_config(model.config)).to(model.lm_head.weight.dtype).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    # Module.to(dtype) rounded the rotary frequencies; transformers' from_pretrained keeps them fp32.
    rotary = llama.model.rotary_emb
    rotary.register_buffer("inv_freq", rotary.compute_default_rope_parameters(llama.config)[0], persistent=False)
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


@dataclass(frozen=True)
class CaseShape:
    batch: int = 2
    seq_len: int = 7
    past_len: int = 0
    seed: int = 0


def run_case(component: str, model: DeciCoderForCausalLM, llama: LlamaForCausalLM, shape: CaseShape) -> OracleCase:
    """Run ``component`` of the reference and of transformers' Llama on the same seeded inputs."""
    runner = _CASES[component]
    with torch.no_grad():
        reference, transformers = runner(model, llama, shape)
    return OracleCase(component, reference, transformers)


def _inputs(model: DeciCoderForCausalLM, shape: CaseShape, *dims: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(shape.seed + len(dims) * 7919 + sum(dims))
    return (torch.randn(*dims, generator=generator) * scale).to(model.lm_head.weight.dtype)


def _positions(shape: CaseShape) -> torch.Tensor:
    return torch.arange(shape.past_len, shape.past_len + shape.seq_len).expand(shape.batch, shape.seq_len)


def _hidden(model, shape):
    return _inputs(model, shape, shape.batch, shape.seq_len, model.config.hidden_size)


def _heads(model, shape, num_heads, length):
    return _inputs(model, shape, shape.batch, num_heads, length, model.config.head_dim)


def _rmsnorm(model, llama, shape):
    x = _hidden(model, shape)
    return {"out": model.model.layers[0].input_layernorm(x)}, {"out": llama.model.layers[0].input_layernorm(x)}


def _rope(model, llama, shape):
    cfg = model.config
    q = _heads(model, shape, cfg.num_attention_heads, shape.seq_len)
    k = _heads(model, shape, cfg.num_key_value_heads, shape.seq_len) * 0.5
    position_ids = _positions(shape)

    def rotate(rotary, apply):
        cos, sin = rotary(q, position_ids)
        q_rot, k_rot = apply(q, k, cos, sin)
        return {"cos": cos, "sin": sin, "q_rot": q_rot, "k_rot": k_rot}

    return (rotate(model.model.layers[0].self_attn.rotary_emb, modeling.apply_rotary_pos_emb),
            rotate(llama.model.rotary_emb, hf.apply_rotary_pos_emb))


def _repeat_kv(model, llama, shape):
    cfg = model.config
    k = _heads(model, shape, cfg.num_key_value_heads, shape.seq_len)
    v = _heads(model, shape, cfg.num_key_value_heads, shape.seq_len) * 0.5
    n_rep = cfg.num_key_value_groups
    return ({"k_rep": modeling.repeat_kv(k, n_rep), "v_rep": modeling.repeat_kv(v, n_rep)},
            {"k_rep": hf.repeat_kv(k, n_rep), "v_rep": hf.repeat_kv(v, n_rep)})


def _past(model, shape):
    cfg = model.config
    return (_heads(model, shape, cfg.num_key_value_heads, shape.past_len),
            _heads(model, shape, cfg.num_key_value_heads, shape.past_len) * 0.5)


def _hf_cache(llama, past):
    cache = DynamicCache(config=llama.config)
    if past is not None:
        cache.update(*past, 0)
    return cache


def _attention(model, llama, shape, past, ref_mask, hf_mask):
    x = _hidden(model, shape)
    position_ids = _positions(shape)
    attn = model.model.layers[0].self_attn
    with capture_taps(attn, component_taps("gqa_masked")) as reference:
        attn(x, position_ids, past, ref_mask)
    cache = _hf_cache(llama, past)
    out, probs = llama.model.layers[0].self_attn(
        x, position_embeddings=llama.model.rotary_emb(x, position_ids), attention_mask=hf_mask, cache=cache
    )
    layer = cache.layers[0]
    return reference, {"probs": probs, "out": out, "present_k": layer.keys, "present_v": layer.values}


def _gqa_masked(model, llama, shape):
    """Prefill: no cache; the reference masks causally inside attention, transformers gets the mask."""
    shape = CaseShape(shape.batch, shape.seq_len, 0, shape.seed)
    hf_mask = causal_mask(shape.seq_len, shape.seq_len, model.lm_head.weight.dtype)[None, None]
    return _attention(model, llama, shape, None, None, hf_mask)


def _gqa_unmasked(model, llama, shape):
    """Decode: a cache of ``past_len`` (possibly empty) and no mask on either side."""
    return _attention(model, llama, shape, _past(model, shape), None, None)


def _mlp(model, llama, shape):
    x = _hidden(model, shape)
    mlp = model.model.layers[0].mlp
    with capture_taps(mlp) as reference:
        mlp(x)
    hf_mlp = llama.model.layers[0].mlp
    gate, up = hf_mlp.gate_proj(x), hf_mlp.up_proj(x)
    return reference, {"gate": gate, "up": up, "act": hf_mlp.act_fn(gate) * up, "down": hf_mlp(x)}


def _decoder_layer(model, llama, shape):
    """Prefill when ``past_len`` is 0, else decode with the mask Llama's model would pass."""
    x = _hidden(model, shape)
    position_ids = _positions(shape)
    dtype = x.dtype
    if shape.past_len == 0:
        past, ref_mask, hf_mask = None, None, causal_mask(shape.seq_len, shape.seq_len, dtype)[None, None]
    else:
        past, ref_mask = _past(model, shape), decode_mask(shape.seq_len, shape.past_len, dtype)
        hf_mask = None if ref_mask is None else ref_mask[None, None]
    layer = model.model.layers[0]
    with capture_taps(layer, component_taps("decoder_layer")) as reference:
        layer(x, position_ids, past, ref_mask)
    out = llama.model.layers[0](
        x, attention_mask=hf_mask, position_ids=position_ids, cache=_hf_cache(llama, past),
        position_embeddings=llama.model.rotary_emb(x, position_ids),
    )
    return reference, {"out": out}


DECODE_STEPS = 3


def _causal_lm(model, llama, shape):
    """Prefill ``seq_len`` tokens, then DECODE_STEPS greedy decode steps through the KV cache."""
    generator = torch.Generator().manual_seed(shape.seed)
    ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.seq_len), generator=generator)
    reference, transformers = {}, {}
    ref_out = model(ids)
    hf_out = llama(ids, use_cache=True)
    reference["prefill.logits"], transformers["prefill.logits"] = ref_out.logits, hf_out.logits
    for step in range(DECODE_STEPS):
        next_ids = ref_out.logits[:, -1:].argmax(-1)  # both sides follow the reference's tokens
        ref_out = model(next_ids, past_key_values=ref_out.past_key_values)
        hf_out = llama(next_ids, cache=hf_out.cache, use_cache=True)
        reference[f"decode_{step}.logits"], transformers[f"decode_{step}.logits"] = ref_out.logits, hf_out.logits
    return reference, transformers


_CASES = {
    "rmsnorm": _rmsnorm,
    "rope": _rope,
    "repeat_kv": _repeat_kv,
    "gqa_masked": _gqa_masked,
    "gqa_unmasked": _gqa_unmasked,
    "mlp": _mlp,
    "decoder_layer": _decoder_layer,
    "causal_lm": _causal_lm,
}
ORACLE_COMPONENTS = tuple(_CASES)
