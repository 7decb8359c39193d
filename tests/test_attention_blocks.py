"""Attention in blocks (trt_layers.attention_blocks): where the onnx backend rewrites the chain, in
head blocks or in query-row blocks (stopping at the last key a causal mask shows), it computes the
lowering's bits; where the chain is marked or not provably blockwise, it stays whole."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DTYPES, head_block_concats, row_block_concats
from parity.check import build_candidate, needs_decode_graph
from parity.compare import first_failure
from parity.locate import locate
from reference.inputs import CaseShape, make_inputs
from reference.taps import real_outputs
from trt_layers import attention_blocks
from trt_layers.bugs import BUGS
from trt_layers.network import OnnxBackend, to_feed


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), OnnxBackend.session_options(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _attention(heads: int, bias_heads: int = 1, softmax_axis: int | None = -1, mark_scores: bool = False,
               opset: int = 18, causal_bias: bool = False):
    """softmax(q k_t + bias) v over ``heads`` heads and 5 queries at positions 1-5 of 6 keys, with its
    build-time shapes; ``causal_bias``: the bias is a constant causal mask [5, 6], not an input."""
    shapes = {"q": (1, heads, 5, 4), "k_t": (1, heads, 4, 6), "v": (1, heads, 6, 4), "bias": (1, bias_heads, 5, 6),
              "scores": (1, heads, 5, 6), "masked": (1, heads, 5, 6), "probs": (1, heads, 5, 6),
              "context": (1, heads, 5, 4)}
    nodes = [helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="qk"),
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax",
                              **({} if softmax_axis is None else {"axis": softmax_axis})),
             helper.make_node("MatMul", ["probs", "v"], ["context"], name="pv")]
    inputs, constants = ["q", "k_t", "v", "bias"], []
    if causal_bias:
        shapes["bias"] = (5, 6)
        constants = [numpy_helper.from_array(np.triu(np.full((5, 6), -np.inf, np.float32), k=2), "bias")]
        inputs.remove("bias")
    values = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()}
    outputs = [values["context"]] + ([values["scores"]] if mark_scores else [])
    graph = helper.make_graph(nodes, "attention", [values[n] for n in inputs], outputs, constants)
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal(shapes[name], dtype=np.float32) for name in inputs}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), shapes, feed


def _blocks(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "MatMul" and node.name.startswith("qk/") for node in model.graph.node)


@pytest.mark.parametrize("heads, blocks, opset", [(6, 2, 18), (8, 2, 18), (9, 3, 18), (32, 8, 18), (8, 2, 11)])
def test_the_chain_runs_in_blocks_and_computes_the_same_bits(heads, blocks, opset):
    """Opset 11 too: its Split takes the sizes as an attribute, not an input."""
    model, shapes, feed = _attention(heads, opset=opset)
    whole = _run(model, feed)
    rewritten = attention_blocks.attention_in_blocks(model, shapes)
    onnx.checker.check_model(rewritten, full_check=True)
    assert _blocks(rewritten) == blocks
    np.testing.assert_array_equal(_run(rewritten, feed)[0], whole[0])


@pytest.mark.parametrize("why, kwargs", [
    ("an operand differs per head", {"heads": 8, "bias_heads": 8}),
    ("softmax over the queries", {"heads": 8, "softmax_axis": 2}),
    ("opset 11's softmax without an axis spans the heads", {"heads": 8, "softmax_axis": None, "opset": 11}),
    ("scores marked", {"heads": 8, "mark_scores": True}),
    ("one block's worth of heads", {"heads": attention_blocks.HEADS_PER_BLOCK}),
])
def test_the_chain_stays_whole(why, kwargs):
    model, shapes, _ = _attention(**kwargs)
    nodes = [node.name for node in model.graph.node]
    assert [node.name for node in attention_blocks.attention_in_blocks(model, shapes).graph.node] == nodes, why


def _keys_read(model: onnx.ModelProto) -> list[int]:
    """The keys each row block's Q K^T reads (the end of its K^T slice, or all 6)."""
    ends = {t.name: int(numpy_helper.to_array(t)[0]) for t in model.graph.initializer if t.name.endswith("/ends")}
    return [ends.get(f"k_t/context/rows_{j}/ends", 6) for j in range(row_block_concats(model) and 2)]


@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("causal_bias, keys", [(False, [6, 6]), (True, [3, 6])], ids=["bias-input", "causal"])
def test_rows_run_in_blocks_and_compute_the_same_bits(heads, causal_bias, keys):
    """Rows 0-1 and 2-4 of 5 (a last block of one row joins the one before); with a constant causal
    mask, each block stops at the last key its rows see (queries at positions 1-5): no key it drops
    had a probability but 0."""
    model, shapes, feed = _attention(heads, causal_bias=causal_bias)
    whole = _run(model, feed)
    dtypes = attention_blocks.dtypes_of(model) | {"scores": TensorProto.FLOAT}
    rewritten = attention_blocks.attention_in_blocks(model, shapes, dtypes, rows=2)
    onnx.checker.check_model(rewritten, full_check=True)
    assert (row_block_concats(rewritten), head_block_concats(rewritten)) == (1, 0)
    assert _keys_read(rewritten) == keys
    np.testing.assert_array_equal(_run(rewritten, feed)[0], whole[0])


def _grouped_attention(order: str):
    """softmax(q k_rep^T) v_rep over 4 query heads and 5 rows, K and V of 2 heads [1, 2, 5, 4] repeated
    as repeat_kv does ("interleaved": Expand on a new axis after the heads, 0,0,1,1) or tiled (0,1,0,1)."""
    kv5 = {"interleaved": (1, 2, 1, 5, 4), "tiled": (1, 1, 2, 5, 4)}[order]
    expanded = (1, 2, 2, 5, 4)
    constants = [numpy_helper.from_array(np.array(shape, np.int64), name) for name, shape in
                 (("kv5", kv5), ("expanded", expanded), ("heads", (1, 4, 5, 4)))]
    nodes = []
    for x in ("k", "v"):
        nodes += [helper.make_node("Reshape", [x, "kv5"], [f"{x}5"]),
                  helper.make_node("Expand", [f"{x}5", "expanded"], [f"{x}_expanded"]),
                  helper.make_node("Reshape", [f"{x}_expanded", "heads"], [f"{x}_rep"])]
    nodes += [helper.make_node("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_rep"], ["context"], name="pv")]
    shapes = {"q": (1, 4, 5, 4), "k": (1, 2, 5, 4), "v": (1, 2, 5, 4), "k5": kv5, "v5": kv5, "k_expanded": expanded,
              "v_expanded": expanded, "k_rep": (1, 4, 5, 4), "v_rep": (1, 4, 5, 4), "k_t": (1, 4, 4, 5),
              "scores": (1, 4, 5, 5), "probs": (1, 4, 5, 5), "context": (1, 4, 5, 4)}
    values = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()}
    graph = helper.make_graph(nodes, "gqa", [values[n] for n in ("q", "k", "v")], [values["context"]], constants)
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal(shapes[name], dtype=np.float32) for name in ("q", "k", "v")}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), shapes, feed


@pytest.mark.parametrize("order", ["interleaved", "tiled"])
def test_row_blocks_read_each_kv_head_once_only_where_repeat_kv_repeated_it(order):
    """Interleaved: a block stacks each KV head's query heads and reads K and V once; tiled (a port's bug)
    stays as the port computed it. The same bits either way."""
    model, shapes, feed = _grouped_attention(order)
    whole = _run(model, feed)
    rewritten = attention_blocks.attention_in_blocks(model, shapes, rows=2)
    onnx.checker.check_model(rewritten, full_check=True)
    assert row_block_concats(rewritten) == 1
    grouped = [node.name for node in rewritten.graph.node if node.name.endswith("/k_by_kv_head")]
    assert (len(grouped), any(node.op_type == "Expand" for node in rewritten.graph.node)) == \
        ((1, False) if order == "interleaved" else (0, True))
    np.testing.assert_array_equal(_run(rewritten, feed)[0], whole[0])


@pytest.mark.parametrize("why, dtypes", [
    ("scores of unknown dtype", {}),
    ("fp16 scores, which can overflow to inf (op by op, inf - inf is NaN)", {"scores": TensorProto.FLOAT16}),
])
def test_no_causal_stop_unproven(why, dtypes):
    model, shapes, _ = _attention(8, causal_bias=True)
    rewritten = attention_blocks.attention_in_blocks(model, shapes, dtypes, rows=2)
    assert row_block_concats(rewritten) == 1, why
    assert _keys_read(rewritten) == [6, 6], why


def test_dynamic_lengths_run_in_head_blocks():
    model, shapes, _ = _attention(8)
    dynamic = {name: (*shape[:2], -1, shape[3]) if len(shape) == 4 else shape for name, shape in shapes.items()}
    rewritten = attention_blocks.attention_in_blocks(model, dynamic, rows=2)
    assert (row_block_concats(rewritten), head_block_concats(rewritten)) == (0, 1)


@pytest.mark.parametrize("layout", ["kvheads8", "kvheads2", "kvheads1", "variant"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("component, shape", [
    ("gqa_masked", CaseShape(2, 33, 0)), ("gqa_unmasked", CaseShape(2, 1, 40)),
    ("decoder_layer", CaseShape(1, 17, 0)), ("decoder_layer", CaseShape(1, 12, 9)),
], ids=["gqa_masked", "gqa_unmasked", "decoder_layer-prefill", "decoder_layer-decode"])
def test_engines_with_real_outputs_run_blocks_with_the_lowering_bits(reference_model, block_rewrites, row_blocks,
                                                                     layout, dtype, component, shape):
    """Marked as shipped (real outputs only), the port's attention runs in blocks: head blocks in the
    session built with the engine, row blocks in the one made for a run whose queries span several;
    the graph saved for polygraphy (engine.model, op by op) gives the same bits."""
    model = reference_model(layout, DTYPES[dtype])
    engine = build_candidate(component, model, OnnxBackend(), needs_decode_graph(component, shape),
                             marked=list(real_outputs(component)))
    assert head_block_concats(block_rewrites[0]) == 1
    feed = to_feed(make_inputs(component, model.config, shape, DTYPES[dtype]))
    actual = engine.infer(feed)
    in_rows = row_blocks is not None and shape.seq_len > row_blocks and dtype == "fp32"
    assert sum(map(row_block_concats, block_rewrites[1:])) == in_rows
    if in_rows:  # the port's causal mask, proven from the graph, stops every block but the last and enters
        # each as a constant (its computation gone from the session)
        rows = block_rewrites[-1].graph.node
        blocks = sum(node.op_type == "Softmax" for node in rows)
        masked = component != "gqa_unmasked"
        assert _products_of_key_slices(block_rewrites[-1]) == (2 * (blocks - 1) if masked else 0)
        constant_masks = [node for node in rows if node.op_type == "Add" and "/rows_" in node.name
                          and any(name.startswith("causal_mask/") for name in node.input)]
        assert len(constant_masks) == (blocks if masked else 0)
        assert not any(node.op_type == "Where" for node in rows)
        # K and V read once a KV head where the port repeats them (GQA, MQA): repeat_kv's Expand gone
        grouped = any(node.name.endswith("/k_by_kv_head") for node in rows)
        assert (grouped, any(node.op_type == "Expand" for node in rows)) == (layout != "kvheads8", False)
    for name, expected in zip(actual, _run(engine.model, feed)):
        np.testing.assert_array_equal(actual[name], expected, err_msg=name)


def test_a_tiled_repeat_survives_the_blocks(reference_model, row_blocks):
    """KV heads tiled (0,1,0,1) are not repeat_kv's pattern: the blocks read them as the port repeated them."""
    bug = BUGS["repeat_kv_tiled"]
    report = locate("gqa_masked", reference_model("kvheads2", DTYPES["fp32"]), OnnxBackend(), CaseShape(2, 33, 0), bug)
    assert first_failure(report.outputs_only) is not None


def _products_of_key_slices(model: onnx.ModelProto) -> int:
    """How many row blocks' products read a slice of the keys (Q K^T of K^T's, P V of V's)."""
    sliced = {node.output[0] for node in model.graph.node if node.op_type == "Slice"}
    return sum(node.op_type == "MatMul" and "/rows_" in node.name and node.input[1] in sliced
               for node in model.graph.node)


def test_a_tapped_attention_runs_whole(reference_model, block_rewrites):
    """Every tap marked (scores and probs among them): nothing to rewrite, as TensorRT fuses nothing."""
    build_candidate("gqa_masked", reference_model("kvheads2", DTYPES["fp32"]), OnnxBackend(), decode=False)
    assert head_block_concats(block_rewrites[0]) == 0


@pytest.mark.parametrize("bug", ["causal_mask_missing", "decode_masked"])
def test_a_mask_bug_survives_the_blocks(reference_model, block_rewrites, row_blocks, bug):
    """The blocks take the port's own mask, and stop only where it hides the keys: its real
    outputs, run in blocks, still diverge."""
    bug = BUGS[bug]
    report = locate(bug.component, reference_model("kvheads2", DTYPES["fp32"]), OnnxBackend(), bug.shape, bug)
    # shipped, then every tap marked; with row blocks, the shipped engine's run in them too
    assert [head_block_concats(model) for model in block_rewrites[:2]] == [1, 0]
    in_rows = row_blocks is not None and bug.shape.seq_len > row_blocks
    assert sum(map(row_block_concats, block_rewrites)) == in_rows
    assert first_failure(report.outputs_only) is not None
