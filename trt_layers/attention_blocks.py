"""Attention a block at a time: the lowering's stand-in for TensorRT's fused attention.

TensorRT fuses an attention chain whose inner tensors are not marked (Q K^T, the mask add, the
softmax, P V) into one kernel that never holds the scores whole, and a causal one skips the keys
the mask hides. ONNX Runtime runs the lowering op by op: at 2048 tokens of DeciCoder-1b the scores
and the masked scores are 512 MiB each, held side by side, and every op streams them through memory.
The onnx backend rewrites each unmarked chain to run a block at a time:

- **query-row blocks** (ROWS_PER_BLOCK rows of every head) where the lengths are known when the
  session is made (``OnnxEngine`` makes one for the shapes it runs). Where the mask follows from the
  shapes alone and is -inf past some key for all of a block's rows (a causal mask), the block stops
  at that key, whose probabilities would be exactly 0, and reads the mask as the constant it is.
  Where K and V are repeat_kv's repeats, a block reads each KV head once, its query heads' rows
  stacked. Measured on 16 cores at 2048 tokens (32 heads): 0.14 s for the chain in 4-head blocks,
  0.10 s in 256-row blocks, 0.064 s with the causal stop;
- **head blocks** (HEADS_PER_BLOCK heads) where the lengths are dynamic.

Either runs the same per-row GEMMs and softmax as the chain whole, bit for bit
(tests/test_attention_blocks.py). A chain with a marked tensor inside stays whole, as marking one
stops TensorRT's fusion; so does any chain this module cannot prove acts on each block alone.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import ChainMap, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS_PER_BLOCK = 4  # 64 MiB of scores a block at 2048 tokens; fewer heads saved no more (measured)
ROWS_PER_BLOCK = 256  # 64 MiB of fp32 scores a block at 32 heads x 2048 keys; 128 rows ran slower (measured)

# Ops between the two MatMuls that act on each query row alone: element-wise ones, and a softmax
# over the keys. (torch.onnx's SDPA adds an IsNaN/Where pair after the softmax; the lowering, casts
# around it in fp16.)
_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Softmax", "IsNaN", "Not", "Where"}

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


def dtypes_of(model: onnx.ModelProto) -> dict[str, int]:
    """The element type (onnx.TensorProto) of every value whose type the model declares."""
    graph = model.graph
    return {**{t.name: t.data_type for t in graph.initializer},
            **{v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}}


def with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have these static shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    del fixed.graph.value_info[:]  # the dynamic shapes of the build give way to the static ones
    return fixed


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with static inputs as ONNX Runtime's basic optimizations leave it (the shape
    arithmetic behind its reshapes folded into constants), every value's shape and type inferred:
    onnx's own inference leaves the lowering's computed reshapes dynamic. Values that remain keep
    their names: the transpose optimizer, which renames the values it moves a transpose across (a
    RoPE'd K, whose shape the causal mask reads), is off. The graph to run stays ``model``, as ONNX
    Runtime's optimized form of an fp16 graph carries the casts to fp32 it inserts."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "inferred.onnx")
        onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=["TransposeOptimizer"])
        return onnx.shape_inference.infer_shapes(onnx.load(options.optimized_model_filepath), data_prop=True)


def _heads(shapes: Shapes, name: str) -> int | None:
    """The head count of a [batch, heads, rows, cols] value, if known at build time."""
    shape = shapes.get(name)
    return shape[1] if shape is not None and len(shape) == 4 and shape[1] > 0 else None


def _static(shapes: Shapes, name: str) -> bool:
    shape = shapes.get(name)
    return shape is not None and len(shape) <= 4 and all(d >= 0 for d in shape)


def _same_for_every_head(shapes: Shapes, name: str) -> bool:
    """Whether an operand broadcast against [batch, heads, rows, cols] is constant along the heads."""
    shape = shapes.get(name)
    return shape is not None and (len(shape) <= 2 or (len(shape) <= 4 and shape[-3] == 1))


def _acts_per_row(node: onnx.NodeProto, opset: int) -> bool:
    if node.op_type not in _CHAIN_OPS or len(node.output) != 1:
        return False
    if node.op_type == "Softmax":
        # Before opset 13 a Softmax without an axis flattens from axis 1: across the heads.
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                    -1 if opset >= 13 else 1)
        return axis in (-1, 3)
    return True


def _outside(chain: list[onnx.NodeProto], inside: set[str]) -> set[str]:
    """The operands the chain's ops read from outside it (a mask, a scale), Q K^T's and P V's excepted."""
    return {name for node in chain for name in node.input if name and name not in inside}


def _chain(nodes: list[onnx.NodeProto], start: int, opset: int, consumers, marked: set[str], shapes: Shapes):
    """(Q K^T, the row-wise ops after it in graph order, P V) from the MatMul ``nodes[start]``, or None."""
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
        if not _acts_per_row(node, opset):
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
    """(Q K^T MatMul, the row-wise ops after it, P V MatMul) for every unmarked attention chain."""
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
            if (chain := _chain(nodes, start, opset, consumers, marked, shapes)) is not None:
                yield chain


# ---------------------------------------------------------------- head blocks

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
        block_outputs.append(_copy(qk, chain, pv, renamed, f"heads_{j}", nodes))
    nodes.append(helper.make_node("Concat", block_outputs, [out], name=f"{out}/concat_heads", axis=1))
    return nodes, [split] if opset >= 13 else []


def _copy(qk, chain, pv, renamed: dict[str, str], tag: str, nodes: list[onnx.NodeProto], regroup=None) -> str:
    """Append one copy of the chain reading ``renamed`` operands; returns its P V output. ``regroup``
    (value, "scores" | "probs") -> value reshapes the scores after Q K^T and the probabilities before
    P V (the grouped-query blocks' [b, kv, n, rows, keys] view); softmaxes then take the last axis."""
    for node in (qk, *chain, pv):
        copy = helper.make_node(node.op_type, [renamed.get(name, name) for name in node.input],
                                [f"{node.output[0]}/{tag}"], name=f"{node.name or node.output[0]}/{tag}")
        copy.attribute.extend(a for a in node.attribute if not (regroup and node.op_type == "Softmax"))
        if regroup and node.op_type == "Softmax":
            copy.attribute.append(helper.make_attribute("axis", -1))
        nodes.append(copy)
        renamed[node.output[0]] = copy.output[0]
        if regroup and node is qk:
            renamed[qk.output[0]] = regroup(copy.output[0], "scores")
        if regroup and node is (chain[-1] if chain else qk):
            renamed[pv.input[0]] = regroup(renamed[pv.input[0]], "probs")
    return renamed[pv.output[0]]


# ---------------------------------------------------------------- query-row blocks

_FOLD_LIMIT = 64  # values behind a mask that follows from shapes alone (the lowering's causal mask: 40)


def _folded(model: onnx.ModelProto, name: str, shapes: Shapes, values: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The value of ``name`` if it follows from constants and static shapes alone (a causal mask
    built from Shape, Range and Where), else None. ``values`` holds constants fed as inputs."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {t.name: t for t in graph.initializer}
    needed, stack, constants = set(), [name], []
    while stack:
        value = stack.pop()
        if not value or value in needed:
            continue
        needed.add(value)
        if value in initializers:
            constants.append(initializers[value])
        elif value in values:
            if values[value].size > 1:
                return None  # a weight: not a mask of the shapes alone
            constants.append(numpy_helper.from_array(values[value], value))
        elif (node := producers.get(value)) is None or len(needed) > _FOLD_LIMIT:
            return None  # a graph input
        elif node.op_type == "Shape" and min(shapes.get(node.input[0], (-1,)), default=0) >= 0:
            shape = shapes[node.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dims = np.array(shape, np.int64)[attrs.get("start", 0):attrs.get("end", len(shape))]
            constants.append(numpy_helper.from_array(dims, value))
        else:  # evaluated, a Shape included where its input's shape is not recorded (ONNX Runtime
            # folded that value away: the Range an unsqueeze reads the rank of)
            stack.extend(node.input)
    folded = {t.name for t in constants}
    nodes = [node for node in graph.node if node.output[0] in needed and node.output[0] not in folded]
    model = helper.make_model(helper.make_graph(nodes, "mask", [], [helper.make_empty_tensor_value_info(name)],
                                                constants), opset_imports=model.opset_import)
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # an op or a case the reference evaluator lacks: no proof, no causal stop
        return None


def _causal_mask(model: onnx.ModelProto, qk, chain, shapes: Shapes, dtypes: Mapping[str, int],
                 values: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """The mask the chain adds (its name and value) where that value follows from the shapes alone and
    the chain then only casts it into the softmax, so that its -inf keys get probabilities of exactly
    0 (cast to 0). None where that is not proven, or where the scores are not fp32 (an fp16 Q K^T can
    overflow to inf, and op by op inf - inf makes the row NaN)."""
    if dtypes.get(qk.output[0]) != TensorProto.FLOAT:
        return None
    inside = {qk.output[0]} | {node.output[0] for node in chain}
    adds = [i for i, node in enumerate(chain) if node.op_type == "Add" and len(set(node.input) & inside) == 1]
    softmax = [i for i, node in enumerate(chain) if node.op_type == "Softmax"]
    if len(adds) != 1 or len(softmax) != 1 or adds[0] > softmax[0] or any(
            node.op_type != "Cast" for node in chain[adds[0] + 1:softmax[0]] + chain[softmax[0] + 1:]):
        return None
    name = next(name for name in chain[adds[0]].input if name not in inside)
    mask = _folded(model, name, shapes, values)
    s_kv = shapes[qk.output[0]][-1]
    if mask is None or mask.ndim == 0 or mask.shape[-1] not in (1, s_kv) or tuple(mask.shape) != shapes.get(name):
        return None
    return name, mask


def _key_limits(mask: np.ndarray, s_q: int, s_kv: int, starts: list[int]) -> list[int]:
    """For each block of query rows, the keys it needs: past them the mask is -inf for all its rows."""
    visible = ~np.isneginf(mask.reshape(-1, *mask.shape[-2:]) if mask.ndim >= 2 else mask[None, None])
    visible = np.broadcast_to(visible.any(axis=0), (s_q, s_kv))  # [s_q, s_kv]: a key some row of some head sees
    last = np.where(visible.any(axis=1), s_kv - np.argmax(visible[:, ::-1], axis=1), s_kv)  # keys each row needs
    return [int(last[start:end].max()) for start, end in zip(starts, [*starts[1:], s_q])]


def _row_starts(s_q: int, rows: int) -> list[int]:
    """The first query row of each block. A last block of one row joins the one before: ONNX
    Runtime computes a one-row product with another kernel (a GEMV), which sums in another order."""
    starts = list(range(0, s_q, rows))
    return starts[:-1] if len(starts) > 1 and s_q - starts[-1] == 1 else starts


def _repeated_kv(name: str, producers: Mapping[str, onnx.NodeProto], shapes: Shapes) -> tuple[str, int] | None:
    """The [b, kv, 1, L, d] value that ``name`` [b, kv * n, L, d] repeats as repeat_kv does (each KV head
    expanded n > 1 times in a row, the heads then merged in order), and n; None for any other producer."""
    merge = producers.get(name)
    expand = producers.get(merge.input[0]) if merge is not None and merge.op_type == "Reshape" else None
    if expand is None or expand.op_type != "Expand":
        return None
    source = shapes.get(expand.input[0], ())
    if len(source) != 5 or source[2] != 1 or min(source) < 0:
        return None
    b, kv, _, length, d = source
    n = shapes.get(name, (0, 0))[1] // kv
    if n < 2 or shapes.get(expand.output[0]) != (b, kv, n, length, d) or shapes.get(name) != (b, kv * n, length, d):
        return None
    return expand.input[0], n


def _kv_groups(qk, chain, pv, producers: Mapping[str, onnx.NodeProto], shapes: Shapes) -> tuple[str, str, int] | None:
    """(K's [b, kv, 1, L, d] value, V's, n) where the chain reads K^T as the transpose of K repeated by
    repeat_kv, and V repeated the same, and its other operands are the same for every batch and head:
    then a block reads each KV head once, for its n query heads at a time."""
    k_t = producers.get(qk.input[1])
    perm = next((list(helper.get_attribute_value(a)) for a in k_t.attribute if a.name == "perm"), None) \
        if k_t is not None and k_t.op_type == "Transpose" else None
    if perm != [0, 1, 3, 2]:
        return None
    k, v = _repeated_kv(k_t.input[0], producers, shapes), _repeated_kv(pv.input[1], producers, shapes)
    inside = {qk.output[0]} | {node.output[0] for node in chain}
    if k is None or v is None or k[1] != v[1] or shapes[k[0]][:2] != shapes[v[0]][:2] or any(
            max(shapes[name][:-2], default=1) > 1 for name in _outside(chain, inside)):
        return None
    return k[0], v[0], k[1]


def _in_row_blocks(qk, chain, pv, shapes: Shapes, mask: tuple[str, np.ndarray] | None, starts: list[int],
                   groups: tuple[str, str, int] | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The chain as one copy per block of query rows, each reading its rows of Q and of every operand
    that varies along them, and only the keys it needs; its output the Concat of the blocks' outputs.
    A proven causal ``mask`` (name, value) stops each block at the last key its rows see, and enters
    as the constant it is: its blocks are initializers, shared by every chain adding the same mask.
    With ``groups`` (_kv_groups) a block reads K and V as they were before repeat_kv, each KV head
    once, with its n query heads' rows stacked: [b, kv, n * rows, d] (the same products, row by row)."""
    out = pv.output[0]
    s_q, s_kv = shapes[qk.output[0]][-2:]
    inside = {qk.output[0]} | {node.output[0] for node in chain}
    key_limits = _key_limits(mask[1], s_q, s_kv, starts) if mask else None
    nodes, initializers = [], []
    known = ChainMap({}, shapes)  # and the shapes of the values made here

    def reshaped(value: str, shape: tuple[int, ...], name: str) -> str:
        initializers.append(numpy_helper.from_array(np.array(shape, np.int64), f"{name}/shape"))
        nodes.append(helper.make_node("Reshape", [value, f"{name}/shape"], [name], name=name))
        known[name] = shape
        return name

    def sliced(operand: str, bounds: dict[int, tuple[int, int]], tag: str) -> str:
        """``operand`` sliced to ``bounds`` (axis from the end -> (start, end)) where it spans that axis."""
        shape = known[operand]
        spans = {len(shape) - k: bound for k, bound in bounds.items()
                 if len(shape) >= k and shape[-k] > 1 and bound != (0, shape[-k])}
        if not spans:
            return operand
        name = f"{operand}/{out}/{tag}"
        for field, column in (("starts", 0), ("ends", 1), ("axes", None)):
            values = [axis if column is None else bound[column] for axis, bound in spans.items()]
            initializers.append(numpy_helper.from_array(np.array(values, np.int64), f"{name}/{field}"))
        nodes.append(helper.make_node("Slice", [operand, f"{name}/starts", f"{name}/ends", f"{name}/axes"], [name],
                                      name=f"{out}/slice_{tag}_{operand}"))
        return name

    def constant(value: np.ndarray, bounds: dict[int, tuple[int, int]], tag: str) -> str:
        """``value`` cut to ``bounds`` as an initializer, named by its bytes (one for equal cuts)."""
        block = np.ascontiguousarray(value[tuple(slice(*bounds[len(value.shape) - axis]) if
                                                 len(value.shape) - axis in bounds and value.shape[axis] > 1
                                                 else slice(None) for axis in range(value.ndim))])
        name = f"causal_mask/{hashlib.sha256(block.tobytes() + str(block.shape).encode()).hexdigest()}"
        initializers.append(numpy_helper.from_array(block, name))
        return name

    k_t, v = qk.input[1], pv.input[1]
    if groups:  # each KV head once: K^T [b, kv, d, L], V [b, kv, L, d_v]
        b, kv, _, length, d = shapes[groups[0]]
        n, d_v = groups[2], shapes[groups[1]][-1]
        k_heads = reshaped(groups[0], (b, kv, length, d), f"{out}/k_by_kv_head")
        k_t, v = f"{out}/k_t_by_kv_head", reshaped(groups[1], (b, kv, length, d_v), f"{out}/v_by_kv_head")
        nodes.append(helper.make_node("Transpose", [k_heads], [k_t], name=k_t, perm=[0, 1, 3, 2]))
        known[k_t] = (b, kv, d, length)

    block_outputs = []
    for j, (start, end) in enumerate(zip(starts, [*starts[1:], s_q])):
        tag, query_rows = f"rows_{j}", (start, end)
        keys = (0, key_limits[j] if key_limits else s_kv)
        renamed = {qk.input[0]: sliced(qk.input[0], {2: query_rows}, tag),
                   qk.input[1]: sliced(k_t, {1: keys}, tag), pv.input[1]: sliced(v, {2: keys}, tag)}
        for operand in sorted(_outside(chain, inside)):
            renamed[operand] = constant(mask[1], {2: query_rows, 1: keys}, tag) if mask and operand == mask[0] \
                else sliced(operand, {2: query_rows, 1: keys}, tag)
        if not groups:
            block_outputs.append(_copy(qk, chain, pv, renamed, tag, nodes))
            continue
        rows, width = end - start, keys[1]
        renamed[qk.input[0]] = reshaped(renamed[qk.input[0]], (b, kv, n * rows, d), f"{out}/{tag}/q_by_kv_head")
        views = {"scores": (b, kv, n, rows, width), "probs": (b, kv, n * rows, width)}
        context = _copy(qk, chain, pv, renamed, tag, nodes,
                        regroup=lambda value, kind: reshaped(value, views[kind], f"{value}/{kind}_view"))
        block_outputs.append(reshaped(context, (b, kv * n, rows, d_v), f"{context}/by_head"))
    nodes.append(helper.make_node("Concat", block_outputs, [out], name=f"{out}/concat_rows",
                                  axis=len(shapes[qk.output[0]]) - 2))
    return nodes, initializers


def _rows_apart(qk, chain, pv, inside: set[str], shapes: Shapes, s_q: int, s_kv: int) -> bool:
    """Whether Q, K^T, V and every operand from outside the chain are distinct and of static shapes,
    the outside ones broadcasting along the rows and keys."""
    operands, outside = (qk.input[0], qk.input[1], pv.input[1]), _outside(chain, inside)
    return len(set(operands)) == 3 and not outside.intersection(operands) \
        and all(_static(shapes, name) for name in (*operands, *outside)) \
        and all((len(shapes[name]) < 2 or shapes[name][-2] in (1, s_q))
                and (len(shapes[name]) < 1 or shapes[name][-1] in (1, s_kv)) for name in outside)


def attention_in_blocks(model: onnx.ModelProto, shapes: Shapes, dtypes: Mapping[str, int] | None = None,
                        values: Mapping[str, np.ndarray] | None = None, *, rows: int = ROWS_PER_BLOCK,
                        heads: int = HEADS_PER_BLOCK) -> onnx.ModelProto:
    """Rewrite ``model`` in place (and return it): every unmarked attention chain runs in blocks of
    ``rows`` query rows where its lengths are static and span more than one block (stopping at the
    last key a causal mask lets a block see; ``dtypes`` and ``values``, constants fed as inputs, let
    that be proven), else in blocks of ``heads`` heads where it has more."""
    graph, opset = model.graph, _opset(model)
    blocks = {}  # P V's output -> the blocks that compute it, in its place: every operand exists by then
    replaced, added = set(), {}
    producers = {output: node for node in graph.node for output in node.output}
    for qk, chain, pv in list(attention_chains(model, shapes)):
        inside = {qk.output[0]} | {node.output[0] for node in chain}
        s_q, s_kv = shapes[qk.output[0]][-2:]
        if opset >= 10 and s_q > rows and s_kv > 0 and _rows_apart(qk, chain, pv, inside, shapes, s_q, s_kv):
            mask = _causal_mask(model, qk, chain, shapes, dtypes or {}, values or {})
            new, initializers = _in_row_blocks(qk, chain, pv, shapes, mask, _row_starts(s_q, rows),
                                               _kv_groups(qk, chain, pv, producers, shapes))
        elif _heads(shapes, qk.input[0]) > heads and all(_same_for_every_head(shapes, name)
                                                          for name in _outside(chain, inside)):
            new, initializers = _in_head_blocks(qk, chain, pv, _heads(shapes, qk.input[0]), heads, opset)
        else:
            continue
        blocks[pv.output[0]] = new
        added |= {tensor.name: tensor for tensor in initializers}
        replaced |= inside
    nodes = []
    for node in graph.node:
        if node.output[0] in blocks:
            nodes += blocks[node.output[0]]
        elif node.output[0] not in replaced:
            nodes.append(node)
    live, read = _live(nodes, {output.name for output in graph.output})
    del graph.node[:]
    graph.node.extend(live)
    # ONNX Runtime would warn of each initializer left unread, one line apiece
    initializers = [tensor for tensor in (*graph.initializer, *added.values()) if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """``nodes`` less those nothing reads (a causal mask's computation, once its blocks are constants),
    and the values the rest read."""
    read, live = set(outputs), []
    for node in reversed(nodes):
        if read.intersection(node.output):
            live.append(node)
            read.update(node.input)
    return live[::-1], read
