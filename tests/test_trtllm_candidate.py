"""locate --candidate on a TensorRT-LLM engine directory (trtllm-build --enable_debug_output):
the directory is checked before anything is built, and on a GPU with TensorRT-LLM an engine of the
native LLaMA, its layers' outputs registered as a port would register them, is judged tap by tap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parity import trtllm_port
from parity.cli import main
from parity.onnx_port import golden_order
from parity.trtllm_port import CONTEXT_LOGITS, as_batch_seq, automatic_names
from reference import random_model, save_pretrained
from trt_layers import fast_path

def _directory(directory, config, edit=lambda engine_config: None, engine: bool = True):
    """An engine directory's config.json (as trtllm-build writes it) for ``config``, edited; a stand-in rank0.engine."""
    engine_config = {
        "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": "float32",
                              **{field: getattr(config, field) for field in trtllm_port.DIMS},
                              "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}},
        "build_config": {"enable_debug_output": True, "gather_context_logits": True}}
    edit(engine_config)
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(engine_config))
    if engine:
        (directory / "rank0.engine").write_bytes(b"not run here")
    return directory


@pytest.mark.parametrize("make, message", [
    (lambda d, c: d, "a directory without config.json, not a TensorRT-LLM engine directory"),
    (lambda d, c: (d / "config.json").write_text("{"), "cannot read config.json as JSON (JSONDecodeError"),
    (lambda d, c: (d / "config.json").write_text("[" * 100000 + "]" * 100000),
     "cannot read config.json as JSON (RecursionError"),
    (lambda d, c: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'),
     "config.json has no pretrained_config: a checkpoint (Hugging Face's or convert_checkpoint's) rather than"),
    (lambda d, c: (d / "config.json").write_text('{"pretrained_config": [], "build_config": {}}'),
     "config.json is not a TensorRT-LLM engine config"),
    (lambda d, c: _directory(d, c, lambda e: e["build_config"].update(enable_debug_output=False)),
     "built without --enable_debug_output"),
    (lambda d, c: _directory(d, c, lambda e: e["build_config"].update(enable_debug_output="false")),
     "built without --enable_debug_output"),
    (lambda d, c: _directory(d, c, lambda e: e["pretrained_config"]["mapping"].update(world_size=2, tp_size=2)),
     "built for world_size 2, tp_size 2, pp_size 1; locate reads a single-rank engine"),
    (lambda d, c: _directory(d, c, engine=False), "no rank0.engine beside config.json"),
    (lambda d, c: _directory(d, c, lambda e: e["pretrained_config"].update(num_hidden_layers=3)),
     "its num_hidden_layers is 3, the golden's 2: build it from the same model"),
    (lambda d, c: _directory(d, c, lambda e: e["pretrained_config"].update(dtype="float16")),
     "built in float16: pass --dtype fp16"),
], ids=["no-config", "bad-json", "deep-json", "a-checkpoint", "config-a-list", "no-debug-output",
        "debug-output-a-string", "two-ranks", "no-engine", "other-layer-count", "other-dtype"])
def test_a_directory_that_is_no_debuggable_engine_is_bad_usage(tmp_path, capsys, tiny_config, make, message):
    """Checked before the golden is built, and before anything needs TensorRT-LLM."""
    directory = tmp_path / "engine"
    directory.mkdir()
    make(directory, tiny_config)
    before = sorted(p.name for p in directory.iterdir())
    assert main(["locate", "--model", "tiny", "--candidate", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in directory.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--candidate", "{dir}/config.json"], "a file of a TensorRT-LLM engine directory: pass the directory"),
    (["--candidate", "{dir}/rank0.engine"], "a file of a TensorRT-LLM engine directory: pass the directory"),
    (["--candidate", "{dir}", "--json", "{dir}/config.json"], "would overwrite the candidate or its tap map"),
    (["--candidate", "{dir}", "--markdown", "{dir}/report.md"], "would overwrite the candidate or its tap map"),
    (["--candidate", "{dir}", "--tap-map", "{dir}/config.json"], "expected an object of golden tap -> tensor name"),
])
def test_misdirected_paths_are_bad_usage(tmp_path, capsys, tiny_config, args, message):
    directory = _directory(tmp_path / "engine", tiny_config)
    written = (directory / "config.json").read_bytes()
    assert main(["locate", "--model", "tiny", *(arg.format(dir=directory) for arg in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "rank0.engine"]
    assert (directory / "config.json").read_bytes() == written


def test_an_engine_directory_without_tensorrt_llm_is_bad_usage(tmp_path, capsys, tiny_config):
    from parity.backends import skip_reason

    if skip_reason("trtllm") is None:
        pytest.skip("TensorRT-LLM and a GPU are here: the engine runs (test_engine_directory_...)")
    assert main(["locate", "--model", "tiny", "--candidate", str(_directory(tmp_path / "engine", tiny_config))]) == 2
    assert "runs on TensorRT-LLM and a CUDA GPU" in capsys.readouterr().err


def test_outputs_come_back_as_batch_by_sequence():
    """Without padding an engine packs the tokens, [batch * seq, ...] or [1, batch * seq, ...];
    context logits come as one [seq, vocab] per row."""
    values = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    for packed in (values.reshape(6, 4), values.reshape(1, 6, 4), [values[0], values[1]], values):
        np.testing.assert_array_equal(as_batch_seq(packed, (2, 3)), values.numpy())


def test_taps_named_as_the_golden_names_them_map_by_themselves(tiny_config):
    names = automatic_names(tiny_config.num_hidden_layers)
    assert names["layer_1.out"] == "transformer.layers.1.out" and names["logits"] == CONTEXT_LOGITS
    assert names["layer_0.attn.q_rot"] == "transformer.layers.0.attn.q_rot"
    assert set(names) == set(golden_order(tiny_config))


def _engine_directory(model, directory, monkeypatch):
    """The native LLaMA engine of ``model``, each decoder layer registering its output as ``out``."""
    from tensorrt_llm.models.llama.model import LLaMADecoderLayer

    forward = LLaMADecoderLayer.forward

    def registering_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        self.register_network_output("out", output[0] if isinstance(output, tuple) else output)
        return output

    monkeypatch.setattr(LLaMADecoderLayer, "forward", registering_forward)
    fast_path.write_checkpoint(model, directory / "checkpoint")
    options = fast_path.build_options(model.config, torch.float32, max_batch_size=2, max_input_len=32)
    return fast_path.build_engine(directory / "checkpoint", directory / "engine", options,
                                  enable_debug_output=True, gather_context_logits=True)


@pytest.mark.trtllm
def test_engine_directory_passes_and_a_swapped_mlp_is_found_in_its_layer(tmp_path, monkeypatch, plugin_config):
    model = random_model(plugin_config, seed=0)
    save_pretrained(model, tmp_path / "hf")
    swapped = random_model(plugin_config, seed=0)
    mlp = swapped.model.layers[1].mlp
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone(), mlp.gate_proj.weight.data
    for name, port_model, code, first in (("clean", model, 0, None), ("swapped", swapped, 1, "layer_1.out")):
        engine = _engine_directory(port_model, tmp_path / name, monkeypatch)
        report = tmp_path / f"{name}.json"
        assert main(["locate", "--model", str(tmp_path / "hf"), "--candidate", str(engine), "--seq-len", "16",
                     "--json", str(report)]) == code
        verdict = json.loads(report.read_text())
        assert {tap["name"] for tap in verdict["taps"]} == {"layer_0.out", "layer_1.out", "logits"}, verdict
        assert verdict["first_failure"] == first, verdict
