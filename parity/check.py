"""One parity check: a component of the reference (golden) against a trt_layers engine (candidate)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from reference import DeciCoderForCausalLM
from reference.components import run_component
from reference.inputs import DECODE_COMPONENTS, CaseShape, make_inputs
from reference.taps import component_outputs
from trt_layers import weights as weight_mapping
from trt_layers.network import Backend, Engine, build_component, to_feed

from .compare import TOLERANCES, TapResult, compare_taps, failure_message, first_failure, format_table
from .diagnose import Diagnosis, diagnose_check
from .quantized import TapBudget, admit_rounding, format_budgets, rounds_activations, tap_budgets, teacher_forced


class UsageError(ValueError):
    """Bad usage or input (exit 2), found before any model is built."""


class CandidateError(Exception):
    """The candidate failed to build or run: the port is at fault (a divergence, exit 1), not the user."""


@contextlib.contextmanager
def candidate_stage(what: str) -> Iterator[None]:
    """Report any failure inside as the candidate's, prefixed with ``what``."""
    try:
        yield
    except CandidateError:
        raise
    except Exception as e:
        raise CandidateError(f"{what}: {type(e).__name__}: {e}".splitlines()[0]) from e


class CandidateBackend(Backend):
    """``backend`` with its build and run failures reported as CandidateError: a port that hard-codes
    a head count fails to build, and that is the port's divergence, not bad usage."""

    def __init__(self, backend: Backend):
        self.backend, self.name = backend, backend.name

    @property
    def description(self) -> str:
        return self.backend.description

    def build(self, name, specs, graph, config, dtype) -> Engine:
        with candidate_stage(f"the candidate failed to build {name}"):
            engine = self.backend.build(name, specs, graph, config, dtype)
        infer, refit = engine.infer, engine.refit

        def checked_infer(feed):
            with candidate_stage(f"the candidate failed to run {name}"):
                return infer(feed)

        def checked_refit(weights):
            with candidate_stage(f"the candidate failed to refit {name}"):
                refit(weights)

        engine.infer, engine.refit = checked_infer, checked_refit
        return engine


def needs_decode_graph(component: str, shape: CaseShape) -> bool:
    """Whether ``shape`` runs the component's decode graph (past K/V inputs)."""
    return component == "gqa_unmasked" or (component in DECODE_COMPONENTS and shape.past_len > 0)


CandidateWeights = Callable[[], Mapping[str, torch.Tensor]]


def reference_weights(model: DeciCoderForCausalLM) -> CandidateWeights:
    """The candidate's weights by default: the reference's, under TensorRT-LLM names (read when built, so an
    injected weight-mapping bug applies)."""
    return lambda: weight_mapping.to_trtllm(model.state_dict(), model.config)


def build_candidate(component: str, model: DeciCoderForCausalLM, backend: Backend, decode: bool,
                    static_shapes: dict[str, tuple[int, ...]] | None = None, marked: list[str] | None = None,
                    weights: CandidateWeights | None = None) -> Engine:
    """The trt_layers engine of ``component`` with ``weights`` (default: the reference's)."""
    weights = (weights or reference_weights(model))()
    return build_component(component, model.config, weights, model.lm_head.weight.dtype, backend, decode,
                           static_shapes, marked=marked)


def on_device(inputs: dict[str, torch.Tensor], model: DeciCoderForCausalLM) -> dict[str, torch.Tensor]:
    """Inputs where the golden runs: the model's device (the CPU, or a GPU with --device cuda)."""
    device = model.lm_head.weight.device
    return {name: tensor.to(device) for name, tensor in inputs.items()}


@dataclass
class CheckResult:
    component: str
    backend: str  # a description of the candidate backend
    dtype: torch.dtype
    shape: CaseShape
    results: list[TapResult]
    error: str | None = None  # the candidate failed to build or run (then no tap was computed)
    diagnosis: Diagnosis | None = None  # what kind of bug the first diverging tap shows
    budget: list[TapBudget] | None = None  # a quantized port: each tap against full precision (parity.quantized)

    @classmethod
    def candidate_failed(cls, component: str, backend: str, dtype: torch.dtype, shape: CaseShape, num_layers: int,
                         error: CandidateError) -> CheckResult:
        """The verdict on a candidate that did not build or run: every tap fails, uncomputed."""
        results = [TapResult(name, (), *(float("nan"),) * 4, False, "not computed")
                   for name in component_outputs(component, num_layers)]
        return cls(component, backend, dtype, shape, results, str(error))

    @property
    def first_failure(self) -> TapResult | None:
        return first_failure(self.results)

    def title(self) -> str:
        s = self.shape
        return (f"{self.component} [{self.backend}] {str(self.dtype).removeprefix('torch.')} "
                f"batch {s.batch} seq {s.seq_len} past {s.past_len} seed {s.seed}")

    def table(self) -> str:
        """The tap table, then the diagnosis of its first divergence or why no tap was computed."""
        lines = [format_table(self.results, self.title())]
        lines += [line for line in (self.diagnosis and self.diagnosis.text(), self.error) if line]
        if self.budget is not None:
            lines.append(format_budgets(self.budget))
        return "\n".join(lines)

    def assert_passed(self) -> None:
        if (message := failure_message(self.results, self.title())) is not None:
            raise AssertionError(message + (f"\n{self.diagnosis.text()}" if self.diagnosis else ""))


def check_component(component: str, model: DeciCoderForCausalLM, engines: Engine | list[Engine],
                    backend_description: str, shape: CaseShape,
                    full_precision: DeciCoderForCausalLM | None = None) -> CheckResult | list[CheckResult]:
    """Run golden and candidate on the same seeded inputs and compare every tap, in order.

    Several engines of one component (say, with and without taps marked) share one golden run.
    A check that diverges carries the diagnosis of its first diverging tap (parity.diagnose). With
    ``full_precision`` (``model`` being a quantized golden), each tap is also judged against it, within
    the quantized golden's own deviation (parity.quantized). A quantized golden that rounds activations runs
    after each candidate, teacher-forced on the candidate's linear inputs (parity.quantized.teacher_forced).
    """
    dtype = model.lm_head.weight.dtype
    inputs = make_inputs(component, model.config, shape, dtype)
    forced = rounds_activations(model)  # the golden runs after each candidate, on its linears' inputs
    order = component_outputs(component, model.config.num_hidden_layers, linear_inputs=forced)
    golden = None if forced else run_component(component, model, on_device(inputs, model))
    full = None
    if full_precision is not None:
        full = run_component(component, full_precision, on_device(inputs, full_precision), linear_inputs=forced)
    checks = []
    for engine in engines if isinstance(engines, list) else [engines]:
        candidate = engine.infer(to_feed(inputs))
        if forced:
            with teacher_forced(model, component, candidate, TOLERANCES[dtype]):
                golden = run_component(component, model, on_device(inputs, model), linear_inputs=True)
        admitted = admit_rounding(component, model, golden, candidate, TOLERANCES[dtype])  # a quantized KV cache's
        results = compare_taps(admitted, candidate, TOLERANCES[dtype], order)
        diagnosis = diagnose_check(component, model, on_device(inputs, model), admitted, candidate, results)
        budget = None if full is None else tap_budgets(full, admitted, candidate, results, TOLERANCES[dtype])
        checks.append(CheckResult(component, backend_description, dtype, shape, results, diagnosis=diagnosis,
                                  budget=budget))
    return checks if isinstance(engines, list) else checks[0]
