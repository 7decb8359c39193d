"""Layouts beyond the preset: ports that hard-code a DeciCoder-1b value, and locate --kv-heads.

The tiny preset shares DeciCoder-1b's rope_theta, rms_norm_eps and 4:1 head grouping, so a
port that hard-codes one of them passes every tiny check; tiny-variant changes each (and the
head count and dim), and the tiny layouts change the grouping (MHA, MQA). Each port below is
patched into trt_layers as the catalog bugs are, and must pass where its value happens to be
right and fail, at the named tap, where it is not.
"""

from dataclasses import replace

import pytest
import torch
from cases import Case

from parity.cli import main
from reference.inputs import CaseShape
from trt_layers import functional as F
from trt_layers.bugs import Bug, Shows


def _theta_10000(original):
    def rotary_tables(config, dtype):
        return original(replace(config, rope_theta=10000.0), dtype)  # create_sinusoidal_positions' default theta
    return rotary_tables


def _eps_1e5(original):
    def rmsnorm(x, weights, name, config, dtype):
        from trt_layers.modeling import param

        return F.rms_norm(x, (config.hidden_size,), weight=param(weights, name, dtype), eps=1e-5)
    return rmsnorm


def _four_query_heads_per_kv_head(original):
    def repeat_kv(x, n_rep):
        return original(x, 4)  # DeciCoder-1b's 32 / 4
    return repeat_kv


def _neox_qkv_for_mha(original):
    """GPT-NeoX's fused layout, per head (q_h, k_h, v_h), applied when the model is MHA."""
    def to_trtllm(state_dict, config):
        weights = dict(original(state_dict, config))
        if config.num_key_value_heads != config.num_attention_heads:
            return weights
        heads, d = config.num_attention_heads, config.head_dim
        for name in [n for n in weights if n.endswith("attention.qkv.weight")]:
            qkv = weights[name].reshape(3, heads, d, -1)  # [q | k | v] rows
            weights[name] = qkv.transpose(0, 1).reshape(3 * heads * d, -1)  # rows q_0 k_0 v_0 q_1 ...
        return weights
    return to_trtllm


def _ported(name, description, target, patch, component, first_tap, hypothesis, shape=CaseShape(2, 7)):
    return Bug(name, description, target, patch, component, first_tap, Shows((component,)), shape,
               hypothesis=hypothesis)


# (port, layouts where its value is right, layouts where it must fail at its first_tap)
HARD_CODED = [
    (_ported("rope_theta_10000", "RoPE tables built with the default theta 10000, not the config's",
             "trt_layers.modeling:rotary_tables", _theta_10000, "rope", "cos", "rope_theta"),
     ["kvheads2"], ["variant"]),
    (_ported("rmsnorm_eps_1e-5", "rms_norm with DeciCoder-1b's eps 1e-5, not the config's",
             "trt_layers.modeling:rmsnorm", _eps_1e5, "rmsnorm", "out", "norm_eps"), ["kvheads2"], ["variant"]),
    (_ported("kv_groups_4", "each KV head repeated for 4 query heads, DeciCoder-1b's 32:4",
             "trt_layers.modeling:repeat_kv", _four_query_heads_per_kv_head, "repeat_kv", "k_rep", "kv_groups"),
     ["kvheads2"], ["variant", "kvheads8", "kvheads1"]),
    (_ported("mha_qkv_per_head", "MHA checkpoints read with GPT-NeoX's per-head fused QKV",
             "trt_layers.weights:to_trtllm", _neox_qkv_for_mha, "gqa_masked", "q", "qkv_layout"),
     ["kvheads2", "kvheads1"], ["kvheads8"]),
]


def _cases(right: bool) -> list:
    return [pytest.param(Case(port.component, "onnx", layout, "fp32", port.shape, port), id=f"{port.name}-{layout}")
            for port, right_layouts, wrong_layouts in HARD_CODED
            for layout in (right_layouts if right else wrong_layouts)]


@pytest.mark.parametrize("case", _cases(right=True))
def test_hard_coded_value_passes_where_it_is_right(parity_check, case):
    parity_check(case).assert_passed()


@pytest.mark.parametrize("case", _cases(right=False))
def test_hard_coded_value_fails_at_its_tap_with_its_diagnosis(parity_check, case):
    check = parity_check(case)
    first, diagnosis = check.first_failure, check.diagnosis
    assert first is not None and first.name == case.bug.first_tap, f"{case.bug.name} on {case.layout}: {first}"
    assert diagnosis.hypothesis == case.bug.hypothesis, check.table()


def test_hard_coded_head_count_fails_to_build(reference_model):
    """A port written for 32 heads cannot build any test layout: caught before a tap runs."""
    from parity.check import build_candidate
    from trt_layers import modeling
    from trt_layers.network import OnnxBackend

    original = modeling.attention

    def attention(hidden_states, position_ids, weights, prefix, config, *args, **kwargs):
        return original(hidden_states, position_ids, weights, prefix, replace(config, num_attention_heads=32),
                        *args, **kwargs)

    for layout in ("kvheads2", "variant"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modeling, "attention", attention)
            with pytest.raises(ValueError, match="split: sections .* do not sum"):
                build_candidate("gqa_masked", reference_model(layout, torch.float32), OnnxBackend(), decode=False)


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_locate_kv_heads_picks_the_layout(capsys, kv_heads):
    assert main(["locate", "--component", "decoder_layer", "--past-len", "5", "--kv-heads", str(kv_heads)]) == 0
    out = capsys.readouterr().out
    assert f"(8 heads, {kv_heads} KV heads)" in out and "PASSED: 6 taps of decoder_layer decode" in out


def test_locate_kv_heads_catches_an_mha_only_bug(capsys):
    port, _, _ = HARD_CODED[-1]
    with port.injected():
        assert main(["locate", "--component", "gqa_masked", "--kv-heads", "2"]) == 0
        assert main(["locate", "--component", "gqa_masked", "--kv-heads", "8"]) == 1
    assert "DIVERGED: first diverging tap q " in capsys.readouterr().out


def test_locate_on_tiny_variant_catches_a_hard_coded_theta(capsys):
    port, _, _ = HARD_CODED[0]
    with port.injected():
        assert main(["locate", "--model", "tiny-variant", "--component", "rope"]) == 1
    assert "DIVERGED: first diverging tap cos " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--kv-heads", "3"], "--kv-heads 3 must divide the 8 attention heads of tiny"),
    (["--kv-heads", "4", "--model", "tiny-variant"], "--kv-heads 4 must divide the 6 attention heads"),
])
def test_locate_kv_heads_must_divide_the_heads(capsys, argv, message):
    assert main(["locate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
