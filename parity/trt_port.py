"""A serialized TensorRT engine of the whole model (``.engine``/``.plan``) as the candidate, run by
polygraphy's ``TrtRunner`` on the GPU.

An engine computes, and shows, only the tensors its builder marked as outputs: nothing can be marked
afterwards, so it runs whole and the taps it can show are its outputs. TensorRT's ONNX parser names
each tensor after the ONNX value it computes, so an engine built from an export maps through that
export's module paths: the ONNX graph beside it with the same stem (``model.onnx`` for
``model.engine``) is read for them, and ``--tap-map`` overrides. Build one with the taps marked, e.g.
``polygraphy convert model.onnx --convert-to trt --trt-outputs NAME ... -o model.engine``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reference import DeciCoderConfig

from .backends import skip_reason
from .check import UsageError, candidate_stage
from .onnx_port import OnnxPort
from .tapmap import TapMapError, load_tap_map

ENGINE_SUFFIXES = (".engine", ".plan")


class TrtEnginePort:
    """The engine at ``path``, with the ONNX graph it was built from when one lies beside it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (reason := skip_reason("tensorrt")) is not None:
            raise UsageError(f"--candidate {path}: a TensorRT engine runs on TensorRT and a CUDA GPU: {reason}")
        source = self.path.with_suffix(".onnx")
        self.graph = OnnxPort(source) if source.is_file() else None

    @property
    def description(self) -> str:
        import tensorrt

        return f"TensorRT engine {self.path.name} run by TensorRT {tensorrt.__version__} (polygraphy TrtRunner)"

    def check_config(self, config: DeciCoderConfig, dtype: torch.dtype) -> None:
        if self.graph is not None:  # TensorRT computes in the engine's dtype: fp16 is fp16 there
            self.graph.check_config(config, dtype, run_here=False)

    def tap_map(self, golden_taps: list[str], num_layers: int, tap_map: str | None) -> dict[str, str]:
        """The ONNX source's mapping (and ``tap_map``'s); without a source, ``tap_map`` alone."""
        if self.graph is not None:
            return self.graph.tap_map(golden_taps, num_layers, tap_map)
        if tap_map is None:
            raise UsageError(f"--candidate {self.path}: no {self.path.with_suffix('.onnx').name} beside it to map "
                             "its tensors by module path: give --tap-map")
        try:
            return load_tap_map(tap_map, None, golden_taps, num_layers)
        except TapMapError as e:
            raise UsageError(str(e)) from None

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """token and position ids (and an all-ones attention_mask) as int32, as TensorRT engines take them."""
        ones = torch.ones_like(inputs["input_ids"])
        return {name: inputs.get(name, ones).numpy().astype(np.int32)
                for name in ("input_ids", "position_ids", "attention_mask")}

    def run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One run of the whole engine; of ``outputs``, those the engine has."""
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        with candidate_stage(f"{self.path.name} failed to load or run"):
            with TrtRunner(EngineFromBytes(BytesFromPath(str(self.path)))) as runner:
                wanted = runner.get_input_metadata().keys()
                produced = runner.infer({name: array for name, array in feed.items() if name in wanted})
                return {name: np.asarray(produced[name]) for name in outputs if name in produced}
