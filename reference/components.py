"""Run one component of the reference on named inputs and return its taps (the golden side)."""

from __future__ import annotations

import torch

from . import modeling
from .inputs import Inputs, past_names
from .modeling import DeciCoderForCausalLM, decode_mask
from .taps import LAYER_TAPS, capture_taps, causal_lm_taps, component_outputs

Taps = dict[str, torch.Tensor]


@torch.no_grad()
def run_component(component: str, model: DeciCoderForCausalLM, inputs: Inputs, layer_idx: int = 0,
                  linear_inputs: bool = False) -> Taps:
    """Taps of ``component`` in execution order; single-layer components use layer ``layer_idx``; with
    ``linear_inputs``, the taps holding its quantized linears' inputs too (taps.LINEAR_INPUTS)."""
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    if component == "repeat_kv":
        n_rep = model.config.num_key_value_groups
        return {"k_rep": modeling.repeat_kv(inputs["k"], n_rep), "v_rep": modeling.repeat_kv(inputs["v"], n_rep)}
    if component == "rope":
        cos, sin = attn.rotary_emb(inputs["q"], inputs["position_ids"])
        q_rot, k_rot = modeling.apply_rotary_pos_emb(inputs["q"], inputs["k"], cos, sin)
        return {"cos": cos, "sin": sin, "q_rot": q_rot, "k_rot": k_rot}
    if component == "causal_lm":
        return _causal_lm(model, inputs)

    past = layer_past(inputs)
    hidden, position_ids = inputs["hidden_states"], inputs.get("position_ids")
    run = {
        "gqa_masked": (attn, lambda: attn(hidden, position_ids)),
        "gqa_unmasked": (attn, lambda: attn(hidden, position_ids, past)),
        "mlp": (layer.mlp, lambda: layer.mlp(hidden)),
        "rmsnorm": (layer.input_layernorm, lambda: layer.input_layernorm(hidden)),
        "decoder_layer": (layer, lambda: layer(hidden, position_ids, past, _decode_mask(hidden, past))),
    }
    if component not in run:
        raise ValueError(f"unknown component {component!r}")
    module, forward = run[component]
    with capture_taps(module, component_outputs(component, linear_inputs=linear_inputs)) as taps:
        forward()
    return taps


def layer_past(inputs: Inputs, layer: int | None = None):
    """The cache (past K, past V) among ``inputs`` for ``layer`` (a component's own: None), or None in prefill."""
    past_k, past_v = past_names(layer)
    return (inputs[past_k], inputs[past_v]) if past_k in inputs else None


def _decode_mask(hidden: torch.Tensor, past) -> torch.Tensor | None:
    """None in prefill (attention masks itself); Llama's decode mask when a cache is given."""
    if past is None:
        return None
    return decode_mask(hidden.shape[1], past[0].shape[2], hidden.dtype, hidden.device)


@torch.no_grad()
def run_layer(model: DeciCoderForCausalLM, i: int, hidden_states: torch.Tensor, position_ids: torch.Tensor,
              past=None, names: tuple[str, ...] = LAYER_TAPS) -> Taps:
    """Decoder layer ``i`` alone, as the whole model runs it, with the taps ``names`` inside it (default: all)."""
    layer = model.model.layers[i]
    with capture_taps(layer, names) as taps:
        layer(hidden_states, position_ids, past, _decode_mask(hidden_states, past))
    return dict(taps)


def _causal_lm(model: DeciCoderForCausalLM, inputs: Inputs) -> Taps:
    """The registry's taps and each layer's present K/V, in execution order."""
    num_layers = model.config.num_hidden_layers
    past = None
    if past_names(0)[0] in inputs:
        past = tuple(layer_past(inputs, i) for i in range(num_layers))
    with capture_taps(model, causal_lm_taps(num_layers)) as taps:
        out = model(inputs["input_ids"], inputs["position_ids"], past_key_values=past)
    for i, (present_k, present_v) in enumerate(out.past_key_values):
        taps[f"layer_{i}.present_k"], taps[f"layer_{i}.present_v"] = present_k, present_v
    return {name: taps[name] for name in component_outputs("causal_lm", num_layers)}
