"""Measure the onnx backend's error against the reference per tap: the figures behind parity.compare.TOLERANCES.

    python benchmarks/bench_fp16_error.py                  # fp16, every component, 3 seeds, causal_lm of 20 layers
    python benchmarks/bench_fp16_error.py --dtype fp32
    python benchmarks/bench_fp16_error.py --fp32-inside    # fp16 as ONNX Runtime computes it unaided, for contrast

A tap's figure is the atol it needs at rtol 0, in the judge's units (parity.compare.row_scale):
max |candidate - golden| / max(1, max |golden row|), its worst over the tiny model's test grid (KV heads 8/2/1, batch 1/3, seq 1/7/64,
past 0/5/100 where the component reads a cache) and the seeds; causal_lm runs the tiny model
deepened to --layers layers, prefill and decode.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.compare import row_scale  # noqa: E402
from parity.check import build_candidate, needs_decode_graph  # noqa: E402
from reference import DeciCoderConfig, random_model, resolve_dtype  # noqa: E402
from reference.components import run_component  # noqa: E402
from reference.inputs import CaseShape, make_inputs  # noqa: E402
from trt_layers import onnx_fp16  # noqa: E402
from trt_layers.network import OnnxBackend, to_feed  # noqa: E402

COMPONENTS = ("rmsnorm", "mlp", "rope", "gqa_masked", "gqa_unmasked", "decoder_layer")
USES_PAST = ("rope", "gqa_unmasked", "decoder_layer")


def needed_atol(golden, candidate) -> float:
    scale = row_scale(golden.float()).numpy()
    golden, candidate = golden.float().numpy(), candidate.astype(np.float32)
    return float((np.abs(candidate - golden) / scale).max())


def measure(component: str, config: DeciCoderConfig, dtype, shapes, worst: dict) -> None:
    """Fold the figures of ``component`` over ``shapes`` into ``worst`` (tap -> (figure, case))."""
    model = random_model(config, seed=0, dtype=dtype)
    engines = {}
    for shape in shapes:
        decode = needs_decode_graph(component, shape)
        if decode not in engines:
            engines[decode] = build_candidate(component, model, OnnxBackend(), decode)
        inputs = make_inputs(component, config, shape, dtype)
        candidate = engines[decode].infer(to_feed(inputs))
        for tap, golden in run_component(component, model, inputs).items():
            figure = needed_atol(golden, candidate[tap])
            case = f"kv{config.num_key_value_heads} b{shape.batch} s{shape.seq_len} p{shape.past_len} seed{shape.seed}"
            if figure >= worst.get(f"{component}.{tap}", (-1.0,))[0]:
                worst[f"{component}.{tap}"] = (figure, case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=20, help="causal_lm depth (0: skip causal_lm)")
    parser.add_argument("--fp32-inside", action="store_true", help="skip onnx_fp16's per-op rounding")
    args = parser.parse_args()
    dtype, tiny = resolve_dtype(args.dtype), DeciCoderConfig.from_preset("tiny")
    seeds = range(args.seeds)
    worst: dict[str, tuple[float, str]] = {}
    start = time.perf_counter()
    with mock.patch.object(onnx_fp16, "round_each_op_to_fp16", lambda m: m) if args.fp32_inside else nullcontext():
        for component, kv_heads in itertools.product(COMPONENTS, (8, 2, 1)):
            pasts = (0, 5, 100) if component in USES_PAST else (0,)
            shapes = [CaseShape(*case) for case in itertools.product((1, 3), (1, 7, 64), pasts, seeds)]
            measure(component, replace(tiny, num_key_value_heads=kv_heads), dtype, shapes, worst)
        if args.layers:
            shapes = [CaseShape(2, 64, 0, seed) for seed in seeds] + [CaseShape(2, 1, 100, seed) for seed in seeds]
            measure("causal_lm", replace(tiny, num_hidden_layers=args.layers), dtype, shapes, worst)
    for tap, (figure, case) in worst.items():
        print(f"{tap:<28} {figure:.2e}  {case}")
    for component in (*COMPONENTS, "causal_lm"):
        figures = [f for tap, (f, _) in worst.items() if tap.startswith(f"{component}.")]
        if figures:
            print(f"worst {component:<15} {max(figures):.2e}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
