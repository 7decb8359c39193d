"""Benchmark `locate --candidate` on an ONNX export of the whole model, beside bare runs and polygraphy's mark-all.

    python benchmarks/bench_candidate.py --export DIR                   # DIR/llama.onnx (+ .data), once
    python benchmarks/bench_candidate.py --candidate DIR/llama.onnx --seq-len 2048 --json out.json --polygraphy
    python benchmarks/bench_candidate.py --candidate DIR/llama.onnx --variants   # + renamed and faulty copies

The export is transformers' LlamaForCausalLM over the seeded fp32 decicoder-1b weights (the
reference's own tensors), written by torch.onnx's dynamo exporter with its weights beside it. In one
run: the reference bare (median of --repeats after a warm-up), the candidate bare (an ONNX Runtime
session over the whole graph, then runs: median), `locate --candidate` in a fresh process (its wall
time and peak RSS, VmHWM, weights and inputs included), and with --polygraphy, `polygraphy run
--onnxrt --onnx-outputs '*'` (every tensor marked, polygraphy's way to localize) in a fresh process,
its address space capped at --cap-gib so that running out of memory fails it, not the machine. With
--variants, the CLI's `locate --candidate` (exit code and verdict) on the export renamed and mapped
with --tap-map, and on each one-node fault of parity.export_edits.

Targets (issue 13, as issue 12 sets them for trt_layers): locate <= 1.25x (reference + candidate
build + candidate run); peak RSS <= weights + 2 GiB. Beside them: the resident memory the bare
candidate's runs add to its session (its activations, the graph run whole, op by op).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.cli import report_file  # noqa: E402
from parity.export import export_llama  # noqa: E402
from reference import DeciCoderConfig, random_model  # noqa: E402
from reference.inputs import CaseShape, make_inputs  # noqa: E402

MODEL = "decicoder-1b"


def export(directory: Path) -> Path:
    """transformers' Llama over the reference's seeded weights, exported by torch.onnx's dynamo exporter."""
    directory.mkdir(parents=True, exist_ok=True)
    model = random_model(DeciCoderConfig.from_preset(MODEL), seed=0)
    return export_llama(model, directory / "llama.onnx", external_data=True)


def _child(argv: list[str], cap_bytes: int | None = None) -> dict:
    """Run ``argv`` in a fresh process: wall seconds, its own peak RSS, exit status, last error line."""
    def limit():
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, preexec_fn=limit)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, errors = out.read(), [line for line in err.read().splitlines() if "rror" in line]
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "returncode": child.returncode,
            "stdout": stdout, "error": (errors or [""])[-1][:300]}


def locate_only(candidate: Path, shape: CaseShape) -> dict:
    """The child process: weights, then `locate --candidate` timed alone (as bench_locate times locate)."""
    from parity.onnx_port import OnnxPort, locate_onnx

    model = random_model(DeciCoderConfig.from_preset(MODEL), seed=0)
    start = time.perf_counter()
    report = locate_onnx(model, OnnxPort(candidate), shape)
    return {"locate_s": time.perf_counter() - start,
            "verdict": "PASSED" if report.exit_code == 0 else report.verdict()}


def variants(candidate: Path, seq_len: int) -> list[dict]:
    """`python -m parity locate --candidate` (the CLI, in a fresh process) on the export renamed (mapped
    with --tap-map) and with each fault of export_edits, saved beside it: exit code, verdict, time, peak."""
    from parity.export_edits import FAULTS, edited, renamed
    from parity.onnx_port import OnnxPort, golden_order

    config = DeciCoderConfig.from_preset(MODEL)
    graph = onnx.load(str(candidate), load_external_data=False)
    names = {}
    copy = edited(graph, lambda model: names.update(renamed(model)))
    mapped = OnnxPort(candidate).tap_map(golden_order(config), config.num_hidden_layers, None)
    tap_map = candidate.with_name("renamed_map.json")
    tap_map.write_text(json.dumps({tap: names.get(tensor, tensor) for tap, tensor in mapped.items()}, indent=1))
    onnx.save(copy, str(candidate.with_name("renamed.onnx")))
    cases = [("renamed, --tap-map", candidate.with_name("renamed.onnx"), ["--tap-map", str(tap_map)], 0, "PASSED", "")]
    for fault, (layer, tap) in FAULTS.items():
        path = candidate.with_name(f"{fault.__name__}.onnx")
        onnx.save(edited(graph, fault), str(path))
        cases.append((fault.__name__, path, [], 1, f"layer_{layer}.out (", f"inside layer {layer}: {tap} "))
    results = []
    for name, path, extra, expected, *where in cases:
        run = _child([sys.executable, "-m", "parity", "locate", "--model", MODEL, "--candidate", str(path),
                      "--seq-len", str(seq_len), *extra])
        verdict = (run["stdout"].strip().splitlines() or [""])[-1]
        results.append({"case": name, "returncode": run["returncode"], "expected_returncode": expected,
                        "verdict": verdict, "seconds": run["seconds"], "peak_rss_gib": run["peak_rss_gib"],
                        "met": run["returncode"] == expected and all(text in verdict for text in where)})
    return results


def bare_runs(candidate: Path, shape: CaseShape, repeats: int) -> dict:
    import onnxruntime

    inputs = make_inputs("causal_lm", DeciCoderConfig.from_preset(MODEL), shape, torch.float32)
    reference = _reference_runs(inputs, repeats)  # its weights are freed before the candidate's load
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    build = time.perf_counter() - start
    feed = {name: inputs[name].numpy() for name in ("input_ids", "position_ids")}
    built = _rss_gib()
    first = _timed(lambda: session.run(None, feed))
    runs = [_timed(lambda: session.run(None, feed)) for _ in range(repeats)]
    return {"reference_s": statistics.median(reference), "candidate_build_s": build,
            "candidate_first_run_s": first, "candidate_run_s": statistics.median(runs),
            "candidate_activations_gib": _rss_gib() - built}


def _rss_gib() -> float:
    """This process's resident set now (VmRSS)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 2**20


@torch.no_grad()
def _reference_runs(inputs: dict[str, torch.Tensor], repeats: int) -> list[float]:
    model = random_model(DeciCoderConfig.from_preset(MODEL), seed=0)
    model(inputs["input_ids"], inputs["position_ids"])
    return [_timed(lambda: model(inputs["input_ids"], inputs["position_ids"])) for _ in range(repeats)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", metavar="DIR", help="write DIR/llama.onnx and its weights, then stop")
    parser.add_argument("--candidate", metavar="PATH.onnx", help="the export to judge")
    parser.add_argument("--seq-len", type=int, default=128, help="prompt tokens (batch 1); default 128")
    parser.add_argument("--repeats", type=int, default=3, help="timed bare runs, median taken; default 3")
    parser.add_argument("--polygraphy", action="store_true", help="also run polygraphy's mark-all on the export")
    parser.add_argument("--variants", action="store_true",
                        help="also run `python -m parity locate --candidate` on a renamed copy (with --tap-map) and on "
                             "each faulty copy of parity.export_edits, written beside the export")
    parser.add_argument("--cap-gib", type=float, default=20.0,
                        help="address-space cap of polygraphy's process, GiB; default 20")
    parser.add_argument("--json", metavar="PATH", type=report_file("--json"), help="also write the figures as JSON")
    parser.add_argument("--locate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.export is None) == (args.candidate is None):
        parser.error("give --export DIR or --candidate PATH.onnx")
    try:
        if args.candidate is not None and not Path(args.candidate).is_file():
            parser.error(f"--candidate {args.candidate}: no such file")
        if args.candidate is not None and not Path(args.candidate + ".data").is_file():
            parser.error(f"--candidate {args.candidate}: no {Path(args.candidate).name}.data beside it (write the "
                         "export with --export DIR)")
        if args.export is not None and Path(args.export).exists() and not Path(args.export).is_dir():
            parser.error(f"--export {args.export}: not a directory")
    except OSError as e:  # a path the OS refuses (too long, ...)
        parser.error(f"{e.strerror}: {e.filename}")
    if not 0 < args.cap_gib < float("inf"):
        parser.error("--cap-gib must be a positive number of GiB")
    context = DeciCoderConfig.from_preset(MODEL).max_position_embeddings
    if not 1 <= args.seq_len <= context or args.repeats < 1:
        parser.error(f"--seq-len must lie in [1, {context}] and --repeats be positive")
    return args


def main() -> None:
    args = parse_args()
    if args.export:
        print(f"exported {export(Path(args.export))}")
        return
    candidate, shape = Path(args.candidate), CaseShape(batch=1, seq_len=args.seq_len, past_len=0)
    if args.locate_only:
        print(json.dumps(locate_only(candidate, shape)))
        return
    figures = {"model": MODEL, "seq_len": args.seq_len, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
               "weights_gib": (candidate.with_name(candidate.name + ".data").stat().st_size) / 2**30}
    # locate first, while this process holds no weights: on a 24 GiB machine the bare session's 4.4 GB
    # beside locate's and the page cache of the weights file would have the two compete for memory.
    located = _child([sys.executable, __file__, "--locate-only", "--candidate", str(candidate), "--seq-len",
                      str(args.seq_len)])
    if located["returncode"] != 0:
        raise SystemExit(f"locate failed: {located['error']}")
    figures.update(json.loads(located["stdout"].splitlines()[-1]), locate_peak_rss_gib=located["peak_rss_gib"])
    figures.update(bare_runs(candidate, shape, args.repeats))
    if args.polygraphy:
        polygraphy = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
        marked = _child([sys.executable, "-c", polygraphy, "run", str(candidate), "--onnxrt", "--onnx-outputs", "*",
                         "--input-shapes", f"input_ids:[1,{args.seq_len}]", f"position_ids:[1,{args.seq_len}]",
                         "--val-range", f"input_ids:[0,{DeciCoderConfig.from_preset(MODEL).vocab_size - 1}]",
                         f"position_ids:[0,{args.seq_len - 1}]"],
                        int(args.cap_gib * 2**30))
        figures["polygraphy_mark_all"] = {key: marked[key] for key in ("seconds", "peak_rss_gib", "returncode",
                                                                       "error")}
        figures["polygraphy_mark_all"]["cap_gib"] = args.cap_gib
    if args.variants:
        figures["variants"] = variants(candidate, args.seq_len)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def report(f: dict) -> None:
    bare = f["reference_s"] + f["candidate_build_s"] + f["candidate_run_s"]
    budget = f["weights_gib"] + 2
    met = lambda value, limit: "met" if value <= limit else "MISSED"  # noqa: E731
    print(f"{f['machine']}; torch {torch.__version__}, {f['torch_threads']} threads; {f['model']} fp32, "
          f"{f['seq_len']}-token prefill, batch 1; candidate: transformers' Llama exported by torch.onnx (dynamo), "
          f"run by ONNX Runtime on the CPU; median of {f['repeats']}")
    print(f"  reference bare                 {f['reference_s']:9.3f} s")
    print(f"  candidate build (session)      {f['candidate_build_s']:9.3f} s")
    print(f"  candidate run                  {f['candidate_run_s']:9.3f} s  first run "
          f"{f['candidate_first_run_s']:.3f} s; its activations held {f['candidate_activations_gib']:.2f} GiB "
          f"(resident growth over its runs)")
    ratio = f["locate_s"] / bare
    print(f"  locate --candidate             {f['locate_s']:9.3f} s  {ratio:.2f}x reference + candidate build + run "
          f"(target <= 1.25x: {met(ratio, 1.25)}); peak RSS {f['locate_peak_rss_gib']:.2f} GiB (target <= weights "
          f"+ 2 GiB = {budget:.2f} GiB: {met(f['locate_peak_rss_gib'], budget)})")
    print(f"  verdict: {f['verdict']}")
    if (p := f.get("polygraphy_mark_all")) is not None:
        outcome = "ran" if p["returncode"] == 0 else f"failed (exit {p['returncode']}): {p['error']}"
        print(f"  polygraphy run --onnx-outputs '*' {p['seconds']:9.3f} s  peak RSS {p['peak_rss_gib']:.2f} GiB "
              f"(address space capped at {p['cap_gib']:g} GiB); {outcome}")
    for v in f.get("variants", []):
        print(f"  {v['case']:<24} exit {v['returncode']} (expected {v['expected_returncode']}: "
              f"{'met' if v['met'] else 'MISSED'}), {v['seconds']:.1f} s, peak RSS {v['peak_rss_gib']:.2f} GiB: "
              f"{v['verdict']}")


if __name__ == "__main__":
    main()
