"""The files `python -m parity export` writes, checked with polygraphy's own command-line tools.

Each test runs the commands exactly as the exported README.txt prints them, in a shell whose PATH
lacks this environment (no activated venv): the commands name their own interpreter and tools.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from parity.cli import main as parity_main
from parity.export import POLYGRAPHY
from parity.reduce_check import DIVERGED
from trt_layers.bugs import BUGS

ROOT = Path(__file__).resolve().parents[1]
NO_VENV = os.pathsep.join(["/usr/bin", "/bin"])


def run(command: str, cwd: Path, path: str = NO_VENV) -> subprocess.CompletedProcess:
    """``command`` in bash with ``path`` as PATH, and this checkout's suite importable."""
    env = {**os.environ, "PATH": path,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


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


def _export(tmp_path, component, source, dtype, batch, seq, past, *extra) -> Path:
    out = tmp_path / f"{component}-{source}-{dtype}"
    argv = ["export", "--component", component, "--source", source, "--dtype", dtype, "--batch", str(batch),
            "--seq-len", str(seq), "--past-len", str(past), "--out", str(out), *extra]
    assert parity_main(argv) == 0
    return out


@pytest.mark.parametrize("component,source,dtype,batch,seq,past", EXPORTS,
                         ids=["-".join(map(str, e)) for e in EXPORTS])
def test_export_rechecks_clean_with_polygraphy_run_and_inspects(tmp_path, component, source, dtype, batch, seq, past):
    out = _export(tmp_path, component, source, dtype, batch, seq, past)
    recheck = run(readme_command(out, f"{POLYGRAPHY} run model.onnx --onnxrt"), out)
    assert recheck.returncode == 0 and "PASSED" in recheck.stdout, recheck.stdout + recheck.stderr
    inspect = run(readme_command(out, f"{POLYGRAPHY} inspect model"), out)
    assert inspect.returncode == 0, inspect.stderr
    taps = [o.name for o in onnx.load(out / "model.onnx").graph.output]
    assert all(name in inspect.stdout for name in taps)


def test_recheck_fails_on_a_buggy_port(tmp_path):
    """The printed command can fail: a port with a catalog bug does not re-check clean."""
    with BUGS["rope_interleaved"].injected():
        out = _export(tmp_path, "gqa_masked", "lowering", "fp32", 2, 7, 0)
    recheck = run(readme_command(out, f"{POLYGRAPHY} run model.onnx --onnxrt"), out)
    assert recheck.returncode != 0 and "FAILED" in recheck.stdout
    assert re.search(r"FAILED \| Output: 'q_rot'", recheck.stdout)


def _export_faulty(tmp_path, bug, component: str | None = None) -> Path:
    """``export --inject``: model.onnx (the port) and faulty.onnx (the port with ``bug``) side by side."""
    shape = bug.shape
    return _export(tmp_path, component or bug.component, "lowering", "fp32", shape.batch, shape.seq_len,
                   shape.past_len, "--inject", bug.name)


def _changed_nodes(out: Path) -> set[str]:
    """Nodes of faulty.onnx that compute something else than model.onnx's node of the same name:
    another op, other inputs, or other constant values (the lowering names nodes in order)."""
    def signature(model, node):
        constants = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
        return node.op_type, node.attribute, [constants.get(name, name) for name in node.input]

    trusted, faulty = onnx.load(out / "model.onnx"), onnx.load(out / "faulty.onnx")
    by_name = {n.name: n for n in trusted.graph.node}
    return {n.name for n in faulty.graph.node
            if n.name not in by_name or signature(faulty, n) != signature(trusted, by_name[n.name])}


def _reduce_command(out: Path) -> str:
    command = readme_command(out, f"{sys.executable} -m parity.reduce_check faulty.onnx")
    assert f"{POLYGRAPHY} debug reduce faulty.onnx" in command and "reduced.onnx" in command
    return command


def _reduced(out: Path) -> onnx.ModelProto | None:
    return onnx.load(out / "reduced.onnx") if (out / "reduced.onnx").exists() else None


def _localizes(out: Path, changed: set[str], fraction: float = 0.2) -> bool:
    """reduced.onnx holds a node the bug changed and at most ``fraction`` of the graph."""
    reduced, original = _reduced(out), len(onnx.load(out / "faulty.onnx").graph.node)
    return (reduced is not None and bool(changed & {n.name for n in reduced.graph.node})
            and len(reduced.graph.node) <= fraction * original)


def _fake_python(tmp_path: Path) -> Path:
    """A ``python`` without the suite, as a bare ``python`` on PATH outside the venv is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'parity'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.slow  # ~25 s on 2 cores; the refusals below stay in the default run
def test_debug_reduce_as_printed_localizes_an_injected_bug_without_the_venv_on_path(tmp_path):
    """README's walk-through: export --inject, then README.txt's reduce command, run as the issue's
    user ran it: no venv on PATH, and a ``python`` there that lacks the suite. The command names its
    interpreter and polygraphy, so the check runs, and reduce ends on a node the bug changed."""
    out = _export_faulty(tmp_path, BUGS["rope_interleaved"], "decoder_layer")
    changed = _changed_nodes(out)
    result = run(_reduce_command(out), out, path=f"{_fake_python(tmp_path).parent}{os.pathsep}{NO_VENV}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _localizes(out, changed), [n.name for n in _reduced(out).graph.node]


@pytest.mark.slow
@pytest.mark.parametrize("bug", [b for b in BUGS.values()
                                 if b.name != "rope_interleaved" and b.shows.quant is None and not b.shows.tp],
                         ids=lambda b: b.name)
def test_debug_reduce_localizes_every_catalog_bug(tmp_path, bug):
    out = _export_faulty(tmp_path, bug)
    changed = _changed_nodes(out)
    result = run(_reduce_command(out), out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _localizes(out, changed, fraction=0.5), [n.name for n in _reduced(out).graph.node]


def test_debug_reduce_refuses_without_a_check_that_runs_or_a_graph_that_fails(tmp_path):
    """reduce assumes the whole graph fails, and reads a check that cannot start as a failure; the
    printed command asks the check first, so neither case writes a reduced.onnx."""
    import shutil

    out = _export_faulty(tmp_path, BUGS["layernorms_swapped"])
    # The folder moved to a machine whose interpreter at that path lacks the suite.
    without_suite = run(_reduce_command(out).replace(sys.executable, str(_fake_python(tmp_path))), out)
    assert without_suite.returncode == 1 and _reduced(out) is None
    assert "ModuleNotFoundError" in without_suite.stderr and "debug reduce" not in without_suite.stdout

    shutil.copy(out / "model.onnx", out / "faulty.onnx")  # nothing diverges: nothing to reduce
    nothing_fails = run(_reduce_command(out), out)
    assert nothing_fails.returncode == 1 and _reduced(out) is None
    assert "nothing to reduce" in nothing_fails.stdout


def test_reduce_check_verdicts_on_the_exported_graphs(tmp_path, capsys):
    """The check passes the exported graph against itself, fails faulty.onnx with a DIVERGED line
    (the only output reduce's --fail-regex counts), and --expect-divergence inverts it."""
    from parity import reduce_check

    out = _export_faulty(tmp_path, BUGS["layernorms_swapped"])
    capsys.readouterr()

    def check(graph: str, *extra: str) -> tuple[int, str]:
        status = reduce_check.main([str(out / graph), "--trusted", str(out / "model.onnx"),
                                    "--load-inputs", str(out / "inputs.json"), *extra])
        return status, capsys.readouterr().out

    assert check("model.onnx") == (0, "all outputs match the trusted graph\n")
    status, printed = check("faulty.onnx")
    assert status == 1 and DIVERGED.search(printed), printed
    assert check("faulty.onnx", "--expect-divergence")[0] == 0
    assert check("model.onnx", "--expect-divergence")[0] == 1
    cannot_start = run(f"{_fake_python(tmp_path)} -m parity.reduce_check faulty.onnx --trusted model.onnx "
                       "--load-inputs inputs.json", out)
    assert cannot_start.returncode == 1 and not DIVERGED.search(cannot_start.stdout + cannot_start.stderr)


def test_debug_reduce_with_an_always_passing_check_does_not_localize(tmp_path):
    """The reduce tests above depend on the check: with `true` it cannot find the faulty node."""
    out = _export_faulty(tmp_path, BUGS["rope_interleaved"], "decoder_layer")
    command = _reduce_command(out)
    run(command[: command.index("--check ")] + "--check true", out)
    assert not _localizes(out, _changed_nodes(out))


def test_external_data_models_recheck_clean(tmp_path, monkeypatch):
    """DeciCoder-1b in fp32 is past protobuf's 2 GiB: such graphs keep weights in model.onnx.data."""
    from parity import export as export_module
    from trt_layers.network import save_onnx as original

    monkeypatch.setattr(export_module, "save_onnx", lambda model, path: original(model, path, external=True))
    out = _export(tmp_path, "decoder_layer", "lowering", "fp32", 2, 7, 0)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    recheck = run(readme_command(out, f"{POLYGRAPHY} run model.onnx --onnxrt"), out)
    assert recheck.returncode == 0 and "PASSED" in recheck.stdout, recheck.stdout + recheck.stderr
