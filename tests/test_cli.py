"""`python -m parity`: the exit-code contract of every subcommand (0 pass, 1 diverges, 2 bad usage
or input, 3 a fault of the suite), validation before any model is built, and the reports."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from parity import cli
from parity.backends import skip_reason
from parity.cli import main

# Bad usage or input for every subcommand: (argv, words the one-line message must hold). In argv,
# {tmp} is a scratch folder, {file} a file in it, {full} a folder holding a file, {bad_model} a
# checkpoint folder whose config.json is not JSON, {tokenizer} a Hugging Face tokenizer folder.
BAD_INPUTS = [
    (["locate", "--seq-len", "257"], "tokens exceed the context of 256 positions"),
    (["locate", "--component", "rope", "--seq-len", "257"], "--seq-len: 257 tokens exceed the context"),
    (["locate", "--component", "causal_lm", "--past-len", "252", "--seq-len", "7"], "--past-len + --seq-len: 259 tokens"),
    (["locate", "--seq-len", "100000"], "100005 tokens exceed"),  # decode checks cache 5 tokens
    (["locate", "--component", "mlp", "--seq-len", "300"], "300 tokens exceed the context of 256 positions"),
    (["locate", "--component", "gqa_unmasked", "--past-len", "250", "--seq-len", "7"], "257 tokens exceed"),
    (["locate", "--component", "rope", "--json", "{tmp}/missing/report.json"],
     "--json {tmp}/missing/report.json: no directory"),
    (["locate", "--component", "rope", "--json", "/proc/report.json"], "--json /proc/report.json: not a regular file"),
    (["locate", "--component", "rope", "--json", "/proc/self/status"], "--json /proc/self/status: not a regular file"),
    (["locate", "--component", "rope", "--markdown", "{tmp}"], "--markdown {tmp}: is a directory"),
    (["locate", "--component", "rope", "--plot", "{tmp}/errors.pdf"], "--plot {tmp}/errors.pdf: expected a .png"),
    (["locate", "--component", "rope", "--json", "{tmp}/r", "--markdown", "{tmp}/r"], "each report needs its own path"),
    (["locate", "--json", "{tmp}/r.json"], "--json, --markdown and --plot report one check: add --component"),
    (["locate", "--component", "mlp", "--phase", "decode"], "mlp has no decode graph"),
    (["locate", "--component", "causal_lm", "--phase", "decode", "--past-len", "0"], "decode needs cached tokens"),
    (["locate", "--component", "rmsnorm", "--inject", "rope_interleaved"], "--inject rope_interleaved cannot show"),
    (["locate", "--kv-heads", "3"], "--kv-heads 3 must divide the 8 attention heads"),
    (["locate", "--dtype", "bf16"], "bfloat16"),
    (["locate", "--batch", "0"], "--batch: expected a positive integer, got '0'"),
    (["locate", "--batch", "100000000"], "--batch 100000000 --seq-len 7: its activations need about"),
    (["locate", "--seed", "-1"], "--seed: expected an integer"),
    (["locate", "--inject", "no_such_bug"], "--inject: invalid choice"),
    (["locate", "--model", "{tmp}/no_checkpoint"], "--model {tmp}/no_checkpoint: neither a preset"),
    (["locate", "--model", "{bad_model}"], "config.json: not valid JSON"),
    (["export", "--component", "rmsnorm", "--out", "{file}"], "--out {file}: is a file"),
    (["export", "--component", "rmsnorm", "--out", "{full}"], "--out {full}: folder is not empty"),
    (["export", "--component", "rmsnorm", "--out", "/proc/export"], "--out /proc/export: cannot create"),
    (["export", "--component", "rope", "--out", "{tmp}/out", "--seq-len", "257"], "257 tokens exceed"),
    (["export", "--component", "rmsnorm", "--out", "{tmp}/out", "--dtype", "bf16"], "--dtype bf16 cannot be exported"),
    (["export", "--component", "rmsnorm", "--out", "{tmp}/out", "--source", "reference", "--inject",
      "rmsnorm_default_eps"], "--inject: catalog bugs are injected into trt_layers"),
    (["export", "--out", "{tmp}/out"], "the following arguments are required: --component"),
    (["build", "--out", "{file}"], "--out {file}: is a file"),
    (["build", "--out", "{full}"], "--out {full}: folder is not empty (--force replaces it)"),
    (["build", "--out", "{tmp}/out", "--model", "{bad_model}"], "not valid JSON"),
    (["generate", "--prompt-ids", "1", "--max-new-tokens", "300"], "prompt + --max-new-tokens: 301 tokens exceed"),
    (["generate", "--prompt", "", "--tokenizer", "{tokenizer}"], "--prompt '': encodes to no tokens"),
    (["generate", "--prompt", "def f():"], "--prompt needs --tokenizer"),
    (["generate", "--prompt-ids", "1", "--tokenizer", "{tmp}/no_tokenizer"],
     "--tokenizer {tmp}/no_tokenizer: no such directory"),
    (["generate", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["generate", "--prompt-ids", "1,2;3"], "same, non-zero number of tokens"),
    (["generate", "--prompt-ids", "1,99999"], "token ids must lie in [0, 512)"),
    (["generate", "--prompt-ids", "1", "--temperature", "nan"], "--temperature nan: expected a positive number"),
    (["generate"], "one of the arguments --prompt-ids --prompt is required"),
    (["generate", "--prompt-ids", "1,,2"], "comma-separated integers"),
    (["generate", "--prompt-ids", "1,2", "--top-k", "5"], "--top-k 5 samples: give --temperature"),
    (["generate", "--prompt-ids", "1,2", "--inject", "kv_append_reversed"], "cannot change generated tokens"),
    (["generate", "--prompt-ids", "1,2", "--inject", "decode_masked"], "--inject decode_masked cannot show"),
    (["export", "--component", "rope", "--out", "{tmp}/out", "--inject", "rope_offset_forgotten"],
     "--inject rope_offset_forgotten cannot show in rope prefill"),
    (["locate", "--component", "mlp", "--markdown", "/dev/full"], "--markdown /dev/full: not a regular file"),
    (["report", "--seq-len", "300"], "305 tokens exceed"),
    (["locate", "--candidate", "{tmp}/none.onnx"], "--candidate {tmp}/none.onnx: no such file"),
    (["locate", "--candidate", "{file}"], "--candidate {file}: not a readable ONNX model"),
    (["locate", "--candidate", "{file}", "--inject", "rope_interleaved", "--phase", "decode"],
     "the golden on the CPU: drop --inject"),
    (["locate", "--tap-map", "{file}"], "--tap-map maps the taps of a --candidate graph: add --candidate"),
    (["locate", "--candidate", "{file}", "--device", "cuda"], "the golden on the CPU: drop --device cuda"),
    (["report", "--component", "no_such_component"], "--component: invalid choice"),
    (["list-bugs", "--all"], "unrecognized arguments: --all"),
]
if skip_reason("trtllm"):
    BAD_INPUTS.append((["locate", "--backend", "trtllm"], "--backend trtllm cannot run here"))


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tokenizer")
    vocab = {word: i for i, word in enumerate(["<eos>", "def", "f", "(", ")", ":", "return", "x", "[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS])
def test_bad_usage_exits_2_with_one_line_before_any_model_is_built(tmp_path, capsys, monkeypatch, tokenizer_dir,
                                                                   argv, message):
    (tmp_path / "file").write_text("mine\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    (tmp_path / "bad_model").mkdir()
    (tmp_path / "bad_model" / "config.json").write_text('{"hidden_size": 128')
    paths = {"tmp": tmp_path, "file": tmp_path / "file", "full": tmp_path / "full",
             "bad_model": tmp_path / "bad_model", "tokenizer": tokenizer_dir}
    before = _snapshot(tmp_path)
    for loader in ("load_model", "load_model_as"):
        monkeypatch.setattr(cli, loader, lambda *a, **k: pytest.fail("a model was built before validation"))
    try:
        status = main([arg.format(**paths) for arg in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message.format(**paths) in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before


# -- a broken port is a divergence (exit 1), reported like any other ----------------------------------------

class _HardCoded32Heads:
    """DeciCoder-1b's 32 query heads written into the port instead of the config's."""

    num_attention_heads = 32

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        return getattr(self._config, name)


@pytest.fixture
def port_with_32_heads(monkeypatch):
    import trt_layers.modeling as modeling

    attention = modeling.attention
    monkeypatch.setattr(modeling, "attention", lambda hidden, positions, weights, prefix, config, *args, **kwargs:
                        attention(hidden, positions, weights, prefix, _HardCoded32Heads(config), *args, **kwargs))


@pytest.mark.parametrize("component", ["causal_lm", "gqa_masked"])
def test_a_port_that_fails_to_build_diverges_and_is_reported(tmp_path, capsys, port_with_32_heads, component):
    report, markdown, plot = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "errors.png"
    status = main(["locate", "--component", component, "--json", str(report), "--markdown", str(markdown),
                   "--plot", str(plot)])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(f"DIVERGED: {component}( prefill)?: the candidate failed to build", out), out
    assert "split: sections [512, 32, 32] do not sum to 192" in out
    written = json.loads(report.read_text())
    assert not written["passed"] and "[512, 32, 32]" in written["candidate_error"]
    assert "[512, 32, 32]" in markdown.read_text() and plot.stat().st_size > 0


@pytest.mark.parametrize("argv", [["build", "--out", "{out}"],
                                  ["export", "--component", "decoder_layer", "--out", "{out}"],
                                  ["generate", "--prompt-ids", "1,2,3"]], ids=["build", "export", "generate"])
def test_a_port_that_fails_to_build_exits_1_and_leaves_nothing(tmp_path, capsys, port_with_32_heads, argv):
    out = tmp_path / "new" / "engines"
    assert main([arg.format(out=out) for arg in argv]) == 1
    assert "DIVERGED: the candidate failed to build" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# -- shipped files: --out, --force, --inject ------------------------------------------------------------------

def test_export_replaces_a_folder_only_with_force(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "reduced.onnx").write_text("stale")
    argv = ["export", "--component", "rmsnorm", "--out", str(out)]
    assert main(argv) == 2 and (out / "reduced.onnx").read_text() == "stale"
    assert main([*argv, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "golden.json", "inputs.json", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left


def test_force_never_deletes_the_checkpoint_a_symlink_or_the_current_directory(tmp_path, monkeypatch, capsys):
    from reference import DeciCoderConfig, random_model
    from reference.checkpoint import save_pretrained

    checkpoint = tmp_path / "ckpt"
    save_pretrained(random_model(DeciCoderConfig.from_preset("tiny"), seed=0), checkpoint)
    saved = sorted(p.name for p in checkpoint.iterdir())
    (tmp_path / "link").symlink_to(checkpoint)
    monkeypatch.chdir(checkpoint)
    for out in (checkpoint, checkpoint / "export", tmp_path / "link", checkpoint / ".." / "ckpt"):
        argv = ["export", "--component", "rmsnorm", "--model", str(checkpoint), "--out", str(out), "--force"]
        assert main(argv) == 2, out
        assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in checkpoint.iterdir()) == saved


def test_export_inject_writes_the_faulty_graph_or_refuses_a_bug_that_cannot_show(tmp_path, capsys):
    import onnx

    out = tmp_path / "faulty"
    assert main(["export", "--component", "mlp", "--inject", "mlp_gate_up_swapped", "--out", str(out)]) == 0
    assert {"model.onnx", "faulty.onnx"} <= {p.name for p in out.iterdir()}
    assert "mlp_gate_up_swapped" in (out / "README.txt").read_text()
    assert [o.name for o in onnx.load(out / "faulty.onnx").graph.output] == ["gate", "up", "act", "down"]

    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["export", "--component", "rmsnorm", "--inject", "rope_interleaved", "--out", str(refused)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot show in rmsnorm" in err
    assert not refused.exists() and [p.name for p in tmp_path.iterdir()] == ["faulty"]


def test_printed_commands_name_this_interpreter(tmp_path, capsys):
    import shlex
    import sys

    out = tmp_path / "export"
    assert main(["export", "--component", "rmsnorm", "--out", str(out)]) == 0
    readme = (out / "README.txt").read_text()
    assert "  python " not in readme and "  polygraphy " not in readme and "--check polygraphy " not in readme
    assert f"{shlex.quote(sys.executable)} -m parity.reduce_check" in readme
    assert f"{shlex.quote(str(Path(sys.executable).parent / 'polygraphy'))} run model.onnx --onnxrt" in readme


def test_generate_with_an_injected_bug_names_the_first_step_out_of_tolerance(capsys):
    """Positions restarting at 0 in decode leave the prefill step right and the first decode step wrong."""
    status = main(["generate", "--prompt-ids", "5,17,230,9", "--max-new-tokens", "4", "--compare",
                   "--inject", "rope_offset_forgotten"])
    out = capsys.readouterr().out
    assert status == 1
    assert "injected bug: rope_offset_forgotten" in out and "logits leave tolerance at step 1" in out


# -- reports and help -------------------------------------------------------------------------------------------

def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["locate", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "(default: auto)" in out and "(default: tiny)" in out and "(default: 0)" in out


def test_tolerance_is_absolute_or_relative_per_element():
    """What polygraphy's elemwise check (compare_taps) accepts: |c - g| <= atol_tap OR <= rtol |g|,
    not numpy's atol + rtol |g|; atol_tap = atol x max(1, max |g|)."""
    from parity.compare import TOLERANCES, compare_taps

    tolerance = TOLERANCES[torch.float32]  # atol = rtol = 1e-5
    golden = np.array([1.0, 0.5], dtype=np.float32)  # atol_tap = 1e-5

    def passes(error: float) -> bool:
        return compare_taps({"t": golden}, {"t": golden + np.array([error, 0.0], np.float32)}, tolerance)[0].passed

    assert passes(0.9e-5) and not passes(1.5e-5)  # 1.5e-5 <= atol + rtol |g| = 2e-5, yet it fails
    scaled = np.array([100.0, 0.0], dtype=np.float32)  # atol_tap = 1e-3, applied to every element
    result = compare_taps({"t": scaled}, {"t": scaled + np.array([0.0, 0.9e-3], np.float32)}, tolerance)[0]
    assert result.passed and result.atol == pytest.approx(1e-3)


def test_plot_titles_its_verdict_and_draws_the_tolerance(tmp_path):
    from parity.check import CheckResult
    from parity.compare import TapResult
    from parity.locate import LocateReport
    from parity.report import plot
    from reference.inputs import CaseShape

    results = [TapResult("q", (2,), 0.0, 0.0, 0.0, 1.0, True, atol=1e-5),
               TapResult("probs", (2,), 0.5, 2.0, 0.1, 0.9, False, atol=1e-5)]
    report = LocateReport(CheckResult("gqa_masked", "onnx", torch.float32, CaseShape(), results),
                          bug="causal_mask_missing")
    axes = plot(report, "tiny").axes[0]
    assert axes.get_title() == "tiny gqa_masked (float32): DIVERGED, injected bug causal_mask_missing"
    assert [c.get_label() for c in axes.collections] == ["atol of the tap's largest row (elements also pass within rtol x |golden|)"]
    assert any("exactly 0" in t.get_text() for t in axes.texts)



@pytest.mark.parametrize("argv", [["locate", "--dtype", "fp16"], ["export", "--component", "rope", "--dtype", "fp16",
                                                                  "--out", "out"]], ids=["locate", "export"])
def test_fp16_where_onnxruntime_cannot_round_per_op_is_bad_usage(tmp_path, capsys, monkeypatch, argv):
    """Never fp32 called fp16: an onnxruntime that folds the per-op rounding away is refused up front."""
    from trt_layers.network import OnnxBackend

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(OnnxBackend, "fp16_rounding_gap", staticmethod(lambda: "onnxruntime 1.16 folds fp16 casts"))
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was built before validation"))
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: fp16 on the onnx backend: onnxruntime 1.16 folds fp16 casts\n"
    assert list(tmp_path.iterdir()) == []


def test_a_fault_of_the_suite_is_neither_a_verdict_nor_a_usage_error(monkeypatch, capsys):
    def crash(args):
        raise RuntimeError("a bug in the suite")

    monkeypatch.setitem(cli.COMMANDS, "list-bugs", crash)
    assert main(["list-bugs"]) == 3
    out, err = capsys.readouterr()
    assert "DIVERGED" not in out and err.count("\n") == 1 and "internal error" in err
