"""A port this suite did not write: an ONNX graph of the whole model, run by ONNX Runtime.

Its inputs are token ids (``input_ids``), and optionally ``position_ids`` and an all-ones
``attention_mask``; its outputs include the logits. The golden taps it computes are found by
``tapmap``; the file is only read, and weights kept beside it (external data) stay there until a
session reads them.

Where the embedding and every layer's output are mapped, the graph is cut at those tensors (onnx's
``Extractor``) and streamed as ``locate`` streams trt_layers: the embedding, then one layer at a
time fed the candidate's own previous output (each segment's session reads only that layer's
weights), then the head. The golden reruns each layer on that same input, so a layer is judged on
its own arithmetic, and the first layer that diverges is run again, golden and candidate, with
every mapped tap inside it. A graph that cannot be cut runs whole, every mapped tap marked. Taps no
tensor maps to are listed, never guessed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx.utils import Extractor

from reference import DeciCoderConfig, DeciCoderForCausalLM, capture_taps
from reference.components import layer_past, run_layer
from reference.inputs import CaseShape, make_inputs, past_names
from reference.taps import LAYER_TAPS
from trt_layers import attention_blocks
from trt_layers.network import beside_the_golden

from .check import CheckResult, UsageError, candidate_stage
from .compare import TOLERANCES, TapResult, compare_taps, first_failure
from .diagnose import Diagnosis, diagnose_layer, diagnose_model_tap, diagnose_whole
from .locate import LocateReport, diagnose_head, judge_head, release_freed_memory
from .tapmap import GraphScopes, TapMapError, auto_map, load_tap_map

FEEDS = ("input_ids", "position_ids", "attention_mask")
# A decode graph's cache, as optimum and transformers' own exports name it: layer i's past K/V in, present out.
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT = "present.{i}.{kind}"


class OnnxPort:
    """The graph at ``path``, read without its external weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.model = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:
            raise UsageError(f"--candidate {path}: not a readable ONNX model ({type(e).__name__}: {e})"
                             .splitlines()[0]) from None
        if not self.model.graph.node:  # protobuf parses many a stray file as an empty model
            raise UsageError(f"--candidate {path}: not a readable ONNX model (no graph nodes)")
        weights = {t.name for t in self.model.graph.initializer}
        self.inputs = [i.name for i in self.model.graph.input if i.name not in weights]
        # past input -> the golden's input for it (reference.inputs.past_names)
        self.past = {name: past_names(int(m[1]))[m[2] == "value"]
                     for name in self.inputs if (m := PAST.fullmatch(name))}
        if "input_ids" not in self.inputs or any(name not in FEEDS and name not in self.past for name in self.inputs):
            raise UsageError(f"--candidate {path}: inputs {self.inputs}; expected input_ids and optionally "
                             "position_ids, attention_mask and, for decode, past_key_values.{i}.key/value")
        self.scopes = GraphScopes(self.model.graph)
        self._shared: list[tuple[onnx.ModelProto, object]] = []  # (segment, its session), for run_layer

    def check_config(self, config: DeciCoderConfig, dtype: torch.dtype, run_here: bool = True) -> None:
        """UsageError unless the graph holds a [vocab, hidden] table (the embedding) of ``dtype``: a graph of
        another model, or another dtype, is a wrong pairing with --model / --dtype, not a divergence. A
        graph ONNX Runtime runs here must be fp32: its CPU computes most fp16 ops in fp32, and a verdict
        would name a dtype that was not computed."""
        if run_here and dtype != torch.float32:
            raise UsageError(f"--candidate {self.path}: ONNX Runtime's CPU computes most fp16/bf16 ops in fp32, so a "
                             "verdict here would not be that dtype's: judge an fp32 export (or an engine)")
        shape = [config.vocab_size, config.hidden_size]
        tables = [t for t in self.model.graph.initializer if list(t.dims) == shape]
        if not tables:
            raise UsageError(f"--candidate {self.path}: no [{shape[0]}, {shape[1]}] embedding table in it: "
                             f"it is not a model of --model's config (vocab {shape[0]}, hidden {shape[1]})")
        graph_dtype = onnx.helper.tensor_dtype_to_np_dtype(tables[0].data_type)
        if run_here and graph_dtype != np.float32:
            raise UsageError(f"--candidate {self.path}: its weights are {graph_dtype}, and ONNX Runtime's CPU computes "
                             "most fp16 ops in fp32: judge an fp32 export here (or an engine built from it)")
        if graph_dtype != torch.empty(0, dtype=dtype).numpy().dtype:
            raise UsageError(f"--candidate {self.path}: its weights are {graph_dtype}; run with the --dtype they hold")
        if self.past and len(self.past) != 2 * config.num_hidden_layers:
            raise UsageError(f"--candidate {self.path}: past K/V inputs for {len(self.past) // 2} layers; --model has "
                             f"{config.num_hidden_layers}")
        self._check_external_data()

    def check_case(self, shape: CaseShape) -> None:
        """UsageError unless the case is one the graph takes: decode (a past) exactly where it has past
        K/V inputs, and every size it declares static."""
        if bool(self.past) != bool(shape.past_len):
            raise UsageError(f"--candidate {self.path}: " + (
                "takes past K/V (past_key_values.{i}.key/value): run decode with --past-len N" if self.past else
                "has no past K/V inputs: it is judged in prefill, without --phase decode or --past-len"))
        tokens, seen = (shape.batch, shape.seq_len), (shape.batch, shape.past_len + shape.seq_len)
        sizes = {"input_ids": tokens, "position_ids": tokens, "attention_mask": seen,
                 **{name: (shape.batch, None, shape.past_len, None) for name in self.past}}  # None: any size
        for value in self.model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if any(d is not None and e is not None and d != e for d, e in zip(dims, sizes.get(value.name, ()))):
                raise UsageError(f"--candidate {self.path}: its {value.name} is static {dims} ([batch, seq] or "
                                 "[batch, kv heads, past, head dim]): run with --batch, --seq-len, --past-len to match")

    def _check_external_data(self) -> None:
        """UsageError unless every weight kept beside the graph is there in full: a missing or cut-short
        data file is a bad copy of the graph, found before the golden's weights are made."""
        folder, needed = self.path.resolve().parent, {}
        for tensor in self.model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(tensor)
                size = int(info.get("length") or np.prod(tensor.dims, dtype=np.int64)
                           * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
                end = int(info.get("offset", 0)) + size
                needed[info["location"]] = max(needed.get(info["location"], 0), end)
        for location, end in needed.items():
            data = folder / location
            if not data.is_file():
                raise UsageError(f"--candidate {self.path}: its weights file {data} is missing")
            if data.stat().st_size < end:
                raise UsageError(f"--candidate {self.path}: its weights file {data} is cut short "
                                 f"({data.stat().st_size} bytes; the graph reads up to byte {end})")

    def tap_map(self, golden_taps: list[str], num_layers: int, tap_map: str | None) -> dict[str, str]:
        """The automatic mapping, overridden tap by tap by ``tap_map`` (a JSON file)."""
        outputs = {o.name for o in self.model.graph.output}
        presents = {f"layer_{i}.attn.present_{kind[0]}": name for i in range(num_layers) for kind in ("key", "value")
                    if (name := PRESENT.format(i=i, kind=kind)) in outputs}
        mapped = auto_map(self.scopes, golden_taps, num_layers, aside=set(presents.values()))
        mapped.update((tap, tensor) for tap, tensor in presents.items() if tap in golden_taps)
        if tap_map is not None:
            try:
                mapped.update(load_tap_map(tap_map, self.scopes.tensors, golden_taps, num_layers))
            except TapMapError as e:
                raise UsageError(str(e)) from None
        if not mapped:  # nothing would be judged: that is no pass
            fix = "map taps in --tap-map" if tap_map else "give --tap-map"
            raise UsageError(f"--candidate {self.path}: no golden tap maps to a tensor of it (its nodes carry no "
                             f"module paths the Llama layout names): {fix}")
        computed = {name for node in self.model.graph.node for name in node.output}
        if given := [f"{tap} -> {tensor}" for tap, tensor in mapped.items() if tensor not in computed]:
            raise UsageError(f"--tap-map: {', '.join(given)}: an input or weight of the graph, not a tensor it "
                             "computes")
        return mapped

    @property
    def description(self) -> str:
        import onnxruntime

        return f"ONNX graph {self.path.name} run by onnxruntime {onnxruntime.__version__} (CPU)"

    @functools.cached_property
    def _extractor(self) -> Extractor:
        # The cut tensors need value infos: onnx 1.19's Extractor infers them, 1.23's does not. Data
        # propagation resolves the head counts behind torch.onnx's computed reshapes (attention_blocks).
        return Extractor(onnx.shape_inference.infer_shapes(self.model, data_prop=True))

    def run(self, feed: dict[str, np.ndarray], outputs: list[str], cut: str | None = None) -> dict[str, np.ndarray]:
        """Run the part of the graph that computes ``outputs``, from tensor ``cut`` (fed in ``feed``)
        on if given: only that part's weights are read."""
        return self.segment(outputs, cut)(feed)

    def segment(self, outputs: list[str], cut: str | None = None) -> Callable[[dict[str, np.ndarray]], dict]:
        """``run``'s part of the graph as a session, to run on several feeds. Its weights are fed in place
        from the external-data file, as run_layer's are: loaded by the session, lm_head's 384 MiB would be
        copied and then packed again for its MatMul."""
        part = self._extractor.extract_model([*([cut] if cut else []), *self.inputs], outputs)
        folder = self.path.resolve().parent
        weights = {t.name: initializer_array(t, folder) for t in part.graph.initializer}
        session = self._session(weights_as_inputs(part))
        return lambda feed: self._run(session, {**feed, **weights}, outputs)

    def run_layer(self, feed: dict[str, np.ndarray], cut: str, outputs: list[str]) -> dict[str, np.ndarray]:
        """One layer's segment, ``cut`` to ``outputs`` (its output, and a decode graph's present K/V).
        Layers whose segments have one structure share a session, built once with the weights as
        inputs, and each is run with its own weights fed in place from the external-data file
        (TensorRT's refit, on a graph this suite did not build): a session per layer would read and
        repack every weight again. A segment of another structure (a layer edited apart from the rest,
        or layer 0, which computes what later layers reuse) gets a session of its own the same way."""
        segment = self._extractor.extract_model([cut, *self.inputs], outputs)
        read = {name for node in segment.graph.node for name in node.input}
        kept = [value for value in segment.graph.input if value.name in read]  # a layer's own cache, not all
        del segment.graph.input[:]
        segment.graph.input.extend(kept)
        for shared, session in self._shared:
            if (names := same_structure(shared.graph, segment.graph)) is not None:
                break
        else:
            shared, names = segment, {v.name: v.name for v in (*segment.graph.input, *segment.graph.initializer)}
            session = self._session(weights_as_inputs(segment))
            self._shared.append((shared, session))
        weights = {t.name: t for t in segment.graph.initializer}
        folder = self.path.resolve().parent
        # Each input of the shared session takes this segment's own: its weights, and (a decode graph) its
        # layer's past K/V, which another layer's session names past_key_values.{j}.
        feed = {name: initializer_array(weights[own], folder) if own in weights else feed[own]
                for name, own in names.items()}
        produced = self._run(session, feed, [output.name for output in shared.graph.output])
        return dict(zip(outputs, produced.values()))  # the shared session's names, in this segment's order

    def _session(self, model: onnx.ModelProto):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # External weights are read from beside the graph, by this segment's session alone.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.path.resolve().parent))
        # Segments share trt_layers' engine arena: a session's own would hold its largest run's
        # activations while it lives. ONNX Runtime's default graph optimizations stay: this is the
        # candidate as it would run, but for unmarked attention, run a block at a time as in
        # trt_layers' engines: the same bits, without 2.5 GiB of whole scores a layer at 2048 tokens.
        beside_the_golden(options)
        model = attention_blocks.attention_in_blocks(model, attention_blocks.shapes_of(model),
                                                     attention_blocks.dtypes_of(model))
        with candidate_stage(f"onnxruntime could not load {self.path.name}"):
            return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _run(self, session, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        wanted = {spec.name for spec in session.get_inputs()}
        with candidate_stage(f"{self.path.name} failed to run"):
            return dict(zip(outputs, session.run(outputs, {k: v for k, v in feed.items() if k in wanted})))

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graph's inputs from the golden's, in the dtypes it declares; attention_mask all ones."""
        declared = {i.name: i.type.tensor_type.elem_type for i in self.model.graph.input}
        feed = {}
        for name in self.inputs:
            if name in self.past:
                feed[name] = inputs[self.past[name]].numpy()
                continue
            value = inputs.get(name)
            if value is None:  # attention_mask: every token, cached or new, visible
                value = torch.ones(inputs["input_ids"].shape[0], self._cached(inputs) + inputs["input_ids"].shape[1],
                                   dtype=torch.int64)
            feed[name] = value.numpy().astype(np.int32 if declared[name] == onnx.TensorProto.INT32 else np.int64)
        return feed

    def _cached(self, inputs: dict[str, torch.Tensor]) -> int:
        return inputs[next(iter(self.past.values()))].shape[2] if self.past else 0


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer a graph input instead: the same graph, for weights fed per run."""
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    fed.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                           for t in fed.graph.initializer)
    del fed.graph.initializer[:]
    return fed


def same_structure(a: onnx.GraphProto, b: onnx.GraphProto) -> dict[str, str] | None:
    """For each input and initializer of ``a``, the one of ``b`` in its place, if ``b`` is ``a`` node for
    node (same ops, attributes and wiring, initializers of the same shapes) under other names; else None."""
    if len(a.node) != len(b.node) or len(a.input) != len(b.input) or len(a.output) != len(b.output):
        return None
    a_weights = {t.name: t for t in a.initializer}
    b_weights = {t.name: t for t in b.initializer}
    names = {x.name: y.name for x, y in zip(a.input, b.input)}
    for x, y in zip(a.node, b.node):
        if (x.op_type, x.domain, len(x.input), len(x.output)) != (y.op_type, y.domain, len(y.input), len(y.output)) \
                or list(x.attribute) != list(y.attribute):
            return None
        for u, v in zip(x.input, y.input):
            if (u in a_weights) != (v in b_weights) or names.setdefault(u, v) != v:
                return None
            if u in a_weights and (a_weights[u].dims, a_weights[u].data_type) != (b_weights[v].dims,
                                                                                     b_weights[v].data_type):
                return None
        if any(names.setdefault(u, v) != v for u, v in zip(x.output, y.output)):
            return None
    return {name: names[name] for name in (*(v.name for v in a.input), *a_weights)}


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """Where an external initializer's bytes lie: location, offset, length."""
    return {entry.key: entry.value for entry in tensor.external_data}


def initializer_array(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """An initializer's values; external data is mapped from its file, not copied."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    info = _external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(folder / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims))


def golden_order(config: DeciCoderConfig) -> list[str]:
    """Every tap of the whole model, each layer in full detail, in execution order."""
    return ["embed", *(f"layer_{i}.{tap}" for i in range(config.num_hidden_layers) for tap in LAYER_TAPS),
            "final_norm", "logits"]


def _as_golden_layout(candidate: np.ndarray, golden: torch.Tensor) -> np.ndarray:
    """A module's [b, s, n * d] as the golden's [b, n, s, d] (heads merged vs apart: the same values)."""
    if golden.ndim == 4 and candidate.shape == (golden.shape[0], golden.shape[2], golden.shape[1] * golden.shape[3]):
        b, n, s, d = golden.shape
        return candidate.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    return candidate


def _judge(golden: dict[str, torch.Tensor], outputs: dict[str, np.ndarray], mapped: dict[str, str], tolerance,
           order: list[str]) -> list[TapResult]:
    """The mapped taps among ``order``, each candidate tensor in the golden's layout."""
    names = [tap for tap in order if tap in mapped]
    candidate = {tap: _as_golden_layout(outputs[mapped[tap]], golden[tap]) for tap in names}
    return compare_taps(golden, candidate, tolerance, names)


# The candidate's head runs on bigger blocks than the golden's: its lm_head weights, fed as an input,
# are packed for ONNX Runtime's GEMM on every run (with 16 MiB blocks, locate took 95 s at 2048
# tokens on 2 cores, against 73 s with these).
CANDIDATE_HEAD_BLOCK_BYTES = 2**27


def locate_onnx(model: DeciCoderForCausalLM, port: OnnxPort, shape: CaseShape, mapped: dict[str, str] | None = None,
                tap_map: str | None = None) -> LocateReport:
    """Judge every tap of ``port`` that maps to a golden tap (``mapped``, default: port.tap_map), prefill or
    (``shape.past_len``) decode: streamed where every layer's output is mapped, else run whole."""
    config = model.config
    order = golden_order(config)
    if mapped is None:
        mapped = port.tap_map(order, config.num_hidden_layers, tap_map)
    cuts = ["embed", *(f"layer_{i}.out" for i in range(config.num_hidden_layers))]
    streamed = all(tap in mapped for tap in cuts)
    report = (_locate_streamed if streamed else locate_whole)(model, port, shape, mapped, order)
    report.notes.insert(0, f"{len(mapped)} of {len(order)} golden taps mapped to tensors of {port.path.name}; "
                        + ("the graph was cut at each layer's output and streamed." if streamed else
                           "not every layer's output is mapped, so the graph ran whole."))
    if unmapped := [tap for tap in order if tap not in mapped]:
        report.notes.append(f"not mapped, so not judged ({len(unmapped)}): {_by_layer(unmapped, config)}")
    return report


def _by_layer(taps: list[str], config: DeciCoderConfig) -> str:
    """Tap names with the layer folded where a tap is missing in every layer: layer_{i}.attn.q_rot."""
    layers = config.num_hidden_layers
    every = {tap.split(".", 1)[1] for tap in taps if tap.startswith("layer_0.")}
    every = {rest for rest in every if all(f"layer_{i}.{rest}" in taps for i in range(layers))}
    shown = [f"layer_{{i}}.{rest}" for rest in LAYER_TAPS if rest in every]
    shown += [tap for tap in taps if not (tap.startswith("layer_") and tap.split(".", 1)[1] in every)]
    return ", ".join(shown) + (f" ({{i}}: every layer, 0-{layers - 1})" if every else "")


def locate_whole(model: DeciCoderForCausalLM, port, shape: CaseShape, mapped: dict[str, str],
                 order: list[str] | None = None) -> LocateReport:
    """Run ``port`` whole (an ONNX graph, or an engine, which cannot be cut) and judge every mapped
    tap it produced; a mapped tensor it did not produce (an engine output never marked) is reported."""
    dtype = model.lm_head.weight.dtype
    order = order or golden_order(model.config)
    inputs = make_inputs("causal_lm", model.config, shape, dtype)
    past = [layer_past(inputs, i) for i in range(model.config.num_hidden_layers)] if shape.past_len else None
    with torch.no_grad(), capture_taps(model, tuple(order)) as golden:
        model(inputs["input_ids"], inputs["position_ids"], past_key_values=past)
    outputs = port.run(port.feed(inputs), list(dict.fromkeys(mapped.values())))
    produced = {tap: tensor for tap, tensor in mapped.items() if tensor in outputs}
    results = _judge(golden, outputs, produced, TOLERANCES[dtype], order)
    candidate = {tap: _as_golden_layout(outputs[tensor], golden[tap]) for tap, tensor in produced.items()}
    diagnosis = diagnose_whole(model, results, golden, candidate, inputs)
    report = LocateReport(CheckResult("causal_lm", port.description, dtype, shape, results, diagnosis=diagnosis))
    if missing := [tap for tap in mapped if tap not in produced]:
        report.notes.append(f"mapped, but not among the candidate's outputs (not marked when it was built), so not "
                            f"judged: {', '.join(missing)}")
    return report


def _locate_streamed(model, port, shape, mapped, order) -> LocateReport:
    config, dtype = model.config, model.lm_head.weight.dtype
    tolerance = TOLERANCES[dtype]
    inputs = make_inputs("causal_lm", config, shape, dtype)
    feed, positions = port.feed(inputs), inputs["position_ids"]
    results, detail, diagnosis = [], None, None
    with torch.no_grad():
        hidden = port.run(feed, [mapped["embed"]])[mapped["embed"]]
        golden_embed = {"embed": model.model.embed_tokens(inputs["input_ids"])}
        results += _judge(golden_embed, {mapped["embed"]: hidden}, mapped, tolerance, ["embed"])
        weights_differ = not results[0].passed
        if weights_differ:
            diagnosis = diagnose_model_tap(model, "embed", {**golden_embed, "input_ids": inputs["input_ids"]}, hidden)
        cut = mapped["embed"]
        for i in range(config.num_hidden_layers):
            release_freed_memory()
            golden_input, out = torch.from_numpy(hidden), mapped[f"layer_{i}.out"]
            # The layer's output, and its present K/V where the graph outputs them: a cache written wrong
            # leaves this step's output right.
            taps = [tap for tap in ("attn.present_k", "attn.present_v") if f"layer_{i}.{tap}" in mapped] + ["out"]
            candidate = port.run_layer({**feed, cut: hidden}, cut, [mapped[f"layer_{i}.{tap}"] for tap in taps])
            past = layer_past(inputs, i)
            golden = run_layer(model, i, golden_input, positions, past, tuple(taps))
            layer = _judge({f"layer_{i}.{tap}": golden[tap] for tap in taps}, candidate, mapped, tolerance,
                           [f"layer_{i}.{tap}" for tap in taps])
            results += layer
            if detail is None and first_failure(layer) is not None:  # where inside this layer, and what?
                layer_inputs = {"hidden_states": golden_input, "position_ids": positions}
                layer_inputs.update(zip(("past_k", "past_v"), past or ()))
                detail_results, detail_diagnosis = _layer_detail(model, port, i, layer_inputs, past, feed, cut,
                                                                 mapped, tolerance)
                detail = (i, detail_results)
                if diagnosis is None and first_failure(results[:-len(layer)]) is None:
                    diagnosis = detail_diagnosis or diagnose_layer(
                        model, i, [replace(r, name=r.name.removeprefix(f"layer_{i}.")) for r in layer], golden,
                        {tap: _as_golden_layout(candidate[mapped[f"layer_{i}.{tap}"]], golden[tap]) for tap in taps},
                        layer_inputs)
            hidden, cut = candidate[out], out
        if head := [tap for tap in ("final_norm", "logits") if tap in mapped]:
            head_segment = port.segment([mapped[tap] for tap in head], cut)

            def candidate_head(block: np.ndarray) -> dict[str, np.ndarray]:
                outputs = head_segment({**feed, cut: block})
                return {tap: outputs[mapped[tap]] for tap in head}

            head_results = judge_head(model, hidden, candidate_head, head, tolerance, CANDIDATE_HEAD_BLOCK_BYTES)
            if first_failure(results) is None and (first := first_failure(head_results)) is not None:
                diagnosis = diagnose_head(model, hidden, candidate_head, first.name)
            results += head_results
    report = LocateReport(CheckResult("causal_lm", port.description, dtype, shape, results, diagnosis=diagnosis),
                          layer_detail=detail)
    report.notes.append("Each segment ran on the candidate's own previous output, and the golden reran each layer "
                        "and the head on that same input: each row judges that piece alone.")
    if weights_differ:
        report.notes.append("The embedding lookup already differs: the graph's weights are likely not --model's "
                            "(export it from the same checkpoint, or for a preset with the same --seed).")
    if detail is not None:
        first = first_failure(detail[1])
        where = first.name if first else "no mapped tap inside it (map more with --tap-map)"
        report.notes.append(f"Inside layer {detail[0]}, the first diverging tap is {where}.")
    return report


def _layer_detail(model, port, i, inputs, past, feed, cut, mapped, tolerance) -> tuple[list[TapResult],
                                                                                      Diagnosis | None]:
    """Layer ``i`` again, golden and candidate on the same ``inputs``, every mapped tap inside it (names
    relative to the layer, as trt_layers' layer detail names them), and the first divergence's diagnosis."""
    prefix = f"layer_{i}."
    inside = {tap.removeprefix(prefix): tensor for tap, tensor in mapped.items() if tap.startswith(prefix)}
    outputs = port.run({**feed, cut: inputs["hidden_states"].numpy()}, list(dict.fromkeys(inside.values())), cut)
    golden = run_layer(model, i, inputs["hidden_states"], inputs["position_ids"], past)
    results = _judge(golden, outputs, inside, tolerance, list(LAYER_TAPS))
    candidate = {tap: _as_golden_layout(outputs[inside[tap]], golden[tap]) for tap in inside if tap in golden}
    return results, diagnose_layer(model, i, results, golden, candidate, inputs)
