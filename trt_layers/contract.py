"""The TensorRT-LLM 1.2.1 / TensorRT 10.14 API the project calls, as facts, and a checker of every call.

No TensorRT exists where CI runs, so nothing executes ``network.py``'s, ``fast_path.py``'s or
the engine tests' calls into TensorRT-LLM there. ``API`` holds what those calls rely on,
copied from the source (each entry names the file and commit it was read at), and
``check_project`` parses the project with ``ast`` and checks every call site against it:

* calls through the vocabulary (``F.matmul(...)`` in ``trt_layers/``) resolve through
  ``functional.VOCABULARY`` to the TensorRT-LLM function;
* names imported from ``tensorrt_llm``, ``tensorrt`` and ``polygraphy.backend.trt``, and the
  objects their calls return (``Builder().create_network()``), resolve through ``API``;
* in a function that builds a graph (calls the vocabulary), a method called on a value of
  unknown type is taken as a TensorRT-LLM ``Tensor`` method if ``Tensor`` has one of that name.

A call fails on a name ``API`` does not hold, a keyword its signature lacks, or a wrong number
of positional arguments (``inspect.Signature.bind``). ``API`` holds a subset of each class's
members, so the checker errs towards failing. Types, values and calls made through
``setattr`` or ``**kwargs`` are out of its reach (``tests/test_contract.py`` checks the fast
path's option names as data).

The GitHub index reachable here stores each file of NVIDIA/TensorRT-LLM at one commit, not
all at the 1.2.1 tag (its ``requirements.txt`` at 000867d9, which pins ``tensorrt~=10.13.3``, lies
between the 1.1 and 1.2 releases; 1.2.1's package metadata requires ``tensorrt~=10.14.1``); the
entries below are the signatures as read, which the 1.x line kept.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import functional

TRTLLM = "NVIDIA/TensorRT-LLM"
FUNCTIONAL = f"{TRTLLM} tensorrt_llm/functional.py@0071496dc625"
QUANT_FUNCTIONAL = f"{TRTLLM} tensorrt_llm/quantization/functional.py@2a9abd9536aa"
UTILS = f"{TRTLLM} tensorrt_llm/_utils.py@000a01de66f0"
BUILDER = f"{TRTLLM} tensorrt_llm/builder.py@008b2b8d23af"
NETWORK = f"{TRTLLM} tensorrt_llm/network.py@138f96d45f90"
MODELS = f"{TRTLLM} tensorrt_llm/models/__init__.py@02267d3d4fd8"
MODELING_UTILS = f"{TRTLLM} tensorrt_llm/models/modeling_utils.py@01ea6d79d454"
# NVIDIA's plugin.py in the index predates the pydantic PluginConfig of the 1.x line; this fork has it.
PLUGIN = "nv-auto-deploy/TensorRT-LLM tensorrt_llm/plugin/plugin.py@502412b7ac19"
COMMANDS_BUILD = f"{TRTLLM} tensorrt_llm/commands/build.py@008b2b8d23af"
RUNTIME = f"{TRTLLM} tensorrt_llm/runtime/__init__.py@06c0e9b1ec38"
MODEL_RUNNER = f"{TRTLLM} tensorrt_llm/runtime/model_runner.py@0243026ffeb3"
VERSION = f"{TRTLLM} tensorrt_llm/__init__.py (from tensorrt_llm.version import __version__)"
# The index holds this file at an older commit; LLaMADecoderLayer(Module) and its forward, which returns
# hidden_states or (hidden_states, presents), are what the test relies on, and the 1.x line kept them.
LLAMA_MODEL = f"{TRTLLM} tensorrt_llm/models/llama/model.py@027cd518e3b6"
GENERATION = f"{TRTLLM} tensorrt_llm/runtime/generation.py@2340c776201e"
TENSORRT = "TensorRT 10.13/10.14 Python API (IBuilderConfig.clear_flag, BuilderFlag.TF32), docs.nvidia.com"
POLYGRAPHY = "polygraphy 0.53.6 backend/trt/{runner,loader}.py (the installed wheel; tests compare)"


@dataclass(frozen=True)
class Api:
    source: str
    signature: str | None = None  # as its ``def`` writes it, without self/cls; None: not called
    returns: str | None = None  # the class of what a call (or, for a property, an access) gives
    kwargs_to: str | None = None  # the API whose parameters a ``**kwargs`` parameter takes


def _class(source: str, key: str, signature: str) -> tuple[str, Api]:
    return key, Api(source, signature, returns=key)


API: dict[str, Api] = dict([
    # tensorrt_llm.functional: the vocabulary (trt_layers.functional.VOCABULARY) and Tensor
    _class(FUNCTIONAL, "tensorrt_llm.functional.Tensor",
           "(name=None, dtype=None, shape=None, dim_range=None, is_network_input=True,"
           " location=trt.TensorLocation.DEVICE, network=None, trt_tensor=None)"),
    ("tensorrt_llm.functional.Tensor.view", Api(FUNCTIONAL, "(shape, zero_is_placeholder=True)")),
    ("tensorrt_llm.functional.Tensor.flatten", Api(FUNCTIONAL, "(start_dim=0, end_dim=-1)")),
    ("tensorrt_llm.functional.Tensor.permute", Api(FUNCTIONAL, "(dims)")),
    ("tensorrt_llm.functional.Tensor.transpose", Api(FUNCTIONAL, "(dim0, dim1)")),
    ("tensorrt_llm.functional.Tensor.mean", Api(FUNCTIONAL, "(dim, keepdim=False)")),
    ("tensorrt_llm.functional.Tensor.max", Api(FUNCTIONAL, "(dim, keepdim=False)")),
    ("tensorrt_llm.functional.Tensor.abs", Api(FUNCTIONAL, "()")),
    ("tensorrt_llm.functional.Tensor.sqrt", Api(FUNCTIONAL, "()")),
    ("tensorrt_llm.functional.Tensor.squeeze", Api(FUNCTIONAL, "(dim, zero_is_placeholder)")),
    ("tensorrt_llm.functional.Tensor.unsqueeze", Api(FUNCTIONAL, "(dim)")),
    ("tensorrt_llm.functional.Tensor.log", Api(FUNCTIONAL, "()")),
    ("tensorrt_llm.functional.Tensor.cast", Api(FUNCTIONAL, "(dtype)")),
    ("tensorrt_llm.functional.Tensor.size", Api(FUNCTIONAL, "(dim=None)")),
    ("tensorrt_llm.functional.Tensor.rank", Api(FUNCTIONAL, "()")),
    ("tensorrt_llm.functional.Tensor.ndim", Api(FUNCTIONAL, "()")),
    ("tensorrt_llm.functional.Tensor.split", Api(FUNCTIONAL, "(split_size_or_sections, dim=0)")),
    ("tensorrt_llm.functional.Tensor.select", Api(FUNCTIONAL, "(dim, index)")),
    ("tensorrt_llm.functional.Tensor.unbind", Api(FUNCTIONAL, "(dim=0)")),
    ("tensorrt_llm.functional.Tensor.repeat", Api(FUNCTIONAL, "(sizes)")),
    ("tensorrt_llm.functional.Tensor.is_dynamic", Api(FUNCTIONAL, "(dim=None)")),
    ("tensorrt_llm.functional.Tensor.mark_output", Api(FUNCTIONAL, "(name=None, dtype=None)")),
    ("tensorrt_llm.functional.allgather", Api(FUNCTIONAL, "(tensor, group, gather_dim=0)")),
    ("tensorrt_llm.functional.allreduce", Api(FUNCTIONAL, "(tensor, group, all_reduce_params=AllReduceParams())")),
    ("tensorrt_llm.functional.arange", Api(FUNCTIONAL, "(start, end, dtype)")),
    ("tensorrt_llm.functional.cast", Api(FUNCTIONAL, "(input, dtype)")),
    ("tensorrt_llm.functional.concat", Api(FUNCTIONAL, "(inputs, dim=0)")),
    ("tensorrt_llm.functional.constant", Api(FUNCTIONAL, "(ndarray, as_dtype=None, as_shape=None)")),
    ("tensorrt_llm.functional.embedding", Api(FUNCTIONAL, "(input, weight, tp_size=1, tp_group=None, sharding_dim=0,"
                                                          " tp_rank=None, per_token_scale=None, padding=None)")),
    ("tensorrt_llm.functional.expand", Api(FUNCTIONAL, "(input, expand_shape)")),
    ("tensorrt_llm.functional.identity", Api(FUNCTIONAL, "(input)")),
    ("tensorrt_llm.functional.matmul", Api(FUNCTIONAL, "(input, mat2, transa=False, transb=False, use_fp32_acc=True)")),
    ("tensorrt_llm.functional.repeat_interleave", Api(FUNCTIONAL, "(tensor, repeats, dim)")),
    ("tensorrt_llm.quantization.functional.quantize", Api(QUANT_FUNCTIONAL, "(input, scale_factor, dtype, axis=-1)")),
    ("tensorrt_llm.quantization.functional.dequantize", Api(QUANT_FUNCTIONAL, "(input, scale_factor, axis=-1,"
                                                                              " output_type='float16')")),
    ("tensorrt_llm.functional.rms_norm", Api(FUNCTIONAL, "(input, normalized_shape, num_groups=1, weight=None,"
                                                         " eps=1e-06)")),
    ("tensorrt_llm.functional.shape", Api(FUNCTIONAL, "(input, dim=None, cast_to_dtype=None, clip_before_cast=None)")),
    ("tensorrt_llm.functional.silu", Api(FUNCTIONAL, "(input)")),
    ("tensorrt_llm.functional.softmax", Api(FUNCTIONAL, "(input, dim=None)")),
    ("tensorrt_llm.functional.split", Api(FUNCTIONAL, "(tensor, split_size_or_sections, dim=0)")),
    ("tensorrt_llm.functional.unsqueeze", Api(FUNCTIONAL, "(input, axis)")),
    ("tensorrt_llm.functional.where", Api(FUNCTIONAL, "(condition, left, right)")),
    ("tensorrt_llm.functional.RopeEmbeddingUtils", Api(FUNCTIONAL)),
    ("tensorrt_llm.functional.RopeEmbeddingUtils.create_sinusoidal_positions",
     Api(FUNCTIONAL, "(num_pos, dim, theta=10000.0, dtype=np.float32)")),
    ("tensorrt_llm.functional.RopeEmbeddingUtils.rotate_half", Api(FUNCTIONAL, "(tensor)")),
    ("tensorrt_llm.functional.RopeEmbeddingUtils.rotate_every_two", Api(FUNCTIONAL, "(tensor)")),  # a catalog bug
    ("tensorrt_llm._utils.torch_to_numpy", Api(UTILS, "(x)")),
    ("tensorrt_llm._utils.str_dtype_to_trt", Api(UTILS, "(dtype)")),
    # graph building: Builder, BuilderConfig, Network, net_guard (network.py's TrtllmBackend)
    _class(BUILDER, "tensorrt_llm.builder.Builder", "()"),
    ("tensorrt_llm.builder.Builder.create_network", Api(BUILDER, "()", returns="tensorrt_llm.network.Network")),
    ("tensorrt_llm.builder.Builder.create_builder_config",
     Api(BUILDER, "(precision, timing_cache=None, tensor_parallel=1, use_refit=False, int8=False, strongly_typed=True,"
                  " force_num_profiles=None, profiling_verbosity='layer_names_only', use_strip_plan=False,"
                  " weight_streaming=False, precision_constraints='obey', **kwargs)",
         returns="tensorrt_llm.builder.BuilderConfig")),
    # build_engine asserts that TensorRT returned an engine ('Engine building failed, ...').
    ("tensorrt_llm.builder.Builder.build_engine", Api(BUILDER, "(network, builder_config, managed_weights=None)")),
    ("tensorrt_llm.builder.BuilderConfig", Api(BUILDER)),
    ("tensorrt_llm.builder.BuilderConfig.trt_builder_config", Api(BUILDER, returns="tensorrt.IBuilderConfig")),
    ("tensorrt_llm.network.Network", Api(NETWORK)),
    ("tensorrt_llm.network.net_guard", Api(NETWORK, "(network)")),
    ("tensorrt.IBuilderConfig", Api(TENSORRT)),
    ("tensorrt.IBuilderConfig.clear_flag", Api(TENSORRT, "(flag)")),
    ("tensorrt.BuilderFlag.TF32", Api(TENSORRT)),
    ("tensorrt.__version__", Api(TENSORRT)),
    ("tensorrt.int4", Api(TENSORRT)),  # DataType.INT4 (TensorRT 10): INT4 weights for IDequantizeLayer
    # the fast path: checkpoint, BuildConfig + PluginConfig, build, engine, runner
    _class(BUILDER, "tensorrt_llm.builder.BuildConfig",
           "(max_input_len=1024, max_seq_len=None, opt_batch_size=8, max_batch_size=2048, max_beam_width=1,"
           " max_num_tokens=8192, opt_num_tokens=None, max_prompt_embedding_table_size=0, kv_cache_type=None,"
           " gather_context_logits=False, gather_generation_logits=False, strongly_typed=True,"
           " force_num_profiles=None, profiling_verbosity='layer_names_only', enable_debug_output=False,"
           " max_draft_len=0, speculative_decoding_mode=SpeculativeDecodingMode.NONE, use_refit=False,"
           " input_timing_cache=None, output_timing_cache='model.cache', lora_config=LoraConfig(),"
           " auto_parallel_config=AutoParallelConfig(), weight_sparsity=False, weight_streaming=False,"
           " plugin_config=PluginConfig(), use_strip_plan=False, max_encoder_input_len=1024, dry_run=False,"
           " visualize_network=None, monitor_memory=False, use_mrope=False)"),
    ("tensorrt_llm.builder.BuildConfig.plugin_config", Api(BUILDER, returns="tensorrt_llm.plugin.PluginConfig")),
    ("tensorrt_llm.builder.build", Api(BUILDER, "(model, build_config)", returns="tensorrt_llm.builder.Engine")),
    ("tensorrt_llm.builder.Engine", Api(BUILDER)),
    ("tensorrt_llm.builder.Engine.save", Api(BUILDER, "(engine_dir)")),
    ("tensorrt_llm.plugin.PluginConfig", Api(PLUGIN, returns="tensorrt_llm.plugin.PluginConfig")),
    ("tensorrt_llm.plugin.PluginConfig.from_arguments",
     Api(PLUGIN, "(args)", returns="tensorrt_llm.plugin.PluginConfig")),
    ("tensorrt_llm.plugin.PluginConfig.model_dump",  # PluginConfig is a pydantic BaseModel
     Api(PLUGIN, "(*, mode='python', include=None, exclude=None)")),
    # PluginConfig fields the fast path sets (trtllm-build exposes each as --<field>)
    ("tensorrt_llm.plugin.PluginConfig.gpt_attention_plugin", Api(PLUGIN)),  # default "auto": the model dtype
    ("tensorrt_llm.plugin.PluginConfig.gemm_plugin", Api(PLUGIN)),  # default None
    ("tensorrt_llm.plugin.PluginConfig.context_fmha", Api(PLUGIN)),  # default True
    ("tensorrt_llm.plugin.PluginConfig.use_paged_context_fmha", Api(PLUGIN)),  # default True
    ("tensorrt_llm.commands.build.parse_arguments", Api(COMMANDS_BUILD, "()")),
    ("tensorrt_llm.models.LLaMAForCausalLM", Api(MODELS)),
    ("tensorrt_llm.models.LLaMAForCausalLM.from_checkpoint",
     Api(MODELING_UTILS, "(ckpt_dir, rank=None, config=None, *, preprocess_weights_hook=None)",
         returns="tensorrt_llm.models.LLaMAForCausalLM")),
    # tests/test_trtllm_candidate.py registers each LLaMA layer's output, as a port would
    ("tensorrt_llm.models.llama.model.LLaMADecoderLayer", Api(LLAMA_MODEL)),
    # called unbound by a wrapper that passes the builder's arguments through as they came
    ("tensorrt_llm.models.llama.model.LLaMADecoderLayer.forward", Api(LLAMA_MODEL, "(*args, **kwargs)")),
    ("tensorrt_llm.runtime.ModelRunner", Api(RUNTIME)),
    ("tensorrt_llm.runtime.ModelRunner.from_dir",
     Api(MODEL_RUNNER, "(engine_dir, *, max_output_len=None, lora_dir=None, rank=0, debug_mode=False,"
                       " lora_ckpt_source='hf', medusa_choices=None, stream=None, gpu_weights_percent=1,"
                       " enable_context_fmha_fp32_acc=None, multi_block_mode=None)",
         returns="tensorrt_llm.runtime.ModelRunner")),
    ("tensorrt_llm.runtime.ModelRunner.generate",
     Api(MODEL_RUNNER, "(batch_input_ids, position_ids=None, sampling_config=None, prompt_table=None,"
                       " prompt_tasks=None, lora_uids=None, streaming=False, output_generation_logits=False,"
                       " stopping_criteria=None, logits_processor=None, medusa_choices=None,"
                       " encoder_max_input_length=None, encoder_input_features=None, encoder_output_lengths=None,"
                       " cross_attention_masks=None, **kwargs)",
         kwargs_to="tensorrt_llm.runtime.SamplingConfig")),  # generate() applies kwargs via SamplingConfig.update
    # parity/trtllm_port.py reads an engine directory's debug outputs: ModelRunner.__init__ keeps the
    # GenerationSession as .session; in debug mode it lists the engine outputs it was not built to
    # expect (debug_tensors) and keeps the context step's I/O buffers (debug_buffer, name -> tensor).
    ("tensorrt_llm.runtime.ModelRunner.session", Api(MODEL_RUNNER, returns="tensorrt_llm.runtime.GenerationSession")),
    ("tensorrt_llm.runtime.GenerationSession", Api(GENERATION)),
    ("tensorrt_llm.runtime.GenerationSession.debug_tensors", Api(GENERATION)),
    ("tensorrt_llm.runtime.GenerationSession.debug_buffer", Api(GENERATION)),
    ("tensorrt_llm.__version__", Api(VERSION)),
    ("tensorrt_llm.runtime.SamplingConfig",
     Api(GENERATION, "(end_id, pad_id, max_new_tokens=20, num_beams=1, max_attention_window_size=None,"
                     " sink_token_length=None, output_sequence_lengths=False, return_dict=False,"
                     " stop_words_list=None, bad_words_list=None, temperature=1.0, top_k=1, top_p=0.0,"
                     " top_p_decay=None, top_p_min=None, top_p_reset_ids=None, length_penalty=1.0,"
                     " repetition_penalty=1.0)")),
    # polygraphy: runs the engines
    _class(POLYGRAPHY, "polygraphy.backend.trt.TrtRunner",
           "(engine, name=None, optimization_profile=None, allocation_strategy=None, weight_streaming_budget=None,"
           " weight_streaming_percent=None, debug_listener=None)"),
    _class(POLYGRAPHY, "polygraphy.backend.trt.EngineFromBytes",
           "(serialized_engine, runtime=None, dla_workspace_allocation_strategy=None)"),
    # polygraphy: builds an engine from an ONNX graph, outputs marked (locate --candidate's engine test)
    _class(POLYGRAPHY, "polygraphy.backend.trt.NetworkFromOnnxPath",
           "(path, flags=None, plugin_instancenorm=None, strongly_typed=None,"
           " mark_unfused_tensors_as_debug_tensors=None, enable_uint8_asymmetric_quantization_dla=None,"
           " config=None)"),
    _class(POLYGRAPHY, "polygraphy.backend.trt.ModifyNetworkOutputs",
           "(network, outputs=None, exclude_outputs=None, mark_layer_types=None)"),
    _class(POLYGRAPHY, "polygraphy.backend.trt.EngineFromNetwork",
           "(network, config=None, save_timing_cache=None, runtime=None, dla_workspace_allocation_strategy=None)"),
    ("polygraphy.backend.trt.CreateConfig",  # profiles reaches it through **kwargs, as its docstring lists
     Api(POLYGRAPHY, "(tf32=None, fp16=None, int8=None, fp8=None, bf16=None, calibrator=None, use_dla=None,"
                     " allow_gpu_fallback=None, profiles=None)", returns="polygraphy.backend.trt.CreateConfig")),
    _class(POLYGRAPHY, "polygraphy.backend.trt.SaveEngine", "(engine, path)"),
    ("polygraphy.backend.trt.SaveEngine.__call__", Api(POLYGRAPHY, "()")),
    _class(POLYGRAPHY, "polygraphy.backend.trt.Profile", "()"),
    ("polygraphy.backend.trt.Profile.add", Api(POLYGRAPHY, "(name, min, opt, max)",
                                               returns="polygraphy.backend.trt.Profile")),
])

# Imports from these are checked; the project's own code and other libraries are not.
ROOTS = ("tensorrt_llm", "tensorrt", "polygraphy.backend.trt")
TENSOR = "tensorrt_llm.functional.Tensor"


@cache
def signature(key: str) -> inspect.Signature:
    """``API[key]``'s signature as ``inspect`` writes one (defaults are their unevaluated ast)."""
    source = API[key].signature
    if source is None:
        raise TypeError(f"{key} is not callable")
    args = ast.parse(f"def f{source}: pass").body[0].args
    Parameter = inspect.Parameter
    positional = args.posonlyargs + args.args
    defaults = [Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [Parameter(a.arg, Parameter.POSITIONAL_OR_KEYWORD, default=d) for a, d in zip(positional, defaults)]
    if args.vararg:
        params.append(Parameter(args.vararg.arg, Parameter.VAR_POSITIONAL))
    params += [Parameter(a.arg, Parameter.KEYWORD_ONLY, default=Parameter.empty if d is None else d)
               for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append(Parameter(args.kwarg.arg, Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


@dataclass(frozen=True)
class Ref:
    """What an expression denotes: an API (module, class, function, member) or an instance of a class."""

    key: str
    instance: bool = False


EXTERNAL = Ref("<other libraries and the project>")
VOCABULARY = Ref("<trt_layers.functional>")


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    call: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.call}: {self.problem}"


class _Checker(ast.NodeVisitor):
    """Walks one module in source order, tracking which names denote TensorRT-LLM APIs."""

    def __init__(self, file: str, vocabulary: bool):
        self.file, self.vocabulary = file, vocabulary
        self.env: dict[str, Ref | None] = {}
        self.violations: list[Violation] = []
        self.checked = 0
        self.builds_graph = False  # the current function calls the vocabulary

    # ---- names

    def _bind_import(self, key: str, alias: str) -> None:
        if key == "trt_layers.functional":
            self.env[alias] = VOCABULARY if self.vocabulary else EXTERNAL
        elif any(key == root or key.startswith(root + ".") for root in ROOTS):
            self.env[alias] = Ref(key)
        else:
            self.env[alias] = EXTERNAL

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self._bind_import(alias.name, alias.asname)
            else:  # import a.b binds a
                self._bind_import(alias.name.split(".")[0], alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:  # only trt_layers' modules import relatively
            module = "trt_layers" + (f".{module}" if module else "")
        for alias in node.names:
            self._bind_import(f"{module}.{alias.name}", alias.asname or alias.name)

    def resolve(self, node: ast.expr) -> Ref | None:
        """The API ``node`` denotes, EXTERNAL for other libraries and the project, None if unknown."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None or base is EXTERNAL:
                return base
            if base is VOCABULARY:
                if node.attr in functional.VOCABULARY:
                    return Ref(f"{functional.VOCABULARY[node.attr]}.{node.attr}")
                return EXTERNAL if node.attr in vars(functional) else Ref(f"trt_layers.functional.{node.attr}")
            key = f"{base.key}.{node.attr}"
            api = API.get(key)
            if base.instance and api is not None and api.signature is None and api.returns:
                return Ref(api.returns, instance=True)  # a property, or a field holding an object
            return Ref(key)
        if isinstance(node, ast.Call):
            callee = self.resolve(node.func)
            if callee is EXTERNAL:
                return EXTERNAL
            api = API.get(callee.key) if callee else None
            return Ref(api.returns, instance=True) if api and api.returns else None
        return None

    # ---- scopes

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer_env, outer_builds = dict(self.env), self.builds_graph
        every_arg = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
        self.env.update((a.arg, None) for a in every_arg if a is not None)
        self.builds_graph = any(isinstance(n, ast.Call) and (ref := self.resolve(n.func)) is not None
                                and ref.key.startswith("tensorrt_llm.functional.") for n in ast.walk(node))
        self.generic_visit(node)
        self.env, self.builds_graph = outer_env, outer_builds

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        value = self.resolve(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.env[target.id] = value
            elif isinstance(target, ast.Attribute) and (owner := self.resolve(target.value)) and owner.instance:
                self._check_name(target, f"{owner.key}.{target.attr}")  # a field TensorRT-LLM's class must have
                self.visit(target.value)
            else:
                self.visit(target)

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if isinstance(item.optional_vars, ast.Name):
                self.env[item.optional_vars.id] = None
        for statement in node.body:
            self.visit(statement)

    # ---- uses

    def _check_name(self, node: ast.AST, key: str) -> bool:
        if key in API:
            return True
        where = "trt_layers.functional.VOCABULARY" if key.startswith("trt_layers.functional.") else "contract.API"
        self.violations.append(Violation(self.file, node.lineno, key, f"unknown name (not in {where})"))
        return False

    def visit_Attribute(self, node: ast.Attribute) -> None:
        ref = self.resolve(node)
        parent = getattr(node, "parent", None)
        called = isinstance(parent, ast.Call) and parent.func is node
        used_whole = not isinstance(parent, ast.Attribute) and not called
        if used_whole and ref not in (None, EXTERNAL, VOCABULARY) and not ref.instance:
            self._check_name(node, ref.key)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        ref = self.resolve(node.func)
        key = None
        if ref not in (None, EXTERNAL, VOCABULARY) and not ref.instance:
            key = ref.key
        elif (ref is None and self.builds_graph and isinstance(node.func, ast.Attribute)
              and self.resolve(node.func.value) is None and f"{TENSOR}.{node.func.attr}" in API):
            key = f"{TENSOR}.{node.func.attr}"
        if key is not None and self._check_name(node, key):
            self._check_call(node, key)
        self.generic_visit(node)

    def _check_call(self, node: ast.Call, key: str) -> None:
        self.checked += 1
        try:
            sig = signature(key)
        except TypeError as e:
            self.violations.append(Violation(self.file, node.lineno, key, str(e)))
            return
        splat = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        args = [None for a in node.args if not isinstance(a, ast.Starred)]
        kwargs = {k.arg: None for k in node.keywords if k.arg is not None}
        try:
            bound = (sig.bind_partial if splat else sig.bind)(*args, **kwargs)
        except TypeError as e:
            self.violations.append(Violation(self.file, node.lineno, key, str(e)))
            return
        extra = API[key].kwargs_to
        leftover = next((v for p, v in bound.arguments.items()
                         if sig.parameters[p].kind is inspect.Parameter.VAR_KEYWORD), {})
        if extra and leftover:
            unknown = sorted(set(leftover) - set(signature(extra).parameters))
            if unknown:
                self.violations.append(Violation(self.file, node.lineno, key,
                                                 f"keywords {unknown} are not parameters of {extra}"))


def check_source(source: str, file: str = "<source>", vocabulary: bool = True) -> tuple[list[Violation], int]:
    """Violations in ``source`` and the number of call sites checked.

    ``vocabulary``: resolve ``F.<name>`` (the trt_layers vocabulary) to TensorRT-LLM, as in ``trt_layers/``.
    """
    tree = ast.parse(source, file)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    checker = _Checker(file, vocabulary)
    checker.visit(tree)
    return checker.violations, checker.checked


def check_project(root: Path) -> tuple[list[Violation], int]:
    """Every call into TensorRT-LLM, TensorRT and polygraphy's TensorRT backend in the project.

    Vocabulary calls are the port's in ``trt_layers/``; tests that call ``F`` run the ONNX
    lowering, some with arguments TensorRT-LLM is meant to refuse.
    """
    violations, checked = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("[!.]*/*.py")):
        found, count = check_source(path.read_text(encoding="utf-8"), str(path.relative_to(root)),
                                    vocabulary=path.parent.name == "trt_layers")
        violations += found
        checked += count
    return violations, checked
