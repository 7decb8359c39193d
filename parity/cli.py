"""Command line of the parity suite: ``python -m parity {report,export}``.

Exit status: 0 when every tap passes, 1 when something diverges, 2 on bad usage or input.
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers

from reference import COMPONENTS, CheckpointError, ConfigError, load_model, resolve_dtype
from reference.inputs import CaseShape
from reference.oracle import ORACLE_COMPONENTS, llama_from_reference, run_case

from .compare import TOLERANCES, compare_taps, first_failure, format_table
from .export import SOURCES, export

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


def _add_case_arguments(parser: argparse.ArgumentParser, past_len: int) -> None:
    parser.add_argument("--model", default="tiny", help="preset (tiny, decicoder-1b) or a Hugging Face checkpoint dir")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=_positive, default=2)
    parser.add_argument("--seq-len", type=_positive, default=7)
    parser.add_argument("--past-len", type=_non_negative, default=past_len,
                        help="cached tokens (decode); components without a cache ignore it")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser(
        "report", help="check the reference against transformers' Llama blocks, component by component")
    report.add_argument("--component", choices=ORACLE_COMPONENTS, action="append",
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


COMMANDS = {"report": report, "export": export_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
