"""Backend detection and selection, shared fixtures, and skips for what a machine cannot run."""

from dataclasses import replace

import pytest
import torch

from parity.backends import CANDIDATES, detect, onnxruntime_bf16_gap, resolve_candidates, skip_reason
from reference import DeciCoderConfig, random_model

HARDWARE_MARKERS = ("trtllm", "tensorrt", "gpu")


def pytest_addoption(parser):
    parser.addoption("--backend", choices=("auto", *CANDIDATES, "all"), default="auto",
                     help="candidate backend for trt_layers tests: onnx (the ONNX lowering on ONNX Runtime), "
                          "trtllm (TensorRT-LLM engines), all; auto = trtllm where importable with a GPU, else onnx")


def pytest_configure(config):
    option = config.getoption("--backend")
    if option in ("trtllm", "all") and (reason := skip_reason("trtllm")):
        raise pytest.UsageError(f"--backend {option} asks for TensorRT-LLM engines, which cannot run here: {reason}")


def pytest_report_header(config):
    selected, why = resolve_candidates(config.getoption("--backend"))
    return ["backends: " + " | ".join(str(b) for b in detect().values()),
            f"candidate backend: {', '.join(selected)} ({why})"]


def pytest_collection_modifyitems(config, items):
    selected, why = resolve_candidates(config.getoption("--backend"))
    for item in items:
        for marker in HARDWARE_MARKERS:
            if item.get_closest_marker(marker) and (reason := skip_reason(marker)):
                item.add_marker(pytest.mark.skip(reason=f"needs {marker}: {reason}"))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        case = params.get("case")
        backend = getattr(case, "backend", params.get("backend"))
        if backend is None:
            continue
        if backend not in selected:
            item.add_marker(pytest.mark.skip(reason=f"{backend} not selected ({why}); --backend all runs both"))
        elif backend == "onnx" and getattr(case, "dtype", None) == "bf16" and (reason := onnxruntime_bf16_gap()):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def block_rewrites(monkeypatch) -> list:
    """The graphs ONNX Runtime is handed after trt_layers.attention_blocks' rewrite, in build order."""
    from trt_layers import attention_blocks

    rewritten, rewrite = [], attention_blocks.attention_in_blocks
    monkeypatch.setattr(attention_blocks, "attention_in_blocks",
                        lambda *args, **kwargs: rewritten.append(rewrite(*args, **kwargs)) or rewritten[-1])
    return rewritten


def head_block_concats(model) -> int:
    """How many attention chains of ``model`` run in head blocks (a Concat of the blocks each)."""
    return sum(node.name.endswith("/concat_heads") for node in model.graph.node)


def row_block_concats(model) -> int:
    """How many attention chains of ``model`` run in query-row blocks (a Concat of the blocks each)."""
    return sum(node.name.endswith("/concat_rows") for node in model.graph.node)


@pytest.fixture(params=[None, 8], ids=["head-blocks", "row-blocks"])
def row_blocks(request, monkeypatch) -> int | None:
    """Engines' runs at their own shapes (None), or at 8-row blocks: tiny cases then span several."""
    from trt_layers import attention_blocks

    if request.param:
        monkeypatch.setattr(attention_blocks, "ROWS_PER_BLOCK", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_config() -> DeciCoderConfig:
    return DeciCoderConfig.from_preset("tiny")


@pytest.fixture(scope="session")
def plugin_config(tiny_config) -> DeciCoderConfig:
    """The tiny model in a layout TensorRT-LLM's GPT attention plugin has kernels for: 4 heads of 32, 1 KV head."""
    return replace(tiny_config, num_attention_heads=4, num_key_value_heads=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return random_model(tiny_config, seed=0)


# Test layouts, (preset, KV heads): the tiny model's 8 heads as MHA, GQA 4:1 and MQA, and
# tiny-variant, whose rope_theta, rms_norm_eps, head count and head dim all differ from
# DeciCoder-1b's (tiny shares its theta, eps and 4:1 grouping), so a port that hard-codes one
# of them fails. Ids avoid component names so that `pytest -k gqa` selects the attention tests only.
LAYOUTS = {"kvheads8": ("tiny", 8), "kvheads2": ("tiny", 2), "kvheads1": ("tiny", 1), "variant": ("tiny-variant", 2)}
KV_LAYOUTS = ("kvheads8", "kvheads2", "kvheads1")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def layout_config(layout: str) -> DeciCoderConfig:
    preset, kv_heads = LAYOUTS[layout]
    return DeciCoderConfig.from_preset(preset).with_kv_heads(kv_heads)


@pytest.fixture(scope="session")
def reference_model():
    """A reference with seeded weights, per layout (a key of LAYOUTS) and dtype (built once)."""
    models = {}

    def make(layout: str, dtype: torch.dtype):
        if (layout, dtype) not in models:
            models[layout, dtype] = random_model(layout_config(layout), seed=0, dtype=dtype)
        return models[layout, dtype]

    return make


@pytest.fixture(scope="session")
def oracle_pair(reference_model):
    """(reference, transformers Llama) with the same weights, per layout and dtype."""
    from reference.oracle import llama_from_reference

    pairs = {}

    def make(layout: str, dtype: torch.dtype):
        if (layout, dtype) not in pairs:
            model = reference_model(layout, dtype)
            pairs[layout, dtype] = model, llama_from_reference(model)
        return pairs[layout, dtype]

    return make


@pytest.fixture(scope="session")
def parity_check(reference_model):
    """Run a tests.cases.Case: golden reference vs a trt_layers engine (engines built once per graph)."""
    from contextlib import nullcontext

    from parity.check import build_candidate, check_component, needs_decode_graph
    from trt_layers.network import BACKENDS

    engines = {}

    def run(case):
        model = reference_model(case.layout, DTYPES[case.dtype])
        backend = BACKENDS[case.backend]()
        decode = needs_decode_graph(case.component, case.shape)
        key = (case.component, case.layout, case.dtype, case.backend, decode, case.bug)
        if key not in engines:
            with case.bug.injected() if case.bug else nullcontext():
                engines[key] = build_candidate(case.component, model, backend, decode)
        return check_component(case.component, model, engines[key], backend.description, case.shape)

    return run


@pytest.fixture(scope="session")
def tiny_engines(tiny_model):
    """The tiny model's prefill + decode engines in fp32, per backend (and injected bug), built once."""
    from contextlib import nullcontext

    from trt_layers.generation import CausalLM
    from trt_layers.network import BACKENDS

    built = {}

    def get(backend: str, bug=None) -> CausalLM:
        if (backend, bug) not in built:
            with bug.injected() if bug else nullcontext():
                built[backend, bug] = CausalLM.build(tiny_model.config, tiny_model.state_dict(), torch.float32,
                                                     BACKENDS[backend]())
        return built[backend, bug]

    return get
