"""DeciCoder config.json in both eras, the presets, and the model's input checks."""

import json

import pytest
import torch

from reference import ConfigError, DeciCoderConfig
from reference.configuration import DECICODER_1B


def test_decicoder_1b_preset_matches_the_published_config():
    config = DeciCoderConfig.from_preset("decicoder-1b")
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers, config.vocab_size, config.max_position_embeddings) == (
        2048, 5888, 32, 4, 20, 49152, 2048)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 10000.0  # 4.31 file: Llama's default theta
    assert not config.tie_word_embeddings and config.bos_token_id == config.eos_token_id == 0
    assert config.head_dim == 64 and config.num_key_value_groups == 8
    assert not config.naive_attention_prefill and config.naive_attention_decode_batched


def test_tiny_preset_keeps_the_structure():
    config = DeciCoderConfig.from_preset("tiny")
    assert config.num_attention_heads // config.num_key_value_heads == 4  # GQA 4:1
    assert not config.tie_word_embeddings and config.bos_token_id == config.eos_token_id == 0


def test_transformers_5_rope_parameters(tmp_path):
    raw = {k: v for k, v in DECICODER_1B.items() if k != "rope_scaling"}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert DeciCoderConfig.from_json_file(tmp_path / "config.json").rope_theta == 250000.0


def test_roundtrip_through_to_dict():
    config = DeciCoderConfig.from_preset("tiny")
    assert DeciCoderConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("key,value,words", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "'rope_scaling'"),
    ("head_dim", 32, "'head_dim'"),
    ("attention_bias", True, "'attention_bias'"),
    ("rms_norm_eps", -1, "'rms_norm_eps'"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings'"),
    ("eos_token_id", -1, "'eos_token_id'"),
])
def test_bad_keys_are_named(key, value, words):
    with pytest.raises(ConfigError, match=words):
        DeciCoderConfig.from_dict({**DECICODER_1B, key: value}, source="config.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'decicoder-7b'"):
        DeciCoderConfig.from_preset("decicoder-7b")


def test_causal_lm_rejects_sequence_longer_than_context(tiny_model):
    context = tiny_model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"\(1, {context + 1}\).*max_position_embeddings={context}"):
        tiny_model(torch.zeros(1, context + 1, dtype=torch.long))


def test_causal_lm_rejects_decode_past_the_context(tiny_model):
    context = tiny_model.config.max_position_embeddings
    out = tiny_model(torch.zeros(1, context, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"{context} cached tokens need {context + 1} positions"):
        tiny_model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values)


def test_causal_lm_rejects_out_of_vocabulary_ids(tiny_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[0, tiny_model.config.vocab_size]]))


def test_causal_lm_rejects_padding(tiny_model):
    with pytest.raises(NotImplementedError, match="padding"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))
