"""Which backends this machine can run, and why the others are unavailable."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    detail: str  # the version in use, or why it is unavailable

    def __str__(self) -> str:
        return f"{self.name} {self.detail}" if self.available else f"{self.name}: unavailable ({self.detail})"


def _module_version(module: str) -> Backend:
    try:
        return Backend(module, True, importlib.import_module(module).__version__)
    except Exception as e:  # ImportError, or a broken install that fails while importing
        return Backend(module, False, f"import {module} failed: {type(e).__name__}: {e}".splitlines()[0])


@cache
def detect() -> dict[str, Backend]:
    cuda = torch.cuda.is_available()
    return {
        "reference": Backend("reference", True, f"torch {torch.__version__} on cpu" + (" and cuda" if cuda else "")),
        "cuda": Backend("cuda", cuda, torch.cuda.get_device_name(0) if cuda else "torch.cuda.is_available() is False"),
        "onnxruntime": _module_version("onnxruntime"),
        "tensorrt": _module_version("tensorrt"),
        "tensorrt_llm": _module_version("tensorrt_llm"),
    }


def skip_reason(marker: str) -> str | None:
    """Why tests with ``marker`` (trtllm, tensorrt, gpu) cannot run here, or None if they can."""
    backends = detect()
    needs = {"trtllm": ("tensorrt_llm", "cuda"), "tensorrt": ("tensorrt", "cuda"), "gpu": ("cuda",)}[marker]
    missing = [backends[name] for name in needs if not backends[name].available]
    return "; ".join(str(b) for b in missing) or None


CANDIDATES = ("onnx", "trtllm")


def resolve_candidates(option: str) -> tuple[tuple[str, ...], str]:
    """The candidate backends to run for ``--backend`` (auto, onnx, trtllm, all), and why."""
    if option == "all":
        return CANDIDATES, "--backend all"
    if option in CANDIDATES:
        return (option,), f"--backend {option}"
    if skip_reason("trtllm") is None:
        return ("trtllm",), "auto: tensorrt_llm and a GPU are present"
    return ("onnx",), f"auto: {skip_reason('trtllm')}"


@cache
def onnxruntime_bf16_gap() -> str | None:
    """Why ONNX Runtime cannot run the lowering's bfloat16 graphs here, or None if it can."""
    import onnxruntime
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "probe", [value],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:160]
        return f"onnxruntime {onnxruntime.__version__} has no CPU bfloat16 MatMul kernel ({first_line})"
    return None
