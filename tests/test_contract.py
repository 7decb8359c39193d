"""The project's calls into TensorRT-LLM, TensorRT and polygraphy against their signatures (no TensorRT needed)."""

import inspect
from pathlib import Path

import pytest
import torch

from reference import DeciCoderConfig
from trt_layers import contract, fast_path
from trt_layers.functional import VOCABULARY

ROOT = Path(__file__).resolve().parents[1]


def test_every_call_site_matches_the_tensorrt_llm_signatures():
    violations, checked = contract.check_project(ROOT)
    assert not violations, "\n".join(map(str, violations))
    # modeling.py's vocabulary calls, the bug catalog's, network.py's engine build, the fast path's
    # build and runner: a floor, so that a checker that stops resolving calls cannot pass.
    assert checked >= 60, f"only {checked} call sites checked"


def test_the_checker_fails_on_a_wrong_keyword():
    source = ("from trt_layers import functional as F\n\n"
              "def linear(x, weight):\n"
              "    return F.matmul(x, weight, transpose_b=True)\n")
    violations, checked = contract.check_source(source)
    assert checked == 1 and len(violations) == 1
    assert violations[0].call == "tensorrt_llm.functional.matmul" and "transpose_b" in violations[0].problem


GRAPH = "from trt_layers import functional as F\n\ndef graph(x, w):\n    y = F.silu(x)\n"
FAST_PATH = ("from tensorrt_llm.builder import BuildConfig\nfrom tensorrt_llm.runtime import ModelRunner\n\n"
             "def f(ids):\n    config = BuildConfig()\n")
ENGINE = ("def build(network):\n    import tensorrt as trt\n    from tensorrt_llm.builder import Builder\n"
          "    builder = Builder()\n    config = builder.create_builder_config(precision='float32')\n")


@pytest.mark.parametrize("source, call, problem", [
    (GRAPH + "    return F.gelu(y)\n", "trt_layers.functional.gelu", "unknown name"),  # not in the vocabulary
    (GRAPH + "    return F.unsqueeze(y)\n", "tensorrt_llm.functional.unsqueeze", "missing a required argument"),
    (GRAPH + "    return F.softmax(y, -1, True)\n", "tensorrt_llm.functional.softmax", "too many positional"),
    (GRAPH + "    return y.permute(0, 2, 1, 3)\n", "tensorrt_llm.functional.Tensor.permute", "too many positional"),
    (GRAPH + "    return y.mark_output('y', dtype='float32', force=True)\n",
     "tensorrt_llm.functional.Tensor.mark_output", "unexpected keyword"),
    (ENGINE + "    return builder.build_engine(network)\n", "tensorrt_llm.builder.Builder.build_engine", "missing"),
    (ENGINE + "    config.trt_builder_config.clear_flag(trt.BuilderFlag.TF33)\n", "tensorrt.BuilderFlag.TF33",
     "unknown name"),
    (FAST_PATH + "    BuildConfig(max_batch=8)\n", "tensorrt_llm.builder.BuildConfig", "unexpected keyword"),
    (FAST_PATH + "    config.plugin_config.gpt_plugin = 'auto'\n", "tensorrt_llm.plugin.PluginConfig.gpt_plugin",
     "unknown name"),
    (FAST_PATH + "    ModelRunner.from_dir('e').generate(ids, max_tokens=3)\n",
     "tensorrt_llm.runtime.ModelRunner.generate", "not parameters of tensorrt_llm.runtime.SamplingConfig"),
    ("from tensorrt_llm.builder import Builderr\n\ndef f():\n    return Builderr()\n", "tensorrt_llm.builder.Builderr",
     "unknown name"),
], ids=["not-in-vocabulary", "missing-argument", "too-many-positional", "tensor-method-arity", "tensor-method-keyword",
        "chained-method", "unknown-attribute", "build-config-field", "plugin-config-field", "sampling-keyword",
        "unknown-import"])
def test_the_checker_fails_on(source, call, problem):
    violations, _ = contract.check_source(source)
    assert [(v.call, problem in v.problem) for v in violations] == [(call, True)], violations


def test_every_vocabulary_name_and_signature_is_in_the_table():
    for name, module in VOCABULARY.items():
        assert f"{module}.{name}" in contract.API, name
    for key, api in contract.API.items():
        if api.signature is not None:
            contract.signature(key)  # parses
        if api.returns is not None:
            assert api.returns in contract.API, key


@pytest.mark.parametrize("key, installed", [
    ("polygraphy.backend.trt.TrtRunner", "polygraphy.backend.trt.TrtRunner.__init__"),
    ("polygraphy.backend.trt.EngineFromBytes", "polygraphy.backend.trt.EngineFromBytes.__init__"),
    ("polygraphy.backend.trt.NetworkFromOnnxPath", "polygraphy.backend.trt.NetworkFromOnnxPath.__init__"),
    ("polygraphy.backend.trt.ModifyNetworkOutputs", "polygraphy.backend.trt.ModifyNetworkOutputs.__init__"),
    ("polygraphy.backend.trt.EngineFromNetwork", "polygraphy.backend.trt.EngineFromNetwork.__init__"),
    ("polygraphy.backend.trt.SaveEngine", "polygraphy.backend.trt.SaveEngine.__init__"),
    ("polygraphy.backend.trt.Profile.add", "polygraphy.backend.trt.Profile.add"),
])
def test_polygraphy_entries_are_the_installed_polygraphy(key, installed):
    import importlib

    module, cls, method = installed.rsplit(".", 2)
    real = inspect.signature(getattr(getattr(importlib.import_module(module), cls), method))
    real_params = [(p.name, p.default is p.empty) for p in list(real.parameters.values())[1:]]  # without self
    table_params = [(p.name, p.default is p.empty) for p in contract.signature(key).parameters.values()]
    assert table_params == real_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fast_path_options_are_tensorrt_llm_fields(dtype):
    """Names the fast path passes by ``**`` and ``setattr``, which the call checker cannot see."""
    build_config = contract.signature("tensorrt_llm.builder.BuildConfig").parameters
    options = fast_path.build_options(DeciCoderConfig.from_preset("decicoder-1b"), dtype)
    for name in options:
        if name in fast_path.BUILD_CONFIG_FIELDS:
            assert name in build_config, name
        else:
            assert f"tensorrt_llm.plugin.PluginConfig.{name}" in contract.API, name
