"""Edits of a torch.onnx export of transformers' Llama (``export.export_llama``): ports this project
did not write, for ``locate --candidate``'s tests and benchmark.

``renamed`` gives every node and inner tensor a meaningless name (mapped back with ``--tap-map``);
each fault edits one node, as a porting slip would, and ``FAULTS`` says where ``locate`` must find
it. The edits touch the graph only: a copy saved beside an external-data export reads its weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper


def _scope(node: onnx.NodeProto) -> str:
    return {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")


def find_node(graph: onnx.GraphProto, op: str, scope: str, where=lambda node: True) -> onnx.NodeProto:
    return next(n for n in graph.node if n.op_type == op and f"'{scope}'" in _scope(n) and where(n))


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(n for n in graph.node if name in n.output)


def swap_rope_cos_for_sin(model: onnx.ModelProto) -> None:
    """A swapped Mul input: layer 1's q * sin where q * cos belongs."""
    g = model.graph
    unsq = {n.input[0]: n.output[0] for n in g.node if n.op_type == "Unsqueeze" and n.input[0] in ("cos", "sin")}
    mul = find_node(g, "Mul", "model.layers.1.self_attn", lambda n: unsq["cos"] in n.input)
    mul.input[list(mul.input).index(unsq["cos"])] = unsq["sin"]


def change_norm_eps(model: onnx.ModelProto) -> None:
    """A changed constant: layer 1's post-attention RMSNorm eps, set to 1."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    add = find_node(g, "Add", "model.layers.1.post_attention_layernorm", lambda n: any(i in weights for i in n.input))
    eps = next(i for i in add.input if i in weights)
    g.initializer.append(numpy_helper.from_array(np.ones_like(numpy_helper.to_array(weights[eps])), "eps_changed"))
    add.input[list(add.input).index(eps)] = "eps_changed"


def drop_mask_add(model: onnx.ModelProto) -> None:
    """A removed mask add: layer 0's softmax reads the unmasked scores."""
    g = model.graph
    softmax = find_node(g, "Softmax", "model.layers.0.self_attn")
    softmax.input[0] = _producer(g, softmax.input[0]).input[0]


def sigmoid_to_tanh(model: onnx.ModelProto) -> None:
    """SiLU's Sigmoid as Tanh, in layer 1's MLP."""
    find_node(model.graph, "Sigmoid", "model.layers.1.mlp").op_type = "Tanh"


# Where each fault shows first: its layer, and the first mapped tap inside it (RoPE and the attention
# scores sit inside functions, not modules: the attention's output is the first tap after them).
FAULTS: dict[Callable[[onnx.ModelProto], None], tuple[int, str]] = {
    swap_rope_cos_for_sin: (1, "attn.context"), change_norm_eps: (1, "post_norm"),
    drop_mask_add: (0, "attn.context"), sigmoid_to_tanh: (1, "mlp.act")}


def renamed(model: onnx.ModelProto) -> dict[str, str]:
    """Rename every node and inner tensor meaninglessly, dropping module paths; returns old -> new names."""
    g = model.graph
    kept = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    names = {}
    for k, node in enumerate(g.node):
        node.name = f"n{k}"
        del node.metadata_props[:]
        for j, out in enumerate(node.output):
            if out not in kept:
                names[out] = f"t{k}_{j}"
    for node in g.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    del g.value_info[:]
    return names


def edited(model: onnx.ModelProto, edit: Callable[[onnx.ModelProto], object]) -> onnx.ModelProto:
    """A copy of ``model`` with ``edit`` applied."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    edit(copy)
    return copy
