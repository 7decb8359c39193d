"""Which tensor of someone else's ONNX graph computes each golden tap: a tap map.

A graph exported from a model with Hugging Face's Llama layout keeps its module paths: torch.onnx's
dynamo exporter in each node's metadata (``pkg.torch.onnx.name_scopes``, e.g. ``['', 'model',
'model.layers.0', 'model.layers.0.mlp', 'model.layers.0.mlp.gate_proj', 'linear_4']``, the FX node
last), the TorchScript exporter in node names (``/model/layers.0/mlp/gate_proj/MatMul``). A tap that
is a module's output, or its input, is the one float tensor crossing that module's boundary: it is
found by scope, never by shape, and a boundary crossed by several tensors maps nothing. (Where the
golden holds heads apart, [b, n, s, d], and the module's tensor holds them merged, [b, s, n * d], the
judge views the one as the other: the same values.) Taps inside a
function rather than a module (RoPE, attention scores) have no boundary: they stay unmapped unless
``--tap-map`` names them.

``--tap-map`` is JSON, golden tap -> candidate tensor name; ``{i}`` in both stands for the layer:
``{"layer_{i}.mlp.act": "mlp_{i}_act"}``. It overrides the automatic mapping tap by tap.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import onnx

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class Boundary:
    """A tap as a module boundary: the module's output or its (activation) input."""

    module: str  # module path, {i} for the layer
    side: str  # "output" or "input"


# The Llama layout of transformers (and of Deci's own DeciCoder code).
LLAMA_BOUNDARIES = {
    "embed": Boundary("model.embed_tokens", "output"),
    "layer_{i}.input_norm": Boundary("model.layers.{i}.input_layernorm", "output"),
    "layer_{i}.attn.q": Boundary("model.layers.{i}.self_attn.q_proj", "output"),
    "layer_{i}.attn.k": Boundary("model.layers.{i}.self_attn.k_proj", "output"),
    "layer_{i}.attn.v": Boundary("model.layers.{i}.self_attn.v_proj", "output"),
    "layer_{i}.attn.context": Boundary("model.layers.{i}.self_attn.o_proj", "input"),
    "layer_{i}.attn.out": Boundary("model.layers.{i}.self_attn.o_proj", "output"),
    "layer_{i}.attn_out": Boundary("model.layers.{i}.self_attn.o_proj", "output"),
    "layer_{i}.resid_1": Boundary("model.layers.{i}.post_attention_layernorm", "input"),
    "layer_{i}.post_norm": Boundary("model.layers.{i}.post_attention_layernorm", "output"),
    "layer_{i}.mlp.gate": Boundary("model.layers.{i}.mlp.gate_proj", "output"),
    "layer_{i}.mlp.up": Boundary("model.layers.{i}.mlp.up_proj", "output"),
    "layer_{i}.mlp.act": Boundary("model.layers.{i}.mlp.down_proj", "input"),
    "layer_{i}.mlp.down": Boundary("model.layers.{i}.mlp.down_proj", "output"),
    "layer_{i}.mlp_out": Boundary("model.layers.{i}.mlp", "output"),
    "layer_{i}.out": Boundary("model.layers.{i}", "output"),
    "final_norm": Boundary("model.norm", "output"),
    "logits": Boundary("lm_head", "output"),
}


class TapMapError(ValueError):
    """A --tap-map that names a tap the golden lacks or a tensor the graph lacks (bad usage, exit 2)."""


def node_scope(node: onnx.NodeProto) -> str | None:
    """The module path a node was exported from, or None if the graph does not say."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            scopes = ast.literal_eval(prop.value)  # a Python list literal, the FX node's name last
            return scopes[-2] if len(scopes) >= 2 else ""
    if node.name.startswith("/"):  # TorchScript: /model/layers.0/mlp/gate_proj/MatMul
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


class GraphScopes:
    """The graph's nodes by module path, who reads each tensor, and which tensors are activations."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.graph_outputs = {o.name for o in graph.output}
        self.constants = {i.name for i in graph.initializer}
        self.constants |= {o for node in self.nodes if node.op_type == "Constant" for o in node.output}
        types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
        self.is_float = lambda name: types.get(name, onnx.TensorProto.FLOAT) in FLOAT_TYPES
        self.tensors = {o for node in self.nodes for o in node.output} | {i.name for i in graph.input}
        self.activations = self._activations()
        self.members: dict[str, list[int]] = {}  # module path -> its nodes and its submodules', in graph order
        self.readers: dict[str, set[int]] = {}  # tensor -> the nodes that read it
        for index, node in enumerate(self.nodes):
            for name in node.input:
                self.readers.setdefault(name, set()).add(index)
            if (scope := node_scope(node)) is not None:
                parts = scope.split(".")
                for depth in range(1, len(parts) + 1):
                    self.members.setdefault(".".join(parts[:depth]), []).append(index)

    def _activations(self) -> set[str]:
        """Tensors whose values follow from the token ids (through shapes alone does not count): the
        hidden states and what is computed from them, not RoPE tables or masks, which an exporter may
        compute once inside layer 0 and share with every layer."""
        reached = {"input_ids"}
        for node in self.nodes:  # ONNX keeps nodes in topological order
            if node.op_type not in ("Shape", "Size") and reached.intersection(node.input):
                reached.update(node.output)
        return reached

    def crossing(self, module: str, side: str) -> list[str]:
        """The activations crossing ``module``'s boundary on ``side``, in graph order."""
        inside = self.members.get(module, [])
        within = set(inside)
        produced = {o for index in inside for o in self.nodes[index].output}
        if side == "output":
            found = [o for index in inside for o in self.nodes[index].output
                     if o in self.graph_outputs or not self.readers.get(o, set()) <= within]
        else:
            found = [i for index in inside for i in self.nodes[index].input
                     if i and i not in produced and i not in self.constants]
        return list(dict.fromkeys(t for t in found if t in self.activations and self.is_float(t)))


def expand(template: str, num_layers: int) -> list[tuple[str, int | None]]:
    """(name, layer) for each layer a ``{i}`` template stands for; a plain name once."""
    if "{i}" not in template:
        return [(template, None)]
    return [(template.replace("{i}", str(i)), i) for i in range(num_layers)]


def auto_map(scopes: GraphScopes, golden_taps: list[str], num_layers: int, aside: set[str] = frozenset()
             ) -> dict[str, str]:
    """Each golden tap whose module boundary the graph's scopes show, crossed by exactly one tensor
    other than those ``aside`` (a decode graph's present K/V, which leave every layer beside its output)."""
    mapped = {}
    for template, boundary in LLAMA_BOUNDARIES.items():
        for tap, layer in expand(template, num_layers):
            if tap not in golden_taps:
                continue
            module = boundary.module if layer is None else boundary.module.replace("{i}", str(layer))
            tensors = [t for t in scopes.crossing(module, boundary.side) if t not in aside]
            if len(tensors) == 1:
                mapped[tap] = tensors[0]
    return mapped


def load_tap_map(path: str | Path, tensors: set[str] | None, golden_taps: list[str], num_layers: int
                 ) -> dict[str, str]:
    """--tap-map: golden tap -> tensor name, {i} for the layer; every tap checked, and every tensor
    against the candidate's ``tensors`` (None: an engine, whose outputs are known once it runs)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TapMapError(f"--tap-map {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise TapMapError(f"--tap-map {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise TapMapError(f"--tap-map {path}: expected an object of golden tap -> tensor name (strings)")
    mapped = {}
    for template, tensor_template in entries.items():
        for tap, layer in expand(template, num_layers):
            if tap not in golden_taps:
                raise TapMapError(f"--tap-map {path}: {tap!r} is not a golden tap (e.g. layer_0.mlp.act, logits)")
            tensor = tensor_template if layer is None else tensor_template.replace("{i}", str(layer))
            if tensors is not None and tensor not in tensors:
                raise TapMapError(f"--tap-map {path}: {tap!r} -> {tensor!r}: no tensor of that name in the candidate")
            mapped[tap] = tensor
    return mapped
