"""parity.diagnose: locate names the kind of bug at the first diverging tap, and says so when it cannot.

Every catalog bug gets the hypothesis the catalog names for it (Bug.hypothesis), in its component
check and inside the streamed whole model; bugs outside the catalog, written here as patches of the
port, get theirs; hand-made tensors cover the variants no port bug here produces. Correct ports get no
diagnosis over 20 seeds in fp32 and fp16, and noise gets "no known pattern", never a guess.
"""

import itertools
from dataclasses import replace

import pytest
import torch

from conftest import layout_config
from test_layouts import HARD_CODED
from parity.check import build_candidate, check_component
from parity.compare import TOLERANCES, compare_taps, first_failure
from parity.diagnose import HYPOTHESES, NO_PATTERN, Evidence, diagnose, diagnose_check, diagnose_layer, scoped
from parity.locate import locate
from reference import modeling
from reference.components import run_component, run_layer
from reference.inputs import CaseShape, make_inputs
from trt_layers import functional as F
from trt_layers import modeling as port
from trt_layers.bugs import BUGS, Bug, Shows
from trt_layers.network import OnnxBackend

FP32, FP16 = torch.float32, torch.float16
CASE, DECODE = CaseShape(batch=2, seq_len=7), CaseShape(batch=2, seq_len=7, past_len=5)
DIAGNOSED = set()  # the hypotheses some test below expects, for test_every_hypothesis_has_a_case


def _expects(*hypotheses: str) -> None:
    DIAGNOSED.update(hypotheses)


# ---------------------------------------------------------------- the catalog

_expects(*(bug.hypothesis for bug in BUGS.values() if bug.hypothesis is not None))  # TP: not diagnosed
CATALOG_CASES = [pytest.param(bug, layout, dtype, id=f"{bug.name}-{layout}-{str(dtype)[6:]}")
                 for layout, dtype in (("kvheads2", FP32), ("kvheads2", FP16), ("variant", FP32))
                 for bug in BUGS.values() if bug.shows.allows(bug.component, bug.shape, layout_config(layout))]


@pytest.mark.parametrize("bug, layout, dtype", CATALOG_CASES)
def test_catalog_bug_gets_its_diagnosis_at_its_tap(reference_model, bug, layout, dtype):
    report = locate(bug.component, reference_model(layout, dtype), OnnxBackend(), bug.shape, bug)
    diagnosis = report.diagnosis
    assert report.exit_code == 1 and report.first_failure.name == bug.first_tap, report.text()
    assert (diagnosis.tap, diagnosis.hypothesis) == (bug.first_tap, bug.hypothesis), report.text()
    assert f"diagnosis: {bug.hypothesis} at {bug.first_tap}: " in report.text()


@pytest.mark.parametrize("bug", [BUGS["rope_offset_forgotten"], BUGS["rope_interleaved"]], ids=lambda bug: bug.name)
def test_rope_bug_gets_its_diagnosis_at_the_end_of_the_context(tiny_model, bug):
    """The context's last 7 positions: angles that large still tell the layouts and the positions apart."""
    past_len = tiny_model.config.max_position_embeddings - 7
    report = locate("rope", tiny_model, OnnxBackend(), CaseShape(batch=2, seq_len=7, past_len=past_len), bug)
    assert report.diagnosis.hypothesis == bug.hypothesis, report.text()


STREAMED_CASES = [pytest.param(bug, shape, id=f"{bug.name}-{'decode' if shape.past_len else 'prefill'}")
                  for bug in BUGS.values() for shape in (CASE, DECODE)
                  if bug.shows.allows("causal_lm", shape, layout_config("kvheads2"))]


@pytest.mark.parametrize("bug, shape", STREAMED_CASES)
def test_catalog_bug_gets_its_diagnosis_inside_the_streamed_model(tiny_model, bug, shape):
    """Diagnosed at the first diverging tap inside the first diverging layer (or the head)."""
    report = locate("causal_lm", tiny_model, OnnxBackend(), shape, bug)
    if report.layer_detail is None:
        expected_tap = report.first_failure.name
    else:
        layer, taps = report.layer_detail
        expected_tap = f"layer_{layer}.{first_failure(taps).name}"
    assert report.exit_code == 1 and report.diagnosis.hypothesis == bug.hypothesis, report.text()
    assert report.diagnosis.tap == expected_tap, report.text()


# ---------------------------------------------------------------- bugs outside the catalog

def _rotate_half_sign_flipped(original):
    return lambda x: original(x) * -1.0  # cat(x2, -x1): rotates the other way


def _positions_off_by_one(original):
    return lambda position_ids: original(position_ids) + 1


def _v_appended_before_past(original):
    calls = itertools.count()  # attention appends K, then V

    def append_kv(past, new):
        return original(past, new) if next(calls) % 2 == 0 else F.concat([new, past], dim=2)
    return append_kv


def _scale_applied_twice(original):
    def attention_probs(scores, mask):
        head_dim = layout_config("kvheads2").head_dim
        return original(scores * head_dim**-0.5, mask)  # scores already carry 1/sqrt(d) (q scaled before Q K^T)
    return attention_probs


def _gate_up_by_weight_names(original):
    def mlp(x, weights, prefix, dtype):
        # HF's names read as TensorRT-LLM's: gate_proj is "mlp.gate" to a porter, but it is mlp.fc
        gate = port.linear(x, port.param(weights, f"{prefix}mlp.gate.weight", dtype))
        up = port.linear(x, port.param(weights, f"{prefix}mlp.fc.weight", dtype))
        act = F.silu(gate) * up
        return {"gate": gate, "up": up, "act": act,
                "down": port.linear(act, port.param(weights, f"{prefix}mlp.proj.weight", dtype))}
    return mlp


def _linear_in_fp16(original):
    return lambda x, weight: F.cast(F.cast(original(x, weight), "float16"), "float32")


def _down_proj_of_next_layer(original):
    def to_trtllm(state_dict, config):
        weights = original(state_dict, config)
        return {**weights, "transformer.layers.0.mlp.proj.weight": weights["transformer.layers.1.mlp.proj.weight"]}
    return to_trtllm


def _patched(name, target, patch, component, first_tap, hypothesis, shape=CASE) -> Bug:
    return Bug(name, name, target, patch, component, first_tap, Shows((component,)), shape, hypothesis=hypothesis)


PATCHED = [
    (_patched("rotate_half_sign_flipped", "trt_layers.modeling:rotate_half", _rotate_half_sign_flipped, "rope",
              "q_rot", "rope_layout"), "kvheads2", "sign flipped"),
    (_patched("positions_off_by_one", "trt_layers.modeling:rope_positions", _positions_off_by_one, "rope", "cos",
              "rope_positions"), "kvheads2", "off by +1"),
    (_patched("v_appended_before_past", "trt_layers.modeling:append_kv", _v_appended_before_past, "gqa_unmasked",
              "present_v", "sequence_order", DECODE), "kvheads2", "rotated by 5"),
    (_patched("scale_applied_twice", "trt_layers.modeling:attention_probs", _scale_applied_twice, "gqa_masked",
              "probs", "scale"), "kvheads2", "1/sqrt(head_dim)"),
    (_patched("gate_up_by_weight_names", "trt_layers.modeling:mlp", _gate_up_by_weight_names, "mlp", "gate",
              "other_tap"), "kvheads2", "as mlp.up"),
    (_patched("linear_in_fp16", "trt_layers.modeling:linear", _linear_in_fp16, "mlp", "gate", "lower_precision"),
     "kvheads2", "computed in float16"),
    (_patched("down_proj_of_next_layer", "trt_layers.weights:to_trtllm", _down_proj_of_next_layer, "mlp", "down",
              "other_weight"), "kvheads2", "model.layers.1.mlp.down_proj.weight in place of"),
]
_expects(*(bug.hypothesis for bug, _, _ in PATCHED))
_expects(*(port.hypothesis for port, _, _ in HARD_CODED))  # values hard-coded from DeciCoder-1b: test_layouts


@pytest.mark.parametrize("bug, layout, finding", PATCHED, ids=[bug.name for bug, _, _ in PATCHED])
def test_bug_outside_the_catalog_gets_its_diagnosis(reference_model, bug, layout, finding):
    report = locate(bug.component, reference_model(layout, FP32), OnnxBackend(), bug.shape, bug)
    diagnosis = report.diagnosis
    assert report.exit_code == 1 and report.first_failure.name == bug.first_tap, report.text()
    assert (diagnosis.hypothesis, diagnosis.tap) == (bug.hypothesis, bug.first_tap), report.text()
    assert finding in diagnosis.finding, diagnosis


# ---------------------------------------------------------------- variants made by hand

def _reversed_kv_heads(golden, inputs, model):
    return {"k_rep": modeling.repeat_kv(inputs["k"].flip(1), model.config.num_key_value_groups)}


def _heads_scaled(golden, inputs, model):
    return {"q_rot": golden["q_rot"] * torch.arange(1.0, 9.0)[None, :, None, None]}


def _diagonal_masked(golden, inputs, model):
    visible = torch.ones(7, 7, dtype=torch.bool).tril(-1)
    mask = torch.zeros(7, 7).masked_fill(~visible, torch.finfo(FP32).min)
    return {"probs": torch.softmax(golden["scores"] + mask, -1)}


def _decode_mask_unshifted(golden, inputs, model):
    visible = torch.ones(7, 12, dtype=torch.bool).tril(0)
    mask = torch.zeros(7, 12).masked_fill(~visible, torch.finfo(FP32).min)
    return {"attn.probs": torch.softmax(golden["attn.scores"] + mask, -1)}


def _cache_reversed(golden, inputs, model):
    return {"present_k": golden["present_k"].flip(2)}


def _o_proj_transposed(golden, inputs, model):
    context = golden["context"].transpose(1, 2).flatten(2)
    return {"out": context @ model.model.layers[0].self_attn.o_proj.weight}


def _gelu_for_silu(golden, inputs, model):
    return {"act": torch.nn.functional.gelu(golden["gate"]) * golden["up"]}


def _eps_of_a_hundredth(golden, inputs, model):
    norm = model.model.layers[0].input_layernorm
    x = inputs["hidden_states"]
    return {"out": norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2)}


HAND_MADE = [  # (component or "layer" (layer 0 in decode, every tap), change, hypothesis, the finding says)
    ("repeat_kv", _reversed_kv_heads, "head_order", "KV heads in reverse order"),
    ("rope", _heads_scaled, "scale", "each head scaled by its own factor (1, 2, 3"),
    ("gqa_masked", _diagonal_masked, "attention_mask", "the diagonal masked too"),
    ("layer", _decode_mask_unshifted, "attention_mask", "not offset by the 5 cached tokens"),
    ("gqa_unmasked", _cache_reversed, "sequence_order", "the tokens in reverse order"),
    ("gqa_masked", _o_proj_transposed, "other_weight", "o_proj.weight transposed in place of"),
    ("mlp", _gelu_for_silu, "activation", "GELU (erf) where SiLU belongs"),
    ("rmsnorm", _eps_of_a_hundredth, "norm_eps", "eps 0.01 where the config says 1e-05"),
]
_expects(*(hypothesis for _, _, hypothesis, _ in HAND_MADE))


def _golden(component: str, model, shape: CaseShape = CASE, dtype=FP32):
    """(inputs, golden taps) of a component check, or of layer 0 in decode with every tap ("layer")."""
    if component == "layer":
        inputs = make_inputs("decoder_layer", model.config, DECODE, dtype)
        past = (inputs["past_k"], inputs["past_v"])
        return inputs, run_layer(model, 0, inputs["hidden_states"], inputs["position_ids"], past)
    if component == "gqa_unmasked":
        shape = DECODE
    inputs = make_inputs(component, model.config, shape, dtype)
    return inputs, run_component(component, model, inputs)


def _diagnosis(component, model, inputs, golden, candidate):
    if component == "layer":
        results = compare_taps(golden, candidate, TOLERANCES[FP32])
        return diagnose_layer(model, 0, results, golden, candidate, inputs)
    return diagnose_check(component, model, inputs, golden, candidate, compare_taps(golden, candidate,
                                                                                     TOLERANCES[FP32]))


@pytest.mark.parametrize("component, change, hypothesis, finding", HAND_MADE, ids=[c.__name__[1:] for _, c, _, _ in
                                                                                    HAND_MADE])
def test_variant_made_by_hand_gets_its_diagnosis(tiny_model, component, change, hypothesis, finding):
    inputs, golden = _golden(component, tiny_model)
    diagnosis = _diagnosis(component, tiny_model, inputs, golden, {**golden, **change(golden, inputs, tiny_model)})
    assert diagnosis.hypothesis == hypothesis and finding in diagnosis.finding, diagnosis


def test_values_past_fp16_range_turned_infinite_are_an_overflow(tiny_model):
    _, golden = _golden("decoder_layer", tiny_model)
    large = golden["out"] * 1e5  # a residual stream with outliers past 65504
    candidate = torch.where(large.abs() > 65504, large.sign() * torch.inf, large)
    diagnosis = diagnose(Evidence("out", large, candidate, {}, tiny_model, 0))
    assert diagnosis.hypothesis == "overflow" and "fp16's range" in diagnosis.finding, diagnosis


_expects("overflow")


def test_every_hypothesis_has_a_case():
    assert DIAGNOSED - {NO_PATTERN} == set(HYPOTHESES), set(HYPOTHESES) ^ DIAGNOSED


# ---------------------------------------------------------------- no guesses

NOISY = [("rope", "q_rot"), ("repeat_kv", "k_rep"), ("gqa_unmasked", "present_k"), ("gqa_masked", "scores"),
         ("gqa_masked", "probs"), ("gqa_masked", "out"), ("mlp", "gate"), ("mlp", "act"), ("rmsnorm", "out"),
         ("decoder_layer", "out")]


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("size", [1.0, 0.1])
@pytest.mark.parametrize("component, tap", NOISY, ids=[f"{c}-{t}" for c, t in NOISY])
def test_noise_gets_no_known_pattern(reference_model, component, tap, size, dtype):
    """Unstructured noise, as large as the tap (size 1) or a tenth of it: no hypothesis may claim it."""
    model = reference_model("kvheads2", dtype)
    inputs, golden = _golden(component, model, dtype=dtype)
    noise = torch.randn(golden[tap].shape, generator=torch.Generator().manual_seed(1))
    noisy = (golden[tap].float() + noise * golden[tap].float().std() * size).to(dtype)
    candidate = {**golden, tap: noisy}
    diagnosis = diagnose_check(component, model, inputs, golden, candidate,
                               compare_taps(golden, candidate, TOLERANCES[dtype]))
    assert (diagnosis.tap, diagnosis.hypothesis) == (tap, NO_PATTERN), diagnosis
    assert "of elements beyond tolerance" in diagnosis.finding and "no hypothesis explains it" in diagnosis.finding


CHECKS = [("repeat_kv", CASE), ("rope", CASE), ("rope", DECODE), ("gqa_masked", CASE), ("gqa_unmasked", DECODE),
          ("mlp", CASE), ("rmsnorm", CASE), ("decoder_layer", CASE), ("decoder_layer", DECODE)]


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("component, shape", CHECKS,
                         ids=[f"{c}-{'decode' if s.past_len else 'prefill'}" for c, s in CHECKS])
def test_correct_port_gets_no_diagnosis_over_20_seeds(reference_model, component, shape, dtype):
    model = reference_model("kvheads2", dtype)
    engine = build_candidate(component, model, OnnxBackend(), decode=shape.past_len > 0 or component == "gqa_unmasked")
    for seed in range(20):
        check = check_component(component, model, engine, "onnx", replace(shape, seed=seed))
        assert check.first_failure is None and check.diagnosis is None, check.table()


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [CASE, DECODE], ids=["prefill", "decode"])
def test_correct_streamed_model_gets_no_diagnosis_over_20_seeds(reference_model, shape, dtype):
    model = reference_model("kvheads2", dtype)
    for seed in range(20):
        report = locate("causal_lm", model, OnnxBackend(), replace(shape, seed=seed))
        assert report.exit_code == 0 and report.diagnosis is None, report.text()


def test_scoped_names_follow_the_decoder_layer():
    assert [scoped(c, t) for c, t in [("rope", "q_rot"), ("mlp", "gate"), ("rmsnorm", "out"),
                                       ("decoder_layer", "post_norm")]] == [
        "attn.q_rot", "mlp.gate", "input_norm", "post_norm"]
