"""benchmarks/bench_candidate.py refuses bad arguments before any model is built (exit 2, one line)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_candidate.py"


@pytest.mark.parametrize("args, message", [
    (["--candidate", "{graph}"], "no graph.onnx.data beside it"),
    (["--candidate", "{tmp}/" + "x" * 300 + ".onnx"], "File name too long"),
    (["--export", "{graph}"], "not a directory"),
    (["--candidate", "{graph}", "--cap-gib", "nan"], "--cap-gib must be a positive number"),
    (["--export", "{tmp}", "--candidate", "{graph}"], "give --export DIR or --candidate"),
], ids=["weights-inside", "path-too-long", "export-to-a-file", "cap-nan", "both"])
def test_bench_candidate_refuses_bad_arguments(tmp_path, args, message):
    graph = tmp_path / "graph.onnx"
    graph.write_bytes(b"")
    argv = [arg.format(graph=graph, tmp=tmp_path) for arg in args]
    if "--cap-gib" in argv:
        (tmp_path / "graph.onnx.data").write_bytes(b"")
    run = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr
