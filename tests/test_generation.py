"""Generation-level parity and the `generate` command (through the ONNX lowering here)."""

import numpy as np
import pytest
import torch
from cases import backend_params

from parity.cli import main
from parity.generation import compare_generation
from trt_layers.bugs import BUGS
from trt_layers.generation import Sampling

# (prompt length, batch): several lengths; prompts of one length share a batch (no padding).
PROMPTS = [(1, 1), (5, 3), (17, 2), (40, 1)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("prompt_len,batch", PROMPTS, ids=[f"p{p}-b{b}" for p, b in PROMPTS])
def test_causal_lm_generation_is_identical_for_32_tokens(tiny_model, tiny_engines, backend, prompt_len, batch):
    ids = torch.randint(0, tiny_model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(prompt_len))
    result = compare_generation(tiny_model, tiny_engines(backend), ids, max_new_tokens=32)
    assert result.identical, result.describe()


def test_causal_lm_generation_reports_the_first_mismatch_of_a_buggy_port(tiny_model, tiny_engines):
    """Positions that restart at 0 in decode leave prefill intact and derail the first decode step."""
    buggy = tiny_engines("onnx", BUGS["rope_offset_forgotten"])
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    result = compare_generation(tiny_model, buggy, ids, max_new_tokens=32)
    assert result.first_mismatch is not None and result.first_mismatch >= 1
    assert result.margin > 0 and "first mismatch at step" in result.describe()


def test_sampling_is_reproducible_and_differs_from_greedy(tiny_engines):
    ids = np.array([[1, 2, 3]])
    sampled = [tiny_engines("onnx").generate(ids, 12, Sampling(temperature=1.5, top_k=50, seed=7))[0] for _ in range(2)]
    greedy, _ = tiny_engines("onnx").generate(ids, 12)
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], greedy)


def test_generate_command_compares_with_the_reference(capsys):
    assert main(["generate", "--prompt-ids", "1,2,3;4,5,6", "--max-new-tokens", "8", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "identical" in out and out.count("\ntokens: ") == 2


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", "1,2;3"], "same, non-zero number of tokens"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,99999"], "token ids must lie in"),
    (["--prompt", "def f():"], "--prompt needs --tokenizer"),
    (["--prompt-ids", "1", "--max-new-tokens", "300"], "exceed the context"),
])
def test_generate_bad_input_exits_2(capsys, argv, message):
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_build_command_writes_engines_that_run(tmp_path, tiny_model):
    """(The fast path's part of ``build`` is tested in test_fast_path.py.)"""
    import onnxruntime

    from parity.compare import assert_parity

    assert main(["build", "--out", str(tmp_path)]) == 0
    assert {"prefill.onnx", "decode.onnx", "config.json"} <= {p.name for p in tmp_path.iterdir()}
    session = onnxruntime.InferenceSession(str(tmp_path / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 230, 9]], dtype=np.int32)
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"input_ids": ids, "position_ids": np.arange(4, dtype=np.int32)[None]})))
    with torch.no_grad():
        golden = tiny_model(torch.from_numpy(ids).long())
    assert_parity({"logits": golden.logits}, {"logits": outputs["logits"]}, torch.float32, title="built prefill.onnx")


def test_generate_from_text_with_a_local_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<eos>", "def", "f", "(", ")", ":", "return", "x", "[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    assert main(["generate", "--prompt", "def f ( x ) :", "--tokenizer", str(tmp_path), "--max-new-tokens", "4",
                 "--compare"]) == 0
    out = capsys.readouterr().out
    assert "\ntext: " in out and "identical" in out
