"""fp16 on the onnx backend is fp16 arithmetic: every op's result is rounded to fp16, as in an fp16 engine.

ONNX Runtime's CPU provider computes an fp16 graph in fp32 from end to end unless made not to
(``trt_layers.onnx_fp16`` says how it is made to). These tests measure that each op rounds, that
ONNX Runtime keeps the rounding, and that ports missing an fp32 upcast fail in fp16 where
activations reach fp16's range, while the port as written passes on the same inputs.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from unittest import mock

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from test_lowering import run_lowered

from parity.check import build_candidate
from parity.compare import TOLERANCES, compare_taps, first_failure, format_table
from reference.components import run_component
from reference.inputs import CaseShape, make_inputs
from reference.taps import component_outputs
from trt_layers import functional as F
from trt_layers import lowering, onnx_fp16
from trt_layers.modeling import param
from trt_layers.network import OnnxBackend, to_feed

# What ONNX Runtime computes without the rewrite: fp32 from end to end, fp16 at the boundaries.
fp32_inside = mock.patch.object(onnx_fp16, "round_each_op_to_fp16", lambda model: model)


def fp16(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16)


def test_each_op_rounds_to_fp16():
    """300^2 overflows fp16 (max 65504) and 1024 + 0.25 rounds to 1024: fp16 per op gives inf and 0
    where fp32 inside the graph gives back x and 0.25."""
    x, y = fp16(300.0, 1024.0), fp16(0.25, 0.25)

    def graph(i):
        return {"square_over_x": i["x"] * i["x"] / i["x"], "absorbed": i["x"] + i["y"] - i["x"]}

    per_op = run_lowered(graph, x=x, y=y)
    with np.errstate(over="ignore"):
        a, b = x.numpy(), y.numpy()
        np.testing.assert_array_equal(per_op["square_over_x"], a * a / a)  # numpy rounds each fp16 op
        np.testing.assert_array_equal(per_op["absorbed"], a + b - a)
    np.testing.assert_array_equal(per_op["square_over_x"], [np.inf, np.inf])
    np.testing.assert_array_equal(per_op["absorbed"], [0.25, 0.0])
    with fp32_inside:
        inside = run_lowered(graph, x=x, y=y)
    np.testing.assert_array_equal(inside["square_over_x"], [300.0, 1024.0])
    np.testing.assert_array_equal(inside["absorbed"], [0.25, 0.25])


@pytest.mark.parametrize("component", ["rmsnorm", "gqa_masked", "gqa_unmasked"])
def test_rounding_agrees_with_onnx_reference_evaluator(reference_model, component):
    """onnx.reference evaluates the lowering's own fp16 graph in numpy, whose fp16 ops each round:
    every tap agrees bit for bit. (Not the MLP: onnx.reference's fp16 sigmoid has fp16 intermediates.)"""
    model = reference_model("kvheads2", torch.float16)
    decode = component == "gqa_unmasked"
    engine = build_candidate(component, model, OnnxBackend(), decode)
    with fp32_inside:
        fp16_graph = engine.model  # the lowering's graph, not rewritten
    feed = to_feed(make_inputs(component, model.config, CaseShape(2, 16, 5 if decode else 0), torch.float16))
    actual = engine.infer(feed)
    for output, expected in zip(fp16_graph.graph.output, ReferenceEvaluator(fp16_graph).run(None, feed)):
        np.testing.assert_array_equal(actual[output.name], expected, err_msg=output.name)


def test_an_onnxruntime_that_folds_the_rounding_away_is_refused():
    assert OnnxBackend.fp16_rounding_gap() is None
    folding = OnnxBackend.session_options()
    folding.add_session_config_entry("optimization.enable_cast_chain_elimination", "1")
    assert "cannot compute fp16 per op" in onnx_fp16.rounding_gap(folding)
    with mock.patch.object(OnnxBackend, "fp16_rounding_gap", staticmethod(lambda: "it folds")):
        with pytest.raises(RuntimeError, match="fp16 on the onnx backend: it folds"):
            run_lowered(lambda i: {"y": i["x"] * i["x"]}, x=fp16(1.0))
        run_lowered(lambda i: {"y": i["x"] * i["x"]}, x=torch.ones(1))  # fp32 graphs are not affected


def _count_casts(model: onnx.ModelProto, to: int) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Cast" and any(a.i == to for a in n.attribute))


def test_onnxruntime_keeps_every_rounding(reference_model, tmp_path):
    """In the graph ONNX Runtime optimizes and runs, every fp16 rounding of the rewrite is still
    there, no float op reads or writes fp16, and ONNX Runtime inserted no casts of its own."""
    model = reference_model("kvheads2", torch.float16)
    graph = build_candidate("decoder_layer", model, OnnxBackend(), decode=False).model
    options = OnnxBackend.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    roundings = _count_casts(graph, onnx.TensorProto.FLOAT16)
    assert roundings > 50 and _count_casts(optimized, onnx.TensorProto.FLOAT16) == roundings
    assert not [n.name for n in optimized.graph.node if n.name.startswith("InsertedPrecisionFreeCast")]
    fp16_values = onnx_fp16.fp16_values(optimized)
    fp16_ops = [n.op_type for n in optimized.graph.node if n.op_type not in ("Cast", "Identity")
                and fp16_values.intersection([*n.input, *n.output])]
    assert not fp16_ops, f"ops computing on fp16 inside ONNX Runtime: {sorted(set(fp16_ops))}"


# ---------------------------------------------------------------- ports missing an fp32 upcast

def rmsnorm_in_fp16(x, weights, name, config, dtype):
    """RMSNorm without the fp32 upcast: x^2 overflows fp16 once |x| > 256."""
    variance = (x * x).mean(-1, keepdim=True)
    return x / (variance + config.rms_norm_eps).sqrt() * param(weights, name, dtype)


def _spelled_softmax(x):
    """exp(x) / sum(exp(x)) over the last dim, in x's dtype: exp overflows fp16 past x = 11.1, fp32 past 88.7.
    (ONNX nodes: the port's vocabulary has no exp or sum.)"""
    net = lowering.default_net()
    exp = net.add_node("Exp", [x], x.dtype, x.shape)
    total = net.add_node("ReduceSum", [exp, lowering.constant(np.asarray([-1]))], exp.dtype, (*exp.shape[:-1], 1),
                         keepdims=1)
    return exp / total


def probs_spelled_in_fp32(scores, mask):
    """A softmax spelled out, with the fp32 upcast: fine up to scores of 88."""
    scores_fp32 = F.cast(scores, "float32") + mask
    return F.cast(_spelled_softmax(scores_fp32), scores.dtype)


def probs_spelled_in_fp16(scores, mask):
    """The same softmax without the fp32 upcast: scores above 11 overflow its exp."""
    return _spelled_softmax(scores + F.cast(mask, scores.dtype))


def _rmsnorm_with_outliers(inputs):
    """Every third token an outlier of RMS 300, as real residual streams carry."""
    hidden = inputs["hidden_states"].clone()  # [b, s, hidden]
    outliers = torch.randn(hidden[:, ::3].shape, generator=torch.Generator().manual_seed(1)) * 300
    hidden[:, ::3] = outliers.to(hidden.dtype)
    return {"hidden_states": hidden}


def _attention_with_large_scores(inputs):
    """Hidden states x2: attention scores up to ~16, past fp16's exp range, well within fp32's."""
    return {**inputs, "hidden_states": inputs["hidden_states"] * 2}


@dataclass(frozen=True)
class MissingUpcast:
    component: str
    replaced: str  # the trt_layers.modeling function the port replaces
    broken: Callable  # without the fp32 upcast
    kept: Callable | None  # the same code with the upcast (None: the port as written)
    inputs: Callable  # make_inputs' inputs -> inputs where the upcast matters
    first_tap: str


MISSING_UPCASTS = {
    "rmsnorm_fp16_square": MissingUpcast("rmsnorm", "rmsnorm", rmsnorm_in_fp16, None, _rmsnorm_with_outliers, "out"),
    "softmax_fp16_exp": MissingUpcast("gqa_masked", "attention_probs", probs_spelled_in_fp16, probs_spelled_in_fp32,
                                      _attention_with_large_scores, "probs"),
}


def _check(port: MissingUpcast, reference_model, replacement, rounding=nullcontext()):
    model = reference_model("kvheads2", torch.float16)
    inputs = port.inputs(make_inputs(port.component, model.config, CaseShape(batch=2, seq_len=16), torch.float16))
    patch = mock.patch(f"trt_layers.modeling.{port.replaced}", replacement) if replacement else nullcontext()
    with patch, rounding:
        engine = build_candidate(port.component, model, OnnxBackend(), decode=False)
    golden = run_component(port.component, model, inputs)
    order = component_outputs(port.component, model.config.num_hidden_layers)
    return compare_taps(golden, engine.infer(to_feed(inputs)), TOLERANCES[torch.float16], order)


@pytest.mark.parametrize("name", MISSING_UPCASTS)
def test_port_missing_fp32_upcast_fails_in_fp16(reference_model, name):
    port = MISSING_UPCASTS[name]
    results = _check(port, reference_model, port.broken)
    first = first_failure(results)
    message = format_table(results, f"{name}: must fail at {port.first_tap}")
    assert first is not None and first.name == port.first_tap, message


@pytest.mark.parametrize("name", MISSING_UPCASTS)
def test_port_keeping_fp32_upcast_passes_on_the_same_inputs(reference_model, name):
    results = _check(MISSING_UPCASTS[name], reference_model, MISSING_UPCASTS[name].kept)
    assert first_failure(results) is None, format_table(results, name)


@pytest.mark.parametrize("name", MISSING_UPCASTS)
def test_fp32_inside_the_graph_hides_the_missing_upcast(reference_model, name):
    """Why per-op rounding is needed: ONNX Runtime's own fp16 execution passes the broken port."""
    results = _check(MISSING_UPCASTS[name], reference_model, MISSING_UPCASTS[name].broken, rounding=fp32_inside)
    assert first_failure(results) is None, format_table(results, name)
