"""Where does a port diverge? Every component and the whole model, or one check.

By default ``locate`` runs the suite (``plan_checks``): each component, in prefill and, where it
reads a cache (rope through its positions), in decode; then the whole model in prefill and in
decode through the cache. Together these catch every catalog bug; one check alone may not, so
injecting a bug that cannot show in what runs is refused (``refuse_unshowable``).

A component is checked twice: first with only its real outputs marked (the engine as it would
ship), then with every tap marked. Marking a tensor as an output stops TensorRT fusing across
it, so a divergence can vanish once tapped; when the two verdicts differ the report says so.

The whole model (``causal_lm``) streams: golden and candidate advance one layer at a time and
only that layer's tensors are held, so DeciCoder-1b fits beside one weight set (the candidate
reads the golden's weights in place). The candidate runs piece by piece (embedding, a decoder
layer, final norm + lm_head), each piece fed the candidate's own previous output, as the
assembled engine runs; a whole-graph engine cannot be cut into layers. The golden runs each
layer (and the head) on that same input, so every layer is judged on its own arithmetic:
comparing two chains instead would judge layer 17 on rounding that 16 layers amplified (fp32
decicoder-1b, decode after 2047 cached tokens: 2.5e-5 at layer 17, over the fp32 tolerance,
with no bug anywhere).
The decoder-layer engine is built once and refitted with each layer's weights where the backend
can refit (the onnx lowering), and rebuilt per layer where it cannot. The golden computes
attention fused, as Deci's code does, since no step inside it is tapped. Layers are compared on
their present K/V and output; the first layer that diverges is rebuilt with every tap inside it
marked (LAYER_TAPS) and run again on the same input, golden and candidate, to name the tap where
it goes wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from reference import COMPONENTS, PRESETS, DeciCoderConfig, DeciCoderForCausalLM, load_model, random_model
from reference.components import run_layer
from reference.inputs import CaseShape, make_inputs, past_names
from reference.taps import LINEAR_INPUTS, component_outputs, real_outputs
from trt_layers.bugs import Bug
from trt_layers.network import Backend, Engine, build_component, numpy_to_torch, refit_layer, to_feed

from .check import (CandidateWeights, CheckResult, build_candidate, check_component, needs_decode_graph, on_device,
                    reference_weights)
from .compare import TOLERANCES, TapJudge, TapResult, compare_taps, first_failure
from .diagnose import NO_PATTERN, Diagnosis, diagnose_layer, diagnose_model_tap
from .quantized import TapBudget, admit_rounding, rounds_activations, tap_budgets, teacher_forced, unquantized_budgets

Progress = Callable[[str], None]

PREFILL, DECODE = "prefill", "decode"
# The phases each component runs in: decode reads a cache (rope: positions continue after it).
PHASES = {"repeat_kv": (PREFILL,), "rope": (PREFILL, DECODE), "gqa_masked": (PREFILL,), "gqa_unmasked": (DECODE,),
          "mlp": (PREFILL,), "rmsnorm": (PREFILL,), "decoder_layer": (PREFILL, DECODE),
          "causal_lm": (PREFILL, DECODE)}
DEFAULT_PAST_LEN = 5  # cached tokens of a decode check when --past-len is not given


@dataclass(frozen=True)
class Check:
    """One locate check: a component, in one phase, on one case."""

    component: str
    phase: str
    shape: CaseShape

    @property
    def label(self) -> str:
        return f"{self.component} {self.phase}" if len(PHASES[self.component]) > 1 else self.component


def plan_checks(component: str | None, phase: str | None, batch: int, seq_len: int, past_len: int | None,
                seed: int = 0) -> list[Check]:
    """The checks a request runs: ``component``'s, or (None) the suite, every component in every phase.

    ``phase`` None: the suite runs both; one component runs decode if it has only that or
    ``past_len`` > 0. Decode checks cache ``past_len`` tokens (default DEFAULT_PAST_LEN), prefill
    checks none. A combination that cannot run raises ValueError.
    """
    checks = []
    for name in COMPONENTS if component is None else (component,):
        phases = PHASES[name]
        if phase is not None:
            phases = (phase,) if phase in phases or component is not None else ()
        elif component is not None:
            phases = (DECODE,) if DECODE in phases and (past_len or PREFILL not in phases) else (PREFILL,)
        checks += [Check(name, p, CaseShape(batch, seq_len, _past_len(name, p, past_len, component is None), seed))
                   for p in phases]
    return checks


def _past_len(component: str, phase: str, past_len: int | None, suite: bool = False) -> int:
    """The cache length of ``component`` in ``phase``; in the suite, ``past_len`` is the decode checks'."""
    if phase not in PHASES[component]:
        if component == "gqa_unmasked":
            raise ValueError("gqa_unmasked is the decode path; use gqa_masked for prefill")
        raise ValueError(f"{component} has no decode graph; decode components: "
                         f"{', '.join(c for c, phases in PHASES.items() if DECODE in phases)}")
    if phase == PREFILL:
        if suite:
            return 0
        if past_len and component == "gqa_masked":
            raise ValueError("gqa_masked is the prefill path and has no cache; use gqa_unmasked with --past-len")
        if past_len and DECODE in PHASES[component]:
            raise ValueError(f"prefill has no cache: --past-len must be 0 (got {past_len})")
        return 0
    if past_len is None:
        return DEFAULT_PAST_LEN
    if past_len == 0 and component != "gqa_unmasked":  # the bare decode attention runs on an empty cache
        raise ValueError("decode needs cached tokens: give --past-len N (N >= 1), or --phase prefill")
    return past_len


def refuse_unshowable(bug: Bug, checks: list[Check], config: DeciCoderConfig, quant: str | None = None,
                      tp: int = 1) -> None:
    """ValueError unless ``bug`` can show in one of ``checks`` (with weights quantized as ``quant``, split across
    ``tp`` ranks): a PASS there would check nothing."""
    if any(bug.shows.allows(check.component, check.shape, config, quant, tp) for check in checks):
        return
    past_len = max(check.shape.past_len for check in checks)
    ran = checks[0].label if len(checks) == 1 else f"any of the {len(checks)} checks"
    message = (f"--inject {bug.name} cannot show in {ran} (--seq-len {checks[0].shape.seq_len}, --past-len {past_len}, "
               f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, rms_norm_eps "
               f"{config.rms_norm_eps:g}): it shows in {bug.shows.describe()}")
    if bug.shows.tp and tp == 1:
        raise ValueError(f"--inject {bug.name} misreads tensor parallelism: it shows only with --tp N (N > 1), e.g. "
                         f"--component {bug.component} --tp {bug.tp_size}")
    if bug.shows.quant is not None and bug.shows.quant not in (quant or "").split("+"):
        raise ValueError(f"--inject {bug.name} misreads the {bug.shows.quant} weight layout: it shows only in "
                         f"locate --quant {bug.shows.quant}, in {bug.shows.describe()}")
    if bug.shows.allows(bug.component, bug.shape, config, bug.shows.quant, bug.tp_size):
        message += f", e.g. --component {bug.component} --seq-len {bug.shape.seq_len} --past-len {bug.shape.past_len}"
        message += f" --tp {bug.tp_size}" if bug.tp_size > 1 else ""
        message += f" --quant {bug.shows.quant}" if bug.shows.quant else ""
    raise ValueError(message)


def model_config(spec: str, kv_heads: int | None = None) -> DeciCoderConfig:
    """The config ``spec`` names (a preset, or a checkpoint directory's config.json), before any weights.

    ``kv_heads`` lays out a preset's attention: its head count (MHA), a divisor of it (GQA), 1 (MQA).
    """
    if spec not in PRESETS:
        if not Path(spec).is_dir():
            raise ValueError(f"--model {spec}: neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
        if kv_heads is not None:
            raise ValueError("--kv-heads lays out a preset's random weights; a checkpoint keeps its own layout")
        return DeciCoderConfig.from_json_file(Path(spec) / "config.json")
    config = DeciCoderConfig.from_preset(spec)
    if kv_heads is None:
        return config
    heads = config.num_attention_heads
    if heads % kv_heads:
        raise ValueError(f"--kv-heads {kv_heads} must divide the {heads} attention heads of {spec}: "
                         f"{heads} (MHA), a divisor (GQA) or 1 (MQA)")
    return config.with_kv_heads(kv_heads)


def load_model_as(spec: str, config: DeciCoderConfig, dtype: torch.dtype, seed: int) -> DeciCoderForCausalLM:
    """``spec``'s model with ``config``'s layout (model_config): seeded random weights for a preset."""
    return random_model(config, seed, dtype) if spec in PRESETS else load_model(spec, dtype)


@dataclass
class LocateReport:
    check: CheckResult  # every tap, in execution order
    outputs_only: list[TapResult] | None = None  # the real outputs, from an engine with no taps marked
    layer_detail: tuple[int, list[TapResult]] | None = None  # causal_lm: the first diverging layer, every tap
    bug: str | None = None
    notes: list[str] = field(default_factory=list)
    quant: str | None = None  # the quantization mode of the port's weights (the golden then the quantized one)
    outputs_marks: tuple[str, ...] = ()  # taps the outputs-only engine marks beside its outputs (linear inputs)

    @property
    def first_failure(self) -> TapResult | None:
        return self.check.first_failure

    @property
    def diagnosis(self) -> Diagnosis | None:
        return self.check.diagnosis

    @property
    def exit_code(self) -> int:
        outputs_failed = self.outputs_only is not None and first_failure(self.outputs_only) is not None
        return 1 if self.first_failure is not None or outputs_failed else 0

    def verdict(self) -> str:
        """'pass', or where it diverges: 'FAIL at q_rot (max abs 1.2e+00, cosine 0.76)'."""
        if self.exit_code == 0:
            return "pass"
        if self.check.error is not None:
            return f"FAIL: {self.check.error}"
        first = self.first_failure
        if first is None:
            return "FAIL at the real outputs (every tap passes once marked)"
        verdict = f"FAIL at {first.name} (max abs {first.max_abs:.3e}, cosine {first.cosine:.6f})"
        if self.layer_detail is not None and (inside := first_failure(self.layer_detail[1])) is not None:
            verdict += f"; inside layer {self.layer_detail[0]}: {inside.name}"
        if self.diagnosis is not None and self.diagnosis.hypothesis != NO_PATTERN:
            verdict += f"; diagnosis {self.diagnosis.hypothesis}"
        return verdict

    def text(self) -> str:
        """The tap table, the verdict of the real outputs alone, and the notes."""
        lines = [self.check.table()]
        if self.outputs_only is not None:
            shipped = first_failure(self.outputs_only)
            verdict = "pass" if shipped is None else f"FAIL at {shipped.name}"
            marks = (f"only the linears' inputs marked ({', '.join(self.outputs_marks)}), which the judge rounds as "
                     "the port did" if self.outputs_marks else "no taps marked")
            lines.append(f"real outputs alone ({marks}): {verdict}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def summary(checks: list[Check], reports: list[LocateReport], dtype: str, quant: str | None = None) -> str:
    """The last lines of a locate run: each check's verdict (when several ran), then PASSED or DIVERGED."""
    failed = [(check, report) for check, report in zip(checks, reports) if report.exit_code]
    taps = sum(len(report.check.results) for report in reports)
    if len(checks) == 1:
        if not failed:
            return (f"PASSED: {taps} tap{'s' if taps != 1 else ''} of {checks[0].label} within {dtype} tolerance"
                    f"{_of_golden(quant)}")
        if reports[0].check.error is not None:
            return f"DIVERGED: {checks[0].label}: {reports[0].check.error}"
        return f"DIVERGED: first diverging tap {reports[0].verdict().removeprefix('FAIL at ')}"
    width = max(len(check.label) for check in checks)
    lines = [f"  {check.label:<{width}}  {report.verdict()}" for check, report in zip(checks, reports)]
    if not failed:
        lines.append(f"PASSED: {len(checks)} checks, {taps} taps within {dtype} tolerance{_of_golden(quant)}")
    else:
        first_check, first_report = failed[0]
        lines.append(f"DIVERGED: {len(failed)} of {len(checks)} checks; first: {first_check.label} "
                     f"{first_report.verdict().removeprefix('FAIL ')}")
    return "\n".join(lines)


def _of_golden(quant: str | None) -> str:
    return f" of the {quant} quantized golden" if quant else ""


def _linear_inputs(model: DeciCoderForCausalLM, component: str) -> tuple[str, ...]:
    """The taps every engine of ``component`` marks for the judge: its linears' inputs, where the golden rounds
    activations (parity.quantized.teacher_forced); else none."""
    return tuple(LINEAR_INPUTS.get(component, ())) if rounds_activations(model) else ()


def _bug_context(bug: Bug | None):
    return bug.injected() if bug else contextlib.nullcontext()


def locate(component: str, model: DeciCoderForCausalLM, backend: Backend, shape: CaseShape, bug: Bug | None = None,
           progress: Progress | None = None, weights: CandidateWeights | None = None,
           full_precision: DeciCoderForCausalLM | None = None) -> LocateReport:
    """Check ``component`` of the candidate built by ``backend`` (with ``bug`` injected) against ``model``.

    ``weights``: the candidate's (default: the reference's own, reference_weights), read when it is built.
    ``full_precision``: for a quantized port (``model`` its quantized golden), the golden each tap is also
    judged against, within a budget (parity.quantized).
    """
    weights = weights or reference_weights(model)
    if component == "causal_lm":
        return _locate_streaming(model, backend, shape, bug, progress or (lambda message: None), weights,
                                 full_precision)
    decode = needs_decode_graph(component, shape)
    shipped_marks = [*real_outputs(component), *_linear_inputs(model, component)]
    with _bug_context(bug):
        shipped = build_candidate(component, model, backend, decode, marked=shipped_marks, weights=weights)
        tapped = build_candidate(component, model, backend, decode, weights=weights)
    shipped_check, tapped_check = check_component(component, model, [shipped, tapped], backend.description, shape,
                                                  full_precision)
    outputs_only = [r for r in shipped_check.results if r.name in real_outputs(component)]
    report = LocateReport(tapped_check, outputs_only, bug=bug.name if bug else None,  # diagnosed by check_component
                          outputs_marks=tuple(_linear_inputs(model, component)))
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


# The head runs a few tokens at a time: whole logits are 384 MiB a side at 2048 tokens.
HEAD_BLOCK_BYTES = 2**24


def judge_head(model: DeciCoderForCausalLM, hidden: np.ndarray, candidate_head: Callable[[np.ndarray], dict],
               taps: list[str], tolerance, candidate_block_bytes: int | None = None) -> list[TapResult]:
    """``taps`` (final_norm, logits) of golden and candidate (``candidate_head``: hidden states -> taps)
    from the same hidden states, judged a block of tokens at a time: the head treats each token
    alone, so blocks compute what the whole would. The candidate may run on bigger blocks
    (``candidate_block_bytes`` of logits, default HEAD_BLOCK_BYTES) than the golden's."""
    batch, seq_len, hidden_size = hidden.shape
    vocab = model.config.vocab_size
    judges = {tap: TapJudge(tap, (batch, seq_len, {"final_norm": hidden_size, "logits": vocab}[tap]), tolerance)
              for tap in taps}
    misshapen: dict[str, TapResult] = {}
    golden_tokens = max(1, HEAD_BLOCK_BYTES // (4 * batch * vocab))
    candidate_tokens = golden_tokens * max(1, (candidate_block_bytes or HEAD_BLOCK_BYTES) // HEAD_BLOCK_BYTES)
    for start in range(0, seq_len, candidate_tokens):
        block = np.ascontiguousarray(hidden[:, start:start + candidate_tokens])
        candidate = candidate_head(block)
        for tap, judge in judges.items():
            if tap not in misshapen and candidate[tap].shape != (batch, block.shape[1], judge.shape[-1]):
                misshapen[tap] = TapResult(tap, judge.shape, *(float("nan"),) * 4, False,
                                           f"shape {list(candidate[tap].shape)} from {block.shape[1]} tokens")
        for offset in range(0, block.shape[1], golden_tokens):
            golden_norm = model.model.norm(_golden_input(block[:, offset:offset + golden_tokens], model))
            golden = {"final_norm": golden_norm, "logits": model.lm_head(golden_norm)}
            for tap, judge in judges.items():
                if tap not in misshapen:
                    judge.add(golden[tap], candidate[tap][:, offset:offset + golden_tokens])
    return [misshapen.get(tap) or judges[tap].result() for tap in taps]


# The head is diagnosed on its first tokens: whole logits are 384 MiB a side at 2048 tokens.
DIAGNOSED_HEAD_TOKENS = 32


def diagnose_head(model: DeciCoderForCausalLM, hidden: np.ndarray, candidate_head: Callable[[np.ndarray], dict],
                  tap: str) -> Diagnosis:
    """The diagnosis of ``tap`` (final_norm or logits) on the first tokens of ``hidden`` (what the head reads)."""
    block = np.ascontiguousarray(hidden[:, :DIAGNOSED_HEAD_TOKENS])
    golden_hidden = _golden_input(block, model)
    golden_norm = model.model.norm(golden_hidden)
    known = {"final_hidden": golden_hidden, "final_norm": golden_norm, "logits": model.lm_head(golden_norm)}
    diagnosis = diagnose_model_tap(model, tap, known, candidate_head(block)[tap])
    return diagnosis or Diagnosis(tap, NO_PATTERN, f"its first {block.shape[1]} tokens match: the divergence lies "
                                                   "in later tokens, which were not diagnosed")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


def release_freed_memory() -> None:
    """Return the pages of freed heap blocks to the OS. The golden's and the judge's tensors of a few
    MiB are freed into glibc's heap, which keeps them resident beside ONNX Runtime's arena; at 2048
    tokens that held 0.1-0.2 GiB through every layer."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def _golden_input(hidden: np.ndarray, model: DeciCoderForCausalLM) -> torch.Tensor:
    """The candidate's hidden states as the golden's input: same values, the golden's device."""
    return numpy_to_torch(hidden).to(model.lm_head.weight.device)


def _locate_streaming(model: DeciCoderForCausalLM, backend: Backend, shape: CaseShape, bug: Bug | None,
                      progress: Progress, candidate_weights: CandidateWeights,
                      full_precision: DeciCoderForCausalLM | None = None) -> LocateReport:
    config, dtype = model.config, model.lm_head.weight.dtype
    tolerance = TOLERANCES[dtype]
    decode = shape.past_len > 0
    inputs = make_inputs("causal_lm", config, shape, dtype)
    feed = to_feed(inputs)
    inputs = on_device(inputs, model)
    results: dict[str, TapResult] = {}
    layer_outputs = ("attn.present_k", "attn.present_v", "out")
    layer_marks = (*layer_outputs, *_linear_inputs(model, "layer"))  # the judge may read the linears' inputs
    detail = diagnosis = None
    budget: list[TapBudget] = []

    def build(piece: str, layer: int = 0, marked: tuple[str, ...] | None = None):
        return build_component(piece, config, weights, dtype, backend, decode and piece == "layer", layer=layer,
                               marked=marked)

    def layer_engine(engine: Engine | None, i: int) -> Engine:
        """The decoder-layer engine with layer ``i``'s weights: refitted where it can be, else built."""
        if engine is not None and engine.refittable:
            refit_layer(engine, weights, dtype, i)
            return engine
        return build("layer", i, layer_marks)

    with torch.no_grad(), _bug_context(bug):
        weights = candidate_weights()
        candidate_hidden = build("embed").infer({"input_ids": feed["input_ids"]})["embed"]
        golden_embed = {"embed": model.model.embed_tokens(inputs["input_ids"])}
        results.update((r.name, r) for r in compare_taps(golden_embed, {"embed": candidate_hidden}, tolerance))
        if not results["embed"].passed:
            diagnosis = diagnose_model_tap(model, "embed", {**golden_embed, "input_ids": inputs["input_ids"]},
                                           candidate_hidden)
        diverged = not results["embed"].passed
        engine = None
        for i in range(config.num_hidden_layers):
            start = time.perf_counter()
            release_freed_memory()
            layer_feed = {"hidden_states": candidate_hidden, "position_ids": feed["position_ids"]}
            past = None
            if decode:
                past_k, past_v = past_names(i)
                past = (inputs[past_k], inputs[past_v])
                layer_feed.update(past_k=feed[past_k], past_v=feed[past_v])
            # The golden runs the layer on the candidate's own input, so the layer is judged on its own
            # arithmetic, not on rounding that the layers before amplified; only the compared tensors
            # are kept (at 2048 tokens one layer's attention scores alone are 512 MiB).
            golden_hidden = _golden_input(candidate_hidden, model)
            engine = layer_engine(engine, i)
            candidate = engine.infer(layer_feed)
            with teacher_forced(model, "layer", candidate, tolerance, layer=i):  # a golden rounding activations
                golden = run_layer(model, i, golden_hidden, inputs["position_ids"], past, layer_outputs)
            golden = admit_rounding("layer", model, golden, candidate, tolerance, layer=i)  # a quantized KV cache's
            compared = compare_taps(golden, candidate, tolerance, layer_outputs)
            for r in compared:
                name = f"layer_{i}.{r.name.removeprefix('attn.')}"
                results[name] = replace(r, name=name)
            if full_precision is not None:
                full = run_layer(full_precision, i, golden_hidden, inputs["position_ids"], past, tuple(layer_outputs))
                budget += [replace(b, name=f"layer_{i}.{b.name.removeprefix('attn.')}")
                           for b in tap_budgets(full, golden, candidate, compared, tolerance)]
                del full
            if detail is None and first_failure(compared) is not None:  # where inside this layer, and what?
                candidate_taps = build("layer", i).infer(layer_feed)
                with teacher_forced(model, "layer", candidate_taps, tolerance, layer=i):
                    golden_taps = run_layer(model, i, golden_hidden, inputs["position_ids"], past)
                golden_taps = admit_rounding("layer", model, golden_taps, candidate_taps, tolerance, layer=i)
                detail = (i, compare_taps(golden_taps, candidate_taps, tolerance))
                if not diverged:
                    layer_inputs = {"hidden_states": golden_hidden, "position_ids": inputs["position_ids"]}
                    layer_inputs.update(zip(("past_k", "past_v"), past or ()))
                    diagnosis = (diagnose_layer(model, i, detail[1], golden_taps, candidate_taps, layer_inputs)
                                 or diagnose_layer(model, i, compared, golden, candidate, layer_inputs))
                del golden_taps, candidate_taps
            diverged = diverged or first_failure(compared) is not None
            candidate_hidden = candidate["out"]
            progress(f"layer {i + 1}/{config.num_hidden_layers}: {time.perf_counter() - start:.2f} s")
        head = build("head")

        def candidate_head(block: np.ndarray) -> dict:
            return head.infer({"hidden_states": block})

        head_results = judge_head(model, candidate_hidden, candidate_head, ["final_norm", "logits"], tolerance)
        results.update((r.name, r) for r in head_results)
        if not diverged and (first := first_failure(head_results)) is not None:
            diagnosis = diagnose_head(model, candidate_hidden, candidate_head, first.name)

    order = component_outputs("causal_lm", config.num_hidden_layers)
    if full_precision is not None:  # the embedding and the head are not quantized: their budget is the atol
        unquantized = {b.name: b for b in unquantized_budgets([results["embed"], *head_results])}
        budget = [unquantized["embed"], *budget, unquantized["final_norm"], unquantized["logits"]]
    check = CheckResult("causal_lm", backend.description, dtype, shape, [results[name] for name in order],
                        diagnosis=diagnosis, budget=budget if full_precision is not None else None)
    report = LocateReport(check, layer_detail=detail, bug=bug.name if bug else None)
    report.notes.append("The candidate ran piece by piece (embedding, one decoder-layer engine given each layer's "
                        "weights in turn, head), each piece fed the candidate's previous output; the golden reran "
                        "each layer and the head on that same input, so each row judges that piece alone and the "
                        "layers after a wrong one can pass.")
    if detail is not None:
        layer, taps = detail
        first = first_failure(taps)
        where = first.name if first else "no single tap (the layer's outputs diverge only once assembled)"
        report.notes.append(f"Inside layer {layer}, the first diverging tap is {where}.")
    return report
