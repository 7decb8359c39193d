"""trt_layers causal_lm against the reference, tap by tap, on every candidate backend."""

import numpy as np
import pytest
import torch
from cases import assert_bug_localized, backend_params, bug_cases, parity_cases

from parity.compare import assert_parity
from reference.oracle import DECODE_STEPS


@pytest.mark.parametrize("case", parity_cases("causal_lm"))
def test_causal_lm_matches_reference(parity_check, case):
    parity_check(case).assert_passed()


@pytest.mark.parametrize("case", bug_cases("causal_lm"))
def test_causal_lm_bug_is_localized(parity_check, case):
    assert_bug_localized(parity_check(case), case.bug)


@pytest.mark.parametrize("backend", backend_params())
def test_causal_lm_prefill_and_decode_steps_match_reference(tiny_model, tiny_engines, backend):
    """Prefill then DECODE_STEPS greedy steps, each engine fed the cache the previous one returned."""
    engines = tiny_engines(backend)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 11))
    with torch.no_grad():
        golden = tiny_model(ids)
    logits, past = engines.forward(ids.numpy())
    assert_parity({"logits": golden.logits}, {"logits": logits}, torch.float32, title=f"prefill [{backend}]")
    for step in range(DECODE_STEPS):
        next_ids = golden.logits[:, -1:].argmax(-1)
        with torch.no_grad():
            golden = tiny_model(next_ids, past_key_values=golden.past_key_values)
        logits, past = engines.forward(next_ids.numpy(), past)
        assert_parity({"logits": golden.logits}, {"logits": logits}, torch.float32,
                      title=f"decode step {step} [{backend}]")


@pytest.mark.parametrize("backend", backend_params())
def test_causal_lm_greedy_generation_matches_reference(tiny_model, tiny_engines, backend):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 5))
    tokens, _ = tiny_engines(backend).generate(ids.numpy(), max_new_tokens=16)
    np.testing.assert_array_equal(tokens, tiny_model.generate(ids, max_new_tokens=16).numpy())
