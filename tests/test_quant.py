"""Quantized ports (trt_layers.quantization): TensorRT-LLM's quantized checkpoint layout, read back through
dequantize, judged against the quantized golden (the reference computing with the weights the layout stores).

int8_wo, int4_wo and fp8: each layout's names, shapes, dtypes and values (TensorRT-LLM's symmetric_quantize,
ModelOpt's AWQ and fp8 exports), the port passing against the quantized golden (every component, the streamed
model, prefill and decode, fp32 and fp16, GQA and tiny-variant's layout) while diverging from full precision, and
each layout's catalog bugs caught at their taps. fp8 rounds activations too: the judge teacher-forces the golden
on the port's linear inputs, without which a correct fp16 port fails.
"""

import contextlib
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from parity.cli import main
from parity.locate import locate, plan_checks
from parity.compare import TOLERANCES
from parity import locate as locate_module
from parity.quantized import BUDGET_MARGIN, admit_cache_rounding, candidate_weights, teacher_forced
from reference.components import run_component
from reference.inputs import CaseShape, make_inputs
from trt_layers.bugs import BUGS
from trt_layers.network import OnnxBackend
from trt_layers.quantization import (GROUP_SIZE, MODES, RoundedCache, awq_input_scale, awq_quantize, fp8_values,
                                     pack_int4, quantized_golden, symmetric_quantize, unpack_int4)

INT8_WO, INT4_WO, FP8 = MODES["int8_wo"], MODES["int4_wo"], MODES["fp8"]


def test_symmetric_quantize_is_tensorrt_llms():
    """Per output channel max |w| / 128; round half away from zero (C's round); the positive maximum clips to 127."""
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.6015625], [-2.0, 0.0, 0.0, 0.0078125]])  # [out 2, in 4]
    q, scale = symmetric_quantize(weight, 8)
    assert scale.tolist() == [1 / 128, 2 / 128] and q.dtype == torch.int8 and q.shape == (4, 2)  # [in, out]
    assert q[:, 0].tolist() == [127, -64, 32, 77]  # 0.6015625 * 128 = 77.0; 1.0 * 128 = 128 clipped to 127
    assert q[:, 1].tolist() == [-128, 0, 0, 1]  # 0.0078125 * 64 = 0.5, rounded away from zero
    assert torch.equal(INT8_WO.layout.dequantized(weight), (q.float() * scale).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_int8_wo_layout_is_the_checkpoints(reference_model, dtype):
    """weight int8 [in, out], per_channel_scale [out] in the model dtype; the embedding and lm_head stay as they are."""
    model = reference_model("kvheads2", dtype)
    weights = candidate_weights(model, INT8_WO)()
    config = model.config
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    layer = "transformer.layers.1."
    expected = {"attention.qkv": (config.hidden_size, qkv_out), "attention.dense": (config.hidden_size,) * 2,
                "mlp.fc": (config.hidden_size, config.intermediate_size),
                "mlp.gate": (config.hidden_size, config.intermediate_size),
                "mlp.proj": (config.intermediate_size, config.hidden_size)}
    for linear, shape in expected.items():
        weight, scale = weights[f"{layer}{linear}.weight"], weights[f"{layer}{linear}.per_channel_scale"]
        assert (weight.dtype, tuple(weight.shape), scale.dtype, tuple(scale.shape)) == (torch.int8, shape, dtype,
                                                                                          (shape[1],)), linear
    assert weights["lm_head.weight"].dtype == dtype and weights["transformer.vocab_embedding.weight"].dtype == dtype
    assert weights[f"{layer}input_layernorm.weight"].dtype == dtype


def test_awq_quantize_is_modelopts():
    """Each group of 128 inputs: max |w / input scale| / 7, round half to even, clip to [-8, 7]; the input padded
    with zeros to whole groups; two output channels a byte, the even one in the low nibble."""
    weight = torch.zeros(2, 130)  # [out 2, in 130]: two groups once padded
    weight[0, 0], weight[0, 1], weight[0, 2], weight[1, 0], weight[0, 129] = 7.0, 0.5, -1.5, -3.5, 2.0
    q, scale = awq_quantize(weight, torch.ones(130))
    assert q.shape == (2, 256) and torch.equal(scale, torch.tensor([[1.0, 2 / 7], [0.5, 0.0]]))
    assert q[0, :3].tolist() == [7, 0, -2] and q[0, 129] == 7  # 0.5 -> 0 and -1.5 -> -2: half to even
    assert q[1, 0] == -7 and not q[:, 130:].any()  # -3.5 / 0.5; the padding stays 0
    q, _ = awq_quantize(weight, torch.full((130,), 0.5))  # the weight scaled up by 1 / input scale first
    assert q[0, :3].tolist() == [7, 0, -2]  # the same values: each group's scale doubles with it
    packed = pack_int4(torch.tensor([[-8, 7], [3, -1]], dtype=torch.int8))  # [out 2, in 2] -> [1, 2]
    assert packed.view(torch.uint8).tolist() == [[0x38, 0xF7]] and unpack_int4(packed).tolist() == [[-8, 7], [3, -1]]


def test_awq_input_scale_is_shared_by_the_fused_qkv():
    q, k = torch.randn(8, 4), torch.randn(2, 4)
    assert torch.equal(awq_input_scale([q, k]), awq_input_scale([torch.cat([q, k])]))
    assert not torch.equal(awq_input_scale([q]), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_int4_wo_layout_is_the_checkpoints(reference_model, dtype):
    """weight int8 [out / 2, in padded to 128], weights_scaling_factor [out, groups] and prequant_scaling_factor
    [in] in the model dtype (tiny's intermediate_size 368 pads to 384: three groups)."""
    model = reference_model("kvheads2", dtype)
    weights = candidate_weights(model, INT4_WO)()
    config = model.config
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    layer = "transformer.layers.1."
    expected = {"attention.qkv": (qkv_out, 128), "attention.dense": (128, 128), "mlp.fc": (368, 128),
                "mlp.gate": (368, 128), "mlp.proj": (128, 368)}  # [out, in]
    for linear, (out_features, in_features) in expected.items():
        groups = -(-in_features // GROUP_SIZE)
        stored = {suffix: weights[f"{layer}{linear}.{suffix}"] for suffix in INT4_WO.layout.suffixes}
        assert {suffix: (t.dtype, tuple(t.shape)) for suffix, t in stored.items()} == {
            "weight": (torch.int8, (out_features // 2, groups * GROUP_SIZE)),
            "weights_scaling_factor": (dtype, (out_features, groups)),
            "prequant_scaling_factor": (dtype, (in_features,))}, linear
    assert weights["lm_head.weight"].dtype == dtype and f"{layer}mlp.fc.per_channel_scale" not in weights


def test_fp8_values_are_iquantizelayers():
    """x / scale in fp32, rounded half to even to e4m3 (3 mantissa bits), saturated at 448."""
    x = torch.tensor([1.0625, 1.1875, -500.0, 0.001, 2.25])
    assert fp8_values(x, torch.tensor([0.5])).float().tolist() == [2.0, 2.5, -448.0, 0.001953125, 4.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_layout_is_the_checkpoints(reference_model, dtype):
    """weight e4m3 [out, in]; weights_scaling_factor and activation_scaling_factor [1] fp32 (FP8Linear's), the fused
    QKV's over q, k and v; the embedding and lm_head stay as they are."""
    model = reference_model("kvheads2", dtype)
    weights = candidate_weights(model, FP8)()
    layer = "transformer.layers.1."
    for linear, module in [("attention.qkv", None), ("attention.dense", "self_attn.o_proj"),
                           ("mlp.fc", "mlp.gate_proj"), ("mlp.gate", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")]:
        weight, scale = weights[f"{layer}{linear}.weight"], weights[f"{layer}{linear}.weights_scaling_factor"]
        input_scale = weights[f"{layer}{linear}.activation_scaling_factor"]
        assert (weight.dtype, scale.dtype, tuple(scale.shape), input_scale.dtype, tuple(input_scale.shape)) == (
            torch.float8_e4m3fn, torch.float32, (1,), torch.float32, (1,)), linear
        if module is not None:
            full = model.model.layers[1].get_submodule(module).weight
            assert weight.shape == full.shape and torch.equal(scale, full.float().abs().amax().reshape(1) / 448)
    attention = model.model.layers[1].self_attn
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(weights[f"{layer}attention.qkv.weights_scaling_factor"],
                       fused.float().abs().amax().reshape(1) / 448)
    assert weights["lm_head.weight"].dtype == dtype and weights["transformer.vocab_embedding.weight"].dtype == dtype


def test_fp8_golden_forces_only_a_passing_input(tiny_model):
    """Teacher forcing: mlp.down_proj reads the candidate's act where it passes against the golden's (a last-ulp
    change, rounded there as the port rounds it) and its own where it does not."""
    golden = quantized_golden(tiny_model, FP8)
    inputs = make_inputs("mlp", tiny_model.config, CaseShape(batch=2, seq_len=7), torch.float32)
    own = run_component("mlp", golden, inputs)
    down_proj = golden.model.layers[0].mlp.down_proj
    for offset, forced in [(1e-6, True), (1.0, False)]:
        act = own["act"] + offset
        with teacher_forced(golden, "mlp", {"act": act}, TOLERANCES[torch.float32]):
            down = run_component("mlp", golden, inputs)["down"]
        assert torch.equal(down, down_proj(act if forced else own["act"])), offset
    assert not golden.forced_inputs


def test_fp8_fp16_port_fails_without_teacher_forcing(reference_model, monkeypatch):
    """A correct fp16 port: its linear inputs differ from the golden's in last ulps, some on an e4m3 rounding
    boundary; rounded on the golden's own inputs, the golden is a whole step off there (seed 0: layer 0's out)."""
    model = reference_model("kvheads2", torch.float16)
    golden, shape = quantized_golden(model, FP8), CaseShape(batch=2, seq_len=7)
    assert locate("causal_lm", golden, OnnxBackend(), shape, weights=candidate_weights(model, FP8)).exit_code == 0
    monkeypatch.setattr(locate_module, "teacher_forced", lambda *args, **kwargs: contextlib.nullcontext())
    report = locate("causal_lm", golden, OnnxBackend(), shape, weights=candidate_weights(model, FP8))
    assert report.exit_code == 1, report.text()

CHECKS = plan_checks(None, None, batch=2, seq_len=7, past_len=None)


# Each mode alone in fp32 and fp16, GQA and tiny-variant's layout; weight and KV cache modes together in fp16.
SINGLE = [(mode, layout, dtype) for mode in MODES.values() if "+" not in mode.name for layout in ("kvheads2", "variant")
          for dtype in (torch.float32, torch.float16)]
TOGETHER = [(mode, "kvheads2", torch.float16) for mode in MODES.values() if "+" in mode.name]


# fp8 with a KV cache mode, and tiny-variant's fp32, with -m slow (the default run keeps tiny-variant in fp16, where
# rounding is hardest on the judge, and tiny in both dtypes).
SLOW = [(mode, layout, dtype) for mode, layout, dtype in SINGLE + TOGETHER
        if mode.name.startswith("fp8+") or (layout, dtype) == ("variant", torch.float32)]


@pytest.mark.parametrize("check", CHECKS, ids=[check.label.replace(" ", "-") for check in CHECKS])
@pytest.mark.parametrize("mode, layout, dtype", [
    pytest.param(mode, layout, dtype, id=f"{mode.name}-{layout}-{str(dtype)[6:]}",
                 marks=[pytest.mark.slow] if (mode, layout, dtype) in SLOW else [])
    for mode, layout, dtype in SINGLE + TOGETHER])
def test_port_matches_the_quantized_golden_within_budget(reference_model, mode, check, layout, dtype):
    """Exit 0 against the quantized golden, and no tap beyond its budget against full precision."""
    model = reference_model(layout, dtype)
    report = locate(check.component, quantized_golden(model, mode), OnnxBackend(), check.shape,
                    weights=candidate_weights(model, mode), full_precision=model)
    assert report.exit_code == 0, report.text()
    assert "beyond budget" not in {b.verdict for b in report.check.budget}, report.text()


FIRST_QUANTIZED = [(INT8_WO, "mlp", "gate"), (INT4_WO, "mlp", "gate"), (MODES["int8_kv"], "gqa_masked", "present_k"),
                   (MODES["fp8_kv"], "gqa_masked", "present_k")]  # the first tap each mode changes


@pytest.mark.parametrize("mode, component, tap", FIRST_QUANTIZED, ids=[mode.name for mode, _, _ in FIRST_QUANTIZED])
def test_port_diverges_from_full_precision(tiny_model, mode, component, tap):
    report = locate(component, tiny_model, OnnxBackend(), CaseShape(), weights=candidate_weights(tiny_model, mode))
    assert report.exit_code == 1 and report.first_failure.name == tap, report.text()


@pytest.mark.parametrize("mode", [MODES["int8_kv"], MODES["fp8_kv"]], ids=["int8_kv", "fp8_kv"])
def test_kv_cache_scales_are_the_checkpoints(tiny_model, mode):
    """transformer.layers.{i}.attention.kv_cache_scaling_factor, [1] fp32: max |K|, |V| over the calibration
    prompt / the format's largest value; the cache holds x / scale in the format, read back times it."""
    weights = candidate_weights(tiny_model, mode)()
    scales = [weights[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] for i in range(2)]
    assert all(s.dtype == torch.float32 and s.shape == (1,) and s.item() > 0 for s in scales)
    x = torch.tensor([1.0, -2.5, 3.0, 1000.0])
    stored = mode.kv.stored(x, 0.5)
    expected = [1.0, -2.5, 3.0, 63.5] if mode.kv.dtype == "int8" else [1.0, -2.5, 3.0, 224.0]  # saturated
    assert stored.tolist() == expected
    assert INT4_WO.layout is not None and "transformer.layers.0.mlp.fc.per_channel_scale" not in weights


def test_quantized_golden_shares_the_models_weights_and_leaves_it_full_precision(tiny_model):
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    golden = quantized_golden(tiny_model, INT8_WO)
    q_proj = golden.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.weight, INT8_WO.layout.dequantized(before["model.layers.0.self_attn.q_proj.weight"]))
    assert q_proj.parametrizations.weight.original is tiny_model.model.layers[0].self_attn.q_proj.weight
    assert golden.lm_head.weight is tiny_model.lm_head.weight
    after = tiny_model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_int4_quantized_golden_scales_each_linears_input(tiny_model):
    """(x * pre-quant scale) @ dequantized^T, the scale the fused qkv's: q, k and v share it."""
    attention = tiny_model.model.layers[0].self_attn
    input_scale = awq_input_scale([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    x = torch.randn(1, 3, tiny_model.config.hidden_size)
    k_proj = quantized_golden(tiny_model, INT4_WO).model.layers[0].self_attn.k_proj
    expected = torch.nn.functional.linear(x * input_scale, INT4_WO.layout.dequantized(attention.k_proj.weight,
                                                                                        input_scale))
    assert torch.equal(k_proj(x), expected) and not torch.allclose(k_proj(x), attention.k_proj(x), atol=1e-2)


def test_cache_rounding_admits_the_neighbouring_step_of_a_value_on_a_boundary_only():
    """A K value a last ulp below a rounding boundary rounds down in the golden and may round up in a correct port
    (whose K differs in its last ulps): admitted. A step off elsewhere is not: the error left is that step."""
    cache = RoundedCache(MODES["int8_kv"].kv, 0.5)
    k = torch.tensor([0.2499999, 1.0, -3.0]).reshape(1, 1, 3, 1)  # [b, kv_heads, new tokens, d]
    golden = {"present_k": cache(k, "k")}
    assert golden["present_k"].flatten().tolist() == [0.0, 1.0, -3.0]
    admitted = admit_cache_rounding(golden, {"present_k": torch.tensor([0.5, 1.0, -3.0]).reshape(1, 1, 3, 1)},
                                    SimpleNamespace(kv_cache=cache), {"k": "present_k"}, TOLERANCES[torch.float32])
    assert admitted["present_k"].flatten().tolist() == [0.5, 1.0, -3.0]
    admitted = admit_cache_rounding(golden, {"present_k": torch.tensor([0.0, 1.5, -3.0]).reshape(1, 1, 3, 1)},
                                    SimpleNamespace(kv_cache=cache), {"k": "present_k"}, TOLERANCES[torch.float32])
    assert admitted["present_k"].flatten().tolist() == [0.0, 1.0, -3.0]


@pytest.mark.parametrize("seed", [3, 6])
def test_int8_kv_fp16_cache_rounding_a_last_ulp_apart_passes(reference_model, seed):
    """Seeds at which a correct port's cache held the other rounding of a K or V value on a boundary (64 tokens,
    fp16): failed before the judge admitted it."""
    model = reference_model("kvheads2", torch.float16)
    mode = MODES["int8_kv"]
    report = locate("causal_lm", quantized_golden(model, mode), OnnxBackend(), CaseShape(batch=2, seq_len=64,
                                                                                         seed=seed),
                    weights=candidate_weights(model, mode))
    assert report.exit_code == 0, report.text()


QUANT_BUGS = [bug for bug in BUGS.values() if bug.shows.quant is not None]


@pytest.mark.parametrize("check", CHECKS, ids=[check.label.replace(" ", "-") for check in CHECKS])
@pytest.mark.parametrize("bug", QUANT_BUGS, ids=lambda bug: bug.name)
def test_quantized_layout_bug_is_caught_where_it_shows(tiny_model, bug, check):
    """Exit 1 in every check the bug can show in, at the catalog's tap in its own check, diagnosed, beyond budget;
    a pass elsewhere."""
    mode = MODES[bug.shows.quant]
    report = locate(check.component, quantized_golden(tiny_model, mode), OnnxBackend(), check.shape, bug,
                    weights=candidate_weights(tiny_model, mode), full_precision=tiny_model)
    shows = bug.shows.allows(check.component, check.shape, tiny_model.config, mode.name)
    assert report.exit_code == int(shows), report.text()
    if check.component == bug.component:
        budget = {b.name: b.verdict for b in report.check.budget}
        assert report.first_failure.name == bug.first_tap and budget[bug.first_tap] == "beyond budget", report.text()
        assert report.diagnosis.hypothesis == bug.hypothesis, report.text()


def test_quantized_layout_bug_without_quant_is_refused(capsys):
    assert main(["locate", "--component", "mlp", "--inject", "int8_scale_missing"]) == 2
    assert "with --quant int8_wo" in capsys.readouterr().err


def test_quant_cli_reports_the_budget(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["locate", "--component", "causal_lm", "--quant", "int8_wo", "--past-len", "5", "--json",
                 str(report), "--markdown", str(tmp_path / "report.md")]) == 0
    out = capsys.readouterr().out
    assert "quantized: int8_wo (TensorRT-LLM W8A16)" in out
    assert "against full precision (max |x - full precision|" in out
    budget = json.loads(report.read_text())["budget"]
    assert budget["margin"] == BUDGET_MARGIN and {b["verdict"] for b in budget["taps"]} == {
        "matches the quantized golden"}
    assert [b["name"] for b in budget["taps"]][:2] == ["embed", "layer_0.present_k"]
    assert "| `layer_1.out` |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("quant, component", [("fp8", "rope"), ("int8_wo", "rmsnorm"), ("fp8_kv", "mlp")])
def test_quant_on_a_component_it_leaves_unquantized_is_bad_usage(capsys, quant, component):
    """A PASS there would check nothing quantized."""
    assert main(["locate", "--component", component, "--quant", quant]) == 2
    assert f"--quant {quant} quantizes nothing {component} computes" in capsys.readouterr().err


def test_quant_with_an_external_candidate_is_bad_usage(tmp_path, capsys):
    graph = tmp_path / "port.onnx"
    graph.write_bytes(b"")
    assert main(["locate", "--candidate", str(graph), "--quant", "int8_wo"]) == 2
    assert "--quant quantizes the trt_layers port's weights" in capsys.readouterr().err


def test_int4_wo_refuses_an_odd_output_size(tiny_config):
    """Two output channels a byte: an odd intermediate_size cannot be stored (exit 2 in the command line)."""
    odd = replace(tiny_config, intermediate_size=367)
    assert INT4_WO.unsupported(odd) == "INT4 packs two output channels a byte: intermediate_size 367 odd"
    assert INT4_WO.unsupported(tiny_config) is None and INT8_WO.unsupported(odd) is None
