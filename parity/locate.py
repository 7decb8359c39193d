"""Where does a port diverge? One component, or the whole model streamed layer by layer.

A component is checked twice: first with only its real outputs marked (the engine as it would
ship), then with every tap marked. Marking a tensor as an output stops TensorRT fusing across
it, so a divergence can vanish once tapped; when the two verdicts differ the report says so.

The whole model (``causal_lm``) streams: golden and candidate advance one layer at a time and
only that layer's tensors are held, so DeciCoder-1b fits beside its two weight sets. The
candidate runs as per-layer engines (embedding, each decoder layer, final norm + lm_head), each
fed the candidate's own previous output, so errors grow across layers as they would in the
assembled engine; a whole-graph engine cannot stream. Layers are compared on their present K/V
and output; the first layer that diverges is rebuilt with every tap inside it marked
(LAYER_TAPS) and run again on the same input, to name the tap where it goes wrong.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from reference import DeciCoderForCausalLM
from reference.components import run_layer
from reference.inputs import CaseShape, make_inputs, past_names
from reference.taps import component_outputs, real_outputs
from trt_layers import weights as weight_mapping
from trt_layers.bugs import Bug
from trt_layers.network import Backend, build_component, to_feed

from .check import CheckResult, build_candidate, check_component, needs_decode_graph
from .compare import TOLERANCES, TapResult, compare_taps, first_failure

Progress = Callable[[str], None]


@dataclass
class LocateReport:
    check: CheckResult  # every tap, in execution order
    outputs_only: list[TapResult] | None = None  # the real outputs, from an engine with no taps marked
    layer_detail: tuple[int, list[TapResult]] | None = None  # causal_lm: the first diverging layer, every tap
    bug: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def first_failure(self) -> TapResult | None:
        return self.check.first_failure

    @property
    def exit_code(self) -> int:
        outputs_failed = self.outputs_only is not None and first_failure(self.outputs_only) is not None
        return 1 if self.first_failure is not None or outputs_failed else 0



def _bug_context(bug: Bug | None):
    return bug.injected() if bug else contextlib.nullcontext()


def locate(component: str, model: DeciCoderForCausalLM, backend: Backend, shape: CaseShape, bug: Bug | None = None,
           progress: Progress | None = None) -> LocateReport:
    """Check ``component`` of the candidate built by ``backend`` (with ``bug`` injected) against the reference."""
    if component == "causal_lm":
        return _locate_streaming(model, backend, shape, bug, progress or (lambda message: None))
    decode = needs_decode_graph(component, shape)
    with _bug_context(bug):
        shipped = build_candidate(component, model, backend, decode, marked=list(real_outputs(component)))
        tapped = build_candidate(component, model, backend, decode)
    shipped_check, tapped_check = check_component(component, model, [shipped, tapped], backend.description, shape)
    outputs_only = [r for r in shipped_check.results if r.name in real_outputs(component)]
    report = LocateReport(tapped_check, outputs_only, bug=bug.name if bug else None)
    shipped_fails = first_failure(outputs_only) is not None
    tapped_fails = report.first_failure is not None
    if shipped_fails and not tapped_fails:
        report.notes.append("The outputs diverge without taps but match once every tap is marked: marking outputs "
                            "changed the engine (no fusion across marked tensors). Suspect a fused kernel between "
                            "the taps; mark fewer taps to find which fusion.")
    elif tapped_fails and not shipped_fails:
        report.notes.append(f"The real outputs match, but tap {report.first_failure.name} diverges: an intermediate "
                            "differs in a way the outputs absorb (or marking taps changed the engine).")
    return report


def _locate_streaming(model: DeciCoderForCausalLM, backend: Backend, shape: CaseShape, bug: Bug | None,
                      progress: Progress) -> LocateReport:
    config, dtype = model.config, model.lm_head.weight.dtype
    tolerance = TOLERANCES[dtype]
    decode = shape.past_len > 0
    inputs = make_inputs("causal_lm", config, shape, dtype)
    feed = to_feed(inputs)
    results: dict[str, TapResult] = {}
    layer_outputs = ("attn.present_k", "attn.present_v", "out")
    detail = None

    def build(piece: str, layer: int = 0, marked: tuple[str, ...] | None = None):
        return build_component(piece, config, weights, dtype, backend, decode and piece == "layer", layer=layer,
                               marked=marked)

    with torch.no_grad(), _bug_context(bug):
        weights = weight_mapping.to_trtllm(model.state_dict(), config)
        golden_hidden = model.model.embed_tokens(inputs["input_ids"])
        candidate_hidden = build("embed").infer({"input_ids": feed["input_ids"]})["embed"]
        results.update((r.name, r) for r in compare_taps({"embed": golden_hidden}, {"embed": candidate_hidden},
                                                          tolerance))
        for i in range(config.num_hidden_layers):
            start = time.perf_counter()
            layer_feed = {"hidden_states": candidate_hidden, "position_ids": feed["position_ids"]}
            past = None
            if decode:
                past_k, past_v = past_names(i)
                past = (inputs[past_k], inputs[past_v])
                layer_feed.update(past_k=feed[past_k], past_v=feed[past_v])
            # Only the compared tensors are kept: at 2048 tokens one layer's scores alone are 512 MiB.
            golden = run_layer(model, i, golden_hidden, inputs["position_ids"], past, tuple(layer_outputs))
            candidate = build("layer", i, layer_outputs).infer(layer_feed)
            compared = compare_taps(golden, candidate, tolerance, layer_outputs)
            for r in compared:
                name = f"layer_{i}.{r.name.removeprefix('attn.')}"
                results[name] = replace(r, name=name)
            if detail is None and first_failure(compared) is not None:  # where inside this layer?
                golden_taps = run_layer(model, i, golden_hidden, inputs["position_ids"], past)
                detail = (i, compare_taps(golden_taps, build("layer", i).infer(layer_feed), tolerance))
                del golden_taps
            golden_hidden, candidate_hidden = golden["out"], candidate["out"]
            progress(f"layer {i + 1}/{config.num_hidden_layers}: {time.perf_counter() - start:.2f} s")
        candidate = build("head").infer({"hidden_states": candidate_hidden})
        golden_norm = model.model.norm(golden_hidden)
        golden = {"final_norm": golden_norm, "logits": model.lm_head(golden_norm)}
        results.update((r.name, r) for r in compare_taps(golden, candidate, tolerance))

    order = component_outputs("causal_lm", config.num_hidden_layers)
    check = CheckResult("causal_lm", backend.description, dtype, shape, [results[name] for name in order])
    report = LocateReport(check, layer_detail=detail, bug=bug.name if bug else None)
    report.notes.append("The candidate ran as per-layer engines, each fed the candidate's previous output: a "
                        "whole-graph engine cannot stream.")
    if detail is not None:
        layer, taps = detail
        first = first_failure(taps)
        where = first.name if first else "no single tap (the layer's outputs diverge only once assembled)"
        report.notes.append(f"Inside layer {layer}, the first diverging tap is {where}.")
    return report
