"""Backend detection for the pytest header and for skipping tests a machine cannot run."""

import pytest
import torch

from parity.backends import detect, skip_reason
from reference import DeciCoderConfig, random_model

HARDWARE_MARKERS = ("trtllm", "tensorrt", "gpu")


def pytest_report_header(config):
    backends = detect().values()
    return ["backends: " + " | ".join(str(b) for b in backends)]


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in HARDWARE_MARKERS:
            if marker in item.keywords and (reason := skip_reason(marker)):
                item.add_marker(pytest.mark.skip(reason=f"needs {marker}: {reason}"))


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


@pytest.fixture(scope="session")
def oracle_pair(tiny_config):
    """(reference, transformers Llama) with the same seeded weights, per KV-head count and dtype."""
    from dataclasses import replace

    from reference.oracle import llama_from_reference

    pairs = {}

    def make(kv_heads: int, dtype: torch.dtype):
        if (kv_heads, dtype) not in pairs:
            model = random_model(replace(tiny_config, num_key_value_heads=kv_heads), seed=0, dtype=dtype)
            pairs[kv_heads, dtype] = model, llama_from_reference(model)
        return pairs[kv_heads, dtype]

    return make
