"""Generation-level parity: the reference and the candidate each decode greedily on their own.

A port can pass every tap check and still drift over many decode steps, so each side follows
its own tokens, and the report gives the first step whose logits leave the dtype's tolerance
(often well before any token changes), the first step where the tokens differ, and how close
the reference was to choosing the candidate's token there.

Prompts of different lengths run as separate batches: DeciCoder's prefill ignores padding (as
the reference does), so a padded batch would not be the model's own computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reference import DeciCoderForCausalLM
from trt_layers.generation import CausalLM

from .compare import TOLERANCES, compare_taps, first_failure


@dataclass(frozen=True)
class GenerationResult:
    prompt_len: int
    batch: int
    new_tokens: int
    first_mismatch: int | None  # step (0-based, over the batch) where the tokens first differ
    margin: float | None  # the reference's logit of its token minus of the candidate's token, at that step
    max_logit_error: float  # over the steps both sides saw the same tokens
    first_out_of_tolerance: int | None  # first of those steps whose logits fail the dtype's tolerance

    @property
    def identical(self) -> bool:
        return self.first_mismatch is None

    @property
    def passed(self) -> bool:
        return self.identical and self.first_out_of_tolerance is None

    def describe(self) -> str:
        head = f"prompt {self.prompt_len} x batch {self.batch}, {self.new_tokens} new tokens:"
        logits = ("logits within tolerance at every step" if self.first_out_of_tolerance is None
                  else f"logits leave tolerance at step {self.first_out_of_tolerance}")
        if self.identical:
            return f"{head} identical tokens, {logits} (max logit error {self.max_logit_error:.2e})"
        return (f"{head} {logits}; tokens: first mismatch at step {self.first_mismatch}, where the reference "
                f"preferred its token by {self.margin:.3e} logits (max logit error up to it "
                f"{self.max_logit_error:.2e})")


@torch.no_grad()
def reference_generate(model: DeciCoderForCausalLM, input_ids: torch.Tensor, max_new_tokens: int):
    """Greedy tokens and each step's last-position logits [b, vocab], as CausalLM.generate returns them."""
    out = model(input_ids)
    tokens, step_logits = [input_ids], []
    for step in range(max_new_tokens):
        last = out.logits[:, -1].float()
        step_logits.append(last.numpy())
        next_token = last.argmax(-1, keepdim=True)
        tokens.append(next_token)
        if step + 1 < max_new_tokens:
            out = model(next_token, past_key_values=out.past_key_values)
    return torch.cat(tokens, dim=1).numpy(), step_logits


def compare_generation(model: DeciCoderForCausalLM, candidate: CausalLM, input_ids: torch.Tensor,
                       max_new_tokens: int) -> GenerationResult:
    golden_tokens, golden_logits = reference_generate(model, input_ids, max_new_tokens)
    tokens, logits = candidate.generate(input_ids.numpy(), max_new_tokens)
    prompt_len = input_ids.shape[1]
    new_golden, new_candidate = golden_tokens[:, prompt_len:], tokens[:, prompt_len:]
    differs = np.nonzero((new_golden != new_candidate).any(axis=0))[0]
    first = int(differs[0]) if differs.size else None
    same_steps = max_new_tokens if first is None else first + 1  # the step that diverges saw the same inputs
    max_error = max(float(np.abs(g - c).max()) for g, c in zip(golden_logits[:same_steps], logits[:same_steps]))
    tolerance = TOLERANCES[model.lm_head.weight.dtype]
    out_of_tolerance = (step for step, (g, c) in enumerate(zip(golden_logits[:same_steps], logits[:same_steps]))
                        if first_failure(compare_taps({"logits": g}, {"logits": c}, tolerance)) is not None)
    margin = None
    if first is not None:
        rows = np.arange(input_ids.shape[0])
        step_logits = golden_logits[first]
        margin = float((step_logits[rows, new_golden[:, first]] - step_logits[rows, new_candidate[:, first]]).max())
    return GenerationResult(prompt_len, input_ids.shape[0], max_new_tokens, first, margin, max_error,
                            next(out_of_tolerance, None))
