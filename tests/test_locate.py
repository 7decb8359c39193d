"""`python -m parity locate`: the table, the exit status, the reports, and every catalog bug localized."""

import json
import re

import pytest
import torch

from conftest import layout_config
from parity.cli import main
from parity.locate import locate as run_locate, plan_checks
from reference.inputs import CaseShape
from trt_layers.bugs import BUGS
from trt_layers.network import OnnxBackend

SUITE = plan_checks(None, None, batch=2, seq_len=7, past_len=None)


def locate(capsys, *argv):
    status = main(["locate", *argv])
    return status, capsys.readouterr().out


def test_default_runs_every_component_then_the_whole_model_in_both_phases(capsys):
    status, out = locate(capsys)
    assert status == 0
    assert [check.label for check in SUITE] == [
        "repeat_kv", "rope prefill", "rope decode", "gqa_masked", "gqa_unmasked", "mlp", "rmsnorm",
        "decoder_layer prefill", "decoder_layer decode", "causal_lm prefill", "causal_lm decode"]
    assert "PASSED: 11 checks, 71 taps within fp32 tolerance" in out and "FAIL" not in out and "diagnosis" not in out
    assert "causal_lm [" in out and "past 5" in out and "piece by piece" in out


def _failed_checks(out: str) -> dict[str, str]:
    """check label -> first diverging tap, from the summary of a default locate."""
    return dict(re.findall(r"^  (\w+(?: prefill| decode)?) +FAIL at (\S+) \(", out, flags=re.M))


# One suite run per bug takes seconds: rmsnorm_default_eps runs by default (the whole model
# catches it only through reference.inputs.SCALED_TOKENS), the others with -m slow.
@pytest.mark.parametrize("bug", [pytest.param(bug, id=bug.name, marks=[] if bug.name == "rmsnorm_default_eps"
                                              else [pytest.mark.slow]) for bug in BUGS.values() if not bug.shows.tp])
def test_default_locate_catches_each_catalog_bug_at_its_tap(capsys, bug):
    """Exit 1, the catalog's check names the catalog's tap, and exactly the checks bug.shows allows fail."""
    status, out = locate(capsys, "--inject", bug.name, *_quant(bug))
    assert status == 1
    failed = _failed_checks(out)
    catalog_check = plan_checks(bug.component, None, 2, bug.shape.seq_len, bug.shape.past_len)[0]
    assert failed.get(catalog_check.label) == bug.first_tap, out
    tiny = layout_config("kvheads2")
    assert set(failed) == {c.label for c in SUITE if bug.shows.allows(c.component, c.shape, tiny, bug.shows.quant)}, \
        out


def _quant(bug) -> list[str]:
    """The --quant a bug in a quantized layout needs to show."""
    return ["--quant", bug.shows.quant] if bug.shows.quant else []


def _rmsnorm_squaring_in_fp16(x, weights, name, config, dtype):
    """A port's RMSNorm without the fp32 upcast: x * x overflows fp16 once |x| > 256."""
    from trt_layers.modeling import param

    variance = (x * x).mean(-1, keepdim=True)
    return x / (variance + config.rms_norm_eps).sqrt() * param(weights, name, dtype)


def test_whole_model_inputs_hold_rows_where_eps_and_fp16_range_matter(capsys, monkeypatch):
    """Both pass without reference.inputs.SCALED_TOKENS: random weights keep hidden states near RMS 1."""
    from trt_layers import modeling

    assert main(["locate", "--component", "causal_lm", "--inject", "rmsnorm_default_eps"]) == 1
    monkeypatch.setattr(modeling, "rmsnorm", _rmsnorm_squaring_in_fp16)
    assert main(["locate", "--component", "causal_lm", "--dtype", "fp16"]) == 1
    assert capsys.readouterr().out.count("DIVERGED: first diverging tap layer_0.present_k") == 2


@pytest.mark.parametrize("bug", [pytest.param(bug, id=bug.name, marks=[pytest.mark.slow] if bug.shows.tp else [])
                                 for bug in BUGS.values()])
def test_each_catalog_bug_is_localized(capsys, bug):
    """A tensor-parallel bug at its TP size (rank processes take seconds to start: -m slow)."""
    tp = ["--tp", str(bug.tp_size)] if bug.shows.tp else []
    status, out = locate(capsys, "--component", bug.component, "--inject", bug.name, *_quant(bug), *tp,
                         "--past-len", str(bug.shape.past_len), "--seq-len", str(bug.shape.seq_len))
    assert status == 1
    if bug.shows.tp:
        assert f"at {bug.first_tap} on rank {bug.first_rank} (max abs" in out.splitlines()[-1], out
    else:
        assert f"DIVERGED: first diverging tap {bug.first_tap} " in out


def test_whole_model_names_the_layer_then_the_tap_inside_it(capsys):
    status, out = locate(capsys, "--component", "causal_lm", "--inject", "layernorms_swapped")
    assert status == 1
    assert "first diverging tap layer_0.present_k" in out
    assert "Inside layer 0, the first diverging tap is input_norm." in out


def test_decode_streams_with_the_cache(capsys):
    status, out = locate(capsys, "--component", "causal_lm", "--past-len", "5", "--seq-len", "1")
    assert status == 0 and "layer_1.present_k        [2, 2, 6, 16]" in out


@pytest.mark.parametrize("argv,message", [
    (["--component", "mlp", "--phase", "decode"], "mlp has no decode graph"),
    (["--component", "decoder_layer", "--phase", "prefill", "--past-len", "3"], "prefill has no cache"),
    (["--component", "causal_lm", "--phase", "decode", "--past-len", "0"], "decode needs cached tokens"),
    (["--past-len", "0"], "decode needs cached tokens"),
    (["--component", "gqa_masked", "--past-len", "3"], "gqa_masked is the prefill path"),
    (["--dtype", "bf16"], "bfloat16"),
    (["--json", "report.json"], "--json, --markdown and --plot report one check: add --component"),
    (["--model", "no/such/dir"], "--model no/such/dir: neither a preset (decicoder-1b, tiny, tiny-variant) nor"),
])
def test_bad_usage_exits_2(capsys, argv, message):
    assert main(["locate", *argv]) == 2
    assert message in capsys.readouterr().err


# The requests of issue 11 that printed PASSED though the bug could not show, and what shows it.
@pytest.mark.parametrize("argv,shows_in", [
    (["--component", "causal_lm", "--inject", "decode_masked"], "it shows in gqa_unmasked with --seq-len >= 2"),
    (["--component", "decoder_layer", "--past-len", "5", "--inject", "decode_masked"], "it shows in gqa_unmasked"),
    (["--inject", "decode_masked", "--seq-len", "1"], "e.g. --component gqa_unmasked --seq-len 7 --past-len 5"),
    (["--component", "rope", "--inject", "rope_offset_forgotten"], "with --past-len >= 1 (decode)"),
    (["--component", "gqa_unmasked", "--past-len", "0", "--inject", "kv_append_reversed"],
     "it shows in gqa_unmasked, decoder_layer, causal_lm with --past-len >= 1 (decode)"),
    (["--component", "rmsnorm", "--inject", "rope_interleaved"], "it shows in rope, gqa_masked"),
    (["--kv-heads", "1", "--inject", "repeat_kv_tiled"], "with grouped KV heads (1 < --kv-heads < heads; with --tp N, on each rank)"),
    (["--model", "tiny-variant", "--inject", "rmsnorm_default_eps"], "with rms_norm_eps other than 1e-06"),
])
def test_a_bug_that_cannot_show_is_refused(capsys, argv, shows_in):
    assert main(["locate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "cannot show in" in captured.err and shows_in in captured.err


# Where bugs.py says a bug cannot show, the check indeed passes with it injected (the default
# locate per bug checks the rest of bug.shows: exactly the allowed checks fail).
@pytest.mark.parametrize("bug,component,shape,layout", [
    ("decode_masked", "decoder_layer", CaseShape(2, 7, 5), "kvheads2"),
    ("decode_masked", "gqa_unmasked", CaseShape(2, 1, 5), "kvheads2"),
    ("causal_mask_missing", "gqa_masked", CaseShape(2, 1, 0), "kvheads2"),
    ("rope_interleaved", "rope", CaseShape(2, 1, 0), "kvheads2"),
    ("rope_offset_forgotten", "rope", CaseShape(2, 7, 0), "kvheads2"),
    ("kv_append_reversed", "gqa_unmasked", CaseShape(2, 7, 0), "kvheads2"),
    ("repeat_kv_tiled", "repeat_kv", CaseShape(2, 7, 0), "kvheads8"),
    ("repeat_kv_tiled", "repeat_kv", CaseShape(2, 7, 0), "kvheads1"),
    ("rmsnorm_default_eps", "rmsnorm", CaseShape(2, 7, 0), "variant"),
], ids=lambda value: value if isinstance(value, str) else f"s{value.seq_len}-p{value.past_len}")
def test_where_a_bug_cannot_show_its_check_passes(reference_model, bug, component, shape, layout):
    import torch

    bug = BUGS[bug]
    model = reference_model(layout, torch.float32)
    assert not bug.shows.allows(component, shape, model.config)
    assert run_locate(component, model, OnnxBackend(), shape, bug).exit_code == 0


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_:
        main(["locate", "--inject", "no_such_bug"])
    assert exit_.value.code == 2


def test_kv_heads_of_a_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["locate", "--model", str(tmp_path), "--kv-heads", "2"]) == 2
    assert "--kv-heads lays out a preset's random weights" in capsys.readouterr().err


def test_broken_checkpoint_exits_2(tmp_path, capsys, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 128')
    assert main(["locate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not valid JSON" in err


def test_json_is_stable_and_markdown_written(tmp_path, capsys):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        assert main(["locate", "--component", "causal_lm", "--inject", "rope_interleaved", "--json", str(path),
                     "--markdown", str(tmp_path / "report.md")]) == 1
    assert paths[0].read_bytes() == paths[1].read_bytes()
    report = json.loads(paths[0].read_text())
    assert report["first_failure"] == "layer_0.present_k" and report["inject"] == "rope_interleaved"
    assert [t["name"] for t in report["taps"]][:4] == ["embed", "layer_0.present_k", "layer_0.present_v", "layer_0.out"]
    assert {k: report["diagnosis"][k] for k in ("tap", "hypothesis")} == {"tap": "layer_0.attn.q_rot",
                                                                            "hypothesis": "rope_layout"}, report
    assert report["diagnosis"]["residual_max_abs"] < 1e-5 and "rope_gpt_neox" in report["diagnosis"]["hint"]
    markdown = (tmp_path / "report.md").read_text()
    assert "**FAIL (first)**" in markdown and "\ndiagnosis: rope_layout at layer_0.attn.q_rot: " in markdown


def test_a_passing_report_has_no_diagnosis(tmp_path, capsys):
    assert main(["locate", "--component", "rope", "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["diagnosis"] is None
    assert "diagnosis" not in capsys.readouterr().out


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


def _scaled_layer_weight(layer: int, name: str, factor: float):
    """A port that maps one weight of one layer wrong (scaled): only that layer computes differently."""
    from collections import ChainMap

    def patch(original):
        def to_trtllm(state_dict, config):
            weights = original(state_dict, config)
            key = f"transformer.layers.{layer}.{name}"
            return ChainMap({key: weights[key] * factor}, weights)
        return to_trtllm
    return patch


def test_each_layer_is_judged_on_its_own_input(reference_model, monkeypatch):
    """A wrong weight in layer 0 fails layer 0 alone: the golden reruns layer 1 on the candidate's
    (wrong) layer-0 output, so layer 1, itself right, passes."""
    from trt_layers import weights

    model = reference_model("kvheads2", torch.float32)
    monkeypatch.setattr(weights, "to_trtllm", _scaled_layer_weight(0, "attention.dense.weight", 1.5)(weights.to_trtllm))
    report = run_locate("causal_lm", model, OnnxBackend(), CaseShape(2, 7))
    verdicts = {r.name: r.passed for r in report.check.results}
    assert not verdicts["layer_0.out"] and verdicts["layer_1.out"] and verdicts["layer_1.present_k"]
    assert report.first_failure.name == "layer_0.out" and report.layer_detail[0] == 0


def test_a_refitted_layer_engine_computes_what_a_fresh_build_does(reference_model):
    """The decoder-layer engine built once and refitted with layer 1's weights (folded constants
    recomputed) gives the same outputs as an engine built with them."""
    import numpy as np

    from reference.inputs import make_inputs
    from trt_layers import weights as weight_mapping
    from trt_layers.network import build_component, refit_layer, to_feed

    model = reference_model("kvheads2", torch.float32)
    weights = weight_mapping.to_trtllm(model.state_dict(), model.config)
    feed = to_feed(make_inputs("decoder_layer", model.config, CaseShape(2, 7), torch.float32))
    refitted = build_component("layer", model.config, weights, torch.float32, OnnxBackend(), layer=0)
    refit_layer(refitted, weights, torch.float32, 1)
    built = build_component("layer", model.config, weights, torch.float32, OnnxBackend(), layer=1)
    for name, array in built.infer(feed).items():
        np.testing.assert_array_equal(refitted.infer(feed)[name], array, err_msg=name)
    with pytest.raises(ValueError, match="refit: transformer.layers.0.mlp.fc.weight float32 \\[3, 3\\]"):
        refitted.refit({"transformer.layers.0.mlp.fc.weight": np.zeros((3, 3), np.float32)})


def test_the_head_judged_in_token_blocks_matches_it_judged_whole(reference_model, monkeypatch):
    from parity import locate as locate_module

    model = reference_model("kvheads2", torch.float32)
    whole = run_locate("causal_lm", model, OnnxBackend(), CaseShape(2, 7)).check.results
    monkeypatch.setattr(locate_module, "HEAD_BLOCK_BYTES", 4 * 2 * model.config.vocab_size * 3)  # 3 tokens a block
    blocks = run_locate("causal_lm", model, OnnxBackend(), CaseShape(2, 7)).check.results
    for a, b in zip(whole[-2:], blocks[-2:]):  # a Gemm over fewer rows may round differently
        assert (a.name, a.shape, a.passed) == (b.name, b.shape, b.passed)
        assert a.max_abs == pytest.approx(b.max_abs, abs=1e-6) and a.cosine == pytest.approx(b.cosine, abs=1e-9)
    tied = run_locate("causal_lm", model, OnnxBackend(), CaseShape(2, 7), BUGS["lm_head_tied"])
    assert tied.first_failure.name == "logits"


@pytest.mark.gpu
def test_golden_on_the_gpu(capsys):
    status, out = locate(capsys, "--component", "causal_lm", "--device", "cuda")
    assert status == 0 and "golden:    reference DeciCoder (torch" in out and ", cuda, " in out


def test_device_cuda_without_a_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert main(["locate", "--device", "cuda"]) == 2
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err
