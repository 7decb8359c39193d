"""Attention scores a few heads at a time: the lowering's stand-in for TensorRT's fused attention.

TensorRT fuses an attention chain whose inner tensors are not marked (Q K^T, the mask add, the
softmax, P V) into one kernel that never holds the scores whole. ONNX Runtime runs the lowering
op by op: at 2048 tokens of DeciCoder-1b the scores and the masked scores are 512 MiB each, held
side by side, and the arena kept that 1.2 GiB beside the golden through every layer. Split along
the head axis, the chain runs the same per-head GEMMs and softmax rows (bit for bit:
tests/test_attention_blocks.py) HEADS_PER_BLOCK heads at a time, and ONNX Runtime frees each
block's scores before the next block: 0.33 GiB for the whole layer, in the same time.

A chain with a marked tensor inside stays whole, as marking one stops TensorRT's fusion; so does
any chain this module cannot prove acts on each head alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

HEADS_PER_BLOCK = 4  # 64 MiB of scores a block at 2048 tokens; fewer heads saved no more (measured)

# Ops between the two MatMuls that can act on each head alone: element-wise ones whose other
# operands are the same for every head, and a softmax over the keys. (torch.onnx's SDPA adds an
# IsNaN/Where pair after the softmax; the lowering, casts around it in fp16.)
_PER_HEAD_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Softmax", "IsNaN", "Not", "Where"}

Shapes = Mapping[str, tuple[int, ...]]  # build-time shapes, -1 where dynamic (lowering.Network.shapes)


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The shapes an ONNX model declares (inputs, initializers, value infos, outputs), -1 where dynamic."""
    graph = model.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                       for d in value.type.tensor_type.shape.dim)
    return shapes


def _heads(shapes: Shapes, name: str) -> int | None:
    """The head count of a [batch, heads, rows, cols] value, if known at build time."""
    shape = shapes.get(name)
    return shape[1] if shape is not None and len(shape) == 4 and shape[1] > 0 else None


def _same_for_every_head(shapes: Shapes, name: str) -> bool:
    """Whether an operand broadcast against [batch, heads, rows, cols] is constant along the heads."""
    shape = shapes.get(name)
    return shape is not None and (len(shape) <= 2 or (len(shape) <= 4 and shape[-3] == 1))


def _acts_per_head(node: onnx.NodeProto, inside: set[str], shapes: Shapes, opset: int) -> bool:
    if node.op_type not in _PER_HEAD_OPS or len(node.output) != 1:
        return False
    if node.op_type == "Softmax":
        # Before opset 13 a Softmax without an axis flattens from axis 1: across the heads.
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                    -1 if opset >= 13 else 1)
        return axis in (-1, 3)
    return all(name in inside or _same_for_every_head(shapes, name) for name in node.input)


def _chain(nodes: list[onnx.NodeProto], start: int, shapes: Shapes, opset: int, consumers, marked: set[str]):
    """(Q K^T, the per-head ops after it in graph order, P V) from the MatMul ``nodes[start]``, or None."""
    qk = nodes[start]
    heads = _heads(shapes, qk.input[0])
    inside, region = {qk.output[0]}, []
    for node in nodes[start + 1:]:
        if not inside.intersection(node.input):
            continue
        if node.op_type == "MatMul" and node.input[0] in inside and node.input[1] not in inside \
                and _heads(shapes, node.input[1]) == heads:
            pv = node
            break
        if not _acts_per_head(node, inside, shapes, opset):
            return None
        region.append(node)
        inside.add(node.output[0])
    else:
        return None
    # Closed: nothing outside the chain reads a value inside it, and none of them is marked.
    chain = {node.output[0] for node in (*region, pv)}
    if inside & marked or any(reader not in chain for value in inside for reader in consumers[value]):
        return None
    return qk, region, pv


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attention_chains(model: onnx.ModelProto, shapes: Shapes) -> Iterator[tuple[onnx.NodeProto, list, onnx.NodeProto]]:
    """(Q K^T MatMul, the per-head ops after it, P V MatMul) for every unmarked attention chain."""
    graph, opset = model.graph, _opset(model)
    nodes = list(graph.node)
    consumers = defaultdict(list)  # value -> the first output of each node reading it
    for node in nodes:
        for name in node.input:
            consumers[name].append(node.output[0])
    marked = {output.name for output in graph.output}
    for start, node in enumerate(nodes):
        heads = _heads(shapes, node.input[0]) if node.op_type == "MatMul" else None
        if heads is not None and _heads(shapes, node.input[1]) == heads:
            if (chain := _chain(nodes, start, shapes, opset, consumers, marked)) is not None:
                yield chain


def _in_head_blocks(qk: onnx.NodeProto, chain: list[onnx.NodeProto], pv: onnx.NodeProto, heads: int, block: int,
                    opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The chain as one copy per block of heads, its output the Concat of the blocks' outputs. New
    names derive from the chain's output names, which a graph keeps unique (node names it need not)."""
    out = pv.output[0]
    sizes = [min(block, heads - start) for start in range(0, heads, block)]
    split = numpy_helper.from_array(np.array(sizes, np.int64), f"{out}/head_blocks")
    nodes, parts = [], {}
    for operand in dict.fromkeys((qk.input[0], qk.input[1], pv.input[1])):
        parts[operand] = [f"{operand}/{out}/heads_{j}" for j in range(len(sizes))]
        if opset >= 13:  # the sizes became an input in opset 13
            nodes.append(helper.make_node("Split", [operand, split.name], parts[operand], axis=1,
                                          name=f"{out}/split_{operand}"))
        else:
            nodes.append(helper.make_node("Split", [operand], parts[operand], axis=1, split=sizes,
                                          name=f"{out}/split_{operand}"))
    block_outputs = []
    for j in range(len(sizes)):
        renamed = {name: names[j] for name, names in parts.items()}
        for node in (qk, *chain, pv):
            copy = helper.make_node(node.op_type, [renamed.get(name, name) for name in node.input],
                                    [f"{node.output[0]}/heads_{j}"], name=f"{node.name or node.output[0]}/heads_{j}")
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
            renamed[node.output[0]] = copy.output[0]
        block_outputs.append(renamed[out])
    nodes.append(helper.make_node("Concat", block_outputs, [out], name=f"{out}/concat_heads", axis=1))
    return nodes, [split] if opset >= 13 else []


def scores_in_head_blocks(model: onnx.ModelProto, shapes: Shapes, block: int = HEADS_PER_BLOCK) -> onnx.ModelProto:
    """Rewrite ``model`` in place (and return it): every unmarked attention chain over more than
    ``block`` heads runs ``block`` heads at a time."""
    graph, opset = model.graph, _opset(model)
    chains = [chain for chain in attention_chains(model, shapes) if _heads(shapes, chain[0].input[0]) > block]
    replaced = {node.output[0] for qk, chain, _ in chains for node in (qk, *chain)}
    blocks = {}  # P V's output -> the blocks that compute it, in its place: every operand exists by then
    for qk, chain, pv in chains:
        blocks[pv.output[0]], splits = _in_head_blocks(qk, chain, pv, _heads(shapes, qk.input[0]), block, opset)
        graph.initializer.extend(splits)
    nodes = []
    for node in graph.node:
        if node.output[0] in blocks:
            nodes += blocks[node.output[0]]
        elif node.output[0] not in replaced:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
