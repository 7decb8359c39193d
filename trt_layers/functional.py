"""The TensorRT-LLM functional vocabulary of the DeciCoder port: every op it uses, in one place.

Component code does ``from trt_layers import functional as F`` and calls ``F.matmul(...)``.
While a network is being built (see ``network.py``) each name resolves to the active
backend's implementation: TensorRT-LLM's own (``tensorrt_llm.functional`` and friends), or
the ONNX lowering (``lowering.py``), which mirrors the same functions op by op. A name
outside this vocabulary raises, so the port cannot quietly grow a dependency that the
lowering (or a reviewer) has not seen.

Target: TensorRT-LLM 1.2.1 (TensorRT 10.14), whose ``tensorrt_llm.functional`` still holds the
TensorRT backend's graph-building API (``Builder``, ``net_guard``, ``Tensor.mark_output``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import SimpleNamespace

TENSORRT_LLM_VERSION = "1.2.1"

# name -> TensorRT-LLM module that defines it. Tensor methods and operators used by the port
# (view, permute, transpose, cast, unsqueeze, mean, sqrt, mark_output, shape, ndim, + - * / >)
# come with the Tensor class.
VOCABULARY = {
    "RopeEmbeddingUtils": "tensorrt_llm.functional",
    "allgather": "tensorrt_llm.functional",  # tensor parallelism: a rank's lm_head logits
    "allreduce": "tensorrt_llm.functional",  # tensor parallelism: row-parallel linears' partial outputs
    "arange": "tensorrt_llm.functional",
    "cast": "tensorrt_llm.functional",
    "concat": "tensorrt_llm.functional",
    "constant": "tensorrt_llm.functional",
    "embedding": "tensorrt_llm.functional",
    "expand": "tensorrt_llm.functional",
    "identity": "tensorrt_llm.functional",
    "matmul": "tensorrt_llm.functional",
    "repeat_interleave": "tensorrt_llm.functional",
    "rms_norm": "tensorrt_llm.functional",
    "shape": "tensorrt_llm.functional",
    "silu": "tensorrt_llm.functional",
    "softmax": "tensorrt_llm.functional",
    "split": "tensorrt_llm.functional",
    "unsqueeze": "tensorrt_llm.functional",
    "where": "tensorrt_llm.functional",
    "quantize": "tensorrt_llm.quantization.functional",
    "dequantize": "tensorrt_llm.quantization.functional",
    "torch_to_numpy": "tensorrt_llm._utils",
    "int4": "tensorrt",  # the DataType of packed INT4 weights (constant(as_dtype=int4))
}

_active: SimpleNamespace | None = None


def tensorrt_llm_ops() -> SimpleNamespace:
    """The vocabulary resolved against the installed TensorRT-LLM."""
    return SimpleNamespace(**{name: getattr(importlib.import_module(module), name)
                              for name, module in VOCABULARY.items()})


@contextlib.contextmanager
def use(ops: SimpleNamespace) -> Iterator[None]:
    """Resolve the vocabulary against ``ops`` inside the block (a backend's network does this)."""
    global _active
    missing = [name for name in VOCABULARY if not hasattr(ops, name)]
    if missing:
        raise NotImplementedError(f"backend lacks vocabulary ops: {missing}")
    previous, _active = _active, ops
    try:
        yield
    finally:
        _active = previous


def __getattr__(name: str):
    if name not in VOCABULARY:
        raise AttributeError(
            f"{name!r} is not in the DeciCoder port's TensorRT-LLM vocabulary (trt_layers.functional.VOCABULARY); "
            "add it there and to the ONNX lowering before using it"
        )
    if _active is None:
        raise RuntimeError(f"functional.{name} used outside a network: build components inside a backend's network")
    return getattr(_active, name)
