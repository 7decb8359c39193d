"""A quantized port judged twice (trt_layers.quantization holds the modes and their layouts).

1. Against the **quantized golden**, the reference computing with exactly the weights the layout
   stores (quantization.quantized_golden), at the dtype's tolerance: a port bug is found as sharply
   as in full precision. This verdict sets the exit status.
2. Against the **full-precision golden**, tap by tap on the same inputs, within an **error budget**,
   element by element: the quantized golden's own deviation from full precision there, plus
   BUDGET_MARGIN of it, plus the dtype's atol in the row's units (the rounding by which a correct port
   and the quantized golden differ). Each tap reads: matches the quantized golden / within budget /
   beyond budget.

A mode that rounds activations (fp8) rounds each linear's input, and an input a last ulp from a rounding boundary
rounds either way, a step of 6-12%: a correct port's input differs from the golden's by last ulps, so the golden
would diverge from it by whole steps spread through a matmul. The judge therefore **teacher-forces** the quantized
golden (``teacher_forced``): each quantized linear reads the candidate's own input, taken from the candidate's taps,
wherever that input passes the judge against the golden's; one that does not leaves the golden's, so the
divergence shows downstream as it would unforced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from reference import DeciCoderForCausalLM
from reference.taps import LINEAR_INPUTS
from trt_layers import weights as weight_mapping
from trt_layers.network import numpy_to_torch
from trt_layers.quantization import QuantizedWeights, QuantMode, RoundedCache, calibrate

from .compare import TapJudge, TapResult, Tolerance, row_scale

BUDGET_MARGIN = 0.10  # beyond the quantized golden's own deviation: what a port may add before it is "beyond budget"


@dataclass(frozen=True)
class TapBudget:
    name: str
    deviation: float  # max |candidate - full precision|
    own: float  # max |quantized golden - full precision|: what the quantization itself costs here
    used: float  # the largest element's deviation over its budget (<= 1: within budget)
    matches: bool  # the candidate passes against the quantized golden

    @property
    def verdict(self) -> str:
        if self.matches:
            return "matches the quantized golden"
        return "within budget" if self.used <= 1 else "beyond budget"


def candidate_weights(model: DeciCoderForCausalLM, mode: QuantMode) -> Callable[[], QuantizedWeights]:
    """The port's weights: ``model``'s, stored as ``mode`` stores them (read when built, so a weight-mapping
    bug injected then applies)."""
    state = model.state_dict()
    calibrated = calibrate(model, mode)
    return lambda: QuantizedWeights(weight_mapping.to_trtllm(state, model.config), mode, calibrated)


def _as_linear_input(tap: str, value: torch.Tensor) -> torch.Tensor:
    """A tap holding a linear's input (reference.taps.LINEAR_INPUTS) in that linear's layout: the attention
    context [b, heads, s, d] as o_proj reads it, [b, s, heads * d]; the others as they are."""
    return value.transpose(1, 2).flatten(2) if tap.endswith("context") else value


def rounds_activations(model: DeciCoderForCausalLM) -> bool:
    """Whether ``model`` is a quantized golden whose mode rounds the linears' inputs (then teacher_forced)."""
    mode = getattr(model, "quant_mode", None)
    return mode is not None and mode.layout is not None and mode.layout.rounds_activations


def _picker(candidate_input: torch.Tensor, tolerance: Tolerance) -> Callable[[torch.Tensor], torch.Tensor]:
    def pick(golden_input: torch.Tensor) -> torch.Tensor:
        if golden_input.shape != candidate_input.shape:
            return golden_input
        judge = TapJudge("input", tuple(golden_input.shape), tolerance)
        judge.add(golden_input, candidate_input)
        return candidate_input if judge.result().passed else golden_input
    return pick


@contextlib.contextmanager
def teacher_forced(golden: DeciCoderForCausalLM, component: str, candidate: Mapping[str, object],
                   tolerance: Tolerance, layer: int = 0) -> Iterator[None]:
    """Within, a golden that rounds activations (rounds_activations) runs each quantized linear of decoder layer
    ``layer`` on the candidate's own input (``component``'s taps, taps.LINEAR_INPUTS) wherever it passes the judge
    against the golden's own input there; elsewhere, and for any other golden, nothing changes."""
    if not rounds_activations(golden):
        yield
        return
    decoder_layer, weight = golden.model.layers[layer], golden.lm_head.weight
    for tap, paths in LINEAR_INPUTS.get(component, {}).items():
        if tap in candidate:
            value = candidate[tap] if isinstance(candidate[tap], torch.Tensor) else numpy_to_torch(candidate[tap])
            value = value.to(weight.device, weight.dtype)
            pick = _picker(_as_linear_input(tap, value), tolerance)
            golden.forced_inputs.update((decoder_layer.get_submodule(path), pick) for path in paths)
    try:
        yield
    finally:
        golden.forced_inputs.clear()


def admit_cache_rounding(golden: dict[str, object], candidate: Mapping[str, object], attention: torch.nn.Module,
                         present: Mapping[str, str], tolerance: Tolerance) -> dict[str, object]:
    """``golden`` with its quantized KV cache's new entries set to the candidate's wherever the candidate stored
    the rounding of a value within tolerance of the golden's pre-rounding K or V, and to the nearest such rounding
    elsewhere: a value a last ulp from a rounding boundary rounds either way, so a correct port's cache may hold
    the neighbouring step. ``attention``: the golden layer's (its kv_cache a RoundedCache, else nothing to admit);
    ``present``: "k", "v" -> the tap holding that cache. The error left is the candidate's distance beyond the
    roundings a passing K or V allows."""
    cache = getattr(attention, "kv_cache", None)
    if not isinstance(cache, RoundedCache):
        return golden
    golden = dict(golden)
    for name, tap in present.items():
        if tap not in golden or tap not in candidate or name not in cache.rounded:
            continue
        x, stored = cache.rounded[name].float(), golden[tap]
        if tuple(np.shape(candidate[tap])) != tuple(stored.shape):
            continue
        delta = torch.maximum(tolerance.atol * row_scale(x), tolerance.rtol * x.abs())  # the judge's, at K or V
        low, high = cache.window(name, delta)
        new = x.shape[2]  # the new tokens: the cache's last positions [b, kv_heads, past + new, d]
        admitted = stored.clone()
        stored_by_candidate = _tensor(candidate[tap])[:, :, -new:].to(x.device)
        admitted[:, :, -new:] = torch.minimum(torch.maximum(stored_by_candidate, low), high)
        golden[tap] = admitted
    return golden


def cache_taps(component: str, num_layers: int, layer: int = 0) -> list[tuple[int, dict[str, str]]]:
    """Where ``component``'s taps hold a layer's KV cache: (layer, {"k": tap, "v": tap}) for each; ``layer``: the
    streamed model's layer (component "layer")."""
    if component in ("gqa_masked", "gqa_unmasked"):
        return [(0, {"k": "present_k", "v": "present_v"})]
    if component == "layer":
        return [(layer, {"k": "attn.present_k", "v": "attn.present_v"})]
    if component == "causal_lm":
        return [(i, {"k": f"layer_{i}.present_k", "v": f"layer_{i}.present_v"}) for i in range(num_layers)]
    return []


def admit_rounding(component: str, model: DeciCoderForCausalLM, golden: dict[str, object],
                   candidate: Mapping[str, object], tolerance: Tolerance, layer: int = 0) -> dict[str, object]:
    """admit_cache_rounding at every cache ``component``'s taps hold (a copy of ``golden`` where it admits any)."""
    for i, present in cache_taps(component, model.config.num_hidden_layers, layer):
        golden = admit_cache_rounding(golden, candidate, model.model.layers[i].self_attn, present, tolerance)
    return golden


def _tensor(t) -> torch.Tensor:
    return torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).float().cpu()


def tap_budgets(full: Mapping[str, object], quantized: Mapping[str, object], candidate: Mapping[str, object],
                results: list[TapResult], tolerance: Tolerance) -> list[TapBudget]:
    """Each judged tap's deviation from full precision against its budget, element by element: the quantized
    golden's own deviation there times (1 + BUDGET_MARGIN), plus the dtype's atol in the row's units (the judge's:
    compare.row_scale). ``results``: the strict verdicts."""
    budgets = []
    for r in results:
        if r.name not in candidate or np.shape(candidate[r.name]) != tuple(np.shape(full[r.name])):
            budgets.append(TapBudget(r.name, math.nan, math.nan, math.nan, False))
            continue
        f, q, c = _tensor(full[r.name]), _tensor(quantized[r.name]), _tensor(candidate[r.name])
        own, deviation = (q - f).abs(), (c - f).abs()
        allowed = own * (1 + BUDGET_MARGIN) + tolerance.atol * row_scale(f)
        budgets.append(TapBudget(r.name, float(deviation.max()), float(own.max()), float((deviation / allowed).max()),
                                 r.passed))
    return budgets


def unquantized_budgets(results: list[TapResult]) -> list[TapBudget]:
    """Taps the mode leaves in full precision (the embedding, the head): the quantized golden is the full-precision
    one there, so the budget is the judge's tolerance and the verdict the strict one (no budget used to show)."""
    return [TapBudget(r.name, r.max_abs, 0.0, math.nan if r.passed else math.inf, r.passed) for r in results]


def format_budgets(budgets: list[TapBudget]) -> str:
    header = f"{'tap':<24} {'deviation':>10} {'quantized':>10} {'budget used':>12}  verdict"
    lines = [f"against full precision (max |x - full precision| of the candidate and of the quantized golden; budget: "
             f"the quantized golden's own deviation + {BUDGET_MARGIN:.0%}, + the atol, element by element; "
             "budget used -: a tap of the streamed model's embedding or head, which the mode leaves in full "
             "precision, judged at the tolerance)", header, "-" * len(header)]
    lines += [f"{b.name:<24} {b.deviation:>10.3e} {b.own:>10.3e} {'-' if math.isnan(b.used) else f'{b.used:.3g}':>12}  "
              f"{b.verdict}" for b in budgets]
    return "\n".join(lines)
