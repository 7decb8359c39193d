"""The judge: tap-by-tap comparison in execution order, by polygraphy's SimpleCompareFunc rule.

Pass/fail is polygraphy's ``elemwise`` check (SimpleCompareFunc): an element fails only
if its absolute error exceeds atol *and* its relative error exceeds rtol, i.e. it passes when
``|c - g| <= atol_row`` or ``|c - g| <= rtol * |g|`` (g golden, c candidate; a NaN error fails;
not numpy's ``atol + rtol * |g|``), and a tap passes when every element does. ``atol_row`` is the
dtype's atol times ``max(1, max |g|)`` over the element's row, the tap's last axis (``row_scale``).

The rule and the figures (max and mean absolute error, max relative error, cosine similarity)
are computed here, in torch on every core and block by block (``BLOCK_ELEMENTS``), with polygraphy's
definitions; tests/test_compare.py holds them to polygraphy's own SimpleCompareFunc and
CosineSimilarityCompareFunc. Calling polygraphy per tap cost more than the model: it sorts the
differences for medians and quantiles it logs (60% of a DeciCoder-1b locate at 2048 tokens).
This module adds what polygraphy lacks: tap ordering, the first diverging tap, a readable table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


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


def row_scale(golden: torch.Tensor) -> torch.Tensor:
    """The unit of atol for each row (last axis) of a tap: ``max(1, max |row|)`` over its finite values.

    Rounding error of a sum or dot product scales with the magnitude of what was summed, not
    with each result (fp16 attention scores of size 10 carry errors of 1e-2 at entries near 0,
    where an elementwise rtol cannot help); a row is one token's vector (one query's scores), so
    its own magnitude sets its unit, and an outlier token (RMS in the hundreds) loosens no other.
    An infinite golden value sets no unit: an infinite atol would pass any candidate in its row.
    """
    if golden.ndim == 0 or golden.numel() == 0:
        return torch.ones((1,) * golden.ndim)
    return golden.abs().nan_to_num(0.0, posinf=0.0).amax(-1, keepdim=True).clamp_min(1.0)


def tap_atol(tolerance: Tolerance, golden: np.ndarray) -> float:
    """The atol of the tap's largest row: the loosest any element of it is judged at."""
    return tolerance.atol * float(row_scale(torch.from_numpy(golden)).max())


# Taps are judged in blocks of whole rows, at most this many elements each, so that a
# 2048-token logits tap (100 M elements) needs a few blocks' worth of temporaries, not GiBs.
BLOCK_ELEMENTS = 2**22
# What polygraphy adds to golden zeros before dividing by them (SimpleCompareFunc).
_EPSILON = 2.220446049250313e-16


def compare_taps(
    golden: Mapping[str, object], candidate: Mapping[str, object], tolerance: Tolerance,
    order: Iterable[str] | None = None,
) -> list[TapResult]:
    """Compare every tap of ``golden`` (in ``order``, default golden's) that ``candidate`` should have."""
    results = []
    for name in order if order is not None else golden:
        if name not in candidate:
            results.append(TapResult(name, tuple(np.shape(golden[name])), *(float("nan"),) * 4, False, "missing"))
            continue
        g, c = _to_numpy(golden[name]), _to_numpy(candidate[name])
        if g.shape != c.shape:
            results.append(TapResult(name, g.shape, *(float("nan"),) * 4, False, f"shape {list(c.shape)}"))
            continue
        results.append(_compare_tap(name, g, c, tolerance))
    return results


def _compare_tap(name: str, golden: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> TapResult:
    judge = TapJudge(name, golden.shape, tolerance)
    judge.add(golden, candidate)
    return judge.result()


class TapJudge:
    """One tap judged by polygraphy's elemwise rule, given whole or in pieces of whole rows (say,
    the logits of a few tokens at a time); the result is that of the whole tap."""

    def __init__(self, name: str, shape: tuple[int, ...], tolerance: Tolerance):
        self.name, self.shape, self.tolerance = name, tuple(shape), tolerance
        self.passed, self.size = True, 0
        self.max_abs = self.max_rel = self.abs_sum = 0.0
        self.largest_scale = 1.0
        self.dot = self.golden_norm2 = self.candidate_norm2 = 0.0

    def add(self, golden, candidate) -> None:
        """Judge rows of the tap (any leading shape, the tap's last axis last), in blocks of BLOCK_ELEMENTS."""
        golden, candidate = _to_numpy(golden), _to_numpy(candidate)
        width = golden.shape[-1] if golden.ndim and golden.shape[-1] else 1
        golden_rows, candidate_rows = golden.reshape(-1, width), candidate.reshape(-1, width)
        step = max(1, BLOCK_ELEMENTS // width)
        for start in range(0, len(golden_rows), step):
            self._add_block(golden_rows[start:start + step], candidate_rows[start:start + step])

    def _add_block(self, golden: np.ndarray, candidate: np.ndarray) -> None:
        # In torch: its elementwise ops and reductions use every core, numpy's one.
        g, c = torch.from_numpy(golden), torch.from_numpy(candidate)
        scale = row_scale(g)
        absdiff, reldiff = _errors(g, c)
        self.passed = self.passed and bool(_within(absdiff, reldiff, scale, self.tolerance).all())
        self.max_abs = _max_keeping_nan(self.max_abs, absdiff.max().item())
        self.max_rel = _max_keeping_nan(self.max_rel, reldiff.max().item())
        self.abs_sum += absdiff.sum(dtype=torch.float64).item()
        self.size += g.numel()
        self.largest_scale = max(self.largest_scale, scale.max().item())
        # In float64: a cosine near 1 is a difference of nearly equal sums, which fp32 would blur.
        g64, c64 = g.ravel().double(), c.ravel().double()
        self.dot += torch.dot(g64, c64).item()
        self.golden_norm2 += torch.dot(g64, g64).item()
        self.candidate_norm2 += torch.dot(c64, c64).item()

    def result(self) -> TapResult:
        if not self.size:
            return TapResult(self.name, self.shape, *(float("nan"),) * 4, self.passed, "empty")
        return TapResult(self.name, self.shape, self.max_abs, self.max_rel, self.abs_sum / self.size,
                         _cosine(self.dot, self.golden_norm2, self.candidate_norm2), self.passed,
                         atol=self.tolerance.atol * self.largest_scale)


def _errors(golden: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute and relative error of each element, as polygraphy defines them."""
    absdiff = (candidate - golden).abs()
    return absdiff, absdiff / torch.where(golden == 0, _EPSILON, golden).abs()


def _within(absdiff: torch.Tensor, reldiff: torch.Tensor, scale: torch.Tensor, tolerance: Tolerance) -> torch.Tensor:
    # Fails only where both errors exceed their tolerance; a NaN error exceeds any. The absolute
    # one is in units of its row's scale (row_scale); a relative error has no units.
    return (absdiff <= tolerance.atol * scale) | (reldiff <= tolerance.rtol)


def elements_within(golden: torch.Tensor, candidate: torch.Tensor, tolerance: Tolerance) -> torch.Tensor:
    """Which elements of ``candidate`` pass against ``golden`` (fp32 tensors of one shape), by the tap rule."""
    return _within(*_errors(golden, candidate), row_scale(golden), tolerance)


def _max_keeping_nan(a: float, b: float) -> float:
    return a + b if math.isnan(a) or math.isnan(b) else max(a, b)


def _cosine(dot: float, golden_norm2: float, candidate_norm2: float) -> float:
    """Cosine similarity from sums over the blocks, with polygraphy's conventions
    (CosineSimilarityCompareFunc): two zero tensors agree, one zero tensor is orthogonal, NaN stays NaN."""
    if golden_norm2 == 0 and candidate_norm2 == 0:
        return 1.0
    if golden_norm2 == 0 or candidate_norm2 == 0:
        return 0.0
    cosine = dot / math.sqrt(golden_norm2 * candidate_norm2)
    return cosine if math.isnan(cosine) else max(-1.0, min(1.0, cosine))


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
