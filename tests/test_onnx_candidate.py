"""locate --candidate: a graph this project did not write (transformers' Llama, exported by
torch.onnx's dynamo exporter), its taps mapped by module path or by --tap-map, faults localized."""

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from parity.check import UsageError
from parity.compare import first_failure
from parity.diagnose import NO_PATTERN
from parity.export import export_llama
from parity.export_edits import FAULTS, find_node, renamed, sigmoid_to_tanh
from parity.cli import main
from conftest import head_block_concats
from parity import locate as locate_module
from parity import onnx_port
from parity.onnx_port import OnnxPort, golden_order, locate_onnx
from reference import DeciCoderConfig, random_model
from reference.inputs import CaseShape, make_inputs

SHAPE = CaseShape(batch=2, seq_len=7, past_len=0)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    return onnx.load(str(export_llama(model, tmp_path_factory.mktemp("export") / "llama.onnx")))


@pytest.fixture(scope="module")
def deep_model():
    """Four layers: layers 1-3 have one structure and share one session (layer 0 computes what they reuse)."""
    return random_model(replace(DeciCoderConfig.from_preset("tiny"), num_hidden_layers=4), seed=0)


@pytest.fixture(scope="module")
def deep_export(deep_model, tmp_path_factory):
    return onnx.load(str(export_llama(deep_model, tmp_path_factory.mktemp("export") / "llama.onnx")))


def _saved(model, tmp_path, edit=None, name="port.onnx"):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if edit is not None:
        edit(copy)
    path = tmp_path / name
    onnx.save(copy, str(path))
    return path


def _localized(report) -> tuple[int, str]:
    """(layer, tap inside it) where a streamed report diverges first."""
    layer, taps = report.layer_detail
    assert report.first_failure.name == f"layer_{layer}.out", report.text()
    return layer, first_failure(taps).name


def test_clean_export_streams_and_passes(model, export, tmp_path):
    report = locate_onnx(model, OnnxPort(_saved(export, tmp_path)), SHAPE)
    assert report.exit_code == 0, report.text()
    assert [r.name for r in report.check.results] == ["embed", "layer_0.out", "layer_1.out", "final_norm", "logits"]
    assert "streamed" in report.notes[0] and "layer_{i}.attn.q_rot" in report.notes[-1]


# What each fault's first diverging mapped tap shows (parity.diagnose). q * sin where q * cos belongs fits
# no hypothesis: said so, not guessed.
DIAGNOSES = {"swap_rope_cos_for_sin": NO_PATTERN, "change_norm_eps": "norm_eps", "drop_mask_add": "attention_mask",
             "sigmoid_to_tanh": "activation"}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_fault_is_localized_to_its_layer_and_tap_and_diagnosed(model, export, tmp_path, fault):
    report = locate_onnx(model, OnnxPort(_saved(export, tmp_path, fault)), SHAPE)
    layer, tap = FAULTS[fault]
    assert report.exit_code == 1 and _localized(report) == (layer, tap), report.text()
    assert (report.diagnosis.tap, report.diagnosis.hypothesis) == (f"layer_{layer}.{tap}",
                                                                   DIAGNOSES[fault.__name__]), report.text()


def test_attention_runs_in_head_blocks_with_the_graphs_bits(model, export, tmp_path, block_rewrites):
    """torch.onnx's attention (Q K^T, mask add, softmax, IsNaN/Where, P V) runs in head blocks in
    --candidate's sessions (trt_layers.attention_blocks); the graph run whole gives the same bits."""
    path = _saved(export, tmp_path)
    port = OnnxPort(path)
    feed = port.feed(make_inputs("causal_lm", model.config, SHAPE, torch.float32))
    logits_name = export.graph.output[0].name
    logits = port.run(feed, [logits_name])[logits_name]
    assert head_block_concats(block_rewrites[0]) == 2  # one per layer
    whole = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([logits_name], feed)[0]
    np.testing.assert_array_equal(logits, whole)


def test_the_head_is_judged_a_few_tokens_at_a_time(model, export, tmp_path, monkeypatch):
    """Of the seven tokens, the candidate's head runs six then one, the golden's three at a time: a clean
    head passes, and lm_head's weight scaled fails at logits alone."""
    token = 4 * SHAPE.batch * model.config.vocab_size
    monkeypatch.setattr(locate_module, "HEAD_BLOCK_BYTES", 3 * token)
    monkeypatch.setattr(onnx_port, "CANDIDATE_HEAD_BLOCK_BYTES", 6 * token)
    assert locate_onnx(model, OnnxPort(_saved(export, tmp_path)), SHAPE).exit_code == 0

    def scale_lm_head(graph):
        matmul = find_node(graph.graph, "MatMul", "lm_head")
        weight = next(t for t in graph.graph.initializer if t.name == matmul.input[1])
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))

    report = locate_onnx(model, OnnxPort(_saved(export, tmp_path, scale_lm_head, "head.onnx")), SHAPE)
    assert [r.name for r in report.check.results if not r.passed] == ["logits"], report.text()


def test_graph_without_layer_cuts_runs_whole(model, export, tmp_path):
    port = OnnxPort(_saved(export, tmp_path, sigmoid_to_tanh))
    mapped = {tap: tensor for tap, tensor in port.tap_map(golden_order(model.config), 2, None).items()
              if tap != "layer_1.out"}
    report = locate_onnx(model, port, SHAPE, mapped)
    assert "ran whole" in report.notes[0] and report.first_failure.name == "layer_1.mlp.act", report.text()


def test_renamed_copy_needs_and_takes_a_tap_map(model, export, tmp_path):
    clean = OnnxPort(_saved(export, tmp_path))
    mapped = clean.tap_map(golden_order(model.config), model.config.num_hidden_layers, None)
    copy = onnx.ModelProto()
    copy.CopyFrom(export)
    names = renamed(copy)
    tap_map = tmp_path / "map.json"
    tap_map.write_text(json.dumps({tap: names.get(tensor, tensor) for tap, tensor in mapped.items()}))
    with pytest.raises(UsageError, match="give --tap-map"):
        OnnxPort(_saved(copy, tmp_path, name="renamed.onnx")).tap_map(golden_order(model.config), 2, None)
    report = locate_onnx(model, OnnxPort(_saved(copy, tmp_path, name="renamed.onnx")), SHAPE, tap_map=str(tap_map))
    assert report.exit_code == 0, report.text()
    faulty = _saved(copy, tmp_path, _second_sigmoid_to_tanh, name="renamed_bad.onnx")
    report = locate_onnx(model, OnnxPort(faulty), SHAPE, tap_map=str(tap_map))
    assert _localized(report) == (1, "mlp.act"), report.text()


def _second_sigmoid_to_tanh(model):  # layer 1's SiLU, found by order where names say nothing
    [n for n in model.graph.node if n.op_type == "Sigmoid"][1].op_type = "Tanh"


def test_cli_exit_codes(model, export, tmp_path):
    clean, faulty = _saved(export, tmp_path), _saved(export, tmp_path, sigmoid_to_tanh, "bad.onnx")
    assert main(["locate", "--model", "tiny", "--candidate", str(clean)]) == 0
    assert main(["locate", "--model", "tiny", "--candidate", str(faulty)]) == 1
    assert main(["locate", "--model", "tiny", "--candidate", str(tmp_path / "none.onnx")]) == 2
    assert main(["locate", "--model", "tiny", "--candidate", str(clean), "--phase", "decode"]) == 2
    assert main(["locate", "--model", "tiny-variant", "--candidate", str(clean)]) == 2  # another model's graph
    assert main(["locate", "--model", "tiny", "--candidate", str(clean), "--dtype", "fp16"]) == 2  # fp32 weights
    assert main(["locate", "--model", "tiny", "--candidate", str(clean), "--dtype", "bf16"]) == 2
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"layer_{i}.mlp.act": "no_such_tensor"}))
    assert main(["locate", "--model", "tiny", "--candidate", str(clean), "--tap-map", str(bad_map)]) == 2
    input_map = tmp_path / "input.json"  # a cut at a graph input is a wrong map, not a broken port
    input_map.write_text(json.dumps({"layer_0.out": "input_ids"}))
    assert main(["locate", "--model", "tiny", "--candidate", str(clean), "--tap-map", str(input_map)]) == 2
    assert main(["locate", "--model", "tiny", "--candidate", str(tmp_path / ("x" * 300 + ".onnx"))]) == 2


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_damaged_weights_file_is_bad_usage_found_before_the_golden(export, tmp_path, capsys, monkeypatch, damage):
    path, copy = tmp_path / "ext.onnx", onnx.ModelProto()
    copy.CopyFrom(export)  # saving with external data edits the proto it is given
    onnx.save(copy, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])
    monkeypatch.setattr("parity.cli.load_model_as", lambda *a: pytest.fail("the golden was built"))
    assert main(["locate", "--model", "tiny", "--candidate", str(path)]) == 2
    assert f"weights file {data} is {damage}" in capsys.readouterr().err


def test_layers_of_one_structure_share_a_session_fed_their_own_weights(deep_model, deep_export, tmp_path):
    clean = OnnxPort(_saved(deep_export, tmp_path))
    assert locate_onnx(deep_model, clean, SHAPE).exit_code == 0
    assert len(clean._shared) == 2  # layer 0's session, and the one layers 1-3 share

    def layer_2_tanh(model):
        [n for n in model.graph.node if n.op_type == "Sigmoid"][2].op_type = "Tanh"

    faulty = OnnxPort(_saved(deep_export, tmp_path, layer_2_tanh, "layer2.onnx"))
    report = locate_onnx(deep_model, faulty, SHAPE)
    assert _localized(report) == (2, "mlp.act") and len(faulty._shared) == 3, report.text()
    assert [r.name for r in report.check.results if not r.passed] == ["layer_2.out"]


def test_a_layer_with_other_weights_is_run_with_them(deep_model, deep_export, tmp_path):
    """Sharing a session must not share weights: layer 3's gate_proj scaled is caught in layer 3."""
    def scale_layer_3_gate(model):
        matmul = find_node(model.graph, "MatMul", "model.layers.3.mlp.gate_proj")
        weight = next(t for t in model.graph.initializer if t.name == matmul.input[1])
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))

    port = OnnxPort(_saved(deep_export, tmp_path, scale_layer_3_gate, "gate.onnx"))
    report = locate_onnx(deep_model, port, SHAPE)
    assert _localized(report) == (3, "mlp.gate") and len(port._shared) == 2, report.text()


@pytest.mark.tensorrt
def test_engine_built_from_the_export_is_mapped_through_it(model, export, tmp_path):
    """A TensorRT engine built from the export with its mapped tensors marked: judged through the ONNX
    graph beside it; the SiLU fault built into another engine is found at layer_1.mlp.act."""
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath,
                                        Profile, SaveEngine)

    from parity.onnx_port import locate_whole
    from parity.trt_port import TrtEnginePort

    for name, fault in (("clean", None), ("tanh", sigmoid_to_tanh)):
        graph = _saved(export, tmp_path, fault, f"{name}.onnx")
        mapped = OnnxPort(graph).tap_map(golden_order(model.config), model.config.num_hidden_layers, None)
        profile = Profile()
        for input_name in ("input_ids", "position_ids"):
            profile.add(input_name, min=(1, 1), opt=(2, 7), max=(2, 16))
        network = ModifyNetworkOutputs(NetworkFromOnnxPath(str(graph)), outputs=sorted(set(mapped.values())))
        SaveEngine(EngineFromNetwork(network, CreateConfig(tf32=False, profiles=[profile])),
                   str(graph.with_suffix(".engine")))()
        port = TrtEnginePort(graph.with_suffix(".engine"))
        report = locate_whole(model, port, SHAPE, port.tap_map(golden_order(model.config), 2, None))
        if fault is None:
            assert report.exit_code == 0 and len(report.check.results) == len(mapped), report.text()
        else:
            assert report.first_failure.name == "layer_1.mlp.act", report.text()


def test_an_engine_candidate_without_tensorrt_is_bad_usage(tmp_path):
    from parity.backends import skip_reason

    if skip_reason("tensorrt") is None:
        pytest.skip("TensorRT and a GPU are here: the engine runs (test_engine_built_from_the_export_...)")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not run here")
    assert main(["locate", "--model", "tiny", "--candidate", str(engine)]) == 2


@pytest.fixture(scope="module")
def decode_export(model, tmp_path_factory):
    """transformers' Llama decode step (static: batch 2, one new token after 5 cached), cache as inputs."""
    return onnx.load(str(export_llama(model, tmp_path_factory.mktemp("export") / "decode.onnx", past_len=5)))


DECODE_ARGS = ["--model", "tiny", "--batch", "2", "--seq-len", "1", "--past-len", "5"]


@pytest.fixture(scope="module")
def deep_decode_export(deep_model, tmp_path_factory):
    return onnx.load(str(export_llama(deep_model, tmp_path_factory.mktemp("export") / "decode.onnx", past_len=5)))


@pytest.mark.parametrize("fault", [None, sigmoid_to_tanh], ids=["clean", "sigmoid_to_tanh"])
def test_decode_graph_streams_each_layer_with_its_own_cache(decode_export, tmp_path, fault):
    """Its past_key_values.{i}.key/value take the golden's cache, each layer's segment its own; its
    present.{i}.key/value are judged as the layers' present K/V inside the layer detail."""
    report = tmp_path / "report.json"
    assert main(["locate", *DECODE_ARGS, "--candidate", str(_saved(decode_export, tmp_path, fault)),
                 "--json", str(report)]) == (fault is not None)
    verdict = json.loads(report.read_text())
    layers = [f"layer_{i}.{tap}" for i in (0, 1) for tap in ("attn.present_k", "attn.present_v", "out")]
    assert [tap["name"] for tap in verdict["taps"]] == ["embed", *layers, "final_norm", "logits"]
    assert verdict["shape"]["past_len"] == 5, verdict
    if fault is not None:
        detail = {tap["name"]: tap["passed"] for tap in verdict["layer_detail"]["taps"]}
        assert verdict["first_failure"] == "layer_1.out" and verdict["layer_detail"]["layer"] == 1, verdict
        assert detail["attn.present_k"] and detail["attn.present_v"] and not detail["mlp.act"], detail


def test_decode_layers_of_one_structure_share_a_session_fed_their_own_cache(deep_model, deep_decode_export, tmp_path):
    """Layers 1-3 share one session, which names layer 1's cache inputs: fed layer 2's and 3's caches
    under those names, the clean graph passes (fed layer 1's, it would diverge at layer_2.out)."""
    port = OnnxPort(_saved(deep_decode_export, tmp_path))
    report = locate_onnx(deep_model, port, CaseShape(batch=2, seq_len=1, past_len=5))
    assert report.exit_code == 0 and len(report.check.results) == 1 + 3 * 4 + 2 and len(port._shared) == 2, \
        report.text()


def _negated_present_key(model: onnx.ModelProto) -> None:
    """Layer 1 writes its new cache keys negated: this step's attention, and output, stay right."""
    for node in model.graph.node:  # the layer reads the keys as computed; only the written cache changes
        node.input[:] = ["present.1.key/computed" if name == "present.1.key" else name for name in node.input]
        node.output[:] = ["present.1.key/computed" if name == "present.1.key" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", ["present.1.key/computed"], ["present.1.key"]))


def test_a_cache_written_wrong_is_found_though_the_output_is_right(decode_export, tmp_path):
    report = tmp_path / "report.json"
    assert main(["locate", *DECODE_ARGS, "--candidate", str(_saved(decode_export, tmp_path, _negated_present_key)),
                 "--json", str(report)]) == 1
    verdict = json.loads(report.read_text())
    failed = [tap["name"] for tap in verdict["taps"] if not tap["passed"]]
    assert verdict["first_failure"] == "layer_1.attn.present_k" and failed == ["layer_1.attn.present_k"], verdict
    assert verdict["diagnosis"]["hypothesis"] == "scale" and "times -1" in verdict["diagnosis"]["finding"], verdict


@pytest.mark.parametrize("graph, args, message", [
    ("decode", ["--model", "tiny", "--batch", "2", "--seq-len", "1"], "takes past K/V"),
    ("decode", [*DECODE_ARGS[:-1], "4"], "its past_key_values.0.key is static [2, 2, 5, 16]"),
    ("prefill", ["--model", "tiny", "--past-len", "5"], "has no past K/V inputs: it is judged in prefill"),
])
def test_a_case_the_graph_does_not_take_is_bad_usage(export, decode_export, tmp_path, capsys, graph, args, message):
    path = _saved(decode_export if graph == "decode" else export, tmp_path)
    assert main(["locate", *args, "--candidate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
