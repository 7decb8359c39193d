"""The check command for ``polygraphy debug reduce`` on the CPU.

    python -m parity.reduce_check polygraphy_debug.onnx --trusted model.onnx --load-inputs inputs.json

Runs the subgraph that reduce hands over with ONNX Runtime, feeding its inputs the values the
trusted graph (same tensor names: the graph before an edit, or a known-good build) computes on
``inputs.json``, and compares its outputs with the trusted values of the same tensors.
Exit 0: the subgraph matches (good); 1: it diverges (still failing), and a line starting with
``DIVERGED:`` says so, for reduce's ``--fail-regex``: a check that fails to start (a Python
without this suite exits 1 too) then never reads as failing; 2: no verdict (bad usage or input).
``--expect-divergence`` asks the opposite question, before reducing: exit 0 only if the graph
diverges. Imports stay light: reduce runs this once per iteration.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import onnx
import onnxruntime
from polygraphy import constants
from polygraphy.backend.onnx import ModifyOutputs
from polygraphy.json import load_json

MISMATCH, BAD_INPUT = 1, 2
DIVERGED = re.compile("(?m)^DIVERGED: ")  # printed only with a verdict of divergence, at a line start


def _session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def trusted_values(trusted: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor the trusted graph computes on ``feed``, by name (inputs included)."""
    marked = ModifyOutputs(trusted, outputs=constants.MARK_ALL)()
    session = _session(marked)
    values = dict(zip((o.name for o in session.get_outputs()), session.run(None, feed)))
    return {**feed, **values}


def check(subgraph: onnx.ModelProto, values: dict[str, np.ndarray], atol: float, rtol: float) -> list[str]:
    """Names of the subgraph outputs that diverge from the trusted values, with their error."""
    initializers = {t.name for t in subgraph.graph.initializer}
    feed = {i.name: values[i.name] for i in subgraph.graph.input if i.name not in initializers}
    session = _session(subgraph)
    diverging = []
    for output, actual in zip(session.get_outputs(), session.run(None, feed)):
        expected = values[output.name]
        if actual.shape != expected.shape or not np.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
            error = np.abs(actual.astype(np.float64) - expected).max() if actual.shape == expected.shape else "shape"
            diverging.append(f"{output.name} (max abs error {error})")
    return diverging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.reduce_check", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the subgraph to check (polygraphy_debug.onnx)")
    parser.add_argument("--trusted", required=True, help="a graph with the same tensor names that computes right")
    parser.add_argument("--load-inputs", required=True, help="polygraphy data-loader JSON with the graph inputs")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--expect-divergence", action="store_true",
                        help="exit 0 if the graph diverges, 1 if it matches (the whole faulty graph, before reducing)")
    args = parser.parse_args(argv)
    try:
        feed = load_json(args.load_inputs)[0]
        values = trusted_values(onnx.load(args.trusted), feed)
        subgraph = onnx.load(args.model)
        # A subgraph that computes nothing (reduce tries an empty input set) is no evidence either way.
        if not subgraph.graph.node:
            print(f"error: {args.model} has no nodes", file=sys.stderr)
            return BAD_INPUT
        missing = [i.name for i in subgraph.graph.input if i.name not in values]
        if missing:
            print(f"error: {args.trusted} computes no tensor named {missing}", file=sys.stderr)
            return BAD_INPUT
        diverging = check(subgraph, values, args.atol, args.rtol)
    except Exception as e:  # an unreadable file or a subgraph ONNX Runtime rejects is no verdict: never exit 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return BAD_INPUT
    if diverging:
        print("DIVERGED: " + ", ".join(diverging))
        return 0 if args.expect_divergence else MISMATCH
    print("all outputs match the trusted graph" + (": nothing to reduce" if args.expect_divergence else ""))
    return MISMATCH if args.expect_divergence else 0


if __name__ == "__main__":
    sys.exit(main())
