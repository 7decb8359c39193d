"""Taps: the registry names are what the reference emits, and capturing changes nothing."""

import pytest
import torch

from reference import COMPONENT_TAPS, capture_taps, component_taps
from reference.taps import causal_lm_taps


def test_capture_does_not_change_outputs(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 7))
    with torch.no_grad():
        bare = tiny_model(ids)
        with capture_taps(tiny_model, causal_lm_taps(tiny_model.config.num_hidden_layers)) as taps:
            tapped = tiny_model(ids)
    assert torch.equal(bare.logits, tapped.logits)
    assert torch.equal(taps["logits"], bare.logits)


def test_tapped_attention_steps_agree_with_fused_attention(tiny_model):
    """Tapping scores, probs or context runs attention step by step instead of fused (SDPA): the
    same function, so the outputs agree within fp32 rounding."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 7))
    with torch.no_grad():
        fused = tiny_model(ids)
        with capture_taps(tiny_model) as taps:
            stepwise = tiny_model(ids)
    assert "layer_0.attn.probs" in taps
    torch.testing.assert_close(stepwise.logits, fused.logits, atol=1e-5, rtol=1e-5)


def test_mlp_taps_hold_their_own_values(tiny_model):
    """The MLP computes silu(gate) * up in silu's output buffer: the gate and up it taps must still
    be the projections, and act their product."""
    mlp = tiny_model.model.layers[0].mlp
    x = torch.randn(2, 7, tiny_model.config.hidden_size)
    with torch.no_grad(), capture_taps(mlp) as taps:
        down = mlp(x)
    torch.testing.assert_close(taps["gate"], x @ mlp.gate_proj.weight.T)
    torch.testing.assert_close(taps["up"], x @ mlp.up_proj.weight.T)
    assert torch.equal(taps["act"], torch.nn.functional.silu(taps["gate"]) * taps["up"])
    assert torch.equal(taps["down"], down)


def test_causal_lm_emits_registry_taps_in_execution_order(tiny_model):
    names = causal_lm_taps(tiny_model.config.num_hidden_layers)
    with torch.no_grad(), capture_taps(tiny_model, names) as taps:
        tiny_model(torch.randint(0, tiny_model.config.vocab_size, (1, 5)))
    assert tuple(taps) == names


@pytest.mark.parametrize("component,module_path", [
    ("gqa_masked", "model.layers.0.self_attn"),
    ("mlp", "model.layers.0.mlp"),
    ("rmsnorm", "model.layers.0.input_layernorm"),
    ("decoder_layer", "model.layers.0"),
])
def test_component_emits_every_registry_tap(tiny_model, component, module_path):
    """Captured from one submodule, its taps carry the bare registry names, in registry order."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 5))
    with torch.no_grad(), capture_taps(tiny_model.get_submodule(module_path), component_taps(component)) as taps:
        tiny_model(ids)
    assert tuple(taps) == COMPONENT_TAPS[component]


def test_nested_layer_taps_are_scoped(tiny_model):
    with torch.no_grad(), capture_taps(tiny_model) as taps:
        tiny_model(torch.randint(0, tiny_model.config.vocab_size, (1, 3)))
    assert {"layer_1.attn.q_rot", "layer_1.attn.rope.cos", "layer_0.mlp.act", "layer_1.post_norm"} <= taps.keys()


def test_captures_do_not_nest(tiny_model):
    with capture_taps(tiny_model), pytest.raises(RuntimeError, match="do not nest"):
        with capture_taps(tiny_model):
            pass


def test_unknown_component():
    with pytest.raises(ValueError, match="unknown component 'attention'"):
        component_taps("attention")
