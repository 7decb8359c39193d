"""Benchmark `locate` on the whole DeciCoder-1b: wall time against the bare reference forward, peak RSS
against the two models' weight sizes.

    python benchmarks/bench_locate.py                     # decicoder-1b, fp32, 128-token prefill, onnx
    python benchmarks/bench_locate.py --model tiny --prompt-len 16

Targets (issue #5): locate <= 2x the bare forward; peak RSS <= both weight sets + 1 GiB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.check import build_candidate  # noqa: E402
from parity.locate import locate  # noqa: E402
from reference import DeciCoderConfig, random_model, resolve_dtype  # noqa: E402
from reference.inputs import CaseShape, make_inputs  # noqa: E402
from reference.taps import real_outputs  # noqa: E402
from trt_layers.network import OnnxBackend, to_feed  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="decicoder-1b", choices=["decicoder-1b", "tiny"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype)
    config = DeciCoderConfig.from_preset(args.model)

    start = time.perf_counter()
    model = random_model(config, seed=0, dtype=dtype)
    init_s = time.perf_counter() - start
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    shape = CaseShape(batch=1, seq_len=args.prompt_len)
    ids = make_inputs("causal_lm", config, shape, dtype)["input_ids"]
    with torch.no_grad():
        model(ids)  # warm-up
        start = time.perf_counter()
        model(ids)
        bare_s = time.perf_counter() - start
    rss_before = peak_rss_gib()

    layer_log = []
    start = time.perf_counter()
    report = locate("causal_lm", model, OnnxBackend(), shape, progress=layer_log.append)
    locate_s = time.perf_counter() - start
    peak = peak_rss_gib()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model} {args.dtype}, "
          f"{args.prompt_len}-token prefill, candidate {report.check.backend}")
    print(f"weights: reference {weights_gib:.2f} GiB; candidate the same, held one layer at a time")
    print(f"weight init (seeded, apart from the run): {init_s:.1f} s")
    print(f"bare reference forward:                   {bare_s:.2f} s")
    print(f"locate (golden + candidate, every layer): {locate_s:.2f} s = {locate_s / bare_s:.1f}x the bare forward "
          f"(target <= 2x)")
    print(f"peak RSS: {peak:.2f} GiB (after the bare forward: {rss_before:.2f} GiB); target <= both weight sets "
          f"+ 1 GiB = {2 * weights_gib + 1:.2f} GiB")
    print(f"verdict: {'PASSED' if report.exit_code == 0 else 'DIVERGED at ' + report.first_failure.name}")
    print("per layer: " + "; ".join(layer_log[:3]) + (" ..." if len(layer_log) > 3 else ""))
    del report

    # For scale: the candidate run bare, as one whole-graph engine with only its real outputs.
    start = time.perf_counter()
    engine = build_candidate("causal_lm", model, OnnxBackend(), decode=False,
                             marked=list(real_outputs("causal_lm", config.num_hidden_layers)))
    built_s = time.perf_counter() - start
    feed = to_feed(make_inputs("causal_lm", config, shape, dtype))
    start = time.perf_counter()
    engine.infer(feed)
    run_s = time.perf_counter() - start
    print(f"bare candidate (whole-graph engine, no taps): build {built_s:.2f} s + run {run_s:.2f} s; "
          f"locate = {locate_s / (bare_s + built_s + run_s):.2f}x golden + candidate run bare "
          f"(peak RSS now {peak_rss_gib():.2f} GiB)")


if __name__ == "__main__":
    main()
