"""Command line of the parity suite: ``python -m parity {locate,export,list-bugs,build,generate,report}``.

Exit status: 0 when every tap passes, 1 when something diverges, 2 on bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from reference import COMPONENTS, CheckpointError, ConfigError, load_model, resolve_dtype
from reference.inputs import CaseShape
from trt_layers.bugs import BUGS
from trt_layers.network import BACKENDS, Profile, TrtllmBackend

from .backends import CANDIDATES, onnxruntime_bf16_gap, resolve_candidates, skip_reason
from .compare import TOLERANCES, compare_taps, first_failure, format_table
from .export import SOURCES, export
from .locate import load_model_as, locate, model_config, plan_checks, refuse_unshowable, summary
from .report import write_json, write_markdown, write_plot

USAGE_ERROR = 2


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _add_case_arguments(parser: argparse.ArgumentParser, past_len: int | None) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny, tiny-variant, decicoder-1b) or a Hugging Face checkpoint dir")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=_positive, default=2)
    parser.add_argument("--seq-len", type=_positive, default=7)
    parser.add_argument("--past-len", type=_non_negative, default=past_len,
                        help="cached tokens (decode; default: 5 in locate's decode checks); components without a "
                             "cache ignore it")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    locator = commands.add_parser(
        "locate", help="run golden and candidate, compare every tap in order, name the first that diverges")
    locator.add_argument("--component", choices=COMPONENTS,
                         help="check this component alone (default: every component, then the whole model, "
                              "in prefill and in decode)")
    locator.add_argument("--backend", choices=("auto", *CANDIDATES), default="auto",
                         help="candidate: onnx (the ONNX lowering), trtllm (TensorRT-LLM engines); "
                              "auto = trtllm where it can run, else onnx")
    locator.add_argument("--phase", choices=("prefill", "decode"),
                         help="prefill (no cache) or decode (--past-len cached tokens) checks only; default: both, "
                              "or with --component, decode if --past-len > 0")
    locator.add_argument("--kv-heads", type=_positive, metavar="N",
                         help="a preset's KV heads: its head count (MHA), a divisor (GQA), 1 (MQA); "
                              "default: the preset's")
    locator.add_argument("--inject", choices=sorted(BUGS), help="inject a catalog bug into the candidate (list-bugs)")
    locator.add_argument("--json", metavar="PATH", help="write the report as JSON")
    locator.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")
    locator.add_argument("--plot", metavar="PATH.png", help="plot error per tap (causal_lm: per layer), log scale")
    _add_case_arguments(locator, past_len=None)

    commands.add_parser("list-bugs", help="the catalog of porting bugs that --inject takes")

    builder = commands.add_parser(
        "build", help="build the whole model's prefill and decode engines with trt_layers (and the fast path)")
    builder.add_argument("--model", default="tiny", help="preset (tiny, decicoder-1b) or a Hugging Face checkpoint dir")
    builder.add_argument("--backend", choices=("auto", *CANDIDATES), default="auto")
    builder.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    builder.add_argument("--seed", type=int, default=0)
    builder.add_argument("--fast-path", action="store_true",
                         help="also write TensorRT-LLM's LLaMA checkpoint of the weights and, with TensorRT-LLM, "
                              "build its engine (GPT attention plugin)")
    builder.add_argument("--out", required=True, help="folder to write into")

    generator = commands.add_parser(
        "generate", help="prefill + decode through the trt_layers engines; tokens and tokens/s")
    generator.add_argument("--model", default="tiny", help="preset (tiny, decicoder-1b) or a Hugging Face checkpoint dir")
    generator.add_argument("--backend", choices=("auto", *CANDIDATES), default="auto")
    generator.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    prompt = generator.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids; ';' separates the rows of a batch")
    prompt.add_argument("--prompt", help="text, encoded with --tokenizer")
    generator.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (for --prompt and decoding)")
    generator.add_argument("--max-new-tokens", type=_positive, default=16)
    generator.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    generator.add_argument("--top-k", type=_non_negative, default=0, help="with --temperature: sample among the top k")
    generator.add_argument("--seed", type=int, default=0)
    generator.add_argument("--compare", action="store_true",
                           help="also decode greedily with the reference and report the first mismatching step")

    report = commands.add_parser(
        "report", help="check the reference against transformers' Llama blocks, component by component")
    report.add_argument("--component", choices=COMPONENTS, action="append",
                        help="component to check (repeatable; default: all)")
    _add_case_arguments(report, past_len=5)

    exporter = commands.add_parser(
        "export", help="write model.onnx (taps as outputs), inputs.json, golden.json and README.txt for polygraphy")
    exporter.add_argument("--component", choices=COMPONENTS, required=True)
    exporter.add_argument("--source", choices=SOURCES, default="lowering",
                          help="lowering: the trt_layers graph; reference: the reference traced by torch.onnx")
    exporter.add_argument("--out", required=True, help="folder to write into")
    _add_case_arguments(exporter, past_len=0)
    return parser


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
        return 1
    print(f"PASSED: the reference matches transformers on {len(args.component or ORACLE_COMPONENTS)} components")
    return 0


def export_command(args: argparse.Namespace) -> int:
    model = load_model(args.model, resolve_dtype(args.dtype), args.seed)
    written = export(args.component, model, _shape(args), args.out, args.source)
    print(f"wrote {written.model}, {written.inputs.name}, {written.golden.name}, {written.readme.name} "
          f"in {written.directory}")
    print(f"re-check (from {written.directory}):\n  {written.recheck_command}")
    return 0


def _candidate_backend(option: str, dtype: torch.dtype, profile: Profile | None = None):
    """The candidate backend; TensorRT engines serve ``profile`` (default: the whole context)."""
    selected, why = resolve_candidates(option)
    if option == "trtllm" and (reason := skip_reason("trtllm")):
        raise ValueError(f"--backend trtllm cannot run here: {reason}")
    if selected[0] == "onnx" and dtype == torch.bfloat16 and (reason := onnxruntime_bf16_gap()):
        raise ValueError(f"bf16 on the onnx backend: {reason}; use fp32/fp16, or --backend trtllm on a GPU")
    return (TrtllmBackend(profile) if selected[0] == "trtllm" else BACKENDS[selected[0]]()), why


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def locate_command(args: argparse.Namespace) -> int:
    checks = plan_checks(args.component, args.phase, args.batch, args.seq_len, args.past_len, args.seed)
    if len(checks) > 1 and (args.json or args.markdown or args.plot):
        raise ValueError("--json, --markdown and --plot report one check: add --component")
    config = model_config(args.model, args.kv_heads)
    bug = BUGS[args.inject] if args.inject else None
    if bug:
        refuse_unshowable(bug, checks, config)
    dtype = resolve_dtype(args.dtype)
    profile = Profile(args.batch, args.seq_len, max(check.shape.past_len for check in checks))  # the largest case
    backend, why = _candidate_backend(args.backend, dtype, profile)
    started = time.perf_counter()
    model = load_model_as(args.model, config, dtype, args.seed)
    layout = f" ({config.num_attention_heads} heads, {config.num_key_value_heads} KV heads)" if args.kv_heads else ""
    print(f"golden:    reference DeciCoder (torch {torch.__version__}, cpu), model {args.model}{layout}, {args.dtype}")
    print(f"candidate: {backend.description} [{backend.name}: {why}]" + (f", injected bug: {bug.name}" if bug else ""))
    tolerance = TOLERANCES[dtype]
    print(f"tolerance: atol {tolerance.atol:g} x max(1, |tap|), rtol {tolerance.rtol:g} ({tolerance.why})")
    reports = []
    for check in checks:
        reports.append(locate(check.component, model, backend, check.shape, bug, progress=_progress))
        print(f"\n{reports[-1].text()}")
    if args.json:
        write_json(reports[0], args.model, args.json)
    if args.markdown:
        write_markdown(reports[0], args.model, args.markdown)
    if args.plot:
        write_plot(reports[0], args.plot)
    print(f"\n{summary(checks, reports, args.dtype)} ({time.perf_counter() - started:.1f} s)")
    return max(report.exit_code for report in reports)


def _prompt_ids(args: argparse.Namespace, tokenizer) -> torch.Tensor:
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("--prompt needs --tokenizer DIR (a Hugging Face tokenizer directory)")
        return torch.tensor([tokenizer.encode(args.prompt)])
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in args.prompt_ids.split(";")]
    except ValueError:
        raise ValueError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    if not rows[0] or len({len(r) for r in rows}) != 1:
        raise ValueError("--prompt-ids: every row needs the same, non-zero number of tokens (no padding)")
    return torch.tensor(rows)


def generate_command(args: argparse.Namespace) -> int:
    from trt_layers.generation import CausalLM, Sampling

    from .generation import compare_generation

    dtype = resolve_dtype(args.dtype)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    ids = _prompt_ids(args, tokenizer)
    batch, prompt = ids.shape  # the decode engine's cache grows to prompt + max_new_tokens - 1
    backend, why = _candidate_backend(args.backend, dtype, Profile(batch, prompt, prompt + args.max_new_tokens - 1))
    model = load_model(args.model, dtype, args.seed)
    if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"--prompt-ids: token ids must lie in [0, {model.config.vocab_size})")
    if ids.shape[1] + args.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"{ids.shape[1]} prompt + {args.max_new_tokens} new tokens exceed the context of "
                         f"{model.config.max_position_embeddings}")
    print(f"candidate: {backend.description} [{backend.name}: {why}], model {args.model}, {args.dtype}")
    start = time.perf_counter()
    engines = CausalLM.build(model.config, model.state_dict(), dtype, backend)
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
        return 0 if result.identical else 1
    return 0


def build_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trt_layers import fast_path
    from trt_layers.generation import CausalLM

    dtype = resolve_dtype(args.dtype)
    backend, why = _candidate_backend(args.backend, dtype)
    model = load_model(args.model, dtype, args.seed)
    fast_path_options = fast_path.build_options(model.config, dtype) if args.fast_path else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engines = CausalLM.build(model.config, model.state_dict(), dtype, backend)
    paths = [engines.prefill.save(out / "prefill"), engines.decode.save(out / "decode")]
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(f"{backend.description} [{backend.name}: {why}]: wrote {', '.join(str(p) for p in paths)} "
          f"in {time.perf_counter() - start:.1f} s (outputs: logits and each layer's present K/V)")
    if args.fast_path:
        checkpoint = fast_path.write_checkpoint(model, out / "trtllm_checkpoint")
        print(f"fast path: TensorRT-LLM LLaMA checkpoint in {checkpoint}")
        if skip_reason("trtllm") is None:
            engine_dir = fast_path.build_engine(checkpoint, out / "trtllm_engine", fast_path_options)
            print(f"fast path: TensorRT-LLM engine (GPT attention plugin) in {engine_dir}")
        else:
            print(f"fast path: engine not built ({skip_reason('trtllm')}); on a GPU machine: "
                  f"{fast_path.trtllm_build_command(checkpoint, out / 'trtllm_engine', fast_path_options)}")
    return 0


def list_bugs(args: argparse.Namespace) -> int:
    for bug in BUGS.values():
        print(f"{bug.name:<24} {bug.component:<14} first tap {bug.first_tap:<11} {bug.description}")
        print(f"{'':<24} shows in {bug.shows.describe()}")
    return 0


COMMANDS = {"locate": locate_command, "export": export_command, "list-bugs": list_bugs, "build": build_command,
            "generate": generate_command, "report": report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
