"""The files `python -m parity export` writes, checked with polygraphy's own command-line tools.

Each test runs the commands exactly as the exported README.txt prints them, in a subprocess.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from parity.cli import main as parity_main
from trt_layers.bugs import BUGS

BIN = Path(sys.executable).parent  # polygraphy's entry point lives beside this interpreter


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def readme_command(directory: Path, prefix: str) -> str:
    lines = (directory / "README.txt").read_text().splitlines()
    return next(line.strip() for line in lines if line.strip().startswith(prefix))


# (component, source, dtype, batch, seq, past)
EXPORTS = [
    ("rmsnorm", "lowering", "fp32", 2, 7, 0),
    ("decoder_layer", "lowering", "fp32", 2, 7, 0),
    ("decoder_layer", "reference", "fp32", 2, 7, 0),
    ("gqa_unmasked", "lowering", "fp16", 1, 1, 5),
    ("causal_lm", "lowering", "fp32", 2, 5, 3),
]


def _export(tmp_path, component, source, dtype, batch, seq, past) -> Path:
    out = tmp_path / f"{component}-{source}-{dtype}"
    argv = ["export", "--component", component, "--source", source, "--dtype", dtype, "--batch", str(batch),
            "--seq-len", str(seq), "--past-len", str(past), "--out", str(out)]
    assert parity_main(argv) == 0
    return out


@pytest.mark.parametrize("component,source,dtype,batch,seq,past", EXPORTS,
                         ids=["-".join(map(str, e)) for e in EXPORTS])
def test_export_rechecks_clean_with_polygraphy_run_and_inspects(tmp_path, component, source, dtype, batch, seq, past):
    out = _export(tmp_path, component, source, dtype, batch, seq, past)
    recheck = run(readme_command(out, "polygraphy run model.onnx --onnxrt"), out)
    assert recheck.returncode == 0 and "PASSED" in recheck.stdout, recheck.stdout + recheck.stderr
    inspect = run(readme_command(out, "polygraphy inspect model"), out)
    assert inspect.returncode == 0, inspect.stderr
    taps = [o.name for o in onnx.load(out / "model.onnx").graph.output]
    assert all(name in inspect.stdout for name in taps)


def test_recheck_fails_on_a_buggy_port(tmp_path):
    """The printed command can fail: a port with a catalog bug does not re-check clean."""
    with BUGS["rope_interleaved"].injected():
        out = _export(tmp_path, "gqa_masked", "lowering", "fp32", 2, 7, 0)
    recheck = run(readme_command(out, "polygraphy run model.onnx --onnxrt"), out)
    assert recheck.returncode != 0 and "FAILED" in recheck.stdout
    assert re.search(r"FAILED \| Output: 'q_rot'", recheck.stdout)


FAULTY_NODE = "sigmoid_0"  # the MLP's SiLU gate


def _faulty_decoder_layer(tmp_path) -> Path:
    out = _export(tmp_path, "decoder_layer", "lowering", "fp32", 2, 7, 0)
    model = onnx.load(out / "model.onnx")
    node = next(n for n in model.graph.node if n.name == FAULTY_NODE)
    node.op_type = "Tanh"  # one wrong activation, every tensor name unchanged
    onnx.save(model, out / "faulty.onnx")
    return out


def _reduce(out: Path, check: str | None = None) -> tuple[subprocess.CompletedProcess, onnx.ModelProto | None]:
    command = readme_command(out, "polygraphy debug reduce faulty.onnx")
    if check is not None:
        command = command[: command.index("--check ")] + f"--check {check}"
    result = run(command, out)
    reduced = out / "reduced.onnx"
    return result, onnx.load(reduced) if reduced.exists() else None


def _localizes(reduced: onnx.ModelProto | None, original_nodes: int) -> bool:
    return (reduced is not None and FAULTY_NODE in [n.name for n in reduced.graph.node]
            and len(reduced.graph.node) <= original_nodes // 5)


def test_debug_reduce_with_the_shipped_check_isolates_the_faulty_node(tmp_path):
    out = _faulty_decoder_layer(tmp_path)
    original_nodes = len(onnx.load(out / "faulty.onnx").graph.node)
    result, reduced = _reduce(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _localizes(reduced, original_nodes), [n.name for n in reduced.graph.node] if reduced else None


def test_debug_reduce_with_an_always_passing_check_does_not_localize(tmp_path):
    """The reduce test above depends on the check: with `true` it cannot find the faulty node."""
    out = _faulty_decoder_layer(tmp_path)
    original_nodes = len(onnx.load(out / "faulty.onnx").graph.node)
    _, reduced = _reduce(out, check="true")
    assert not _localizes(reduced, original_nodes)


def test_external_data_models_recheck_clean(tmp_path, monkeypatch):
    """DeciCoder-1b in fp32 is past protobuf's 2 GiB: such graphs keep weights in model.onnx.data."""
    from parity import export as export_module
    from trt_layers.network import save_onnx as original

    monkeypatch.setattr(export_module, "save_onnx", lambda model, path: original(model, path, external=True))
    out = _export(tmp_path, "decoder_layer", "lowering", "fp32", 2, 7, 0)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    recheck = run(readme_command(out, "polygraphy run model.onnx --onnxrt"), out)
    assert recheck.returncode == 0 and "PASSED" in recheck.stdout, recheck.stdout + recheck.stderr
