"""The judge: polygraphy's elemwise rule and figures, with atol in units of each row's magnitude
(parity.compare.row_scale)."""

import numpy as np
import pytest
import torch

from parity import compare
from parity.compare import TOLERANCES, Tolerance, compare_taps

FP32 = TOLERANCES[torch.float32]


def _judge(golden: np.ndarray, candidate: np.ndarray) -> bool:
    return compare_taps({"tap": golden}, {"tap": candidate}, FP32)[0].passed


def test_an_outlier_row_loosens_no_other_row():
    golden = np.ones((2, 3, 8), dtype=np.float32)
    golden[0, 0] *= 300.0  # one token's row at magnitude 300, as SCALED_TOKENS makes them
    off_in_small_row = golden.copy()
    off_in_small_row[1, 2, 5] += 1e-3  # 100x atol for an O(1) row, well under atol x 300
    assert not _judge(golden, off_in_small_row)


def test_an_outlier_row_is_judged_in_its_own_units():
    golden = np.ones((2, 3, 8), dtype=np.float32)
    golden[0, 0] *= 300.0
    off_in_outlier_row = golden.copy()
    off_in_outlier_row[0, 0, 5] += 2e-3  # under atol x 300 = 3e-3, a summation-order difference at that size
    assert _judge(golden, off_in_outlier_row)
    off_in_outlier_row[0, 0, 5] += 2e-3  # 4e-3: over atol x 300, and over rtol x 300 = 3e-3
    assert not _judge(golden, off_in_outlier_row)


def test_an_infinite_golden_value_loosens_nothing_in_its_row():
    """An infinite atol would pass any candidate in the row: the row's unit comes from its finite values."""
    golden = np.ones((1, 2, 8), dtype=np.float32)
    golden[0, 0, 0] = np.inf
    wrong = golden.copy()
    wrong[0, 0, 3] = -5.0
    assert not _judge(golden, wrong)
    assert compare.row_scale(torch.from_numpy(golden)).flatten().tolist() == [1.0, 1.0]


def test_reported_errors_are_in_the_taps_own_units():
    golden = np.full((4, 8), 200.0, dtype=np.float32)
    candidate = golden.copy()
    candidate[3, 1] += 0.5
    result = compare_taps({"tap": golden}, {"tap": candidate}, FP32)[0]
    assert result.max_abs == 0.5 and not result.passed


def _polygraphy_verdicts(golden: np.ndarray, candidate: np.ndarray, tolerance: Tolerance):
    """polygraphy's own SimpleCompareFunc (elemwise) and CosineSimilarityCompareFunc on one tap."""
    from polygraphy.comparator import CosineSimilarityCompareFunc, IterationResult, SimpleCompareFunc

    from trt_layers.network import quiet_polygraphy

    runs = (IterationResult({"t": candidate}, runner_name="candidate"),
            IterationResult({"t": golden}, runner_name="golden"))
    with quiet_polygraphy():
        verdict = SimpleCompareFunc(atol=tolerance.atol, rtol=tolerance.rtol)(*runs)["t"]
        cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(*runs)["t"].cosine_similarity
    return verdict, cosine


def _edge_cases():
    rng = np.random.default_rng(0)
    golden = rng.uniform(-1, 1, (6, 5, 16)).astype(np.float32)  # every row's scale is 1: polygraphy's units
    yield "equal", golden, golden.copy()
    yield "within atol", golden, golden + np.float32(4e-6)
    yield "past atol, within rtol", golden, golden * np.float32(1 + 1e-4)
    yield "past atol and rtol", golden, golden + rng.normal(0, 1e-3, golden.shape).astype(np.float32)
    one_off = golden.copy()
    one_off[3, 2, 7] += 1e-4
    yield "one element off", golden, one_off
    zeros = golden.copy()
    zeros[0, 0, :4] = 0
    yield "golden zeros", zeros, zeros + np.float32(1e-6)
    nan = golden.copy()
    nan[5, 4, 15] = np.nan
    yield "a NaN", golden, nan
    yield "zero tensors", np.zeros_like(golden), np.zeros_like(golden)
    yield "one zero tensor", golden, np.zeros_like(golden)


@pytest.mark.parametrize("block_elements", [2**22, 48])  # one block, and blocks of three rows
@pytest.mark.parametrize("case", list(_edge_cases()), ids=lambda case: case[0])
def test_the_judge_agrees_with_polygraphy(case, block_elements, monkeypatch):
    """The judge's verdict and figures are polygraphy's, block by block or whole."""
    monkeypatch.setattr(compare, "BLOCK_ELEMENTS", block_elements)
    _, golden, candidate = case
    tolerance = Tolerance(1e-5, 1e-3, "rtol apart from atol, so that each term decides some cases")
    (result,) = compare.compare_taps({"t": golden}, {"t": candidate}, tolerance)
    verdict, cosine = _polygraphy_verdicts(golden, candidate, tolerance)
    assert result.passed == bool(verdict)
    np.testing.assert_allclose([result.max_abs, result.max_rel, result.mean_abs, result.cosine],
                               [verdict.max_absdiff, verdict.max_reldiff, verdict.mean_absdiff, cosine],
                               rtol=1e-5, atol=0, equal_nan=True)
