"""fp16 graphs on ONNX Runtime's CPU with an fp16 result at every op boundary, as an fp16 engine computes.

ONNX Runtime's CPU provider has no fp16 kernel for most ops. Its InsertCastTransformer wraps each
such op in casts to and from fp32, then RemoveDuplicateCastTransformer drops the cast pairs it
inserted between neighbouring ops, so a chain of fp16 ops runs in fp32 end to end and rounds to
fp16 only where the graph hands a value out. A port that squares in fp16 (RMSNorm without its fp32
upcast) would never overflow there. No session setting turns either pass off: the insertion runs
after the optimizers, at every optimization level, whatever ``disabled_optimizers`` names.

The remover keeps casts it did not insert when they lose precision (its ``UnsafeCast``: a float
narrowing whose node is not one of its own ``InsertedPrecisionFreeCast_``). So the graph is
rewritten to compute in fp32 with an explicit round trip after every op that yields an fp16
value: ``op (fp32) -> Cast(fp16) -> Cast(fp32) -> next op``. Each value keeps its name and fp16
type; its consumers read the fp32 copy of it. An op computes as its fp32 kernel rounded once to
fp16: for + - * / and sqrt that is the correctly rounded fp16 result (rounding to fp32 first
loses nothing, as 24 >= 2 * 11 + 2 bits); reductions and matmuls accumulate in fp32 (the
lowering's fp16 matmuls are fp32 already, as TensorRT-LLM's ``use_fp32_acc`` makes them).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import lowering

FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT
# How the onnx backend computes fp16, for its description in every report.
EXECUTION = "fp16 graphs rounded after every op by explicit casts"


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], name=f"{target}/cast", to=to)


def fp16_values(model: onnx.ModelProto) -> set[str]:
    """Names of every fp16 value of the graph: inputs, initializers and node outputs."""
    return {name for name, elem_type in value_types(model).items() if elem_type == FP16}


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's ONNX element type (inputs, initializers, node outputs), a collective's its input's."""
    graph = model.graph
    # Types need no weights: infer on a skeleton whose initializers are typed inputs (a model past
    # protobuf's 2 GiB could not be inferred on whole).
    inputs = {v.name for v in graph.input}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer
               if t.name not in inputs]
    opsets = [opset for opset in model.opset_import if opset.domain != lowering.COLLECTIVES]
    skeleton = helper.make_model(helper.make_graph(lowering.typed_as_identities(graph.node), graph.name,
                                                   [*graph.input, *weights], graph.output), opset_imports=opsets)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    values = [*inferred.input, *inferred.value_info, *inferred.output]
    typed = {v.name for v in values}
    untyped = [name for node in inferred.node for name in node.output if name and name not in typed]
    if untyped:
        # Without a type we cannot tell whether the value needs rounding: refuse, never guess.
        raise ValueError(f"ONNX type inference left {untyped[:5]} untyped: cannot round per op")
    return {v.name: v.type.tensor_type.elem_type for v in values}


def round_each_op_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computed in fp32 with every fp16 value rounded to fp16 where it is produced.

    Graph inputs, outputs and every value keep their names and fp16 types, so feeds and taps
    are unchanged. A graph without fp16 values comes back as it is.
    """
    fp16 = fp16_values(model)
    if not fp16:
        return model
    graph = model.graph
    consumed = {name for node in graph.node for name in node.input}
    as_fp32: dict[str, str] = {}  # fp16 value -> its fp32 copy, which the ops downstream read
    nodes: list[onnx.NodeProto] = []

    def widen(name: str) -> None:
        if name in consumed:
            as_fp32[name] = f"{name}/fp32"
            nodes.append(_cast(name, as_fp32[name], FP32))

    for source in [*graph.input, *graph.initializer]:
        if source.name in fp16:
            widen(source.name)
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.input[:] = [as_fp32.get(name, name) for name in node.input]
        narrows = node.op_type == "Cast" and any(a.name == "to" and a.i == FP16 for a in node.attribute)
        rounds = []
        for k, name in enumerate(node.output):
            if name in fp16 and not narrows:  # a Cast to fp16 is its own rounding
                node.output[k] = f"{name}/unrounded"
                rounds.append(_cast(node.output[k], name, FP16))
        nodes += [node, *rounds]
        for name in node.output if narrows else [r.output[0] for r in rounds]:
            widen(name)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def rounding_gap(options) -> str | None:
    """Why ONNX Runtime, with session ``options``, cannot keep the per-op rounding (None if it can).

    Its remover folded every fp32 -> fp16 -> fp32 cast pair away before 1.17 (microsoft/onnxruntime#17953),
    so the probe, 300 * 300 / 300 in fp16, must overflow to inf.
    """
    import numpy as np
    import onnxruntime

    x = helper.make_tensor_value_info("x", FP16, [1])
    nodes = [helper.make_node("Mul", ["x", "x"], ["square"]), helper.make_node("Div", ["square", "x"], ["y"])]
    probe = helper.make_model(helper.make_graph(nodes, "probe", [x], [helper.make_tensor_value_info("y", FP16, [1])]),
                              opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(round_each_op_to_fp16(probe).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.asarray([300], dtype=np.float16)})
    if np.isinf(y).all():
        return None
    return (f"onnxruntime {onnxruntime.__version__} folds the explicit fp16 round trips away (before 1.17 it always "
            "does): it cannot compute fp16 per op")
