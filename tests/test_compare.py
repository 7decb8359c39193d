"""The judge's tolerance rule: atol in units of each row's magnitude (parity.compare.row_scale)."""

import numpy as np
import torch

from parity.compare import TOLERANCES, compare_taps

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


def test_reported_errors_are_in_the_taps_own_units():
    golden = np.full((4, 8), 200.0, dtype=np.float32)
    candidate = golden.copy()
    candidate[3, 1] += 0.5
    result = compare_taps({"tap": golden}, {"tap": candidate}, FP32)[0]
    assert result.max_abs == 0.5 and not result.passed
