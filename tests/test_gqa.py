"""trt_layers grouped-query attention against the reference: prefill (masked) and decode (unmasked)."""

import pytest
from cases import assert_bug_localized, bug_cases, parity_cases


@pytest.mark.parametrize("case", parity_cases("gqa_masked"))
def test_gqa_masked_matches_reference(parity_check, case):
    parity_check(case).assert_passed()


@pytest.mark.parametrize("case", parity_cases("gqa_unmasked"))
def test_gqa_unmasked_matches_reference(parity_check, case):
    parity_check(case).assert_passed()


@pytest.mark.parametrize("case", bug_cases("gqa_masked") + bug_cases("gqa_unmasked"))
def test_gqa_bug_is_localized(parity_check, case):
    assert_bug_localized(parity_check(case), case.bug)
