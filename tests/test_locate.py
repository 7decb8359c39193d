"""`python -m parity locate`: the table, the exit status, the reports, and every catalog bug localized."""

import json

import pytest

from parity.cli import main
from trt_layers.bugs import BUGS


def locate(capsys, *argv):
    status = main(["locate", *argv])
    return status, capsys.readouterr().out


def test_tiny_model_passes_with_a_clean_table(capsys):
    status, out = locate(capsys)
    assert status == 0
    assert "PASSED: 9 taps of causal_lm" in out and "FAIL" not in out
    assert "per-layer engines" in out


@pytest.mark.parametrize("bug", BUGS.values(), ids=list(BUGS))
def test_each_catalog_bug_is_localized(capsys, bug):
    status, out = locate(capsys, "--component", bug.component, "--inject", bug.name,
                         "--past-len", str(bug.shape.past_len), "--seq-len", str(bug.shape.seq_len))
    assert status == 1
    assert f"DIVERGED: first diverging tap {bug.first_tap} " in out


def test_whole_model_names_the_layer_then_the_tap_inside_it(capsys):
    status, out = locate(capsys, "--inject", "layernorms_swapped")
    assert status == 1
    assert "first diverging tap layer_0.present_k" in out
    assert "Inside layer 0, the first diverging tap is input_norm." in out


def test_decode_streams_with_the_cache(capsys):
    status, out = locate(capsys, "--past-len", "5", "--seq-len", "1")
    assert status == 0 and "layer_1.present_k        [2, 2, 6, 16]" in out


@pytest.mark.parametrize("argv,message", [
    (["--component", "mlp", "--phase", "decode"], "mlp has no decode graph"),
    (["--component", "decoder_layer", "--phase", "prefill", "--past-len", "3"], "prefill has no cache"),
    (["--component", "causal_lm", "--phase", "decode"], "--phase decode needs cached tokens"),
    (["--component", "gqa_masked", "--past-len", "3"], "gqa_masked is the prefill path"),
    (["--dtype", "bf16"], "bfloat16"),
])
def test_bad_usage_exits_2(capsys, argv, message):
    assert main(["locate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_:
        main(["locate", "--inject", "no_such_bug"])
    assert exit_.value.code == 2


def test_broken_checkpoint_exits_2(tmp_path, capsys, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 128')
    assert main(["locate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not valid JSON" in err


def test_json_is_stable_and_markdown_written(tmp_path, capsys):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        assert main(["locate", "--inject", "rope_interleaved", "--json", str(path),
                     "--markdown", str(tmp_path / "report.md")]) == 1
    assert paths[0].read_bytes() == paths[1].read_bytes()
    report = json.loads(paths[0].read_text())
    assert report["first_failure"] == "layer_0.present_k" and report["inject"] == "rope_interleaved"
    assert [t["name"] for t in report["taps"]][:4] == ["embed", "layer_0.present_k", "layer_0.present_v", "layer_0.out"]
    assert "**FAIL (first)**" in (tmp_path / "report.md").read_text()


def test_plot_has_one_line_per_quantity_and_labelled_axes(tmp_path, capsys):
    import matplotlib.image

    path = tmp_path / "errors.png"
    assert main(["locate", "--component", "gqa_masked", "--inject", "causal_mask_missing", "--plot", str(path)]) == 1
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100

    from parity.locate import locate as run_locate
    from parity.report import plot
    from reference import DeciCoderConfig, random_model
    from reference.inputs import CaseShape
    from trt_layers.network import OnnxBackend

    model = random_model(DeciCoderConfig.from_preset("tiny"))
    figure = plot(run_locate("causal_lm", model, OnnxBackend(), CaseShape()))
    axes = figure.axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == ["max abs error", "mean abs error", "1 - cosine similarity"]
    assert axes.get_xlabel() and axes.get_ylabel() and axes.get_yscale() == "log"
