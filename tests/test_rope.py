"""trt_layers rope against the reference, tap by tap, on every candidate backend."""

import pytest
from cases import assert_bug_localized, bug_cases, parity_cases


@pytest.mark.parametrize("case", parity_cases("rope"))
def test_rope_matches_reference(parity_check, case):
    parity_check(case).assert_passed()


@pytest.mark.parametrize("case", bug_cases("rope"))
def test_rope_bug_is_localized(parity_check, case):
    assert_bug_localized(parity_check(case), case.bug)
