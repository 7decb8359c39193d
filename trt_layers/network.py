"""Build trt_layers graphs into runnable engines, with their taps marked as outputs.

Two backends run the same component code (``modeling.py``):

* ``trtllm``: a real TensorRT engine, built by TensorRT-LLM's ``Builder`` inside ``net_guard``
  and run by polygraphy's ``TrtRunner`` (needs tensorrt_llm and a CUDA GPU);
* ``onnx``: the ONNX lowering (``lowering.py``), run by ONNX Runtime through polygraphy's
  ``OnnxrtRunner`` on the CPU.

Batch, sequence and cache lengths are dynamic dimensions in both, so one engine serves every
shape of a test and component code sees -1 for them, as in TensorRT. A TensorRT engine serves
the shapes of its optimization profile (``Profile``) and reserves activation memory for the
largest of them (``largest_activation_bytes``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch

from reference import DeciCoderConfig
from reference.inputs import CaseShape, past_names
from reference.taps import LAYER_TAPS, component_outputs

from . import functional as F
from . import attention_blocks, lowering, onnx_fp16, ranks, tensor_parallel
from .modeling import COMPONENT_GRAPHS, PIECE_GRAPHS
from .quantization import QuantizedWeights
from .weights import layer_prefix

TORCH_TO_TRTLLM_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # TensorRT-LLM dtype name
    dims: tuple[int | str, ...]  # an int is static; a str names a dynamic dimension

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(-1 if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class Profile:
    """The largest case a TensorRT engine serves: the max shapes of its optimization profile.

    Each dynamic dimension runs from its least value (batch 1, seq 1, past 0) up to these, and
    TensorRT tunes for them (opt = max): the engine is built for the case it checks.
    """

    batch: int
    seq_len: int
    past_len: int = 0

    @classmethod
    def of(cls, shape: CaseShape) -> Profile:
        return cls(shape.batch, shape.seq_len, shape.past_len)

    @classmethod
    def whole_context(cls, config: DeciCoderConfig, batch: int = 8) -> Profile:
        """Every length the model can run: what a deployed engine needs, and the costliest profile."""
        context = config.max_position_embeddings
        return cls(batch, context, context - 1)

    def dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each dynamic dimension, as TensorRT-LLM's ``Tensor(dim_range=...)`` takes them."""
        return {"batch": (1, self.batch, self.batch), "seq": (1, self.seq_len, self.seq_len),
                "past": (0, self.past_len, self.past_len)}


def largest_activation_bytes(config: DeciCoderConfig, profile: Profile, dtype: torch.dtype) -> int:
    """Bytes of the largest activation a trt_layers engine holds at ``profile``'s max shapes.

    TensorRT sizes an engine's activation memory for the max shapes of its profile, and
    polygraphy's ``TrtRunner`` allocates it when it activates (allocation strategy "static").
    The largest tensor is one of

        attention scores, fp32 (the softmax runs in fp32):  4 * batch * heads * seq * (past + seq)
        logits (causal_lm and its head piece):              itemsize(dtype) * batch * seq * vocab

    DeciCoder-1b over its whole context (batch 8, seq 2048, past 2047) holds 8.6 GB of fp32
    scores in every layer; at the command line's default case (batch 2, seq 7), 2.8 MB of fp32 logits.
    """
    scores = 4 * profile.batch * config.num_attention_heads * profile.seq_len * (profile.past_len + profile.seq_len)
    logits = dtype.itemsize * profile.batch * profile.seq_len * config.vocab_size
    return max(scores, logits)


def input_specs(component: str, config: DeciCoderConfig, dtype: torch.dtype, decode: bool,
                mapping: tensor_parallel.TpMapping = tensor_parallel.SINGLE) -> list[InputSpec]:
    """Graph inputs of ``component``, named as ``reference.inputs.make_inputs`` names them; a tensor-parallel
    rank's cache holds its own KV heads."""
    act = TORCH_TO_TRTLLM_DTYPE[dtype]
    kv, d = tensor_parallel.rank_heads(config, mapping)[1], config.head_dim

    def heads(name, num_heads, length="seq"):
        return InputSpec(name, act, ("batch", num_heads, length, d))

    positions = InputSpec("position_ids", "int32", ("batch", "seq"))
    hidden = InputSpec("hidden_states", act, ("batch", "seq", config.hidden_size))
    past = [heads(name, kv, "past") for name in past_names()]
    specs = {
        "repeat_kv": [heads("k", kv), heads("v", kv)],
        "rope": [heads("q", config.num_attention_heads), heads("k", kv), positions],
        "gqa_masked": [hidden, positions],
        "gqa_unmasked": [hidden, positions, *past],
        "mlp": [hidden],
        "rmsnorm": [hidden],
        "decoder_layer": [hidden, positions, *(past if decode else [])],
        "causal_lm": [InputSpec("input_ids", "int32", ("batch", "seq")), positions,
                      *(heads(name, kv, "past") for i in range(config.num_hidden_layers) if decode
                        for name in past_names(i))],
        # pieces of causal_lm, for streaming
        "embed": [InputSpec("input_ids", "int32", ("batch", "seq"))],
        "layer": [hidden, positions, *(past if decode else [])],
        "head": [hidden],
    }
    return specs[component]


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Silence polygraphy's log inside the block: its results come back as values."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.module_severity, G_LOGGER.colors = G_LOGGER.CRITICAL, False
    try:
        yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = previous


# protobuf cannot serialise a message over 2 GiB: larger models keep their weights beside the graph.
PROTOBUF_LIMIT = 2**31 - 1


def save_onnx(model: onnx.ModelProto, path: Path, external: bool | None = None) -> None:
    """Save ``model``; past protobuf's 2 GiB limit (or if ``external``) weights go to ``<name>.data`` beside it."""
    if external is None:
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weight_bytes > PROTOBUF_LIMIT - 2**26  # leave room for the graph itself
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


class Engine:
    """A built graph and the polygraphy runner that runs it (OnnxrtRunner or TrtRunner)."""

    def __init__(self, backend: str, runner, onnx_model: Callable[[], onnx.ModelProto] | None = None,
                 serialized: bytes | None = None):
        self.backend, self._runner = backend, runner
        self._onnx_model, self._serialized = onnx_model, serialized

    def save(self, path: Path) -> Path:
        """Write the engine: an ONNX graph (``.onnx``) or a serialized TensorRT engine (``.engine``)."""
        if self._serialized is not None:
            path = path.with_suffix(".engine")
            path.write_bytes(bytes(self._serialized))
        else:
            path = path.with_suffix(".onnx")
            save_onnx(self.model, path)
        return path

    @property
    def model(self) -> onnx.ModelProto:
        """The ONNX graph with its weights inside (the lowering only), e.g. to save for polygraphy."""
        if self._onnx_model is None:
            raise ValueError(f"a {self.backend} engine has no ONNX graph")
        return self._onnx_model()

    def infer(self, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """Run on named inputs; returns every marked output."""
        with quiet_polygraphy(), self._runner as runner:
            return runner.infer(feed)

    refittable = False  # whether refit can give the engine new weights

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Replace named weights, keeping the graph (TensorRT's ``Refitter.set_named_weights``)."""
        raise NotImplementedError(f"a {self.backend} engine is not refitted here: build one per weight set")


class OnnxEngine(Engine):
    """A lowered graph under polygraphy's ``OnnxrtRunner``, its weights fed as inputs at each run
    (in place, no copy), so that ``refit`` swaps them as TensorRT's Refitter swaps an engine's:
    one decoder-layer engine serves every layer. ``model`` is the lowering op by op, every tensor
    there to mark for polygraphy; the sessions run it with unmarked attention in blocks
    (``attention_blocks``), which computes the same bits: the session built with the engine in head
    blocks (its lengths are dynamic, as a TensorRT engine's profile), and one made for the shapes of
    the latest long run in query-row blocks (as TensorRT tunes its kernels to a profile's shapes)."""

    refittable = True

    def __init__(self, runner, network: lowering.Network, weights: dict[str, np.ndarray], lowered: onnx.ModelProto,
                 session: Callable[[onnx.ModelProto], object], fp16: bool):
        super().__init__("onnx", runner, lambda: onnx_fp16.round_each_op_to_fp16(network.to_onnx()))
        self._network, self._weights, self._lowered, self._session = network, weights, lowered, session
        self._ort_values = _ort_values(weights)
        self._fp16 = fp16  # rounded after each op (onnx_fp16)
        self._at_shapes: tuple[tuple, object | None] = ((), None)  # (feed shapes, their runner or None)

    # Outputs are views into the shared arena. A small one held past the run (a layer's output
    # feeds the next layer) would pin a block carved from the freed attention buffers, and the next
    # run's scores would need new memory: those are copied out. A large one (logits) is not: its
    # copy would cost a fresh mapping of its size, and the callers let it go before the next run.
    COPY_BELOW_BYTES = 2**26

    def infer(self, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        with quiet_polygraphy(), self._runner_for(feed) as runner:
            if self._ort_values:  # polygraphy's runner feeds numpy arrays only
                session = runner.sess
                arrays = session.run(None, {**feed, **self._weights, **self._ort_values})
                outputs = OrderedDict(zip([output.name for output in session.get_outputs()], arrays))
            else:
                outputs = runner.infer({**feed, **self._weights})
        return OrderedDict((name, array.copy() if array.nbytes < self.COPY_BELOW_BYTES else array)
                           for name, array in outputs.items())

    def _runner_for(self, feed: dict[str, np.ndarray]):
        """The runner of a session made for ``feed``'s shapes where a dynamic length there exceeds a
        row block (its attention then runs in row blocks), else the engine's own."""
        shapes = tuple(sorted((name, array.shape) for name, array in feed.items()))
        if shapes != self._at_shapes[0]:
            self._at_shapes = (shapes, self._specialized(dict(shapes)) if self._long(dict(shapes)) else None)
        return self._at_shapes[1] or self._runner

    def _long(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether the run's new tokens (the inputs' "seq" dimension: the attention's query rows) span
        more than one row block. fp32 only: an fp16 graph's rounding after each op (onnx_fp16) ran in
        row blocks differed from the lowering op by op by an fp16 ulp (measured); its runs are tiny."""
        return not self._fp16 and any(dim.dim_param == "seq" and size > attention_blocks.ROWS_PER_BLOCK
                                      for value in self._lowered.graph.input if value.name in shapes
                                      for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]))

    def _specialized(self, shapes: dict[str, tuple[int, ...]]):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        fixed = attention_blocks.with_input_shapes(self._lowered, shapes)
        inferred = attention_blocks.inferred(fixed)
        rewritten = attention_blocks.attention_in_blocks(fixed, attention_blocks.shapes_of(inferred),
                                                         attention_blocks.dtypes_of(inferred), self._weights,
                                                         rows=attention_blocks.ROWS_PER_BLOCK)
        if not any(node.name.endswith("/concat_rows") for node in rewritten.graph.node):
            return None
        return OnnxrtRunner(self._session(rewritten), name="onnx-lowering")

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        changed = self._network.refit(weights)
        # A weight used only through a fold (a norm weight reshaped) is not an input itself.
        self._weights.update((name, array) for name, array in changed.items() if name in self._weights)
        self._ort_values = _ort_values(self._weights)


def _ort_values(weights: dict[str, np.ndarray]) -> dict[str, object]:
    """The weights ONNX Runtime takes only as OrtValues (it has no numpy type for them): INT4 ones as their
    packed bytes, FP8 ones as theirs."""
    import ctypes

    from onnxruntime import OrtValue

    values = {}
    for name, array in weights.items():
        if array.dtype == ml_dtypes.int4:
            packed = lowering.pack_int4(array)
            values[name] = OrtValue.ortvalue_from_shape_and_type(list(array.shape), onnx.TensorProto.INT4)
            ctypes.memmove(values[name].data_ptr(), packed.ctypes.data, packed.nbytes)
        elif array.dtype == ml_dtypes.float8_e4m3fn:
            values[name] = OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8),
                                                                       onnx.TensorProto.FLOAT8E4M3FN)
    return values


class TrtEngine(Engine):
    """A TensorRT engine under polygraphy's ``TrtRunner``, which is fed and read as torch tensors.

    polygraphy 0.53.6 checks a feed's dtype through ``DataType.from_dtype``, which does not know
    ml_dtypes' bfloat16 ("Received unexpected dtype: bfloat16"), and views output bytes as
    numpy, which has no bfloat16 (``DataTypeConversionException``). Given torch tensors it does
    both: inputs already on the GPU are used in place, and the outputs come back as torch tensors.
    """

    def __init__(self, runner, serialized: bytes, device: torch.device | str = "cuda"):
        super().__init__("trtllm", runner, serialized=serialized)
        self.device = torch.device(device)

    def infer(self, feed: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        with quiet_polygraphy(), self._runner as runner:
            outputs = runner.infer({name: numpy_to_torch(array).to(self.device) for name, array in feed.items()})
        return OrderedDict((name, lowering.torch_to_numpy(tensor)) for name, tensor in outputs.items())


class Backend(ABC):
    name: str
    description: str

    @abstractmethod
    def build(self, name: str, specs: list[InputSpec], graph: Callable[[dict], dict], config: DeciCoderConfig,
              dtype: torch.dtype) -> Engine:
        """Build ``graph`` (inputs -> taps) with every tap marked as an output, in order."""


def mark_taps(taps: dict) -> None:
    """Mark each tap as an output; a tensor that is two taps gets an identity for the second,
    since TensorRT names a tensor once."""
    seen = set()
    for name, tensor in taps.items():
        if tensor is None:  # not marked in this build
            continue
        if id(tensor) in seen:
            tensor = F.identity(tensor)
        seen.add(id(tensor))
        tensor.mark_output(name, tensor.dtype)


def to_feed(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Engine inputs from golden inputs: token and position ids as int32, as TensorRT-LLM feeds them."""
    return {name: lowering.torch_to_numpy(t.to(torch.int32) if t.dtype == torch.int64 else t)
            for name, t in inputs.items()}


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """The inverse of ``lowering.torch_to_numpy``: ml_dtypes bfloat16 becomes torch.bfloat16, bit for bit."""
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@functools.cache
def shared_arena() -> None:
    """Register one CPU arena with ONNX Runtime's environment for sessions that ask for it
    (``session.use_env_allocators``). Blocks grow by what is asked, not to the next power of
    two, so the arena's peak stays that of the largest run."""
    import onnxruntime

    memory = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                       onnxruntime.OrtMemType.DEFAULT)
    onnxruntime.create_and_register_allocator(memory, onnxruntime.OrtArenaCfg({"arena_extend_strategy": 1}))


def beside_the_golden(options):
    """ONNX Runtime session options for engines that take turns with the torch golden, layer by layer.

    Every session draws on one arena (shared_arena): a decoder-layer engine run for layer after layer
    finds its activation memory (512 MiB of attention scores at 2048 tokens) already mapped instead of
    faulting it in again at each run, and an engine that is gone leaves its blocks to the next one
    rather than an arena of its own. The memory pattern would hold a whole run's plan in one block,
    over the arena's. Threads spin between the ops of a run (sleeping there cost 10% of a layer's run
    on 16 cores) and stop when the run returns, not spinning through the golden's time.
    """
    shared_arena()
    # As many threads as torch's, unpinned: ONNX Runtime's default pins one per core, which ran the
    # 2048-token candidate 10-15% slower on 16 cores (measured) beside torch's own threads.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxBackend(Backend):
    name = "onnx"

    @property
    def description(self) -> str:
        import onnxruntime

        return f"ONNX lowering of trt_layers run by onnxruntime {onnxruntime.__version__} (CPU; {onnx_fp16.EXECUTION})"

    @staticmethod
    def session_options():
        """ONNX Runtime's settings for the lowering's graphs (weights are added per engine)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Each engine runs a handful of times: repacking every weight for faster kernels (and
        # fusing across ops) costs more at session start than it saves.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # Cast-chain elimination (opt-in) would fold the fp16 round trips of onnx_fp16 away.
        options.add_session_config_entry("optimization.enable_cast_chain_elimination", "0")
        return beside_the_golden(options)

    @staticmethod
    @functools.cache
    def fp16_rounding_gap() -> str | None:
        """Why this onnxruntime cannot compute fp16 per op (None if it can): never fp32 called fp16."""
        return onnx_fp16.rounding_gap(OnnxBackend.session_options())

    def build(self, name, specs, graph, config, dtype) -> Engine:
        from polygraphy.backend.onnxrt import OnnxrtRunner

        network = lowering.Network(name)
        with lowering.net_guard(network), F.use(lowering):
            inputs = {s.name: network.add_input(s.name, s.dtype, s.shape, [d if isinstance(d, str) else None
                                                                         for d in s.dims]) for s in specs}
            mark_taps(graph(inputs))
        weights: dict[str, np.ndarray] = {}
        lowered = network.to_onnx(weights)
        blocks = onnx.ModelProto()
        blocks.CopyFrom(lowered)  # the weights are inputs: the graph alone
        # Unmarked attention runs a block at a time, as TensorRT's fused kernel never holds the scores.
        blocks = attention_blocks.attention_in_blocks(blocks, network.shapes, values=weights)
        # ONNX Runtime's CPU would compute an fp16 graph in fp32 from end to end: round after each op.
        model = onnx_fp16.round_each_op_to_fp16(blocks)
        if model is not blocks and (gap := self.fp16_rounding_gap()):
            raise RuntimeError(f"fp16 on the onnx backend: {gap}")
        # Weights are inputs, not a serialised protobuf: a DeciCoder-1b layer builds in a fraction of
        # the time, graphs past protobuf's 2 GiB still load, and refit swaps them.
        session = functools.partial(self._session, self.session_options())
        if ranks.has_collectives(model):  # a tensor-parallel rank: its pieces between collectives
            return ranks.RankEngine(ranks.cut_at_collectives(model), weights, [o.name for o in model.graph.output],
                                    session)
        return OnnxEngine(OnnxrtRunner(session(model), name="onnx-lowering"), network, weights, lowered, session,
                          fp16=model is not blocks)

    @staticmethod
    def _session(options, model: onnx.ModelProto):
        import onnxruntime

        return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class TrtllmBackend(Backend):
    """TensorRT-LLM's functional API on a strongly typed network, as its own unit tests build them.

    Engines serve ``profile`` (default: the model's whole context, ``Profile.whole_context``);
    size it to the case being checked, since TensorRT reserves memory for its largest shapes.
    """

    name = "trtllm"

    def __init__(self, profile: Profile | None = None):
        self.profile = profile

    @property
    def description(self) -> str:
        return f"TensorRT-LLM {importlib.import_module('tensorrt_llm').__version__} engine (TensorRT, CUDA)"

    def build(self, name, specs, graph, config, dtype) -> Engine:
        import tensorrt as trt
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from tensorrt_llm.builder import Builder
        from tensorrt_llm.functional import Tensor
        from tensorrt_llm.network import net_guard

        ranges = (self.profile or Profile.whole_context(config)).dim_ranges()
        builder = Builder()
        network = builder.create_network()
        with net_guard(network), F.use(F.tensorrt_llm_ops()):
            inputs = {}
            for spec in specs:
                # Every input gets a dim_range, so Builder.build_engine derives the optimization profile.
                dim_range = OrderedDict(
                    (d, [list(ranges[d])]) if isinstance(d, str) else (f"{spec.name}_dim{k}", [d])
                    for k, d in enumerate(spec.dims))
                inputs[spec.name] = Tensor(name=spec.name, dtype=spec.dtype, shape=list(spec.shape),
                                           dim_range=dim_range)
            mark_taps(graph(inputs))
        builder_config = builder.create_builder_config(precision=TORCH_TO_TRTLLM_DTYPE[dtype])
        builder_config.trt_builder_config.clear_flag(trt.BuilderFlag.TF32)  # TF32 would blur fp32 parity
        serialized = builder.build_engine(network, builder_config)  # asserts that TensorRT built it
        return TrtEngine(TrtRunner(EngineFromBytes(serialized), name="tensorrt-llm"), serialized)


BACKENDS: dict[str, type[Backend]] = {"onnx": OnnxBackend, "trtllm": TrtllmBackend}


def piece_outputs(piece: str) -> list[str]:
    return {"embed": ["embed"], "head": ["final_norm", "logits"], "layer": list(LAYER_TAPS)}[piece]


def refit_layer(engine: Engine, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, layer: int,
                built_for: int = 0) -> None:
    """Give ``engine``, a decoder layer built with layer ``built_for``'s weights, layer ``layer``'s."""
    source, target = layer_prefix(layer), layer_prefix(built_for)
    engine.refit({target + name.removeprefix(source): lowering.torch_to_numpy(_engine_array(weights, name, dtype))
                  for name in weights if name.startswith(source)})


def _engine_array(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """What the network's constant ``name`` was built from: a quantized layout's view of its stored tensor, or
    the weight in the model dtype."""
    if isinstance(weights, QuantizedWeights):
        return weights.engine_array(name, dtype)
    return weights[name].to(dtype).contiguous()


def build_component(component: str, config: DeciCoderConfig, weights: dict[str, torch.Tensor],
                    dtype: torch.dtype, backend: Backend, decode: bool = False,
                    static_shapes: dict[str, tuple[int, ...]] | None = None, layer: int = 0,
                    marked: list[str] | None = None) -> Engine:
    """Build ``component`` (or a streaming piece of causal_lm: embed, layer, head) from weights
    under TensorRT-LLM names (``weights.to_trtllm``).

    Single-layer components use layer ``layer``. ``decode`` adds past K/V inputs to decoder_layer,
    causal_lm and layer (gqa_unmasked always has them). ``static_shapes`` freezes every input's
    shape (shape arithmetic then folds away), as ``polygraphy debug reduce`` prefers. ``marked``
    limits the outputs to those names (default: every tap and output). The graph must emit
    exactly the registry's names, in order.
    """
    pieces = {"embed", "layer", "head"}
    graphs = PIECE_GRAPHS if component in pieces else COMPONENT_GRAPHS
    linear_inputs = getattr(weights, "rounds_activations", False)  # decoder_layer emits them (taps.LINEAR_INPUTS)
    expected = (piece_outputs(component) if component in pieces
                else list(component_outputs(component, config.num_hidden_layers, linear_inputs)))

    def graph(inputs):
        taps = graphs[component](inputs, weights, config, dtype, layer=layer)
        if list(taps) != expected:
            raise AssertionError(f"{component} emitted {list(taps)}, the registry says {expected}")
        return {name: t if marked is None or name in marked else None for name, t in taps.items()}

    specs = input_specs(component, config, dtype, decode or component == "gqa_unmasked",
                        tensor_parallel.mapping_of(weights))
    if static_shapes is not None:
        specs = [replace(spec, dims=tuple(static_shapes[spec.name])) for spec in specs]
    return backend.build(f"{component}_{'decode' if decode else 'prefill'}", specs, graph, config, dtype)
