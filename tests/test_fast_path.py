"""The fast path: DeciCoder weights as a TensorRT-LLM LLaMA checkpoint, and that engine's generation."""

import argparse
import json
import shlex
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from parity.backends import skip_reason
from parity.cli import main
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


@pytest.fixture(scope="module")
def plugin_model(plugin_config):
    return random_model(plugin_config, seed=0)


def test_build_refuses_a_head_size_the_plugin_has_no_kernels_for(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", "--fast-path", "--model", "tiny", "--out", str(out)]) == 2  # tiny: 8 heads of 16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "head size 16" in err and "32, 48, 64" in err
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_build_options(plugin_model, dtype):
    options = fast_path.build_options(plugin_model.config, dtype, max_batch_size=4)
    context = plugin_model.config.max_position_embeddings
    assert options["max_batch_size"] == 4 and options["max_input_len"] == options["max_seq_len"] == context
    assert "gather_context_logits" not in options  # never read: [batch, input, vocab] fp32 for nothing
    # fp32 has no fused context attention, which paged context FMHA (on by default) needs
    fp32_off = {"context_fmha": False, "use_paged_context_fmha": False}
    assert {name: options[name] for name in fp32_off if name in options} == (fp32_off if dtype == torch.float32 else {})


# trtllm-build's options as tensorrt_llm/commands/build.py defines them (see trt_layers.contract):
# BuildConfig limits are ints, gather_*_logits store_true flags, PluginConfig features enable/disable.
TRTLLM_BUILD = argparse.ArgumentParser()
for _name in ("checkpoint_dir", "output_dir", "gpt_attention_plugin", "gemm_plugin"):
    TRTLLM_BUILD.add_argument(f"--{_name}")
for _name in ("max_batch_size", "max_input_len", "max_seq_len"):
    TRTLLM_BUILD.add_argument(f"--{_name}", type=int)
TRTLLM_BUILD.add_argument("--gather_generation_logits", action="store_true")
for _name in ("context_fmha", "use_paged_context_fmha"):
    TRTLLM_BUILD.add_argument(f"--{_name}", choices=["enable", "disable"], default="enable")


@pytest.fixture
def recorded_build_config(monkeypatch):
    """tensorrt_llm.builder.BuildConfig, recording what the Python path sets (the fields and the plugins)."""

    class BuildConfig:
        def __init__(self, **fields):
            self.fields, self.plugin_config = fields, SimpleNamespace(context_fmha=True, use_paged_context_fmha=True)

    builder = ModuleType("tensorrt_llm.builder")
    builder.BuildConfig = BuildConfig
    monkeypatch.setitem(sys.modules, "tensorrt_llm", ModuleType("tensorrt_llm"))
    monkeypatch.setitem(sys.modules, "tensorrt_llm.builder", builder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_printed_trtllm_build_line_builds_what_the_python_path_builds(plugin_model, recorded_build_config, dtype):
    options = fast_path.build_options(plugin_model.config, dtype)
    command = fast_path.trtllm_build_command("ckpt dir", "engine", options)
    parsed = vars(TRTLLM_BUILD.parse_args(shlex.split(command)[1:]))
    assert shlex.split(command)[0] == "trtllm-build" and parsed.pop("checkpoint_dir") == "ckpt dir"
    assert parsed.pop("output_dir") == "engine"
    python_path = fast_path.make_build_config(options)
    assert {name: parsed[name] for name in fast_path.BUILD_CONFIG_FIELDS} == python_path.fields
    plugins = {name: {"enable": True, "disable": False}.get(value, value) for name, value in parsed.items()
               if name not in fast_path.BUILD_CONFIG_FIELDS}
    assert plugins == vars(python_path.plugin_config)


def test_build_writes_the_checkpoint_and_the_engine_or_its_trtllm_build_line(tmp_path, plugin_model, capsys):
    plugin_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["build", "--fast-path", "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "trtllm_checkpoint").iterdir()) == ["config.json", "rank0.safetensors"]
    printed = capsys.readouterr().out
    if skip_reason("trtllm"):  # the engine is said not to be built, and how to build it
        line = printed.split("on a GPU machine: ")[1].splitlines()[0]
        options = fast_path.build_options(plugin_model.config, torch.float32)
        assert line == fast_path.trtllm_build_command(out / "trtllm_checkpoint", out / "trtllm_engine", options)
    else:
        assert (out / "trtllm_engine" / "rank0.engine").is_file()


@pytest.mark.trtllm
def test_trtllm_build_line_parses_to_the_python_paths_build_config(plugin_model):
    """trtllm-build's own parser, given the printed line, yields the Python path's limits and PluginConfig."""
    from tensorrt_llm.commands.build import parse_arguments
    from tensorrt_llm.plugin import PluginConfig

    for dtype in (torch.float32, torch.float16):
        options = fast_path.build_options(plugin_model.config, dtype)
        args = parse_arguments().parse_args(shlex.split(fast_path.trtllm_build_command("ckpt", "engine", options))[1:])
        python_path = fast_path.make_build_config(options)
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
                     "opt_num_tokens", "gather_context_logits", "gather_generation_logits"):
            assert getattr(args, name) == getattr(python_path, name), name
        assert PluginConfig.from_arguments(args).model_dump() == python_path.plugin_config.model_dump()


@pytest.mark.trtllm
def test_fast_path_engine_generates_the_reference_tokens(tmp_path, plugin_model):
    """The native LLaMA engine (GPT attention plugin, fp32) decodes greedily like the reference."""
    fast_path.write_checkpoint(plugin_model, tmp_path / "checkpoint")
    options = fast_path.build_options(plugin_model.config, torch.float32, max_batch_size=4, max_input_len=64)
    fast_path.build_engine(tmp_path / "checkpoint", tmp_path / "engine", options)
    ids = torch.randint(0, plugin_model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    tokens, logits = fast_path.generate(tmp_path / "engine", ids, max_new_tokens=16)
    golden_tokens, golden_logits = reference_generate(plugin_model, ids, 16)
    assert torch.equal(tokens, torch.from_numpy(golden_tokens).to(tokens.dtype))
    vocab = plugin_model.config.vocab_size
    torch.testing.assert_close(logits[..., :vocab], torch.stack([torch.from_numpy(s) for s in golden_logits], 1),
                               atol=1e-3, rtol=1e-3)  # the plugin's fused attention sums in another order
