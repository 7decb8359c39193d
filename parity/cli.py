"""Command line of the parity suite: ``python -m parity {locate,export,list-bugs,build,generate,report}``.

Exit status: 0 when every tap passes, 1 when something diverges (a candidate that fails to build or
run included), 2 on bad usage or input, 3 when the suite itself fails (an internal error: no verdict,
never reported as a divergence). Every argument and output path is checked before any model
is built (``validate``); a usage error is one line on stderr and leaves the disk as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from reference import COMPONENTS, PRESETS, CheckpointError, ConfigError, DeciCoderConfig, load_model, resolve_dtype
from reference.inputs import CaseShape
from trt_layers import fast_path
from trt_layers.bugs import BUGS
from trt_layers.network import BACKENDS, OnnxBackend, Profile, TrtllmBackend, largest_activation_bytes
from trt_layers.quantization import MODES as QUANT_MODES
from trt_layers.quantization import QuantMode, quantized_golden
from trt_layers.ranks import RankPool, collectives_backend
from trt_layers.tensor_parallel import unsupported as tensor_parallel_unsupported

from .backends import CANDIDATES, onnxruntime_bf16_gap, resolve_candidates, skip_reason
from .check import CandidateBackend, CandidateError, CheckResult, UsageError
from .compare import TOLERANCES, compare_taps, first_failure, format_table
from .export import SOURCES, export
from .locate import (DECODE, PREFILL, Check, LocateReport, load_model_as, locate, model_config, plan_checks,
                     refuse_unshowable, summary)
from .quantized import candidate_weights
from .report import write_json, write_markdown, write_plot
from .tensor_parallel import TP_COMPONENTS, check_tp, stream_tp

DIVERGED, USAGE_ERROR, INTERNAL_ERROR = 1, 2, 3
SIGPIPE_EXIT = 128 + 13  # what a shell reports for a process ended by SIGPIPE
INTERRUPTED = 128 + 2  # and by SIGINT (Ctrl-C)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's limit


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2, as every other bad input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _integer(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= MAX_SEED:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive = _integer(1, "a positive integer")
_non_negative = _integer(0, "a non-negative integer")
_seed = _integer(0, f"an integer in [0, {MAX_SEED}]")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a Hugging Face checkpoint dir")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and activations")
    parser.add_argument("--seed", type=_seed, default=0, help="random weights (presets) and inputs")


def _add_case_arguments(parser: argparse.ArgumentParser, past_len: int | None) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--batch", type=_positive, default=2, help="sequences per batch")
    parser.add_argument("--seq-len", type=_positive, default=7, help="new tokens per sequence")
    parser.add_argument("--past-len", type=_non_negative, default=past_len,
                        help="cached tokens (decode; default: 5 in locate's decode checks); components without a "
                             "cache ignore it")


def _add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", *CANDIDATES), default="auto",
                        help="candidate: onnx (the ONNX lowering), trtllm (TensorRT-LLM engines); "
                             "auto = trtllm where it can run, else onnx")


def _add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write into (created; refused if not empty)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is not empty (deletes its files)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    locator = commands.add_parser(
        "locate", help="run golden and candidate, compare every tap in order, name the first that diverges",
        description="Run golden and candidate, compare every tap in order, name the first that diverges, and "
                    "diagnose it: the structural hypothesis (heads reordered, a mask's triangle, the other RoPE "
                    "layout, another weight, ...) that explains the candidate there, or 'no known pattern'.")
    locator.add_argument("--component", choices=COMPONENTS,
                         help="check this component alone (default: every component, then the whole model, "
                              "in prefill and in decode)")
    _add_backend_argument(locator)
    locator.add_argument("--phase", choices=("prefill", "decode"),
                         help="prefill (no cache) or decode (--past-len cached tokens) checks only; default: both, "
                              "or with --component, decode if --past-len > 0")
    locator.add_argument("--kv-heads", type=_positive, metavar="N",
                         help="a preset's KV heads: its head count (MHA), a divisor (GQA), 1 (MQA); "
                              "default: the preset's")
    locator.add_argument("--inject", choices=sorted(BUGS), metavar="BUG",
                         help="inject a catalog bug into the candidate (list-bugs)")
    locator.add_argument("--quant", choices=sorted(QUANT_MODES), metavar="MODE",
                         help="quantize the port's weights and/or KV cache as TensorRT-LLM's checkpoint does, judge "
                              "it against the quantized golden (exit status) and against full precision within a "
                              "budget; " + "; ".join(f"{m.name}: {m.description}" for m in QUANT_MODES.values()
                                                     if "+" not in m.name)
                              + "; a weight mode and a KV cache mode together: int8_wo+int8_kv, int4_wo+fp8_kv, ...")
    locator.add_argument("--tp", type=_positive, default=1, metavar="N",
                         help="split the port across N tensor-parallel ranks as TensorRT-LLM 1.2's LLaMA does (one "
                              "process a rank on the onnx backend, collectives by torch.distributed's gloo) and judge "
                              "each rank against its slice of the golden; checks the components a rank splits "
                              f"({', '.join(TP_COMPONENTS)}) and causal_lm; not with --quant, --candidate, "
                              "--json, --markdown, --plot")
    locator.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="where the golden runs; auto = cuda when the candidate is a GPU engine (trtllm) and "
                              "a GPU is present, else cpu")
    locator.add_argument("--candidate", metavar="PATH",
                         help="judge this port of the whole model instead of trt_layers: an ONNX graph (inputs "
                              "input_ids [, position_ids, attention_mask]), a TensorRT engine (.engine/.plan; "
                              "the .onnx beside it maps its outputs) or a TensorRT-LLM engine directory "
                              "(config.json + rank0.engine from trtllm-build --enable_debug_output, one rank); "
                              "engines need TensorRT and a GPU, prefill only; a graph with past_key_values.{i}."
                              "key/value inputs is judged in decode (--past-len); its weights must be --model's")
    locator.add_argument("--tap-map", metavar="FILE.json",
                         help="with --candidate: golden tap -> tensor name, {i} for the layer; default: found "
                              "from the graph's module paths (an engine directory: outputs named as golden taps)")
    locator.add_argument("--json", metavar="PATH", help="write the report as JSON")
    locator.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")
    locator.add_argument("--plot", metavar="PATH.png", help="plot error per tap (causal_lm: per layer), log scale")
    _add_case_arguments(locator, past_len=None)

    commands.add_parser("list-bugs", help="the catalog of porting bugs that --inject takes")

    builder = commands.add_parser(
        "build", help="build the whole model's prefill and decode engines with trt_layers (and the fast path)")
    _add_model_arguments(builder)
    _add_backend_argument(builder)
    builder.add_argument("--fast-path", action="store_true",
                         help="also write TensorRT-LLM's LLaMA checkpoint of the weights and, with TensorRT-LLM, "
                              "build its engine (GPT attention plugin)")
    builder.add_argument("--tp", type=_positive, default=1, metavar="N",
                         help="with --fast-path: split its checkpoint across N tensor-parallel ranks, "
                              "rank{r}.safetensors each, as TensorRT-LLM's LLaMA conversion does")
    _add_out_argument(builder)

    generator = commands.add_parser(
        "generate", help="prefill + decode through the trt_layers engines; tokens and tokens/s")
    _add_model_arguments(generator)
    _add_backend_argument(generator)
    prompt = generator.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids; ';' separates the rows of a batch")
    prompt.add_argument("--prompt", help="text, encoded with --tokenizer")
    generator.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (for --prompt and decoding)")
    generator.add_argument("--max-new-tokens", type=_positive, default=16, help="tokens to generate per row")
    generator.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    generator.add_argument("--top-k", type=_non_negative, default=0,
                           help="with --temperature: sample among the top k (0: all)")
    generator.add_argument("--inject", choices=sorted(BUGS), metavar="BUG",
                           help="inject a catalog bug into the engines (list-bugs)")
    generator.add_argument("--compare", action="store_true",
                           help="also decode greedily with the reference; report the first step whose logits leave "
                                "tolerance and the first mismatching token")

    report = commands.add_parser(
        "report", help="check the reference against transformers' Llama blocks, component by component")
    report.add_argument("--component", choices=COMPONENTS, action="append",
                        help="component to check (repeatable; default: all)")
    _add_case_arguments(report, past_len=5)

    exporter = commands.add_parser(
        "export", help="write model.onnx (taps as outputs), inputs.json, golden.json and README.txt for polygraphy")
    exporter.add_argument("--component", choices=COMPONENTS, required=True, help="what to export")
    exporter.add_argument("--source", choices=SOURCES, default="lowering",
                          help="lowering: the trt_layers graph; reference: the reference traced by torch.onnx")
    exporter.add_argument("--inject", choices=sorted(BUGS), metavar="BUG",
                          help="also write faulty.onnx, the port with this catalog bug, for polygraphy debug reduce")
    _add_out_argument(exporter)
    _add_case_arguments(exporter, past_len=0)
    return parser


# -- validation: every check that needs no model, before any is built ---------------------------------

def _check_context(tokens: int, what: str, config: DeciCoderConfig) -> None:
    if tokens > config.max_position_embeddings:
        raise UsageError(f"{what}: {tokens} tokens exceed the context of {config.max_position_embeddings} positions "
                         "(max_position_embeddings)")


def _check_memory(batch: int, seq_len: int, past_len: int, config: DeciCoderConfig, dtype: str) -> None:
    """Refuse a case whose largest activation (a layer's fp32 attention scores, or the logits)
    could not fit this machine's memory: golden and candidate each hold it, with a copy or two."""
    needed = 4 * largest_activation_bytes(config, Profile(batch, seq_len, past_len), resolve_dtype(dtype))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise UsageError(f"--batch {batch} --seq-len {seq_len}: its activations need about {needed / 2**30:.0f} GiB, "
                         f"this machine has {memory / 2**30:.0f} GiB; give a smaller --batch or --seq-len")


def check_output_file(option: str, path: str, suffix: str | None = None) -> None:
    """``path`` can be written as a file; probed by opening it (an existing file is not truncated)."""
    target = Path(path)
    if suffix is not None and target.suffix.lower() != suffix:
        raise UsageError(f"{option} {path}: expected a {suffix} file")
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"{option} {path}: no directory {target.parent}")
    # A report is a file on disk: not a device, a pipe or a kernel interface (/proc files look regular).
    if target.exists() and not target.is_file() or target.resolve().parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise UsageError(f"{option} {path}: not a regular file on disk")
    try:
        if target.exists():
            os.close(os.open(target, os.O_WRONLY))
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            target.unlink()
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write ({e.strerror})") from None


def report_file(option: str) -> Callable[[str], str]:
    """An argparse ``type`` for a report path (the benchmarks' --json): check_output_file's checks,
    failing as argparse fails (exit 2, one line) before any work."""
    def parse(path: str) -> str:
        try:
            check_output_file(option, path)
        except (UsageError, OSError) as e:  # OSError: a path the OS refuses (too long, ...)
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{option} ")) from None
        return path
    return parse


def _existing_ancestor(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _staging_dir(out: Path) -> Path:
    return _existing_ancestor(out.parent) / f".{out.name}.partial-{os.getpid()}"


def _check_output_dir(path: str, force: bool, model: str | None) -> None:
    """``--out`` can become a folder of fresh files (see ``_staged``); ``--force`` deletes only a
    folder that holds neither the current directory nor the ``--model`` checkpoint."""
    if Path(path).is_symlink():
        raise UsageError(f"--out {path}: is a symbolic link; give the folder it points to")
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path}: is a file, not a folder")
    if model is not None and Path(model).is_dir():
        checkpoint = Path(model).resolve()
        if checkpoint.is_relative_to(out) or out.is_relative_to(checkpoint):
            raise UsageError(f"--out {path}: would write into the --model checkpoint {model}; choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {path}: folder is not empty (--force replaces it)")
        if Path.cwd().resolve().is_relative_to(out):
            raise UsageError(f"--out {path}: --force would delete the current directory")
    if not _existing_ancestor(out.parent).is_dir():
        raise UsageError(f"--out {path}: {_existing_ancestor(out.parent)} is not a folder")
    staging = _staging_dir(out)
    try:
        staging.mkdir()
        staging.rmdir()
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create a folder in {staging.parent} ({e.strerror})") from None


@contextlib.contextmanager
def _staged(path: str) -> Iterator[Path]:
    """A fresh folder that becomes ``path`` once the body succeeds (replacing what was there, which
    ``_check_output_dir`` allowed); if the body fails, nothing it wrote is left behind."""
    out = Path(path).resolve()
    staging = _staging_dir(out)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staging, out)


def _candidate_backend(option: str, dtype: torch.dtype,
                       profile: Profile | None = None) -> tuple[CandidateBackend, str]:
    """The candidate backend; TensorRT engines serve ``profile`` (default: the whole context)."""
    selected, why = resolve_candidates(option)
    if option == "trtllm" and (reason := skip_reason("trtllm")):
        raise UsageError(f"--backend trtllm cannot run here: {reason}")
    if selected[0] == "onnx" and dtype == torch.bfloat16 and (reason := onnxruntime_bf16_gap()):
        raise UsageError(f"bf16 on the onnx backend: {reason}; use fp32/fp16, or --backend trtllm on a GPU")
    if selected[0] == "onnx" and dtype == torch.float16 and (reason := OnnxBackend.fp16_rounding_gap()):
        raise UsageError(f"fp16 on the onnx backend: {reason}")
    backend = TrtllmBackend(profile) if selected[0] == "trtllm" else BACKENDS[selected[0]]()
    return CandidateBackend(backend), why


def _prompt_ids(args: argparse.Namespace, tokenizer, config: DeciCoderConfig) -> torch.Tensor:
    """The prompt as token ids [batch, tokens], checked against the model's vocabulary and context."""
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError("--prompt needs --tokenizer DIR (a Hugging Face tokenizer directory)")
        rows = [tokenizer.encode(args.prompt)]
        if not rows[0]:
            raise UsageError(f"--prompt {args.prompt!r}: encodes to no tokens")
    else:
        try:  # int() refuses an empty id, so "1,,2" is no silent "1,2"
            rows = [[int(t) for t in row.split(",")] if row.strip() else [] for row in args.prompt_ids.split(";")]
        except ValueError:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        if not rows[0] or len({len(r) for r in rows}) != 1:
            raise UsageError("--prompt-ids: every row needs the same, non-zero number of tokens (no padding)")
    if not all(0 <= t < config.vocab_size for row in rows for t in row):
        source = "--prompt-ids" if args.prompt is None else f"--prompt encoded by --tokenizer {args.tokenizer}"
        raise UsageError(f"{source}: token ids must lie in [0, {config.vocab_size}), the model's vocabulary")
    _check_context(len(rows[0]) + args.max_new_tokens, "prompt + --max-new-tokens", config)
    return torch.tensor(rows)


def _load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise UsageError(f"--tokenizer {directory}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer {directory}: {e}") from None


def _golden_device(option: str, candidate: str) -> str:
    """Where the golden runs: ``--device``, or (auto) beside a GPU engine candidate."""
    cuda = torch.cuda.is_available()
    if option == "cuda" and not cuda:
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine; "
                         "use --device cpu or auto")
    if option == "auto":
        return "cuda" if cuda and candidate == "trtllm" else "cpu"
    return option


def _validate_external(args: argparse.Namespace) -> None:
    """--candidate: a whole-model graph judged in prefill, with no trt_layers option beside it."""
    if args.candidate is None:
        if args.tap_map is not None:
            raise UsageError("--tap-map maps the taps of a --candidate graph: add --candidate")
        return
    clashes = [option for option, given in (("--component", args.component not in (None, "causal_lm")),
                                            ("--inject", args.inject),
                                            ("--backend", args.backend != "auto"), ("--kv-heads", args.kv_heads),
                                            ("--device cuda", args.device == "cuda"))
               if given]
    if clashes:
        raise UsageError(f"--candidate judges a whole-model graph, the golden on the CPU: drop {', '.join(clashes)}")
    candidate = Path(args.candidate)
    if not candidate.exists():
        raise UsageError(f"--candidate {args.candidate}: no such file or directory")
    if candidate.is_file() and {"config.json", "rank0.engine"} <= {p.name for p in candidate.parent.iterdir()}:
        raise UsageError(f"--candidate {args.candidate}: a file of a TensorRT-LLM engine directory: pass the "
                         f"directory, {candidate.parent}")
    if args.tap_map is not None and not Path(args.tap_map).is_file():
        raise UsageError(f"--tap-map {args.tap_map}: "
                         f"{'a directory, not a file' if Path(args.tap_map).is_dir() else 'no such file'}")
    args.component = "causal_lm"
    args.phase = args.phase or ("decode" if args.past_len else "prefill")


def _part_of(path: str, candidate: str, tap_map: str | None) -> bool:
    """Whether writing ``path`` would overwrite the candidate (a file, or one inside its directory) or its tap map."""
    target = Path(os.path.abspath(path))
    kept = [Path(os.path.abspath(p)) for p in (candidate, tap_map) if p is not None]
    return any(target == p or p in target.parents for p in kept)


def _validate_locate(args: argparse.Namespace, config: DeciCoderConfig) -> None:
    _validate_external(args)
    # Handed to locate_command: the checks to run (phases and cache lengths checked).
    args.checks = plan_checks(args.component, args.phase, args.batch, args.seq_len, args.past_len, args.seed)
    most_cached = max(check.shape.past_len for check in args.checks)
    what = ("--seq-len" if most_cached == 0 else "--past-len + --seq-len" if args.past_len is not None
            else f"--seq-len + the decode checks' {most_cached} cached tokens (--past-len)")
    _check_context(args.seq_len + most_cached, what, config)
    _check_memory(args.batch, args.seq_len, most_cached, config, args.dtype)
    if args.tp > 1:
        _validate_tp(args, config)
    if args.inject:
        refuse_unshowable(BUGS[args.inject], args.checks, config, args.quant, args.tp)
    if args.quant and args.candidate is not None:
        raise UsageError("--quant quantizes the trt_layers port's weights or KV cache; a --candidate port brings "
                         "its own")
    if args.quant and (problem := QUANT_MODES[args.quant].unsupported(config)):
        raise UsageError(f"--quant {args.quant}: {problem}")
    if args.quant and not any(QUANT_MODES[args.quant].touches(check.component) for check in args.checks):
        raise UsageError(f"--quant {args.quant} quantizes nothing {args.component} computes: a PASS would check "
                         "nothing quantized")
    if args.candidate is None:
        backend, _ = _candidate_backend(args.backend, resolve_dtype(args.dtype))
        args.golden_device = _golden_device(args.device, backend.name)
    else:  # no trt_layers backend runs: the graph's dtype is checked with the graph (check_config)
        args.golden_device = _golden_device(args.device, "onnx")
    reports = {option: path for option in ("--json", "--markdown", "--plot")
               if (path := getattr(args, option.removeprefix("--"))) is not None}
    if reports and len(args.checks) > 1:
        raise UsageError("--json, --markdown and --plot report one check: add --component")
    if len({os.path.abspath(p) for p in reports.values()}) < len(reports):
        raise UsageError(f"{', '.join(reports)}: each report needs its own path")
    for option, path in reports.items():
        if args.candidate is not None and _part_of(path, args.candidate, args.tap_map):
            raise UsageError(f"{option} {path}: would overwrite the candidate or its tap map")
        check_output_file(option, path, ".png" if option == "--plot" else None)


def _validate_tp(args: argparse.Namespace, config: DeciCoderConfig) -> None:
    """--tp N > 1: what the rank processes can run, checked before any model is built."""
    for option, given, why in (
            ("--candidate", args.candidate, "--tp splits the trt_layers port; an external port brings its own ranks"),
            ("--quant", args.quant, "a quantized port is judged at TP 1 only, for now"),
            ("--json, --markdown or --plot", args.json or args.markdown or args.plot,
             "a tensor-parallel check reports in text only, for now")):
        if given:
            raise UsageError(f"--tp {args.tp} with {option}: not supported ({why})")
    if args.backend == "trtllm":
        raise UsageError(f"--tp {args.tp}: its ranks run on the onnx backend here (a TensorRT-LLM engine of "
                         f"{args.tp} ranks needs {args.tp} GPUs and NCCL): use --backend onnx")
    if args.dtype == "bf16":
        raise UsageError(f"--tp {args.tp} --dtype bf16: the ranks run on the onnx backend, whose CPU has no bf16")
    if (problem := tensor_parallel_unsupported(config, args.tp)) is not None:
        raise UsageError(f"--tp {args.tp}: {problem}")
    split = [check for check in args.checks if check.component in (*TP_COMPONENTS, "causal_lm")]
    if not split:
        raise UsageError(f"--tp {args.tp}: {args.component} holds no weight a rank splits (every rank runs it "
                         f"whole); tensor-parallel checks: {', '.join(TP_COMPONENTS)}, causal_lm")
    args.checks = split


def _validate_export(args: argparse.Namespace, config: DeciCoderConfig) -> None:
    if args.dtype == "bf16":
        raise UsageError("--dtype bf16 cannot be exported for polygraphy: its JSON files and ONNX Runtime's CPU "
                         "kernels have no bfloat16; export fp32 or fp16")
    if args.inject and args.source != "lowering":
        raise UsageError("--inject: catalog bugs are injected into trt_layers; use --source lowering")
    if args.source == "lowering":  # the port runs on the onnx backend to be exported
        _candidate_backend("onnx", resolve_dtype(args.dtype))
    if args.inject:  # export then also checks the faulty graph's taps diverge, after building it
        phase = DECODE if args.past_len or args.component == "gqa_unmasked" else PREFILL
        refuse_unshowable(BUGS[args.inject], [Check(args.component, phase, _shape(args))], config)


def _validate_generate(args: argparse.Namespace, config: DeciCoderConfig) -> None:
    _candidate_backend(args.backend, resolve_dtype(args.dtype))
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature {args.temperature}: expected a positive number")
    if args.top_k and args.temperature is None:
        raise UsageError(f"--top-k {args.top_k} samples: give --temperature T too (without it decoding is greedy)")
    # Handed to generate_command, which then needs neither the tokenizer folder nor the config again.
    args.tokenizer_object = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    args.input_ids = _prompt_ids(args, args.tokenizer_object, config)
    if args.inject:
        _refuse_invisible_in_generation(BUGS[args.inject], args.input_ids.shape, config)


def _refuse_invisible_in_generation(bug, prompt_shape: torch.Size, config: DeciCoderConfig) -> None:
    """Generation compares tokens and logits: a bug that cannot change them would pass unchecked."""
    batch, prompt_len = prompt_shape
    steps = [Check("causal_lm", PREFILL, CaseShape(batch, prompt_len)),
             Check("causal_lm", DECODE, CaseShape(batch, 1, prompt_len))]
    if bug.shows.cache_only:
        raise UsageError(f"--inject {bug.name} cannot change generated tokens or logits (it reorders the K/V cache, "
                         f"which attention reads order-free): locate shows it in {bug.shows.describe()}")
    refuse_unshowable(bug, steps, config)


def _validate_build(args: argparse.Namespace, config: DeciCoderConfig) -> None:
    dtype = resolve_dtype(args.dtype)
    _candidate_backend(args.backend, dtype)
    # A model the fast path's attention plugin cannot build is refused here (ValueError), before anything is written.
    args.fast_path_options = fast_path.build_options(config, dtype) if args.fast_path else None
    if args.tp > 1 and not args.fast_path:
        raise UsageError(f"--tp {args.tp} splits the fast path's checkpoint: add --fast-path")
    if args.tp > 1 and (problem := tensor_parallel_unsupported(config, args.tp)) is not None:
        raise UsageError(f"--tp {args.tp}: {problem}")


COMMAND_CHECKS = {"locate": _validate_locate, "export": _validate_export, "generate": _validate_generate,
                  "build": _validate_build}


def validate(args: argparse.Namespace) -> None:
    """Check every argument and output path against the model's config (not its weights); raises
    ValueError (UsageError, ConfigError, ...) naming the argument. Nothing is built or written."""
    if "model" not in args:
        return
    # Handed to the command: the config --model names, with --kv-heads' layout.
    args.config = config = model_config(args.model, getattr(args, "kv_heads", None))
    if "seq_len" in args and args.command != "locate":  # locate plans its cache lengths: _validate_locate
        _check_context(args.past_len + args.seq_len, "--past-len + --seq-len", config)
        _check_memory(args.batch, args.seq_len, args.past_len, config, args.dtype)
    if "out" in args:
        _check_output_dir(args.out, args.force, args.model)
    if (command_checks := COMMAND_CHECKS.get(args.command)) is not None:
        command_checks(args, config)


# -- commands --------------------------------------------------------------------------------------------

def _shape(args: argparse.Namespace) -> CaseShape:
    return CaseShape(args.batch, args.seq_len, args.past_len, args.seed)


def report(args: argparse.Namespace) -> int:
    import transformers  # only here: importing it costs seconds every other command does not need

    from reference.oracle import ORACLE_COMPONENTS, llama_from_reference, run_case

    dtype = resolve_dtype(args.dtype)
    model = load_model(args.model, dtype, args.seed)
    llama = llama_from_reference(model)
    tolerance = TOLERANCES[dtype]
    print(f"golden: reference DeciCoder (torch {torch.__version__}, cpu, {args.dtype}), model {args.model}")
    print(f"oracle: transformers {transformers.__version__} Llama blocks (eager attention), same weights")
    print(f"tolerance ({args.dtype}): atol={tolerance.atol:g} rtol={tolerance.rtol:g}  [{tolerance.why}]\n")
    failures = []
    for component in args.component or ORACLE_COMPONENTS:
        shape = _shape(args)
        case = run_case(component, model, llama, shape)
        results = compare_taps(case.transformers, case.reference, tolerance, order=case.shared_taps)
        print(format_table(results, f"== {component}  (batch {shape.batch}, seq {shape.seq_len}, past {shape.past_len})"))
        print()
        if (first := first_failure(results)) is not None:
            failures.append(f"{component}.{first.name}")
    if failures:
        print(f"DIVERGED: first failing taps: {', '.join(failures)}")
        return DIVERGED
    print(f"PASSED: the reference matches transformers on {len(args.component or ORACLE_COMPONENTS)} components")
    return 0


def export_command(args: argparse.Namespace) -> int:
    model = load_model(args.model, resolve_dtype(args.dtype), args.seed)
    bug = BUGS[args.inject] if args.inject else None
    with _staged(args.out) as directory:
        written = export(args.component, model, _shape(args), directory, args.source, bug)
    names = [p.name for p in (written.model, written.faulty, written.inputs, written.golden, written.readme) if p]
    print(f"wrote {', '.join(names)} in {args.out}")
    print(f"re-check (from {args.out}):\n  {written.recheck_command}")
    return 0


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _locate(check, model, backend, bug, num_layers: int, quant: QuantMode | None = None) -> LocateReport:
    """One planned check; a candidate that fails to build or run is that check's divergence. With ``quant``,
    the port's weights are stored quantized and the golden is the quantized one, ``model`` the full precision."""
    try:
        if quant is not None:
            report = locate(check.component, quantized_golden(model, quant), backend, check.shape, bug,
                            progress=_progress, weights=candidate_weights(model, quant), full_precision=model)
            report.quant = quant.name
            return report
        return locate(check.component, model, backend, check.shape, bug, progress=_progress)
    except CandidateError as failure:
        return LocateReport(CheckResult.candidate_failed(check.component, backend.description, model.lm_head.weight.dtype,
                                                         check.shape, num_layers, failure),
                            bug=bug.name if bug else None)


def locate_external(args: argparse.Namespace) -> int:
    """--candidate: someone else's port (graph, engine, engine directory) against the golden, tap by mapped tap."""
    from .onnx_port import OnnxPort, golden_order, locate_onnx, locate_whole
    from .trt_port import ENGINE_SUFFIXES, TrtEnginePort
    from .trtllm_port import TrtllmEnginePort

    # The candidate and the tap map are read and checked before the golden's weights are made.
    path = Path(args.candidate)
    engine = path.is_dir() or path.suffix in ENGINE_SUFFIXES  # runs whole: nothing to cut
    port = TrtllmEnginePort(path) if path.is_dir() else TrtEnginePort(path) if engine else OnnxPort(path)
    dtype = resolve_dtype(args.dtype)
    port.check_config(args.config, dtype)
    shape = args.checks[0].shape
    if engine and shape.past_len:
        raise UsageError(f"--candidate {path}: an engine is judged in prefill: drop --phase decode and --past-len")
    if not engine:
        port.check_case(shape)
    mapped = port.tap_map(golden_order(args.config), args.config.num_hidden_layers, args.tap_map)
    started = time.perf_counter()
    model = load_model_as(args.model, args.config, dtype, args.seed).to(args.golden_device)
    print(f"golden:    reference DeciCoder (torch {torch.__version__}), model {args.model}, {args.dtype}")
    print(f"candidate: {port.description}" + (f", taps mapped by {args.tap_map}" if args.tap_map else ""))
    report = (locate_whole if engine else locate_onnx)(model, port, shape, mapped)
    print(f"\n{report.text()}")
    for option, write in (("json", write_json), ("markdown", write_markdown), ("plot", write_plot)):
        if getattr(args, option):
            write(report, args.model, getattr(args, option))
    print(f"\n{summary(args.checks, [report], args.dtype)} ({time.perf_counter() - started:.1f} s)")
    return report.exit_code


def locate_tp_command(args: argparse.Namespace) -> int:
    """--tp N: every planned check on N rank processes, each rank judged against its slice of the golden."""
    checks, config, dtype = args.checks, args.config, resolve_dtype(args.dtype)
    started = time.perf_counter()
    model = load_model_as(args.model, config, dtype, args.seed)
    print(f"golden:    reference DeciCoder (torch {torch.__version__}, cpu), model {args.model}, {args.dtype}")
    print(f"candidate: trt_layers on {args.tp} tensor-parallel ranks (TensorRT-LLM 1.2's LLaMA split), each "
          "lowered to ONNX and run by onnxruntime in its own process, cut at its collectives, which "
          f"torch.distributed ({collectives_backend(args.tp)}) runs"
          + (f", injected bug: {args.inject}" if args.inject else ""))
    tolerance = TOLERANCES[dtype]
    print(f"tolerance: an element passes if |error| <= atol {tolerance.atol:g} x max(1, max |row|) or <= rtol "
          f"{tolerance.rtol:g} x |golden| ({tolerance.why})")
    results = []
    with RankPool(args.tp) as pool:
        for check in checks:
            if check.component == "causal_lm":
                result = stream_tp(model, pool, check.shape, args.inject, _progress)
            else:
                result = check_tp(check.component, model, pool, check.shape, args.inject)
            results.append(result)
            print(f"\n{result.table()}")
    failed = [(check, result) for check, result in zip(checks, results) if result.exit_code]
    width = max(len(check.label) for check in checks)
    for check, result in zip(checks, results):
        print(f"  {check.label:<{width}}  {result.verdict()}")
    elapsed = f"({time.perf_counter() - started:.1f} s)"
    if failed:
        check, result = failed[0]
        print(f"DIVERGED: {len(failed)} of {len(checks)} checks at TP {args.tp}; first: {check.label} "
              f"{result.verdict().removeprefix('FAIL ')} {elapsed}")
        return 1
    taps = sum(len(rank.results) for result in results for rank in result.ranks)
    checked = f"{len(checks)} checks" if len(checks) > 1 else checks[0].label
    print(f"PASSED: {checked} at TP {args.tp}, {taps} rank taps within {args.dtype} tolerance {elapsed}")
    return 0


def locate_command(args: argparse.Namespace) -> int:
    if args.candidate is not None:
        return locate_external(args)
    if args.tp > 1:
        return locate_tp_command(args)
    checks, config = args.checks, args.config
    bug = BUGS[args.inject] if args.inject else None
    dtype = resolve_dtype(args.dtype)
    profile = Profile(args.batch, args.seq_len, max(check.shape.past_len for check in checks))  # the largest case
    backend, why = _candidate_backend(args.backend, dtype, profile)
    started = time.perf_counter()
    model = load_model_as(args.model, config, dtype, args.seed).to(args.golden_device)
    layout = f" ({config.num_attention_heads} heads, {config.num_key_value_heads} KV heads)" if args.kv_heads else ""
    device = "cpu" if args.golden_device == "cpu" else f"cuda, {torch.cuda.get_device_name(0)}"
    print(f"golden:    reference DeciCoder (torch {torch.__version__}, {device}), model {args.model}{layout}, "
          f"{args.dtype}")
    quant = QUANT_MODES[args.quant] if args.quant else None
    print(f"candidate: {backend.description} [{backend.name}: {why}]" + (f", injected bug: {bug.name}" if bug else "")
          + (f", quantized: {quant.name} (TensorRT-LLM {quant.quant_algo})" if quant else ""))
    if quant:
        forced = ("; each of its linears rounds the port's own input where that passes (teacher forcing: fp8 "
                  "rounds activations)" if quant.layout is not None and quant.layout.rounds_activations else "")
        print(f"quantized: the golden computes as the {quant.name} port must (verdicts, exit status){forced}; full "
              "precision sets the budget")
    tolerance = TOLERANCES[dtype]
    print(f"tolerance: an element passes if |error| <= atol {tolerance.atol:g} x max(1, max |row|) or <= rtol "
          f"{tolerance.rtol:g} x |golden| ({tolerance.why})")
    reports = []
    for check in checks:
        reports.append(_locate(check, model, backend, bug, config.num_hidden_layers, quant))
        print(f"\n{reports[-1].text()}")
    if args.json:
        write_json(reports[0], args.model, args.json)
    if args.markdown:
        write_markdown(reports[0], args.model, args.markdown)
    if args.plot:
        write_plot(reports[0], args.model, args.plot)
    print(f"\n{summary(checks, reports, args.dtype, args.quant)} ({time.perf_counter() - started:.1f} s)")
    return max(report.exit_code for report in reports)


def _build_engines(model, dtype: torch.dtype, backend, bug_name: str | None):
    from trt_layers.generation import CausalLM

    with BUGS[bug_name].injected() if bug_name else contextlib.nullcontext():
        return CausalLM.build(model.config, model.state_dict(), dtype, backend)


def generate_command(args: argparse.Namespace) -> int:
    from trt_layers.generation import Sampling

    from .generation import compare_generation

    dtype = resolve_dtype(args.dtype)
    ids, tokenizer = args.input_ids, args.tokenizer_object
    batch, prompt = ids.shape  # the decode engine's cache grows to prompt + max_new_tokens - 1
    backend, why = _candidate_backend(args.backend, dtype, Profile(batch, prompt, prompt + args.max_new_tokens - 1))
    model = load_model(args.model, dtype, args.seed)
    print(f"candidate: {backend.description} [{backend.name}: {why}], model {args.model}, {args.dtype}"
          + (f", injected bug: {args.inject}" if args.inject else ""))
    start = time.perf_counter()
    engines = _build_engines(model, dtype, backend, args.inject)
    print(f"built prefill and decode engines in {time.perf_counter() - start:.2f} s")
    sampling = None if args.temperature is None else Sampling(args.temperature, args.top_k, args.seed)
    start = time.perf_counter()
    tokens, _ = engines.generate(ids.numpy(), args.max_new_tokens, sampling)
    elapsed = time.perf_counter() - start
    for row in tokens:
        new = row[ids.shape[1]:].tolist()
        print("tokens:", " ".join(map(str, new)))
        if tokenizer is not None:
            print("text:  ", tokenizer.decode(new))
    print(f"{ids.shape[0] * args.max_new_tokens / elapsed:.1f} tokens/s ({ids.shape[0]} x {args.max_new_tokens} "
          f"new tokens in {elapsed:.2f} s, prefill included)")
    if args.compare:
        result = compare_generation(model, engines, ids, args.max_new_tokens)
        print("parity with the reference (greedy):", result.describe())
        return 0 if result.passed else DIVERGED
    return 0


def build_command(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.dtype)
    backend, why = _candidate_backend(args.backend, dtype)
    model = load_model(args.model, dtype, args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    with _staged(args.out) as staging:
        engines = _build_engines(model, dtype, backend, None)
        names = [engines.prefill.save(staging / "prefill").name, engines.decode.save(staging / "decode").name]
        (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        if args.fast_path:
            fast_path.write_checkpoint(model, staging / "trtllm_checkpoint", args.tp)
            if skip_reason("trtllm") is None:
                fast_path.build_engine(staging / "trtllm_checkpoint", staging / "trtllm_engine", args.fast_path_options,
                                       args.tp)
    print(f"{backend.description} [{backend.name}: {why}]: wrote {', '.join(str(out / n) for n in names)} "
          f"in {time.perf_counter() - start:.1f} s (outputs: logits and each layer's present K/V)")
    if args.fast_path:
        checkpoint = out / "trtllm_checkpoint"
        ranks = f", {args.tp} ranks (rank0..{args.tp - 1}.safetensors)" if args.tp > 1 else ""
        print(f"fast path: TensorRT-LLM LLaMA checkpoint in {checkpoint}{ranks}")
        if skip_reason("trtllm") is None:
            print(f"fast path: TensorRT-LLM engine (GPT attention plugin) in {out / 'trtllm_engine'}")
        else:
            print(f"fast path: engine not built ({skip_reason('trtllm')}); on a GPU machine: "
                  f"{fast_path.trtllm_build_command(checkpoint, out / 'trtllm_engine', args.fast_path_options)}")
    return 0


def list_bugs(args: argparse.Namespace) -> int:
    width = max(len(name) for name in BUGS)
    for bug in BUGS.values():
        print(f"{bug.name:<{width}} {bug.component:<14} first tap {bug.first_tap:<11} {bug.description}")
        where = f" at TP {bug.tp_size}, on rank {bug.first_rank}" if bug.tp_size > 1 else ""
        diagnosis = (f"diagnosed at its first tap in {bug.component} as {bug.hypothesis}" if bug.hypothesis
                     else f"caught at its first tap in {bug.component}{where} (a TP check is not diagnosed)")
        print(f"{'':<{width}} shows in {bug.shows.describe()}; {diagnosis}")
    return 0


COMMANDS = {"locate": locate_command, "export": export_command, "list-bugs": list_bugs, "build": build_command,
            "generate": generate_command, "report": report}


def _one_line(error: Exception) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except (ValueError, OSError) as e:  # a usage, config or checkpoint error, a path the OS refuses: nothing ran
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, CheckpointError) as e:  # e.g. weights that do not match config.json
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except CandidateError as e:
        print(f"DIVERGED: {_one_line(e)}")
        return DIVERGED
    except KeyboardInterrupt:  # the user stopped it: no verdict, one line (the rank processes stop with it)
        print("interrupted: no verdict", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): no verdict was delivered, so none is claimed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return SIGPIPE_EXIT
    except Exception as e:  # a fault of this suite, not a verdict on the port: one line, never a traceback
        print(f"error: {type(e).__name__}: {_one_line(e)} (an internal error of the parity suite, not a verdict; "
              "please report it)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
