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


@pytest.fixture(scope="session")
def tiny_config() -> DeciCoderConfig:
    return DeciCoderConfig.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return random_model(tiny_config, seed=0)


# Attention layouts of the tiny model (8 query heads): ids avoid component names so that
# `pytest -k gqa` selects the attention tests only.
KV_HEADS = {"kvheads8": 8, "kvheads2": 2, "kvheads1": 1}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def reference_model(tiny_config):
    """The tiny reference with seeded weights, per KV-head count and dtype (built once)."""
    models = {}

    def make(kv_heads: int, dtype: torch.dtype):
        if (kv_heads, dtype) not in models:
            config = replace(tiny_config, num_key_value_heads=kv_heads)
            models[kv_heads, dtype] = random_model(config, seed=0, dtype=dtype)
        return models[kv_heads, dtype]

    return make


@pytest.fixture(scope="session")
def oracle_pair(reference_model):
    """(reference, transformers Llama) with the same weights, per KV-head count and dtype."""
    from reference.oracle import llama_from_reference

    pairs = {}

    def make(kv_heads: int, dtype: torch.dtype):
        if (kv_heads, dtype) not in pairs:
            model = reference_model(kv_heads, dtype)
            pairs[kv_heads, dtype] = model, llama_from_reference(model)
        return pairs[kv_heads, dtype]

    return make


@pytest.fixture(scope="session")
def parity_check(reference_model):
    """Run a tests.cases.Case: golden reference vs a trt_layers engine (engines built once per graph)."""
    from contextlib import nullcontext

    from parity.check import build_candidate, check_component, needs_decode_graph
    from trt_layers.network import BACKENDS

    engines = {}

    def run(case):
        model = reference_model(KV_HEADS[case.layout], DTYPES[case.dtype])
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
