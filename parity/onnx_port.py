"""A port this suite did not write: an ONNX graph of the whole model, run by ONNX Runtime.

Its inputs are token ids (``input_ids``), and optionally ``position_ids`` and an all-ones
``attention_mask``; its outputs include the logits. The golden taps it computes are found by
``tapmap`` and marked as outputs of an in-memory copy; the file is only read. Each mapped tap is
judged in the golden's execution order; the taps no tensor maps to are listed, never guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from reference import DeciCoderConfig, DeciCoderForCausalLM, capture_taps
from reference.inputs import CaseShape, make_inputs
from reference.taps import LAYER_TAPS

from .check import CheckResult, UsageError, _candidate_stage
from .compare import TOLERANCES, compare_taps
from .locate import LocateReport
from .tapmap import GraphScopes, TapMapError, auto_map, load_tap_map

FEEDS = ("input_ids", "position_ids", "attention_mask")


class OnnxPort:
    """The graph at ``path`` (external data beside it is read too), with a tap map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.model = onnx.load(str(self.path))
        except Exception as e:
            raise UsageError(f"--candidate {path}: not a readable ONNX model ({type(e).__name__}: {e})"
                             .splitlines()[0]) from None
        weights = {t.name for t in self.model.graph.initializer}
        inputs = [i.name for i in self.model.graph.input if i.name not in weights]
        if "input_ids" not in inputs or any(name not in FEEDS for name in inputs):
            raise UsageError(f"--candidate {path}: inputs {inputs}; expected input_ids and optionally position_ids "
                             f"and attention_mask (graphs with past K/V inputs are not supported yet)")
        self.scopes = GraphScopes(self.model.graph)

    def tap_map(self, golden_taps: list[str], num_layers: int, tap_map: str | None) -> dict[str, str]:
        """The automatic mapping, overridden tap by tap by ``tap_map`` (a JSON file)."""
        mapped = auto_map(self.scopes, golden_taps, num_layers)
        if tap_map is not None:
            try:
                mapped.update(load_tap_map(tap_map, self.scopes, golden_taps, num_layers))
            except TapMapError as e:
                raise UsageError(str(e)) from None
        if not mapped:  # nothing would be judged: that is no pass
            raise UsageError(f"--candidate {self.path}: no golden tap maps to a tensor of it (its nodes carry no "
                             "module paths the Llama layout names): give --tap-map")
        return mapped

    @property
    def description(self) -> str:
        import onnxruntime

        return f"ONNX graph {self.path.name} run by onnxruntime {onnxruntime.__version__} (CPU)"

    def run(self, inputs: dict[str, torch.Tensor], tensors: list[str]) -> dict[str, np.ndarray]:
        """Run once on ``inputs`` (golden names), returning ``tensors`` by name."""
        import onnxruntime

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph_outputs = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in tensors
                                  if name not in graph_outputs)
        with _candidate_stage(f"onnxruntime could not load {self.path.name}"):
            session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {}
        for spec in session.get_inputs():
            dtype = np.int32 if spec.type == "tensor(int32)" else np.int64
            value = inputs.get(spec.name, torch.ones_like(inputs["input_ids"]))  # attention_mask: every token
            feed[spec.name] = value.numpy().astype(dtype)
        with _candidate_stage(f"{self.path.name} failed to run"):
            return dict(zip(tensors, session.run(tensors, feed)))


def _as_golden_layout(candidate: np.ndarray, golden: torch.Tensor) -> np.ndarray:
    """A module's [b, s, n * d] as the golden's [b, n, s, d] (heads merged vs apart: the same values)."""
    if golden.ndim == 4 and candidate.shape == (golden.shape[0], golden.shape[2], golden.shape[1] * golden.shape[3]):
        b, n, s, d = golden.shape
        return candidate.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    return candidate


def golden_order(config: DeciCoderConfig) -> list[str]:
    """Every tap of the whole model, each layer in full detail, in execution order."""
    return ["embed", *(f"layer_{i}.{tap}" for i in range(config.num_hidden_layers) for tap in LAYER_TAPS),
            "final_norm", "logits"]


def locate_onnx(model: DeciCoderForCausalLM, port: OnnxPort, shape: CaseShape, mapped: dict[str, str] | None = None,
                tap_map: str | None = None) -> LocateReport:
    """Judge every tap of ``port`` that maps to a golden tap (``mapped``, default: port.tap_map), prefill."""
    config, dtype = model.config, model.lm_head.weight.dtype
    order = golden_order(config)
    if mapped is None:
        mapped = port.tap_map(order, config.num_hidden_layers, tap_map)
    inputs = make_inputs("causal_lm", config, shape, dtype)
    with torch.no_grad(), capture_taps(model, tuple(order)) as golden:
        model(inputs["input_ids"], inputs["position_ids"])
    outputs = port.run(inputs, list(dict.fromkeys(mapped.values())))
    candidate = {tap: _as_golden_layout(outputs[tensor], golden[tap]) for tap, tensor in mapped.items()}
    results = compare_taps(golden, candidate, TOLERANCES[dtype], [tap for tap in order if tap in mapped])
    check = CheckResult("causal_lm", port.description, dtype, shape, results)
    report = LocateReport(check)
    unmapped = [tap for tap in order if tap not in mapped]
    report.notes.append(f"{len(mapped)} of {len(order)} golden taps mapped to tensors of {port.path.name}.")
    if unmapped:
        report.notes.append(f"not mapped, so not judged ({len(unmapped)}): {', '.join(unmapped)}")
    return report
