"""A quantized port judged twice (trt_layers.quantization holds the modes and their layouts).

1. Against the **quantized golden**, the reference computing with exactly the weights the layout
   stores (quantization.quantized_golden), at the dtype's tolerance: a port bug is found as sharply
   as in full precision. This verdict sets the exit status.
2. Against the **full-precision golden**, tap by tap on the same inputs, within an **error budget**:
   the quantized golden's own deviation from full precision at that tap, plus BUDGET_MARGIN of it,
   plus the tap's atol (the rounding by which a correct port and the quantized golden differ). Each
   tap reads: matches the quantized golden / within budget / beyond budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from reference import DeciCoderForCausalLM
from trt_layers import weights as weight_mapping
from trt_layers.quantization import QuantizedWeights, QuantMode

from .compare import TapResult, Tolerance, tap_atol

BUDGET_MARGIN = 0.10  # beyond the quantized golden's own deviation: what a port may add before it is "beyond budget"


@dataclass(frozen=True)
class TapBudget:
    name: str
    deviation: float  # max |candidate - full precision|
    budget: float  # max |quantized golden - full precision| * (1 + BUDGET_MARGIN) + the tap's atol
    matches: bool  # the candidate passes against the quantized golden

    @property
    def verdict(self) -> str:
        if self.matches:
            return "matches the quantized golden"
        return "within budget" if self.deviation <= self.budget else "beyond budget"


def candidate_weights(model: DeciCoderForCausalLM, mode: QuantMode) -> Callable[[], QuantizedWeights]:
    """The port's weights: ``model``'s, stored as ``mode`` stores them (read when built, so a weight-mapping
    bug injected then applies)."""
    state = model.state_dict()
    return lambda: QuantizedWeights(weight_mapping.to_trtllm(state, model.config), mode)


def _max_abs(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).float().cpu() for t in (a, b))
    return float((a - b).abs().max()) if a.numel() else 0.0


def tap_budgets(full: Mapping[str, object], quantized: Mapping[str, object], candidate: Mapping[str, object],
                results: list[TapResult], tolerance: Tolerance) -> list[TapBudget]:
    """Each judged tap's deviation from full precision against its budget (``results``: the strict verdicts)."""
    budgets = []
    for r in results:
        if r.name not in candidate or np.shape(candidate[r.name]) != tuple(np.shape(full[r.name])):
            budgets.append(TapBudget(r.name, math.nan, math.nan, False))
            continue
        own = _max_abs(quantized[r.name], full[r.name])
        atol = tap_atol(tolerance, torch.as_tensor(full[r.name]).float().cpu().numpy())
        budgets.append(TapBudget(r.name, _max_abs(candidate[r.name], full[r.name]), own * (1 + BUDGET_MARGIN) + atol,
                                 r.passed))
    return budgets


def unquantized_budgets(results: list[TapResult]) -> list[TapBudget]:
    """Taps the mode leaves in full precision (the embedding, the head): the quantized golden is the full-precision
    one there, so the budget is the tap's atol and the deviation the strict verdict's."""
    return [TapBudget(r.name, r.max_abs, r.atol, r.passed) for r in results]


def format_budgets(budgets: list[TapBudget]) -> str:
    header = f"{'tap':<24} {'deviation':>10} {'budget':>10}  verdict"
    lines = [f"against full precision (budget: the quantized golden's own deviation + {BUDGET_MARGIN:.0%}, + the "
             "tap's atol)", header, "-" * len(header)]
    lines += [f"{b.name:<24} {b.deviation:>10.3e} {b.budget:>10.3e}  {b.verdict}" for b in budgets]
    return "\n".join(lines)
