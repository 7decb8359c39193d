"""The judge: tap-by-tap comparison in execution order, through polygraphy's CompareFunc.

polygraphy decides pass/fail with SimpleCompareFunc's ``elemwise`` check: an element fails only
if its absolute error exceeds atol *and* its relative error exceeds rtol, i.e. it passes when
``|c - g| <= atol_row`` or ``|c - g| <= rtol * |g|`` (g golden, c candidate; a NaN error fails;
not numpy's ``atol + rtol * |g|``), and a tap passes when every element does. ``atol_row`` is the
dtype's atol times ``max(1, max |g|)`` over the element's row, the tap's last axis (``row_scale``).
polygraphy also computes the
error statistics and cosine similarity; this module adds what polygraphy lacks: tap ordering, the
first diverging tap, and a readable table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from polygraphy.comparator import (
    CosineSimilarityCompareFunc,
    IterationResult,
    SimpleCompareFunc,
)

from trt_layers.network import quiet_polygraphy


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    why: str


# Per dtype of the compared run, for rows of magnitude up to 1 (see row_scale for larger ones).
# Weights keep activations O(1) (reference.modeling.init_random_weights). "Measured" is the worst
# max |candidate - golden| / max(1, max |golden|) (the atol needed at rtol 0) of the onnx backend
# against the reference in the same dtype, by benchmarks/bench_fp16_error.py: every tap of rmsnorm,
# mlp, rope, gqa_masked/unmasked and decoder_layer over the tests' grid and 3 seeds, and causal_lm
# deepened to 20 layers. The rtol term adds at most as much again at a tap's largest values.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-5, 1e-5, "fp32 differs by summation order only: measured 1.2e-6 per component, "
                                         "2.0e-6 after 20 layers; 5x margin"),
    torch.float16: Tolerance(1e-2, 1e-2, "fp16 rounded per op on both sides: measured 2.0e-3 per component (5x "
                                         "margin), 9.9e-3 per row after 20 layers (no margin at rtol 0)"),
    torch.bfloat16: Tolerance(6e-2, 6e-2, "bf16 keeps 8 mantissa bits: decicoder-1b in bf16 is 3.4e-2 off fp32 on GPU "
                                          "(docs/gpu_baseline.md); 1.8x margin"),
}


@dataclass(frozen=True)
class TapResult:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    passed: bool
    note: str = ""
    atol: float = float("nan")  # the loosest absolute tolerance in the tap: its largest row's (tap_atol)


def _to_numpy(tensor) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        # numpy has no bfloat16, and fp16 -> fp32 is exact: compare everything in fp32.
        return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
    return np.ascontiguousarray(tensor, dtype=np.float32)


def row_scale(golden: np.ndarray) -> np.ndarray:
    """The unit of atol for each row (last axis) of a tap: ``max(1, max |row|)``.

    Rounding error of a sum or dot product scales with the magnitude of what was summed, not
    with each result (fp16 attention scores of size 10 carry errors of 1e-2 at entries near 0,
    where an elementwise rtol cannot help); a row is one token's vector (one query's scores), so
    its own magnitude sets its unit, and an outlier token (RMS in the hundreds) loosens no other.
    """
    if golden.ndim == 0 or golden.size == 0:
        return np.ones((1,) * golden.ndim, dtype=np.float32)
    return np.maximum(1.0, np.abs(golden).max(axis=-1, keepdims=True))


def tap_atol(tolerance: Tolerance, golden: np.ndarray) -> float:
    """The atol of the tap's largest row: the loosest any element of it is judged at."""
    return tolerance.atol * float(row_scale(golden).max(initial=1.0))


def compare_taps(
    golden: Mapping[str, object], candidate: Mapping[str, object], tolerance: Tolerance,
    order: Iterable[str] | None = None,
) -> list[TapResult]:
    """Compare every tap of ``golden`` (in ``order``, default golden's) that ``candidate`` should have."""
    names = list(order if order is not None else golden)
    golden_np = {n: _to_numpy(golden[n]) for n in names if n in candidate}
    candidate_np = {n: _to_numpy(candidate[n]) for n in golden_np}
    comparable = [n for n in golden_np if golden_np[n].shape == candidate_np[n].shape]
    candidate_run = IterationResult({n: candidate_np[n] for n in comparable}, runner_name="candidate")
    golden_run = IterationResult({n: golden_np[n] for n in comparable}, runner_name="golden")
    # Dividing both sides by each row's scale turns polygraphy's one atol per tap into atol x
    # row_scale per row, and leaves relative errors as they are.
    scales = {n: row_scale(golden_np[n]) for n in comparable}
    candidate_scaled = IterationResult({n: candidate_np[n] / scales[n] for n in comparable}, runner_name="candidate")
    golden_scaled = IterationResult({n: golden_np[n] / scales[n] for n in comparable}, runner_name="golden")
    with quiet_polygraphy():
        verdicts = SimpleCompareFunc(atol=tolerance.atol, rtol=tolerance.rtol)(candidate_scaled, golden_scaled)
        # Reported, never judged: infinite tolerances and a cosine threshold of -1 always pass.
        errors = SimpleCompareFunc(atol=np.inf, rtol=np.inf)(candidate_run, golden_run)
        cosines = CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(candidate_run, golden_run)
    del candidate_scaled, golden_scaled
    results = []
    for name in names:
        if name not in candidate:
            results.append(TapResult(name, tuple(np.shape(golden[name])), *(float("nan"),) * 4, False, "missing"))
            continue
        g, c = golden_np[name], candidate_np[name]
        if g.shape != c.shape:
            results.append(TapResult(name, g.shape, *(float("nan"),) * 4, False, f"shape {list(c.shape)}"))
            continue
        error = errors[name]
        results.append(TapResult(
            name, g.shape, float(error.max_absdiff), float(error.max_reldiff), float(error.mean_absdiff),
            cosines[name].cosine_similarity, bool(verdicts[name]), atol=tolerance.atol * float(scales[name].max()),
        ))
    return results


def first_failure(results: Iterable[TapResult]) -> TapResult | None:
    return next((r for r in results if not r.passed), None)


def format_table(results: list[TapResult], title: str) -> str:
    header = f"{'tap':<24} {'shape':<20} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'cosine':>10}  verdict"
    lines = [title, header, "-" * len(header)]
    first = first_failure(results)
    for r in results:
        verdict = "pass" if r.passed else "FAIL" + (" <- first divergence" if r is first else "")
        if r.note:
            verdict += f" ({r.note})"
        lines.append(
            f"{r.name:<24} {str(list(r.shape)):<20} {r.max_abs:>10.3e} {r.max_rel:>10.3e} {r.mean_abs:>10.3e} "
            f"{r.cosine:>10.6f}  {verdict}"
        )
    return "\n".join(lines)


def failure_message(results: list[TapResult], title: str) -> str | None:
    """None if every tap passed; else the first diverging tap with its figures, and the table."""
    first = first_failure(results)
    if first is None:
        return None
    return (f"{title}: first diverging tap {first.name} (max abs {first.max_abs:.3e}, max rel {first.max_rel:.3e}, "
            f"cosine {first.cosine:.6f}{', ' + first.note if first.note else ''})\n" + format_table(results, title))


def assert_parity(
    golden: Mapping[str, object], candidate: Mapping[str, object], dtype: torch.dtype,
    order: Iterable[str] | None = None, title: str = "",
) -> list[TapResult]:
    """Raise AssertionError naming the first diverging tap, with the full table, if any tap fails."""
    results = compare_taps(golden, candidate, TOLERANCES[dtype], order)
    if (message := failure_message(results, title)) is not None:
        raise AssertionError(message)
    return results
