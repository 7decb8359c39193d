"""The reference -> TensorRT-LLM weight mapping, on its own: names, shapes, which tensor goes where."""

from dataclasses import replace

import pytest
import torch

from reference import random_model
from trt_layers.weights import to_trtllm


def test_names_and_shapes_follow_tensorrt_llm_llama_checkpoints(tiny_model):
    config = tiny_model.config
    weights = to_trtllm(tiny_model.state_dict(), config)
    h, d = config.hidden_size, config.head_dim
    per_layer = {
        "input_layernorm.weight": [h],
        "attention.qkv.weight": [(config.num_attention_heads + 2 * config.num_key_value_heads) * d, h],
        "attention.dense.weight": [h, config.num_attention_heads * d],
        "post_layernorm.weight": [h],
        "mlp.fc.weight": [config.intermediate_size, h],
        "mlp.gate.weight": [config.intermediate_size, h],
        "mlp.proj.weight": [h, config.intermediate_size],
    }
    expected = {"transformer.vocab_embedding.weight": [config.vocab_size, h], "transformer.ln_f.weight": [h],
                "lm_head.weight": [config.vocab_size, h]}
    for i in range(config.num_hidden_layers):
        expected.update({f"transformer.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    assert {name: list(t.shape) for name, t in weights.items()} == expected
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_qkv_is_fused_query_key_value_and_the_mlp_branches_land_in_fc_and_gate(tiny_model):
    state = tiny_model.state_dict()
    weights = to_trtllm(state, tiny_model.config)
    attn = "model.layers.1.self_attn."
    expected_qkv = torch.cat([state[attn + "q_proj.weight"], state[attn + "k_proj.weight"],
                              state[attn + "v_proj.weight"]])
    assert torch.equal(weights["transformer.layers.1.attention.qkv.weight"], expected_qkv)
    # TensorRT-LLM's GatedMLP: fc is the SiLU branch (HF gate_proj), gate the linear one (HF up_proj).
    assert torch.equal(weights["transformer.layers.1.mlp.fc.weight"], state["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(weights["transformer.layers.1.mlp.gate.weight"], state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(weights["transformer.layers.1.post_layernorm.weight"],
                       state["model.layers.1.post_attention_layernorm.weight"])


def test_tied_embeddings_fill_lm_head(tiny_config):
    model = random_model(replace(tiny_config, tie_word_embeddings=True))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    weights = to_trtllm(state, model.config)
    assert weights["lm_head.weight"] is weights["transformer.vocab_embedding.weight"]


def test_unmapped_weights_are_an_error(tiny_model):
    state = {**tiny_model.state_dict(), "model.layers.0.self_attn.q_norm.weight": torch.ones(4)}
    with pytest.raises(KeyError, match="q_norm"):
        to_trtllm(state, tiny_model.config)
