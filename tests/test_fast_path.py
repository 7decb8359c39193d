"""The fast path: DeciCoder weights as a TensorRT-LLM LLaMA checkpoint, and that engine's generation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from parity.generation import reference_generate
from reference import random_model
from trt_layers import fast_path
from trt_layers.network import TORCH_TO_TRTLLM_DTYPE
from trt_layers.weights import to_trtllm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_checkpoint_names_shapes_dtypes_and_config(tmp_path, tiny_config, dtype):
    model = random_model(tiny_config, dtype=dtype)
    fast_path.write_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "rank0.safetensors"]

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["dtype"] == TORCH_TO_TRTLLM_DTYPE[dtype]
    expected = {"hidden_act": "silu", "position_embedding_type": "rope_gpt_neox",
                "num_key_value_heads": tiny_config.num_key_value_heads, "head_size": tiny_config.head_dim,
                "intermediate_size": tiny_config.intermediate_size, "norm_epsilon": tiny_config.rms_norm_eps,
                "rotary_base": tiny_config.rope_theta, "vocab_size": tiny_config.vocab_size,
                "max_position_embeddings": tiny_config.max_position_embeddings,
                "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}}
    assert {key: config[key] for key in expected} == expected

    weights = load_file(tmp_path / "rank0.safetensors")
    mapped = to_trtllm(model.state_dict(), model.config)
    assert weights.keys() == mapped.keys()
    assert "lm_head.weight" in weights  # stored: TensorRT-LLM would silently tie a missing one
    for name, tensor in weights.items():
        assert tensor.dtype == dtype and torch.equal(tensor, mapped[name]), name
    heads = tiny_config.num_attention_heads + 2 * tiny_config.num_key_value_heads
    assert list(weights["transformer.layers.0.attention.qkv.weight"].shape) == [heads * tiny_config.head_dim,
                                                                               tiny_config.hidden_size]


@pytest.mark.trtllm
def test_fast_path_engine_generates_the_reference_tokens(tmp_path, tiny_model):
    """The native LLaMA engine (GPT attention plugin, fp32) decodes greedily like the reference."""
    fast_path.write_checkpoint(tiny_model, tmp_path / "checkpoint")
    fast_path.build_engine(tmp_path / "checkpoint", tmp_path / "engine", max_batch_size=4, max_input_len=64)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    tokens, logits = fast_path.generate(tmp_path / "engine", ids, max_new_tokens=16)
    golden_tokens, golden_logits = reference_generate(tiny_model, ids, 16)
    assert torch.equal(tokens, torch.from_numpy(golden_tokens).to(tokens.dtype))
    vocab = tiny_model.config.vocab_size
    torch.testing.assert_close(logits[..., :vocab], torch.stack([torch.from_numpy(s) for s in golden_logits], 1),
                               atol=1e-3, rtol=1e-3)  # the plugin's fused attention sums in another order
