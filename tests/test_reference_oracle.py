"""The reference is golden only because transformers' Llama blocks agree with it.

Each component of the reference runs beside the matching transformers block holding the same
weights, on the same seeded inputs; every tap transformers exposes must match within the
dtype's tolerance (parity.compare.TOLERANCES). Test ids carry the component name, so
``pytest -k rope`` (or gqa, gqa_masked, gqa_unmasked, mlp, rmsnorm, decoder_layer, causal_lm,
repeat_kv) selects one component.
"""

import copy

import pytest
import torch

from conftest import DTYPES, KV_LAYOUTS
from parity.compare import TOLERANCES, assert_parity, compare_taps, first_failure
from reference import modeling
from reference.inputs import CaseShape
from reference.oracle import ORACLE_COMPONENTS, run_case

# (batch, seq_len, past_len). Components with a cache (or positions) also run decode shapes.
PREFILL_SHAPES = [(1, 1, 0), (3, 7, 0), (1, 64, 0)]
DECODE_SHAPES = [(1, 1, 5), (3, 1, 100), (3, 7, 5)]
USES_PAST = {"rope", "gqa_unmasked", "decoder_layer"}


def _cases():
    for component in ORACLE_COMPONENTS:
        shapes = PREFILL_SHAPES + (DECODE_SHAPES if component in USES_PAST else [])
        grid = [(layout, dtype, shape) for layout in KV_LAYOUTS for dtype in DTYPES for shape in shapes]
        grid.append(("variant", "fp32", shapes[-1]))  # theta, eps and head shape unlike DeciCoder-1b's
        for layout, dtype, (batch, seq_len, past_len) in grid:
            yield pytest.param(component, layout, dtype, CaseShape(batch, seq_len, past_len),
                               id=f"{component}-{layout}-{dtype}-b{batch}-s{seq_len}-p{past_len}")


@pytest.mark.parametrize("component,layout,dtype,shape", list(_cases()))
def test_reference_matches_transformers(oracle_pair, component, layout, dtype, shape):
    dtype = DTYPES[dtype]
    model, llama = oracle_pair(layout, dtype)
    case = run_case(component, model, llama, shape)
    assert case.shared_taps, f"transformers exposed no tap of {component}"
    assert_parity(case.transformers, case.reference, dtype, case.shared_taps, title=f"{component} vs transformers")


def _interleaved_rotate_half(x):
    # GPT-J/NeoX confusion: pairs (x0, x1), (x2, x3), ... instead of the two halves.
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _tiled_repeat_kv(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)  # kv heads cycled (0,1,0,1) instead of repeated in place (0,0,1,1)


def _no_causal_mask(q_len, kv_len, dtype, device=None):
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device)


def _patched(name, replacement):
    def break_reference(monkeypatch, model):
        monkeypatch.setattr(modeling, name, replacement)
        return model
    return break_reference


# Module surgery goes on a copy: the tiny models are shared by the whole session, and
# monkeypatch cannot restore nn.Module children.
def _swap_gate_up(monkeypatch, model):
    broken = copy.deepcopy(model)
    mlp = broken.model.layers[0].mlp
    mlp.gate_proj, mlp.up_proj = mlp.up_proj, mlp.gate_proj
    return broken


def _wrong_rmsnorm_eps(monkeypatch, model):
    broken = copy.deepcopy(model)
    broken.model.layers[0].input_layernorm.variance_epsilon = 1e-2
    return broken


# component -> (how the reference is broken, the first tap that must fail)
BROKEN_REFERENCE = {
    "rope": (_patched("rotate_half", _interleaved_rotate_half), "q_rot"),
    "repeat_kv": (_patched("repeat_kv", _tiled_repeat_kv), "k_rep"),
    "gqa_masked": (_patched("causal_mask", _no_causal_mask), "probs"),
    "mlp": (_swap_gate_up, "gate"),
    "rmsnorm": (_wrong_rmsnorm_eps, "out"),
    "causal_lm": (_patched("rotate_half", _interleaved_rotate_half), "prefill.logits"),
}


@pytest.mark.parametrize("component", BROKEN_REFERENCE)
def test_broken_reference_is_caught(oracle_pair, monkeypatch, component):
    """The oracle comparison can fail: a classic porting bug in the reference names the right tap."""
    model, llama = oracle_pair("kvheads2", torch.float32)
    break_reference, expected_tap = BROKEN_REFERENCE[component]
    broken = break_reference(monkeypatch, model)
    case = run_case(component, broken, llama, CaseShape(batch=2, seq_len=7))
    first = first_failure(compare_taps(case.transformers, case.reference, TOLERANCES[torch.float32], case.shared_taps))
    assert first is not None, f"broken {component} passed the oracle"
    assert first.name == expected_tap
