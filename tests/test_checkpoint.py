"""Loading Hugging Face checkpoint directories, as a user's DeciCoder-1b download would be.

The good paths load a checkpoint written by transformers' own ``save_pretrained`` (and the
other layouts a Hub download can have) and must reproduce transformers' logits and greedy
tokens. The bad paths must fail with an error naming the file and key, writing nothing.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from parity.compare import assert_parity
from reference import CheckpointError, DeciCoderConfig, DeciCoderForCausalLM, load_model
from reference.configuration import DECICODER_1B
from reference.modeling import init_random_weights
from reference.oracle import CACHE_ARG, DECODE_STEPS, llama_config

FP32 = torch.float32


def _hf_llama(config: DeciCoderConfig, seed: int = 1) -> LlamaForCausalLM:
    return init_random_weights(LlamaForCausalLM(llama_config(config)), seed).eval()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_config):
    """transformers' LlamaForCausalLM (GQA 4:1) saved by its own save_pretrained."""
    llama = _hf_llama(tiny_config)
    directory = tmp_path_factory.mktemp("hf_llama")
    llama.save_pretrained(directory)
    return directory, llama


# (query heads, kv heads, rope theta): the three attention layouts, one with a non-default theta.
LAYOUTS = {"mha": (8, 8, 10000.0), "gqa4to1": (8, 2, 10000.0), "mqa": (8, 1, 500000.0)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_lm_loads_transformers_checkpoint(tmp_path, tiny_config, layout):
    heads, kv_heads, theta = LAYOUTS[layout]
    config = replace(tiny_config, num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=theta)
    llama = _hf_llama(config)
    llama.save_pretrained(tmp_path)
    model = DeciCoderForCausalLM.from_pretrained(tmp_path)
    assert model.config.rope_theta == theta  # llama_config passed it in this transformers' spelling

    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ours, theirs = model(ids), llama(ids, use_cache=True)
        assert_parity({"logits": theirs.logits}, {"logits": ours.logits}, FP32, title="prefill")
        for step in range(DECODE_STEPS):
            next_ids = theirs.logits[:, -1:].argmax(-1)
            ours = model(next_ids, past_key_values=ours.past_key_values)
            theirs = llama(next_ids, **{CACHE_ARG: getattr(theirs, CACHE_ARG)}, use_cache=True)
            assert_parity({"logits": theirs.logits}, {"logits": ours.logits}, FP32, title=f"decode step {step}")

    llama.generation_config.eos_token_id = None  # exactly 16 tokens on both sides
    expected = llama.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=16), expected)


def _write_sharded(directory: Path, state: dict, suffix: str) -> None:
    names = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.{suffix}": names[i::2] for i in range(2)}
    for shard, shard_names in shards.items():
        tensors = {n: state[n].contiguous() for n in shard_names}
        save_file(tensors, directory / shard) if suffix == "safetensors" else torch.save(tensors, directory / shard)
    index = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _deci_431_config(config: DeciCoderConfig) -> dict:
    """The config.json DeciCoder-1b ships (transformers 4.31 keys, no rope_theta), with tiny dims."""
    raw = dict(DECICODER_1B)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        raw[key] = getattr(config, key)
    return raw


WRITERS = {
    "safetensors_sharded": lambda d, state: _write_sharded(d, state, "safetensors"),
    "bin": lambda d, state: torch.save(state, d / "pytorch_model.bin"),
    "bin_sharded": lambda d, state: _write_sharded(d, state, "bin"),
}


@pytest.mark.parametrize("layout", WRITERS)
def test_causal_lm_loads_other_layouts_and_431_config(tmp_path, tiny_config, hf_checkpoint, layout):
    _, llama = hf_checkpoint
    (tmp_path / "config.json").write_text(json.dumps(_deci_431_config(tiny_config)))
    WRITERS[layout](tmp_path, {k: v.to(torch.bfloat16) for k, v in llama.state_dict().items()})
    model = DeciCoderForCausalLM.from_pretrained(tmp_path, dtype="bf16")
    expected = {k: v.to(torch.bfloat16) for k, v in llama.state_dict().items()}
    for name, param in model.state_dict().items():
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected[name]), name


def test_load_model_resolves_presets_and_directories(hf_checkpoint):
    directory, llama = hf_checkpoint
    assert load_model("tiny").config == DeciCoderConfig.from_preset("tiny")
    loaded = load_model(str(directory))
    assert torch.equal(loaded.lm_head.weight, llama.lm_head.weight)


def test_save_pretrained_roundtrip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    loaded = DeciCoderForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == tiny_model.config
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ---- bad input: a specific error naming the file and key, and nothing written ----

def _snapshot(directory: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


@pytest.fixture
def checkpoint_copy(tmp_path, hf_checkpoint):
    """A private copy of the transformers checkpoint that a test may damage."""
    source, _ = hf_checkpoint
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    (directory / "config.json").write_text(json.dumps(raw))


def _edit_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


_DELETE = object()

# damage -> the words the error must contain
BAD_CHECKPOINTS = {
    "config_not_json": (
        lambda d: (d / "config.json").write_text('{"hidden_size": 128,'),
        ["config.json", "not valid JSON", "line 1"]),
    "config_missing_key": (
        lambda d: _edit_config(d, hidden_size=_DELETE),
        ["config.json", "'hidden_size'", "<missing>"]),
    "config_wrong_type": (
        lambda d: _edit_config(d, num_attention_heads="8"),
        ["config.json", "'num_attention_heads'", "positive integer"]),
    "config_bad_heads": (
        lambda d: _edit_config(d, num_key_value_heads=3),
        ["config.json", "'num_key_value_heads'", "divisor"]),
    "config_rope_scaling": (
        lambda d: _edit_config(d, rope_parameters={"rope_type": "linear", "factor": 2.0}),
        ["config.json", "'rope_parameters'", "default"]),
    "config_gelu": (
        lambda d: _edit_config(d, hidden_act="gelu"),
        ["config.json", "'hidden_act'", "silu"]),
    "no_config": (
        lambda d: (d / "config.json").unlink(),
        ["config.json", "no such file"]),
    "no_weights": (
        lambda d: (d / "model.safetensors").unlink(),
        ["no weights found", "model.safetensors"]),
    "missing_tensor": (
        lambda d: _edit_weights(d, lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
        ["'model.layers.1.mlp.up_proj.weight'", "missing"]),
    "extra_tensor": (
        lambda d: _edit_weights(d, lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)})),
        ["model.safetensors", "'model.layers.9.mlp.up_proj.weight'", "not a DeciCoder parameter"]),
    "misshaped_tensor": (
        lambda d: _edit_weights(d, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 128)})),
        ["model.safetensors", "'model.layers.0.self_attn.k_proj.weight'", "[64, 128]", "[32, 128]"]),
    "integer_tensor": (
        lambda d: _edit_weights(d, lambda s: s.update({"model.norm.weight": torch.zeros(128, dtype=torch.int32)})),
        ["model.safetensors", "'model.norm.weight'", "floating-point"]),
    "truncated_safetensors": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
        ["model.safetensors", "cannot read tensors"]),
}


@pytest.mark.parametrize("damage", BAD_CHECKPOINTS)
def test_bad_checkpoint_names_file_and_key(checkpoint_copy, damage):
    break_checkpoint, expected_words = BAD_CHECKPOINTS[damage]
    break_checkpoint(checkpoint_copy)
    before = _snapshot(checkpoint_copy)
    with pytest.raises(CheckpointError) as error:
        DeciCoderForCausalLM.from_pretrained(checkpoint_copy)
    for words in expected_words:
        assert words in str(error.value)
    assert _snapshot(checkpoint_copy) == before, "loading changed the checkpoint directory"


def test_sharded_index_pointing_at_missing_shard(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    _write_sharded(tmp_path, dict(tiny_model.state_dict()), "safetensors")
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    missing_shard = r"model.safetensors.index.json: key .* points to model-00002-of-00002.safetensors"
    with pytest.raises(CheckpointError, match=missing_shard):
        DeciCoderForCausalLM.from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        DeciCoderForCausalLM.from_pretrained(tmp_path / "absent")


@pytest.mark.parametrize("dtype", ["int8", torch.float64, "fp8"])
def test_unsupported_dtype(hf_checkpoint, dtype):
    directory, _ = hf_checkpoint
    with pytest.raises(ValueError, match="unsupported dtype"):
        DeciCoderForCausalLM.from_pretrained(directory, dtype=dtype)
