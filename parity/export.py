"""Write a component (or the whole model) as files polygraphy's command-line tools work on.

The graph is built at the case's shapes (static, shape arithmetic folded), the form
``polygraphy debug reduce`` works best on. A folder gets ``model.onnx`` (taps as named graph outputs), ``inputs.json`` (polygraphy's
data-loader format) and ``golden.json`` (polygraphy RunResults from the reference), plus a
``README.txt`` with the exact commands that re-check it. With a catalog bug, ``faulty.onnx`` is the
same port with the bug injected: the failing graph ``debug reduce`` works on, ``model.onnx`` its
trusted twin.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import save_json

from reference import DeciCoderForCausalLM
from reference.components import run_component
from reference.inputs import CaseShape, make_inputs
from reference.taps import component_outputs
from trt_layers.bugs import Bug
from trt_layers.network import OnnxBackend, quiet_polygraphy, save_onnx, to_feed

from .check import CandidateBackend, UsageError, build_candidate, needs_decode_graph
from .compare import TOLERANCES, compare_taps, first_failure, tap_atol
from .reduce_check import DIVERGED

SOURCES = ("lowering", "reference")
# Printed commands name the tools of this interpreter's environment, so they run as written without
# an activated venv: a bare `python` or `polygraphy` on PATH may be another install, without the suite.
PYTHON = shlex.quote(sys.executable)
_POLYGRAPHY_HERE = Path(sys.executable).parent / "polygraphy"
POLYGRAPHY = shlex.quote(str(_POLYGRAPHY_HERE)) if _POLYGRAPHY_HERE.exists() else "polygraphy"


@dataclass
class Export:
    directory: Path
    model: Path
    inputs: Path
    golden: Path
    readme: Path
    recheck_command: str
    faulty: Path | None = None  # the port with a catalog bug injected (export --inject)


class _ReferenceGraph(torch.nn.Module):
    """A reference component as a module of positional inputs -> its outputs, for torch.onnx."""

    def __init__(self, component: str, model: DeciCoderForCausalLM, input_names: list[str]):
        super().__init__()
        self.component, self.reference, self.input_names = component, model, input_names

    def forward(self, *tensors):
        outputs = run_component(self.component, self.reference, dict(zip(self.input_names, tensors)))
        return tuple(outputs.values())


def reference_onnx(component: str, model: DeciCoderForCausalLM, inputs: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The reference submodule traced by torch.onnx at these inputs' shapes, taps as outputs."""
    import io

    names = list(inputs)
    # Ids as int32, the same feed the lowering takes; the reference indexes with either.
    args = tuple(t.to(torch.int32) if t.dtype == torch.int64 else t for t in inputs.values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which needs
        # onnxscript; this one needs nothing beyond torch and traces the reference as it runs.
        warnings.simplefilter("ignore")
        torch.onnx.export(_ReferenceGraph(component, model, names), args, buffer, dynamo=False,
                          input_names=names, output_names=list(component_outputs(component, model.config.num_hidden_layers)),
                          opset_version=18, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _tolerance_args(outputs: dict[str, np.ndarray], dtype: torch.dtype) -> str:
    """polygraphy's --atol/--rtol for the suite's tolerance table. polygraphy's command line takes one
    atol per output, so each tap gets its largest row's (tap_atol): never stricter than the suite's
    per-row judge, looser only for rows far smaller than the tap's largest."""
    tolerance = TOLERANCES[dtype]
    atol = " ".join(f"{name}:{tap_atol(tolerance, value):.6g}" for name, value in outputs.items())
    return f"--atol {atol} --rtol {tolerance.rtol:g} --check-error-stat elemwise"


def _recheck_commands(model: Path, outputs: dict[str, np.ndarray], dtype: torch.dtype) -> tuple[str, str, str]:
    common = f"--load-inputs inputs.json {_tolerance_args(outputs, dtype)}"
    onnxrt = f"{POLYGRAPHY} run {model.name} --onnxrt {common} --load-outputs golden.json"
    trt = f"{POLYGRAPHY} run {model.name} --trt --onnxrt {common}"
    # debug precision builds fp16 engines from this (fp32) graph, marking layers back to fp32
    # until the engine meets the fp16 tolerances against the fp32 golden values.
    precision = (f"{POLYGRAPHY} debug precision {model.name} --fp16 --precision float32 --mode bisect --dir forward "
                 f"--load-inputs inputs.json --check {POLYGRAPHY} run polygraphy_debug.engine --trt "
                 f"--load-inputs inputs.json --load-outputs golden.json {_tolerance_args(outputs, torch.float16)}")
    return onnxrt, trt, precision


def _lowered(component: str, model: DeciCoderForCausalLM, shape: CaseShape, inputs: dict[str, torch.Tensor]):
    """The port through the ONNX lowering at these inputs' (static) shapes; a failing build is the port's."""
    static_shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    return build_candidate(component, model, CandidateBackend(OnnxBackend()), needs_decode_graph(component, shape),
                           static_shapes)


def _faulty_graph(component: str, model: DeciCoderForCausalLM, shape: CaseShape, inputs: dict[str, torch.Tensor],
                  golden: dict[str, np.ndarray], bug: Bug) -> onnx.ModelProto:
    """The lowering with ``bug`` injected; refused if its taps match the golden ones (nothing to reduce)."""
    with bug.injected():
        engine = _lowered(component, model, shape, inputs)
    dtype = model.lm_head.weight.dtype
    if first_failure(compare_taps(golden, engine.infer(to_feed(inputs)), TOLERANCES[dtype])) is None:
        raise UsageError(f"--inject {bug.name}: every tap of {component} stays within tolerance in this case, so "
                         f"there is no failing graph to reduce (the bug shows in {bug.component}: see list-bugs)")
    return engine.model


def export(component: str, model: DeciCoderForCausalLM, shape: CaseShape, directory: str | Path,
           source: str = "lowering", bug: Bug | None = None) -> Export:
    """Export ``component`` (prefill, or decode when the shape has a cache) with golden data into
    ``directory``, and with ``bug`` (lowering only) ``faulty.onnx`` beside it."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    if bug is not None and source != "lowering":
        raise ValueError("catalog bugs are injected into trt_layers: --inject needs --source lowering")
    dtype = model.lm_head.weight.dtype
    if dtype == torch.bfloat16:
        raise ValueError("bf16 cannot be exported for polygraphy: its JSON files and ONNX Runtime's CPU kernels "
                         "have no bfloat16; export fp32 or fp16")
    directory = Path(directory)
    inputs = make_inputs(component, model.config, shape, dtype)
    golden = {name: t.detach().numpy() for name, t in run_component(component, model, inputs).items()}
    if source == "lowering":
        graph = _lowered(component, model, shape, inputs).model
    else:
        graph = reference_onnx(component, model, inputs)
    faulty = None if bug is None else _faulty_graph(component, model, shape, inputs, golden, bug)

    directory.mkdir(parents=True, exist_ok=True)
    paths = Export(directory, directory / "model.onnx", directory / "inputs.json", directory / "golden.json",
                   directory / "README.txt", "", None if bug is None else directory / "faulty.onnx")
    save_onnx(graph, paths.model)
    if faulty is not None:
        save_onnx(faulty, paths.faulty)
    results = RunResults()
    results.append(("golden", [IterationResult(golden, runner_name="golden")]))
    with quiet_polygraphy():
        save_json([to_feed(inputs)], str(paths.inputs))
        results.save(str(paths.golden))
    onnxrt, trt, precision = _recheck_commands(paths.model, golden, dtype)
    paths.recheck_command = onnxrt
    reduce = reduce_command("faulty.onnx", "inputs.json", shape_args(inputs), trusted=paths.model.name)
    faulty_note = (_FAULTY_WRITTEN.format(bug=bug.name, description=bug.description) if bug is not None
                   else _FAULTY_TO_MAKE)
    paths.readme.write_text(_README.format(
        component=component, source=source, dtype=str(dtype).removeprefix("torch."),
        shape=f"batch {shape.batch}, seq {shape.seq_len}, past {shape.past_len}, seed {shape.seed}",
        onnxrt=onnxrt, trt=trt, reduce=reduce, model=paths.model.name, faulty=faulty_note, polygraphy=POLYGRAPHY,
        faulty_file="" if bug is None else f"\n  faulty.onnx  the same port with the catalog bug {bug.name} injected",
        precision=precision if dtype == torch.float32 else _FP16_FROM_FP32), encoding="utf-8")
    return paths


def shape_args(inputs: dict[str, torch.Tensor]) -> str:
    """polygraphy's --model-input-shapes value for these inputs, quoted for the shell."""
    return " ".join(shlex.quote(f"{name}:[{','.join(str(d) for d in t.shape)}]") for name, t in inputs.items())


def reduce_command(model: str, inputs: str, shapes: str, trusted: str) -> str:
    """``polygraphy debug reduce`` of ``model`` with the project's CPU check: each subgraph is run on
    the values ``trusted`` (a graph with the same tensor names) computes.

    The check runs in this interpreter (a bare ``python`` may lack the suite), and an iteration
    counts as failing only if the check exits 1 *and* prints its DIVERGED line: a check that
    cannot start or gives no verdict never reads as "still failing". reduce itself assumes the
    whole graph fails, so the command first asks the check whether it does (and whether it can
    run at all): if not, nothing is reduced and no reduced.onnx is written.
    """
    def check(graph: str) -> str:
        return (f"{PYTHON} -m parity.reduce_check {shlex.quote(graph)} "
                f"--trusted {shlex.quote(trusted)} --load-inputs {inputs}")

    return (f"{check(model)} --expect-divergence && {POLYGRAPHY} debug reduce {shlex.quote(model)} -o reduced.onnx "
            f"--mode bisect --model-input-shapes {shapes} --load-inputs {inputs} --fail-code 1 "
            f"--fail-regex {shlex.quote(DIVERGED.pattern)} --check {check('polygraphy_debug.onnx')}")


_README = """\
{component} ({source} graph, {dtype}, {shape}), exported by the DeciCoder parity suite.

  model.onnx   the graph, every tap a named output
  inputs.json  its inputs (polygraphy data-loader JSON)
  golden.json  the reference's taps on those inputs (polygraphy RunResults JSON){faulty_file}

Re-check on the CPU with ONNX Runtime against the golden values:

  {onnxrt}

Needs TensorRT (GPU): build the graph with TensorRT and compare it with ONNX Runtime:

  {trt}

Inspect:

  {polygraphy} inspect model {model} --show layers

Reduce a failing variant of this graph to the smallest failing subgraph, each subgraph checked
on the CPU against the values {model} computes ({faulty}):

  {reduce}

Needs TensorRT: reduce a graph that TensorRT gets wrong by checking TensorRT against ONNX Runtime:

  {polygraphy} debug reduce {model} -o reduced.onnx --mode bisect --check {polygraphy} run polygraphy_debug.onnx --trt --onnxrt

Needs TensorRT: find the layers that must stay in fp32 for an fp16 engine to pass:

  {precision}
"""
_FAULTY_WRITTEN = "faulty.onnx: this port with the catalog bug {bug} injected, {description}"
_FAULTY_TO_MAKE = ("faulty.onnx: a failing copy of the graph with the same tensor names; "
                   "export --inject BUG writes one with a catalog bug")
_FP16_FROM_FP32 = ("(export this component in fp32: `polygraphy debug precision` starts from the fp32 graph "
                   "and its fp32 golden values)")


def export_llama(model: DeciCoderForCausalLM, path: Path, external_data: bool = False, past_len: int = 0) -> Path:
    """transformers' LlamaForCausalLM over ``model``'s own weights, written by torch.onnx's dynamo exporter
    (module paths in each node's metadata): a port this project did not write, for ``locate --candidate``.
    With ``past_len``, its decode step instead: one new token of a batch of 2 after ``past_len`` cached,
    static sizes, the cache in ``past_key_values.{i}.key/value`` and out in ``present.{i}.key/value``."""
    from reference.oracle import llama_from_reference

    llama = llama_from_reference(model, attn_implementation="sdpa")
    if past_len:
        program = _export_decode_step(llama, past_len)
    else:
        ids = torch.zeros(2, 5, dtype=torch.long)  # batch 1 would be specialized: torch.export fixes sizes of 1
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"}, "use_cache": None}
        program = torch.onnx.export(llama, (), kwargs={"input_ids": ids, "position_ids": torch.arange(5).expand(2, 5),
                                                       "use_cache": False}, dynamo=True, dynamic_shapes=dynamic)
    program.save(str(path), external_data=external_data)
    return path


class _LlamaDecodeStep(torch.nn.Module):
    """A Llama's decode step with its cache as flat tensors (torch.export takes no DynamicCache), keeping
    the model's module paths (``model.layers.{i}...``, ``lm_head``) for the tap map."""

    def __init__(self, llama):
        super().__init__()
        self.model, self.lm_head, self.config = llama.model, llama.lm_head, llama.config

    def forward(self, input_ids, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                            use_cache=True).last_hidden_state
        presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(hidden), *presents)


def _export_decode_step(llama, past_len: int):
    config, batch = llama.config, 2
    head_dim = config.hidden_size // config.num_attention_heads
    past = [torch.zeros(batch, config.num_key_value_heads, past_len, head_dim)
            for _ in range(2 * config.num_hidden_layers)]
    layers = range(config.num_hidden_layers)
    return torch.onnx.export(
        _LlamaDecodeStep(llama), (torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), past_len), *past),
        dynamo=True, input_names=["input_ids", "position_ids",
                                  *(f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value"))],
        output_names=["logits", *(f"present.{i}.{kind}" for i in layers for kind in ("key", "value"))])
