"""ONNX lowering of the TensorRT-LLM functional vocabulary (``functional.VOCABULARY``).

Each function here has the signature of the TensorRT-LLM 1.2.1 function of the same name and
mirrors what it does to the network, emitting ONNX nodes where TensorRT-LLM adds TensorRT
layers; the docstring names the function mirrored. TensorRT's build-time view of shapes is
kept: a dimension unknown until run time reads as -1 in ``Tensor.shape``, shape tensors built
from static dimensions are folded to known values, and Python that would break a static
TensorRT graph breaks here too. It is strict: an argument value whose TensorRT behaviour is
not mirrored raises NotImplementedError naming it, and dtype mismatches that a strongly typed
TensorRT network rejects raise TypeError.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 18

# TensorRT-LLM dtype names (str_dtype_to_trt) -> (ONNX type, numpy type)
DTYPES = {
    "float32": (TensorProto.FLOAT, np.float32),
    "float16": (TensorProto.FLOAT16, np.float16),
    "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
    "int64": (TensorProto.INT64, np.int64),
    "int32": (TensorProto.INT32, np.int32),
    "int8": (TensorProto.INT8, np.int8),
    "int4": (TensorProto.INT4, ml_dtypes.int4),  # one value a byte in numpy; packed two a byte in ONNX and TensorRT
    "fp8": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
    "bool": (TensorProto.BOOL, np.bool_),
}
int4 = "int4"  # tensorrt.int4, the DataType constant(as_dtype=) takes for packed INT4 weights
_NUMPY_TO_DTYPE = {np.dtype(np_type): name for name, (_, np_type) in DTYPES.items()}
# Constants that to_onnx can turn into fed weights: floats, and int8, int4 and fp8 (weights stored quantized).
_WEIGHT_DTYPES = ("float32", "float16", "int8", "int4", "fp8")
_FLOATS = ("float32", "float16", "bfloat16")


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise TypeError(f"dtype {dtype!r} is not one of TensorRT-LLM's dtype names {sorted(DTYPES)}")


# ---------------------------------------------------------------- network

class Network:
    """What ``default_net()`` is to TensorRT-LLM: the graph the functional ops add to."""

    def __init__(self, name: str = "decicoder"):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}  # name -> value, turned into initializers by to_onnx
        # folded constant -> (its source constant, how it was computed from it): replayed by refit
        self.folds: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.output_names: set[str] = set()
        self.shapes: dict[str, tuple[int, ...]] = {}  # every value's build-time shape (-1 = dynamic)
        self.opset = OPSET  # raised by the ops that need a newer one (require_opset)
        self._counters: dict[str, itertools.count] = {}

    def require_opset(self, version: int) -> None:
        self.opset = builtins.max(self.opset, version)

    def unique(self, prefix: str) -> str:
        counter = self._counters.setdefault(prefix, itertools.count())
        return f"{prefix}_{next(counter)}"

    def add_input(self, name: str, dtype: str, shape: Sequence[int], dim_names: Sequence[str | None]) -> "Tensor":
        dims = [d if s == -1 else s for s, d in zip(shape, dim_names)]
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[dtype][0], dims))
        self.shapes[name] = tuple(shape)
        return Tensor(name, dtype, tuple(shape))

    def folded(self, dtype: str, shape: Sequence[int], value: np.ndarray | list | None) -> "Tensor | None":
        """Shape arithmetic whose result is known at build time: TensorRT folds it, so does the lowering."""
        if value is None or -1 in shape or any(v is None for v in value):
            return None
        return self.add_constant(np.asarray(value, dtype=DTYPES[dtype][1]).reshape(shape))

    def add_node(self, op: str, inputs: Sequence["Tensor | str"], dtype: str, shape: Sequence[int],
                 value: np.ndarray | list | None = None, **attributes) -> "Tensor":
        if (constant := self.folded(dtype, shape, value)) is not None:
            return constant
        name = self.unique(op.lower())
        output = Tensor(f"{name}:0", dtype, tuple(shape), value)
        self.shapes[output.name] = output.shape
        input_names = [t if isinstance(t, str) else t.name for t in inputs]
        self.nodes.append(helper.make_node(op, input_names, [output.name], name=name, **attributes))
        return output

    def add_constant(self, array: np.ndarray, name: str | None = None) -> "Tensor":
        dtype = _NUMPY_TO_DTYPE.get(array.dtype)
        if dtype is None:
            # TensorRT-LLM's np_dtype_to_trt has no float64 (nor other numpy types): constant() asserts.
            raise TypeError(f"constant: numpy dtype {array.dtype} has no TensorRT counterpart")
        name = name or self.unique("const")
        self.constants[name] = np.asarray(array, order="C")  # ascontiguousarray would make a 0-d array 1-d
        self.shapes[name] = tuple(array.shape)
        value = array if dtype in ("int32", "int64", "bool") and array.size <= 16 else None
        return Tensor(name, dtype, tuple(array.shape), value, is_constant=True)

    def fold(self, source: "Tensor", how: str, compute: Callable[[np.ndarray], np.ndarray]) -> "Tensor":
        """A constant computed at build time from constant ``source`` (TensorRT folds these too)."""
        name = f"{source.name}:{how}"
        if name in self.constants:
            name = self.unique(name)
        self.folds[name] = (source.name, compute)
        return self.add_constant(compute(self.constants[source.name]), name)

    def refit(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Give the constants ``weights`` names new values, as TensorRT's Refitter does, and recompute
        the constants folded from them; returns every constant that changed."""
        arrays = {}
        for name, array in weights.items():
            old = self.constants.get(name)
            if old is not None and old.dtype == ml_dtypes.int4 and array.dtype in (np.int8, np.uint8):
                array = unpack_int4(array, old.shape)  # TensorRT refits INT4 weights as their packed bytes too
            if old is None or old.shape != array.shape or old.dtype != array.dtype:
                found = "no such weight" if old is None else f"the engine's is {old.dtype} {list(old.shape)}"
                raise ValueError(f"refit: {name} {array.dtype} {list(array.shape)}: {found}")
            arrays[name] = array
        for name, (source, compute) in self.folds.items():  # in build order: a fold of a fold comes after
            if source in arrays:
                arrays[name] = compute(arrays[source])
        self.constants.update(arrays)
        return arrays

    def constant_value(self, tensor: "Tensor") -> np.ndarray | None:
        return self.constants.get(tensor.name) if tensor.is_constant else None

    def mark_output(self, tensor: "Tensor", name: str) -> None:
        if name in self.output_names:
            raise ValueError(f"output {name!r} is marked twice")
        if any(i.name == name for i in self.inputs):
            raise ValueError(f"output {name!r} would take an input's name")
        self.output_names.add(name)
        self.nodes.append(helper.make_node("Identity", [tensor.name], [name], name=name))
        dims = [None if d == -1 else d for d in tensor.shape]  # a dynamic dim stays unnamed: its size is run-time
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[tensor.dtype][0], dims))

    def to_onnx(self, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """The graph as an ONNX model, every constant an initializer. With ``weights`` (a dict to
        fill), float constants become graph inputs instead, their arrays go into ``weights`` for the
        runner to feed in place (no copy, no serialisation), and ``refit`` can replace them.
        bfloat16 stays inside: numpy cannot hand it to ONNX Runtime."""
        # Constants that only fed folded shape arithmetic are dead: leave them out.
        used = {name for node in self.nodes for name in node.input}
        initializers, weight_inputs = [], []
        for name, array in self.constants.items():
            if name not in used:
                continue
            if weights is not None and _NUMPY_TO_DTYPE[array.dtype] in _WEIGHT_DTYPES:
                weights[name] = array
                weight_inputs.append(helper.make_tensor_value_info(name, DTYPES[_NUMPY_TO_DTYPE[array.dtype]][0],
                                                                   array.shape))
            else:
                initializers.append(_numpy_to_tensor_proto(array, name))
        graph = helper.make_graph(self.nodes, self.name, self.inputs + weight_inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(node.domain == COLLECTIVES for node in self.nodes):
            opsets.append(helper.make_opsetid(COLLECTIVES, 1))
        return helper.make_model(graph, opset_imports=opsets, producer_name="trt_layers.lowering")


def _numpy_to_tensor_proto(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:
        proto = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
        return proto
    return numpy_helper.from_array(array, name)


_net: Network | None = None


def default_net() -> Network:
    """Mirrors tensorrt_llm._common.default_net: the network set by ``net_guard``."""
    if _net is None:
        raise RuntimeError("no ONNX network is being built: use lowering.net_guard(Network())")
    return _net


@contextlib.contextmanager
def net_guard(network: Network) -> Iterator[Network]:
    """Mirrors tensorrt_llm.network.net_guard."""
    global _net
    previous, _net = _net, network
    try:
        yield network
    finally:
        _net = previous


# ---------------------------------------------------------------- tensor

def _not_mirrored(member: str, why: str):
    """A Tensor member of TensorRT-LLM that the lowering refuses, naming it, rather than guessing."""
    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"Tensor.{member} is not mirrored by the ONNX lowering: {why}")
    refuse.__name__ = member
    return refuse


_GRAPH_REWRITING = "graph rewriting (tensorrt_llm.graph_rewriting) works on TensorRT layers"


class Tensor:
    """Mirrors tensorrt_llm.functional.Tensor: a graph value with a build-time shape (-1 = dynamic).

    ``value`` holds the contents when TensorRT would know them at build time (constants and
    shape arithmetic on static dimensions); None marks an unknown element of a shape tensor.
    Every member of TensorRT-LLM 1.2's Tensor is here: operators build the layers TensorRT-LLM
    builds, and what it leaves to Python's defaults (``!=``, truth value) raises instead.
    """

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], value: np.ndarray | list | None = None,
                 is_constant: bool = False):
        self._name, self._dtype, self._shape = name, dtype, shape
        self.value = None if value is None else list(np.asarray(value, dtype=object).reshape(-1))
        self.is_constant = is_constant

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, new_name: str) -> None:
        """Tensor.name setter: renames the value (constants keep their initializer in sync)."""
        net = default_net()
        if self._name in net.constants:
            net.constants[new_name] = net.constants.pop(self._name)
            net.folds = {new_name if folded == self._name else folded: (new_name if source == self._name else source,
                                                                        compute)
                         for folded, (source, compute) in net.folds.items()}
        if self._name in net.shapes:
            net.shapes[new_name] = net.shapes.pop(self._name)
        for node in net.nodes:
            node.input[:] = [new_name if n == self._name else n for n in node.input]
            node.output[:] = [new_name if n == self._name else n for n in node.output]
        self._name = new_name

    @property
    def dtype(self) -> str:
        """A TensorRT-LLM dtype name (TensorRT-LLM returns the trt.DataType)."""
        return self._dtype

    @dtype.setter
    def dtype(self, dtype) -> None:
        raise NotImplementedError("Tensor.dtype setter is not mirrored: on a strongly typed network "
                                  "change a dtype with cast() or mark_output(dtype=)")

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    location = property(_not_mirrored("location", "the lowering has no host/device placement"))
    network = property(_not_mirrored("network", "use default_net()"))
    get_parent = _not_mirrored("get_parent", _GRAPH_REWRITING)
    get_users = _not_mirrored("get_users", _GRAPH_REWRITING)
    replace_all_uses_with = _not_mirrored("replace_all_uses_with", _GRAPH_REWRITING)
    is_trt_wrapper = _not_mirrored("is_trt_wrapper", _GRAPH_REWRITING)

    def size(self, dim: int | None = None):
        return self._shape if dim is None else self._shape[dim]

    def rank(self) -> int:
        return len(self._shape)

    def ndim(self) -> int:
        return len(self._shape)

    def is_dynamic(self, dim: int | None = None) -> bool:
        """Mirrors Tensor.is_dynamic, which ignores dim 0 when no dim is given."""
        if dim is not None:
            return self._shape[dim] == -1
        return any(s == -1 for i, s in enumerate(self._shape) if i != 0)

    def known(self) -> list | None:
        """Elements of a shape tensor as TensorRT sees them at build time (None = unknown)."""
        return self.value

    def view(self, shape, zero_is_placeholder: bool = True) -> "Tensor":
        return view(self, shape, zero_is_placeholder)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Tensor":
        return flatten(self, start_dim, end_dim)

    def permute(self, dims: Sequence[int]) -> "Tensor":
        return permute(self, dims)

    def transpose(self, dim0: int, dim1: int) -> "Tensor":
        return transpose(self, dim0, dim1)

    def mean(self, dim, keepdim: bool = False) -> "Tensor":
        return mean(self, dim, keepdim)

    def max(self, dim, keepdim: bool = False) -> "Tensor":
        return max(self, dim, keepdim)

    def abs(self) -> "Tensor":
        return abs(self)

    def sqrt(self) -> "Tensor":
        return sqrt(self)

    def squeeze(self, dim, zero_is_placeholder) -> "Tensor":  # no defaults: TensorRT-LLM's method has none
        return squeeze(self, dim, zero_is_placeholder)

    def unsqueeze(self, dim: int) -> "Tensor":
        return unsqueeze(self, dim)

    def log(self) -> "Tensor":
        return log(self)

    def cast(self, dtype) -> "Tensor":
        return cast(self, dtype)

    def split(self, split_size_or_sections, dim: int = 0):
        return split(self, split_size_or_sections, dim)

    def select(self, dim: int, index) -> "Tensor":
        return select(self, dim, index)

    def unbind(self, dim: int = 0):
        return unbind(self, dim)

    def repeat(self, sizes: Sequence[int]) -> "Tensor":
        return repeat(self, sizes)

    def mark_output(self, name: str | None = None, dtype=None) -> None:
        """Mirrors Tensor.mark_output on a strongly typed network: casts to ``dtype`` if given."""
        tensor = self if dtype is None else cast(self, dtype)
        default_net().mark_output(tensor, name or self.name)

    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __floordiv__(self, other): return floordiv(self, other)
    def __mod__(self, other): return modulo(self, other)
    def __lt__(self, other): return lt(self, other)
    def __gt__(self, other): return gt(self, other)
    def __eq__(self, other): return eq(self, other)  # EQUAL (hashes compare only in graph rewriting)
    def __ge__(self, other): return op_or(self > other, self == other)
    def __le__(self, other): return op_or(self < other, self == other)

    def __xor__(self, other):
        """Mirrors Tensor.__xor__: broadcast_helper, then op_xor."""
        return op_xor(*broadcast_helper(self, other))

    def __hash__(self) -> int:
        return id(self)  # TensorRT-LLM hashes the wrapped trt.ITensor's id; the lowering's Tensor is its own

    # TensorRT-LLM defines no __ne__ or __bool__: there `a != b` is `not (a == b)`, the truth value of a
    # Tensor, which Python calls True, so `!=` is always False and `if tensor:` always taken.
    __ne__ = _not_mirrored("__ne__", "TensorRT-LLM's Tensor has none, so `!=` is always False there; "
                                     "build eq() and where() instead")
    __bool__ = _not_mirrored("__bool__", "a Tensor has no value while the network is built (TensorRT-LLM "
                                         "calls every Tensor true); compare .shape, or build where()")

    def __repr__(self) -> str:
        return f"Tensor(name={self.name!r}, dtype={self.dtype}, shape={list(self._shape)})"


# ---------------------------------------------------------------- helpers

_INTS = ("int32", "int64")


def _numpy_dtype(dtype: str):
    return DTYPES[dtype][1]


def _resolve_dim(dim: int, ndim: int, op: str) -> int:
    """dim_resolve_negative, plus the range check TensorRT does when the layer is added."""
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim {dim} is out of range for a rank-{ndim} tensor")
    return dim + ndim if dim < 0 else dim


def constant_to_tensor_(input, dtype=None, to_array: bool = True) -> Tensor:
    """Mirrors functional.constant_to_tensor_: a Python scalar becomes a [1] constant (0-d without
    to_array) of ``dtype``, by default bool, int32 or float32 after its type; a Tensor is returned unchanged."""
    if isinstance(input, Tensor):
        return input
    if dtype is None:
        dtype = "bool" if isinstance(input, bool) else "int32" if isinstance(input, int) else "float32"
    dtype = _dtype_name(dtype)
    if dtype == "int8":
        raise TypeError("constant_to_tensor_: TensorRT-LLM makes no int8 constant from a Python scalar")
    return constant(np.array([input] if to_array else input, dtype=_numpy_dtype(dtype)))


def constants_to_tensors_(*inputs) -> tuple[Tensor, ...]:
    """Mirrors functional.constants_to_tensors_: Python ints become int64 constants when any input is
    an int64 Tensor (or an int outside int32); Tensors, int32 ones included, are returned unchanged."""
    has_int64 = any(isinstance(i, int) and not -2**31 <= i < 2**31 or isinstance(i, Tensor) and i.dtype == "int64"
                    for i in inputs)
    return tuple(constant_to_tensor_(i, "int64" if has_int64 and isinstance(i, int) else None) for i in inputs)


def _broadcast_shape(*shapes: tuple[int, ...], op: str) -> tuple[int, ...]:
    if len({len(s) for s in shapes}) > 1:
        raise ValueError(f"{op}: ranks of {[list(s) for s in shapes]} differ")
    out = []
    for dims in zip(*shapes):
        static = {d for d in dims if d not in (1, -1)}
        if len(static) > 1:
            raise ValueError(f"{op}: shapes {[list(s) for s in shapes]} do not broadcast")
        if static:
            out.append(static.pop())
        elif -1 in dims:
            out.append(-1)
        else:
            out.append(1)
    return tuple(out)


def expand_dims_like(left, right: Tensor) -> Tensor:
    """Mirrors functional.expand_dims_like: an int becomes an int64 constant (dims_array, TensorRT 10), a float
    an fp16 one beside an fp16 ``right``, else fp32; then the rank is padded on the left."""
    if isinstance(left, int):
        left = constant(np.array([left], dtype=np.int64))
    elif isinstance(left, float):
        left = constant(np.array([left], dtype=np.float16 if right.dtype == "float16" else np.float32))
    if right.ndim() > left.ndim():
        return expand_dims(left, list(range(right.ndim() - left.ndim())))
    return left


def broadcast_helper(left, right) -> tuple[Tensor, Tensor]:
    """Mirrors functional.broadcast_helper on a strongly typed network: a scalar takes the other side's dtype."""
    left = constant_to_tensor_(left, right.dtype if isinstance(right, Tensor) else None)
    right = constant_to_tensor_(right, left.dtype)
    if left.rank() < right.rank():
        left = expand_dims_like(left, right)
    elif left.rank() > right.rank():
        right = expand_dims_like(right, left)
    return left, right


def _fold(values_a, values_b, fn):
    if values_a is None or values_b is None:
        return None
    if len(values_a) == 1:
        values_a = values_a * len(values_b)
    if len(values_b) == 1:
        values_b = values_b * len(values_a)
    return [None if a is None or b is None else fn(a, b) for a, b in zip(values_a, values_b)]


def _truncating_div(a, b):
    """Integer division as the unfolded graph computes it (ONNX Div truncates toward zero)."""
    quotient = builtins.abs(a) // builtins.abs(b)
    return quotient if (a < 0) == (b < 0) else -quotient


_ARITHMETIC = (*_INTS, *_FLOATS)
# TensorRT-LLM's elementwise ops: the IElementWiseLayer operation's ONNX form, the input dtypes
# TensorRT accepts for it (its ElementWise operator table; POW takes no integers in TensorRT 10.7,
# so integer pow is left unmirrored), and how shape arithmetic on known ints folds.
_BINARY = {
    "add": ("Add", _ARITHMETIC, operator.add),
    "sub": ("Sub", _ARITHMETIC, operator.sub),
    "mul": ("Mul", _ARITHMETIC, operator.mul),
    "div": ("Div", _ARITHMETIC, _truncating_div),
    "floordiv": ("FloorDiv", _ARITHMETIC, operator.floordiv),
    "pow": ("Pow", _FLOATS, None),
    "gt": ("Greater", _ARITHMETIC, None),
    "lt": ("Less", _ARITHMETIC, None),
    "eq": ("Equal", _ARITHMETIC, None),
    "op_or": ("Or", ("bool",), None),
    "op_xor": ("Xor", ("bool",), None),
}
_BOOL_RESULT = ("gt", "lt", "eq", "op_or", "op_xor")


def elementwise_binary(left, right, op: str) -> Tensor:
    """Mirrors functional.elementwise_binary: IElementWiseLayer after broadcast_helper; int32 meeting
    int64 is cast up, any other dtype mismatch is refused as a strongly typed network refuses it."""
    onnx_op, accepted, fold = _BINARY[op]
    left, right = broadcast_helper(left, right)
    if {left.dtype, right.dtype} == set(_INTS):
        left, right = cast(left, "int64"), cast(right, "int64")
    if left.dtype != right.dtype:
        raise TypeError(f"{op}: operand dtypes differ ({left.dtype} vs {right.dtype}); "
                        "a strongly typed TensorRT network rejects this: cast first")
    if left.dtype not in accepted:
        # TensorRT refuses bool arithmetic and non-bool logic; other gaps (int8, integer POW) are unmirrored.
        refused = left.dtype == "bool" or accepted == ("bool",)
        raise (TypeError if refused else NotImplementedError)(
            f"{op}: TensorRT's elementwise layer takes {list(accepted)} for it, not {left.dtype}")
    shape = _broadcast_shape(left.shape, right.shape, op=op)
    dtype = "bool" if op in _BOOL_RESULT else left.dtype
    value = _fold(left.known(), right.known(), fold) if fold and dtype in _INTS else None
    if onnx_op == "FloorDiv":
        return _floor_div(left, right, shape, value)
    return default_net().add_node(onnx_op, [left, right], dtype, shape, value)


def _floor_div(left: Tensor, right: Tensor, shape: tuple[int, ...], value) -> Tensor:
    """ElementWiseOperation.FLOOR_DIV in ONNX: Floor(a / b) for floats; (a - Mod(a, b)) / b for
    integers, where Mod takes the divisor's sign (fmod=0) so the division is exact."""
    net = default_net()
    if (constant := net.folded(left.dtype, shape, value)) is not None:
        return constant
    if left.dtype in _FLOATS:
        quotient = net.add_node("Div", [left, right], left.dtype, shape)
        return net.add_node("Floor", [quotient], left.dtype, shape)
    remainder = net.add_node("Mod", [left, right], left.dtype, shape, fmod=0)
    multiple = net.add_node("Sub", [left, remainder], left.dtype, shape)
    return net.add_node("Div", [multiple, right], left.dtype, shape, value)


def add(left, right): return elementwise_binary(left, right, "add")  # noqa: E704
def sub(left, right): return elementwise_binary(left, right, "sub")  # noqa: E704
def mul(left, right): return elementwise_binary(left, right, "mul")  # noqa: E704
def div(left, right): return elementwise_binary(left, right, "div")  # noqa: E704
def floordiv(left, right): return elementwise_binary(left, right, "floordiv")  # noqa: E704
def pow(left, right): return elementwise_binary(left, right, "pow")  # noqa: E704,A001
def gt(left, right): return elementwise_binary(left, right, "gt")  # noqa: E704
def lt(left, right): return elementwise_binary(left, right, "lt")  # noqa: E704
def eq(left, right): return elementwise_binary(left, right, "eq")  # noqa: E704
def op_or(left, right): return elementwise_binary(left, right, "op_or")  # noqa: E704
def op_xor(left, right): return elementwise_binary(left, right, "op_xor")  # noqa: E704


def modulo(x: Tensor, y) -> Tensor:
    """Mirrors functional.modulo: x - (x // y) * y (TensorRT has no modulo layer)."""
    return x - (x // y) * y


# ---------------------------------------------------------------- the vocabulary

def constant(ndarray: np.ndarray, as_dtype=None, as_shape=None) -> Tensor:
    """Mirrors functional.constant (IConstantLayer). ``as_dtype=int4`` with ``as_shape``: ``ndarray``'s bytes are
    INT4 values packed two a byte, low nibble first, in row-major order (trt.Weights of INT4)."""
    if as_dtype is None and as_shape is None:
        return default_net().add_constant(ndarray)
    if as_dtype != int4 or as_shape is None:
        raise NotImplementedError(f"constant(as_dtype={as_dtype!r}, as_shape={as_shape!r}) is not mirrored "
                                  "(as_dtype=int4 with as_shape is)")
    return default_net().add_constant(unpack_int4(ndarray, tuple(as_shape)))


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """INT4 values of ``shape`` from their packed bytes (two a byte, low nibble first), one value a byte."""
    count = math.prod(shape)
    if packed.dtype not in (np.int8, np.uint8) or packed.size != (count + 1) // 2:
        raise ValueError(f"INT4 {list(shape)} needs {(count + 1) // 2} packed int8 bytes, not {packed.dtype} "
                         f"{list(packed.shape)}")
    nibbles = np.ascontiguousarray(packed).view(np.uint8).reshape(-1, 1) >> np.array([0, 4], np.uint8) & 0x0F
    values = (nibbles.astype(np.int8) ^ 8) - 8  # sign-extend
    return values.reshape(-1)[:count].reshape(shape).astype(ml_dtypes.int4)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """unpack_int4's inverse: the packed uint8 bytes of INT4 ``values``."""
    flat = values.astype(np.int8).reshape(-1)
    flat = np.concatenate([flat, np.zeros(flat.size % 2, np.int8)]).view(np.uint8) & 0x0F
    return flat[0::2] | flat[1::2] << 4


def torch_to_numpy(x: torch.Tensor) -> np.ndarray:
    """Mirrors tensorrt_llm._utils.torch_to_numpy; bfloat16 and float8_e4m3fn arrays use ml_dtypes (where
    TensorRT-LLM views their bytes as np_bfloat16, np_float8)."""
    if x.dtype == torch.bfloat16:
        return x.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if x.dtype == torch.float8_e4m3fn:
        return x.detach().cpu().view(torch.int8).numpy().view(ml_dtypes.float8_e4m3fn)
    return x.detach().cpu().numpy()


def cast(input: Tensor, dtype) -> Tensor:
    """Mirrors functional.cast (ICastLayer); casting to the same dtype returns the input itself."""
    if not isinstance(dtype, str):
        raise TypeError(f"cast: {dtype!r} is not a dtype name")
    dtype = _dtype_name(dtype)
    if input.dtype == dtype:
        return input
    if "int4" in (input.dtype, dtype):
        raise TypeError(f"cast: {input.dtype} to {dtype}: TensorRT reads INT4 weights only through dequantize")
    if default_net().constant_value(input) is not None:
        return default_net().fold(input, dtype, lambda array: array.astype(_numpy_dtype(dtype)))
    return default_net().add_node("Cast", [input], dtype, input.shape, input.known(), to=DTYPES[dtype][0])


def identity(input: Tensor) -> Tensor:
    """Mirrors functional.identity (IIdentityLayer; the identity plugin is off by default)."""
    return default_net().add_node("Identity", [input], input.dtype, input.shape, input.known())


def matmul(input: Tensor, mat2: Tensor, transa: bool = False, transb: bool = False,
           use_fp32_acc: bool = True) -> Tensor:
    """Mirrors functional.matmul: fp16 x fp16 runs in fp32 by default; transposes act on the last two dims."""
    use_fp32_acc = use_fp32_acc and input.dtype == "float16" and mat2.dtype == "float16"
    if use_fp32_acc:
        input, mat2 = cast(input, "float32"), cast(mat2, "float32")
    weight = default_net().constant_value(mat2)
    if weight is not None and weight.ndim == 2 and transb and not transa and input.ndim() >= 2:
        output = _linear(input, mat2)
        return cast(output, "float16") if use_fp32_acc else output
    input, mat2 = broadcast_helper(input, mat2)
    if input.dtype != mat2.dtype:
        raise TypeError(f"matmul: operand dtypes differ ({input.dtype} vs {mat2.dtype})")
    if transa:
        input = transpose(input, -2, -1)
    if transb:
        mat2 = transpose(mat2, -2, -1)
    (m, k1), (k2, n) = input.shape[-2:], mat2.shape[-2:]
    if -1 not in (k1, k2) and k1 != k2:
        raise ValueError(f"matmul: inner dimensions differ: {list(input.shape)} x {list(mat2.shape)}")
    batch = _broadcast_shape(input.shape[:-2], mat2.shape[:-2], op="matmul")
    output = default_net().add_node("MatMul", [input, mat2], input.dtype, (*batch, m, n))
    return cast(output, "float16") if use_fp32_acc else output


def _linear(input: Tensor, weight: Tensor) -> Tensor:
    """input @ weight^T for a constant 2-D weight [out, in], as ONNX Gemm(transB=1) on the rows of
    input: the same product as MatMul on the transposed weight, without copying the weight."""
    if input.dtype != weight.dtype:
        raise TypeError(f"matmul: operand dtypes differ ({input.dtype} vs {weight.dtype})")
    n, k = weight.shape
    if input.shape[-1] not in (-1, k):
        raise ValueError(f"matmul: inner dimensions differ: {list(input.shape)} x {list(weight.shape)}^T")
    rows = view(input, [-1, k])
    product = default_net().add_node("Gemm", [rows, weight], input.dtype, (rows.shape[0], n), transB=1)
    leading = [shape(input, i) for i in range(input.ndim() - 1)]
    return view(product, concat([*leading, n]))


def _shape_tensor_values(shape: Tensor) -> list | None:
    if shape.ndim() != 1 or shape.shape[0] == -1:
        raise ValueError(f"a shape tensor must be 1-D with a static length, got {list(shape.shape)}")
    return shape.known() or [None] * shape.shape[0]


def _as_shape_tensor(dims: Sequence[int]) -> Tensor:
    return constant(np.asarray(dims, dtype=np.int64))


def view(input: Tensor, shape, zero_is_placeholder: bool = True) -> Tensor:
    """Mirrors functional.view (IShuffleLayer reshape): 0 copies the input dim when zero_is_placeholder."""
    if isinstance(shape, Tensor):
        dims = _shape_tensor_values(shape)
        shape_tensor = shape if shape.dtype == "int64" else cast(shape, "int64")
    else:
        dims = list(shape)
        shape_tensor = _as_shape_tensor(dims)
    if dims.count(-1) > 1:
        raise ValueError(f"view: more than one inferred (-1) dimension in {dims}")
    out = []
    for i, d in enumerate(dims):
        if d is None:
            out.append(-1)
        elif d == 0 and zero_is_placeholder:
            out.append(input.shape[i])
        else:
            out.append(d)
    if -1 in out and out.count(-1) == 1 and -1 not in input.shape and dims.count(-1) == 1:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(input.shape) // known if known else -1
    if -1 not in out and -1 not in input.shape and math.prod(out) != math.prod(input.shape):
        raise ValueError(f"view: {list(input.shape)} has {math.prod(input.shape)} elements, {out} has {math.prod(out)}")
    if default_net().constant_value(input) is not None and -1 not in out:
        return default_net().fold(input, "reshape", lambda array: array.reshape(out))
    value = None
    if input.known() is not None and -1 not in out:
        value = input.known()
    return default_net().add_node("Reshape", [input, shape_tensor], input.dtype, out, value,
                                  allowzero=0 if zero_is_placeholder else 1)


def permute(input: Tensor, dims: Sequence[int]) -> Tensor:
    """Mirrors functional.permute (IShuffleLayer second_transpose)."""
    dims = [_resolve_dim(d, input.ndim(), "permute") for d in dims]
    if sorted(dims) != list(range(input.ndim())):
        raise ValueError(f"permute: {dims} is not a permutation of {input.ndim()} dims")
    if default_net().constant_value(input) is not None:  # a weight used transposed: transpose it once, at build time
        return default_net().fold(input, "transpose", lambda array: np.ascontiguousarray(array.transpose(dims)))
    return default_net().add_node("Transpose", [input], input.dtype, [input.shape[d] for d in dims], perm=dims)


def transpose(input: Tensor, dim0: int, dim1: int) -> Tensor:
    """Mirrors functional.transpose: a permute swapping two dims."""
    dims = list(range(input.ndim()))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(input, dims)


def shape(input: Tensor, dim: int | None = None, cast_to_dtype=None, clip_before_cast=None) -> Tensor:
    """Mirrors functional.shape: IShapeLayer (int64 in TensorRT 10); ``dim`` gives a 0-d tensor."""
    if cast_to_dtype is not None or clip_before_cast is not None:
        raise NotImplementedError("shape(cast_to_dtype=, clip_before_cast=) is not mirrored")
    known = [None if d == -1 else d for d in input.shape]
    full = default_net().add_node("Shape", [input], "int64", (input.ndim(),), known)
    if dim is None:
        return full
    dim = _resolve_dim(dim, input.ndim(), "shape")
    index = constant(np.asarray(dim, dtype=np.int64))
    return default_net().add_node("Gather", [full, index], "int64", (), [known[dim]], axis=0)


def concat(inputs: Sequence, dim: int = 0) -> Tensor:
    """Mirrors functional.concat (IConcatenationLayer): constants_to_tensors_ turns Python ints into
    constants, 0-d inputs become [1]; the layer takes one dtype, so an int32 Tensor beside int64 is refused."""
    if not inputs:
        raise ValueError("concat of nothing: TensorRT-LLM asserts at least one input")
    tensors = [t.view([1]) if t.rank() == 0 else t for t in constants_to_tensors_(*inputs)]
    dtypes = sorted({t.dtype for t in tensors})
    if len(dtypes) > 1:
        raise TypeError(f"concat: inputs have dtypes {dtypes}; TensorRT concatenates one dtype "
                        "(TensorRT-LLM promotes Python ints only): cast first")
    ndim = tensors[0].ndim()
    axis = _resolve_dim(dim, ndim, "concat")
    if any(t.ndim() != ndim for t in tensors):
        raise ValueError(f"concat: ranks differ: {[list(t.shape) for t in tensors]}")
    shape_out = []
    for i, sizes in enumerate(zip(*(t.shape for t in tensors))):
        static = {d for d in sizes if d != -1}
        if i == axis:
            shape_out.append(-1 if -1 in sizes else builtins.sum(sizes))
        elif len(static) > 1:
            raise ValueError(f"concat: shapes {[list(t.shape) for t in tensors]} differ outside dim {axis}")
        else:
            shape_out.append(static.pop() if static else -1)
    sizes = [t.shape[axis] for t in tensors]
    value = None
    if ndim == 1 and tensors[0].dtype in _INTS and -1 not in sizes:
        value = [v for t in tensors for v in (t.known() or [None] * t.shape[0])]
    return default_net().add_node("Concat", tensors, tensors[0].dtype, shape_out, value, axis=axis)


def expand_dims(input: Tensor, dim, shape_cast_dtype=None) -> Tensor:
    """Mirrors functional.expand_dims: a view to a shape tensor with 1s at the output positions ``dim``."""
    if shape_cast_dtype is not None:
        raise NotImplementedError("expand_dims(shape_cast_dtype=) is not mirrored")
    dims = [dim] if isinstance(dim, int) else list(dim)
    out_ndim = input.ndim() + len(dims)
    if any(not 0 <= d < out_ndim for d in dims):
        # TensorRT-LLM tests `i in dim` for i in range(out_ndim): another value inserts no axis and
        # gathers past the end of the input's shape.
        raise ValueError(f"expand_dims: dims {dims} must lie in [0, {out_ndim})")
    input_shape = shape(input)
    out_shapes, j = [], 0
    for i in range(out_ndim):
        if i in dims:
            out_shapes.append(1)
        else:
            out_shapes.append(gather(input_shape, 0, j))
            j += 1
    return view(input, concat(out_shapes), zero_is_placeholder=False)


def gather(input: Tensor, dim: int, indices) -> Tensor:
    """Mirrors functional.gather (GatherElements semantics); used here on shape tensors."""
    if isinstance(indices, int):
        indices = constant(np.asarray([indices], dtype=np.int32))
    if input.rank() != indices.rank():
        raise ValueError("gather: input and indices must have the same rank")
    dim = _resolve_dim(dim, input.ndim(), "gather")
    value = None
    if input.known() is not None and indices.known() is not None and input.ndim() == 1:
        value = [input.known()[int(i)] for i in indices.known()]
    indices = cast(indices, "int64")
    return default_net().add_node("GatherElements", [input, indices], input.dtype, indices.shape, value, axis=dim)


def unsqueeze(input: Tensor, axis: int) -> Tensor:
    """Mirrors functional.unsqueeze."""
    if axis < 0:
        axis = axis + input.ndim() + 1
    return expand_dims(input, axis)


def expand(input: Tensor, expand_shape: Tensor) -> Tensor:
    """Mirrors functional.expand (an ISliceLayer with stride 0 on size-1 dims)."""
    if not isinstance(expand_shape, Tensor):
        raise TypeError("expand: expand_shape must be a shape Tensor (build it with concat)")
    dims = _shape_tensor_values(expand_shape)
    if len(dims) != input.ndim():
        raise ValueError(f"expand: rank {input.ndim()} input, {len(dims)}-element shape")
    for have, want in zip(input.shape, dims):
        # TensorRT's slice would shrink such a dim; ONNX Expand would not: refuse rather than differ.
        if want is not None and have not in (1, -1) and want != have:
            raise NotImplementedError(f"expand of a dim of size {have} to {want} is not mirrored")
    out = [-1 if want is None else want for want in dims]
    return default_net().add_node("Expand", [input, cast(expand_shape, "int64")], input.dtype, out)


def repeat_interleave(tensor: Tensor, repeats: int, dim: int) -> Tensor:
    """Mirrors functional.repeat_interleave, which does not resolve a negative ``dim``."""
    if dim < 0:
        raise NotImplementedError("repeat_interleave with a negative dim: TensorRT-LLM inserts the axis at the front")
    expanded_tensor = expand_dims(tensor, dim + 1)
    tile_output_size = concat([repeats if i == dim + 1 else shape(expanded_tensor, i)
                               for i in range(expanded_tensor.ndim())])
    tile = expand(expanded_tensor, tile_output_size)
    tile_reshape_size = [shape(tensor, i) for i in range(tensor.ndim())]
    tile_reshape_size[dim] = tile_reshape_size[dim] * repeats
    return tile.view(concat(tile_reshape_size))


def slice(input: Tensor, starts, sizes, strides=None, mode=None, fill_value=None) -> Tensor:  # noqa: A001
    """Mirrors functional.slice (ISliceLayer): starts and sizes, not ends."""
    if mode is not None or fill_value is not None:
        raise NotImplementedError("slice(mode=, fill_value=) is not mirrored")
    ndim = input.ndim()
    strides = [1] * ndim if strides is None else strides
    if isinstance(strides, Tensor) or any(s < 1 for s in strides):
        raise NotImplementedError("slice with a strides Tensor or non-positive strides is not mirrored")
    starts_t = cast(starts, "int64") if isinstance(starts, Tensor) else _as_shape_tensor(starts)
    sizes_t = cast(sizes, "int64") if isinstance(sizes, Tensor) else _as_shape_tensor(sizes)
    strides_t = _as_shape_tensor(strides)
    ends_t = starts_t + sizes_t * strides_t
    size_values = _shape_tensor_values(sizes_t)
    out = [-1 if s is None else s for s in size_values]
    axes = _as_shape_tensor(list(range(ndim)))
    return default_net().add_node("Slice", [input, starts_t, ends_t, axes, strides_t], input.dtype, out)


def split(tensor: Tensor, split_size_or_sections, dim: int = 0) -> list[Tensor]:
    """Mirrors functional.split: the split dim must be static; other dims may be dynamic."""
    if tensor.is_dynamic(dim):
        raise ValueError(f"split: dim {dim} of {list(tensor.shape)} is dynamic; TensorRT-LLM asserts it is static")
    dim = _resolve_dim(dim, tensor.ndim(), "split")
    total = tensor.shape[dim]
    if isinstance(split_size_or_sections, int):
        if total % split_size_or_sections:
            raise ValueError(f"split: {total} is not divisible by {split_size_or_sections}")
        sections = [split_size_or_sections] * (total // split_size_or_sections)
    else:
        sections = list(split_size_or_sections)
        if builtins.sum(sections) != total:
            raise ValueError(f"split: sections {sections} do not sum to {total}")
    outputs, start = [], 0
    for size in sections:
        starts = [0] * tensor.ndim()
        starts[dim] = start
        sizes = [shape(tensor, i) if i != dim else size for i in range(tensor.ndim())]
        outputs.append(slice(tensor, concat(starts), concat(sizes)))
        start += size
    return outputs


def unbind(input: Tensor, dim: int = 0) -> list[Tensor]:
    """Mirrors functional.unbind: split into size-1 slices, each viewed to the input's build-time shape
    without ``dim`` (a static view: more than one dynamic dim fails, as in TensorRT-LLM)."""
    output_shape = [input.shape[i] for i in range(input.ndim()) if i != dim]
    return [output.view(output_shape) for output in split(input, 1, dim)]


def repeat(input: Tensor, sizes: Sequence[int]) -> Tensor:
    """Mirrors functional.repeat: concatenates ``sizes[k]`` copies along each dim k, from the last."""
    if input.ndim() > len(sizes):
        raise ValueError(f"repeat: {len(sizes)} sizes for a rank-{input.ndim()} tensor")
    repeated = input
    for k in range(-1, -len(sizes) - 1, -1):
        repeated = concat([repeated] * sizes[k], dim=k)
    return repeated


def select(input: Tensor, dim: int, index) -> Tensor:
    """Mirrors functional.select: IGatherLayer of one index (an int becomes an int32 [1] constant), then a
    view without ``dim``."""
    if isinstance(index, int):
        index = constant(np.array([index], dtype=np.int32))
    if index.rank() != 1 or index.size(0) != 1:
        raise ValueError(f"select: index has shape {list(index.shape)}; TensorRT-LLM asserts [1]")
    if dim < 0:
        raise NotImplementedError("select with a negative dim: TensorRT-LLM keeps every dim in its view")
    new_shape = [shape(input, i) for i in range(input.rank()) if i != dim]
    gathered_shape = tuple(1 if i == dim else s for i, s in enumerate(input.shape))
    gathered = default_net().add_node("Gather", [input, index], input.dtype, gathered_shape, axis=dim)
    return gathered.view(concat(new_shape))


def flatten(input: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Mirrors functional.flatten: a static view whose flattened dim is the product of build-time sizes."""
    ndim = input.ndim()
    start_dim, end_dim = (d + ndim if d < 0 else d for d in (start_dim, end_dim))
    flattened = input.shape[start_dim:end_dim + 1]
    if -1 in flattened:
        raise NotImplementedError(f"flatten of dynamic dims {list(flattened)}: TensorRT-LLM would multiply "
                                  "their -1 into the view")
    new_shape = [*input.shape[:start_dim], *([math.prod(flattened)] if flattened else []),
                 *input.shape[end_dim + 1:]]
    return view(input, new_shape)


def squeeze(input: Tensor, dim=None, zero_is_placeholder: bool = False) -> Tensor:
    """Mirrors functional.squeeze: drops the dims in ``dim`` (all by default) whose build-time size is 1
    (a dynamic dim stays), viewing to the remaining shape() entries."""
    dims = range(input.ndim()) if dim is None else [dim] if isinstance(dim, int) else dim
    dims = [d + input.ndim() if d < 0 else d for d in dims]
    new_shape = [shape(input, i) for i, s in enumerate(input.shape) if not (s == 1 and i in dims)]
    return input.view(concat(new_shape) if new_shape else [], zero_is_placeholder=zero_is_placeholder)


def _unary(op: str, input: Tensor, accepted: Sequence[str] = _FLOATS) -> Tensor:
    if input.dtype not in accepted:
        raise NotImplementedError(f"{op} on {input.dtype} is not mirrored")
    return default_net().add_node(op, [input], input.dtype, input.shape)


def sqrt(input: Tensor) -> Tensor:
    """Mirrors functional.sqrt (IUnaryLayer SQRT)."""
    return _unary("Sqrt", input)


def exp(input: Tensor) -> Tensor:
    """Mirrors functional.exp (IUnaryLayer EXP)."""
    return _unary("Exp", input)


def log(input: Tensor) -> Tensor:
    """Mirrors functional.log (IUnaryLayer LOG)."""
    return _unary("Log", input)


def abs(input: Tensor) -> Tensor:  # noqa: A001
    """Mirrors functional.abs (IUnaryLayer ABS, which takes integers too)."""
    return _unary("Abs", input, _ARITHMETIC)


def sigmoid(input: Tensor) -> Tensor:
    """Mirrors functional.sigmoid (IActivationLayer SIGMOID)."""
    return _unary("Sigmoid", input)


def silu(input: Tensor) -> Tensor:
    """Mirrors functional.silu: input * sigmoid(input)."""
    return input * sigmoid(input)


def softmax(input: Tensor, dim: int | None = None) -> Tensor:
    """Mirrors functional.softmax (ISoftMaxLayer): default dim is the last; no dtype upcast."""
    dim = input.ndim() - 1 if dim is None else _resolve_dim(dim, input.ndim(), "softmax")
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f"softmax on {input.dtype} is not mirrored")
    return default_net().add_node("Softmax", [input], input.dtype, input.shape, axis=dim)


def _reduce(op: str, input: Tensor, dim, keepdim: bool, accepted: Sequence[str]) -> Tensor:
    """Mirrors functional.reduce (IReduceLayer over ``dim``, an int or a tuple)."""
    if input.dtype not in accepted:
        raise NotImplementedError(f"{op} on {input.dtype} is not mirrored")
    dims = sorted(_resolve_dim(d, input.ndim(), op) for d in ([dim] if isinstance(dim, int) else dim))
    out = [1 if i in dims else s for i, s in enumerate(input.shape) if keepdim or i not in dims]
    axes = _as_shape_tensor(dims)
    return default_net().add_node(op, [input, axes], input.dtype, out, keepdims=int(keepdim))


def mean(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    """Mirrors functional.mean (IReduceLayer AVG)."""
    return _reduce("ReduceMean", input, dim, keepdim, _FLOATS)


def max(input: Tensor, dim, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Mirrors functional.max (IReduceLayer MAX)."""
    return _reduce("ReduceMax", input, dim, keepdim, _ARITHMETIC)


def sum(input: Tensor, dim, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Mirrors functional.sum (IReduceLayer SUM)."""
    return _reduce("ReduceSum", input, dim, keepdim, _ARITHMETIC)


# ---------------------------------------------------------------- explicit quantization

def _check_scale(op: str, input: Tensor, scale_factor: Tensor, axis: int) -> int:
    """The axis of a per-channel scale (a 1-D scale of input's size there), or -1 for a per-tensor one
    (0-d or one element). Other scale shapes (TensorRT's blocked quantization) are not mirrored."""
    if scale_factor.dtype not in _FLOATS:
        raise TypeError(f"{op}: the scale must be a float tensor, not {scale_factor.dtype}")
    if math.prod(scale_factor.shape) == 1 and len(scale_factor.shape) <= 1:
        return -1
    axis = _resolve_dim(axis, len(input.shape), op)
    if len(scale_factor.shape) != 1 or scale_factor.shape[0] != input.shape[axis]:
        raise NotImplementedError(f"{op}: a scale of shape {list(scale_factor.shape)} for input "
                                  f"{list(input.shape)} along axis {axis} (blocked quantization) is not mirrored")
    return axis


def quantize(input: Tensor, scale_factor: Tensor, dtype: str, axis: int = -1) -> Tensor:
    """Mirrors quantization.functional.quantize (IQuantizeLayer): input / scale rounded half to even, saturated
    to int8's [-128, 127] or fp8 e4m3's [-448, 448]; per tensor, or (int8) per channel along ``axis``."""
    if dtype not in ("int8", "fp8"):
        raise NotImplementedError(f"quantize to {dtype} is not mirrored (int8 and fp8 are)")
    if input.dtype != scale_factor.dtype or input.dtype not in _FLOATS:
        raise TypeError(f"quantize: a {input.dtype} input with a {scale_factor.dtype} scale (a strongly typed "
                        "network takes the input's float type for both)")
    channel_axis = _check_scale("quantize", input, scale_factor, axis)
    if dtype == "fp8" and channel_axis >= 0:
        raise NotImplementedError("quantize: fp8 with a per-channel scale is not mirrored (per tensor is)")
    # ONNX takes the output type from the zero point: a zero of the output type, as TensorRT's symmetric
    # quantization.
    zero = default_net().add_constant(np.zeros(scale_factor.shape, DTYPES[dtype][1]))
    if input.dtype != "float32" or dtype == "fp8":
        default_net().require_opset(19)  # QuantizeLinear-19 takes fp16/bf16 inputs and scales, and outputs fp8
    return default_net().add_node("QuantizeLinear", [input, scale_factor, zero], dtype, input.shape,
                                  **({"axis": channel_axis} if channel_axis >= 0 else {}))


def dequantize(input: Tensor, scale_factor: Tensor, axis: int = -1, output_type="float16") -> Tensor:
    """Mirrors quantization.functional.dequantize (IDequantizeLayer): int8 or int4 input times scale, per tensor
    or per channel along ``axis``, or (int4 weights, 2-D) in blocks along ``axis``, as ``output_type``."""
    if input.dtype not in ("int8", "int4", "fp8"):
        raise NotImplementedError(f"dequantize of {input.dtype} is not mirrored (int8, int4 and fp8 are)")
    output_type = _dtype_name(output_type)
    if output_type not in _FLOATS:
        raise TypeError(f"dequantize: output_type {output_type} is not a float type")
    if input.dtype == "int4" and default_net().constant_value(input) is None:
        raise TypeError("dequantize: TensorRT takes INT4 input only from a constant (weights)")
    if input.dtype == "int4" and len(scale_factor.shape) == len(input.shape) == 2:
        attributes = _block("dequantize", input, scale_factor, axis)
    else:
        channel_axis = _check_scale("dequantize", input, scale_factor, axis)
        attributes = {"axis": channel_axis} if channel_axis >= 0 else {}
    if scale_factor.dtype != "float32" or input.dtype == "fp8":
        default_net().require_opset(19)  # DequantizeLinear-19 takes fp16/bf16 scales (output in their type), fp8
    if input.dtype == "int4":
        default_net().require_opset(21)  # INT4 and block_size arrive in opset 21
    # DequantizeLinear multiplies in the scale's type; TensorRT's output_type is a cast of that product.
    scaled = default_net().add_node("DequantizeLinear", [input, scale_factor], scale_factor.dtype, input.shape,
                                    **attributes)
    return cast(scaled, output_type)


def _block(op: str, input: Tensor, scale_factor: Tensor, axis: int) -> dict[str, int]:
    """TensorRT's blocked quantization of 2-D weights: the scale has the input's shape except along ``axis``,
    where each of its rows covers a block of input rows (the block size is the ratio of the two)."""
    axis = _resolve_dim(axis, 2, op)
    other = 1 - axis
    rows, scale_rows = input.shape[axis], scale_factor.shape[axis]
    if scale_factor.shape[other] != input.shape[other] or scale_rows < 1 or rows % scale_rows:
        raise ValueError(f"{op}: a blocked scale {list(scale_factor.shape)} does not tile input "
                         f"{list(input.shape)} along axis {axis}")
    return {"axis": axis, "block_size": rows // scale_rows}


def rms_norm(input: Tensor, normalized_shape, num_groups: int = 1, weight: Tensor | None = None,
             eps: float = 1e-06) -> Tensor:
    """Mirrors functional.rms_norm (no plugin): fp32 mean of squares, divide by the root, cast back, scale."""
    if num_groups != 1:
        raise NotImplementedError("rms_norm(num_groups != 1) is not mirrored")
    normalized_shape = [normalized_shape] if isinstance(normalized_shape, int) else normalized_shape
    dim = tuple(-i - 1 for i in range(len(normalized_shape)))
    input_dtype = input.dtype
    fp32_input = cast(input, "float32")
    varx = pow(fp32_input, 2.0)
    varx = varx.mean(dim=dim, keepdim=True)
    denom = varx + eps
    denom = denom.sqrt()
    fp32_y = fp32_input / denom
    y = cast(fp32_y, input_dtype)
    if weight is not None:
        y = y * weight
    return y


def where(condition, left, right) -> Tensor:
    """Mirrors functional.where (ISelectLayer): a bool condition becomes a constant, the branches go
    through constants_to_tensors_ (so 0 beside an int64 Tensor is int64, 0.0 is always fp32), then each
    is padded to the largest rank; the layer takes a bool condition and branches of one dtype."""
    condition = constant_to_tensor_(condition)
    left, right = constants_to_tensors_(left, right)
    largest = condition
    if largest.rank() < left.rank():
        largest = left
    if largest.rank() < right.rank():
        largest = right
    condition, left, right = (t if t is largest else expand_dims_like(t, largest) for t in (condition, left, right))
    if condition.dtype != "bool":
        raise TypeError(f"where: the condition is {condition.dtype}; TensorRT's select layer takes bool")
    if left.dtype != right.dtype:
        raise TypeError(f"where: branch dtypes differ ({left.dtype} vs {right.dtype}); "
                        "a strongly typed TensorRT network rejects this: cast first")
    shape_out = _broadcast_shape(condition.shape, left.shape, right.shape, op="where")
    return default_net().add_node("Where", [condition, left, right], left.dtype, shape_out)


def arange(start, end, dtype: str) -> Tensor:
    """Mirrors functional.arange (IFillLayer LINSPACE, step 1): from ints (constants of the result's
    integer type) or from integer Tensors, a 0-d start and a one-element end; of an int32 and an int64
    Tensor, TensorRT-LLM casts one to int32 for an int32 result, else to int64."""
    res_dtype = _dtype_name(dtype)
    int_dtype = "int32" if res_dtype == "int32" else "int64"
    if isinstance(start, int):
        if not isinstance(end, int):
            raise TypeError("arange: an int start needs an int end")
        start, end = (constant(np.asarray(v, dtype=_numpy_dtype(int_dtype))) for v in (start, end))
    elif isinstance(start, Tensor):
        if not isinstance(end, Tensor) or start.dtype not in _INTS or end.dtype not in _INTS:
            raise TypeError("arange: Tensor start and end must both be int32 or int64 Tensors")
        if start.dtype != end.dtype:
            start, end = cast(start, int_dtype), cast(end, int_dtype)
    else:
        raise TypeError(f"arange: {type(start).__name__} start is not supported")
    if start.rank() != 0:
        raise ValueError(f"arange: start has shape {list(start.shape)}; the fill layer's start is a scalar")
    if -1 not in end.shape and math.prod(end.shape) != 1:
        raise ValueError(f"arange: end has shape {list(end.shape)}; TensorRT-LLM views end - start as [1]")
    limit = end if end.rank() == 0 else end.view([])  # ONNX Range takes scalars
    step = constant(np.asarray(1, dtype=_numpy_dtype(start.dtype)))
    count = _fold(limit.known(), start.known(), operator.sub)
    length = -1 if count is None or count[0] is None else int(count[0])
    value = None if length == -1 or length > 16 else [int(start.known()[0]) + i for i in range(length)]
    tensor = default_net().add_node("Range", [start, limit, step], start.dtype, (length,), value)
    return cast(tensor, res_dtype)


def embedding(input: Tensor, weight: Tensor, tp_size: int = 1, tp_group=None, sharding_dim: int = 0,
              tp_rank=None, per_token_scale=None, padding=None) -> Tensor:
    """Mirrors functional.embedding without tensor parallelism: IGatherLayer on axis 0."""
    if tp_size != 1 or per_token_scale is not None or padding is not None:
        raise NotImplementedError("embedding with tensor parallelism, per_token_scale or padding is not mirrored")
    if input.dtype not in ("int32", "int64"):
        raise TypeError(f"embedding: indices must be integers, got {input.dtype}")
    return default_net().add_node("Gather", [weight, input], weight.dtype, (*input.shape, *weight.shape[1:]), axis=0)


# ---------------------------------------------------------------- collectives

# TensorRT-LLM's collectives are NCCL plugins (AllReduce, AllGather); the lowering marks them as nodes of this
# domain, which ONNX Runtime cannot run: a rank's graph is cut at them and the collectives run between the pieces
# (trt_layers.ranks, torch.distributed).
COLLECTIVES = "trt_layers.collectives"


def typed_as_identities(nodes) -> list[onnx.NodeProto]:
    """``nodes`` with each collective read as an Identity: what ONNX type inference needs to type a rank's graph
    (a collective keeps its input's element type; allgather's shape is not inferred)."""
    typed = []
    for node in nodes:
        if node.domain == COLLECTIVES:
            node = helper.make_node("Identity", node.input, node.output, name=node.name)
        typed.append(node)
    return typed


def _group(op: str, group) -> list[int]:
    ranks = list(group)
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks) \
            or len(set(ranks)) != len(ranks):
        raise ValueError(f"{op}: group must list distinct ranks (Mapping.tp_group), got {group!r}")
    return ranks


def allreduce(tensor: Tensor, group, all_reduce_params=None) -> Tensor:
    """Mirrors functional.allreduce with its default AllReduceParams: the sum of ``tensor`` over the ranks of
    ``group`` (the AllReduce plugin, NCCL strategy auto, no fusion), every rank getting the whole sum."""
    if all_reduce_params is not None:
        raise NotImplementedError("allreduce: all_reduce_params other than the default (a fused norm, residual "
                                  "or quantization, another strategy) is not mirrored")
    if tensor.dtype not in _FLOATS:
        raise TypeError(f"allreduce: a {tensor.dtype} tensor (the plugin reduces float types)")
    ranks = _group("allreduce", group)
    return default_net().add_node("AllReduce", [tensor], tensor.dtype, tensor.shape, domain=COLLECTIVES, group=ranks)


def allgather(tensor: Tensor, group, gather_dim: int = 0) -> Tensor:
    """Mirrors functional.allgather: every rank's ``tensor`` of ``group``, concatenated along ``gather_dim`` in
    rank order (the AllGather plugin gathers along dimension 0; other dimensions are split and concatenated)."""
    ranks = _group("allgather", group)
    dim = _resolve_dim(gather_dim, len(tensor.shape), "allgather")
    shape = list(tensor.shape)
    shape[dim] = -1 if shape[dim] == -1 else shape[dim] * len(ranks)
    return default_net().add_node("AllGather", [tensor], tensor.dtype, shape, domain=COLLECTIVES, group=ranks,
                                  gather_dim=dim)


class RopeEmbeddingUtils:
    """Mirrors the parts of functional.RopeEmbeddingUtils the port uses."""

    @staticmethod
    def create_sinusoidal_positions(num_pos: int, dim: int, theta: float = 10000.0, dtype=np.float32):
        inv_freq = 1.0 / (theta**(np.arange(0, dim, 2) / dim)).astype(dtype)
        sinusoid_inp = np.einsum("i , j -> i j", np.arange(num_pos, dtype=dtype), inv_freq, dtype=dtype)
        concat_ = np.concatenate((np.sin(sinusoid_inp), np.cos(sinusoid_inp)), axis=1)
        return np.expand_dims(concat_, axis=0).astype(dtype)

    @staticmethod
    def rotate_half(tensor: Tensor) -> Tensor:
        """[b, heads, s, d]: concat(-x[..., d/2:], x[..., :d/2])."""
        if tensor.ndim() != 4:
            raise ValueError("rotate_half expects a 4-D tensor")
        shape_tensor = concat([shape(tensor, i) / 2 if i == tensor.ndim() - 1 else shape(tensor, i)
                               for i in range(tensor.ndim())])
        last_dim = shape(tensor, tensor.ndim() - 1) / 2
        x1 = slice(tensor, [0, 0, 0, 0], shape_tensor, [1, 1, 1, 1])
        x2 = slice(tensor, concat([0, 0, 0, last_dim]), shape_tensor, [1, 1, 1, 1])
        zero = constant(np.ascontiguousarray(np.zeros([1], dtype=_numpy_dtype(tensor.dtype))))
        x2 = zero - x2
        return concat([x2, x1], 3)

    @staticmethod
    def rotate_every_two(tensor: Tensor) -> Tensor:
        """[b, heads, s, d]: out[..., 2i] = -x[..., 2i+1], out[..., 2i+1] = x[..., 2i] (GPT-J)."""
        if tensor.ndim() != 4:
            raise ValueError("rotate_every_two expects a 4-D tensor")
        shape_tensor = concat([shape(tensor, i) / 2 if i == tensor.ndim() - 1 else shape(tensor, i)
                               for i in range(tensor.ndim())])
        x1 = slice(tensor, [0, 0, 0, 0], shape_tensor, [1, 1, 1, 2])
        x2 = slice(tensor, [0, 0, 0, 1], shape_tensor, [1, 1, 1, 2])
        x1 = expand_dims(x1, 4)
        x2 = expand_dims(x2, 4)
        zero = constant(np.ascontiguousarray(np.zeros([1], dtype=_numpy_dtype(tensor.dtype))))
        x2 = zero - x2
        x = concat([x2, x1], 4)
        return view(x, concat([shape(x, 0), shape(x, 1), shape(x, 2), shape(x, 3) * 2]))
