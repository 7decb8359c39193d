"""The TensorRT-LLM backend's plumbing: feeds and outputs through polygraphy, profiles and their memory.

What runs here is polygraphy's own code (``BaseRunner.infer``'s input check, ``util.array.view``
of output bytes as ``TrtRunner`` does it); only the engine is stood in for. The engines
themselves are built and run by the ``trtllm``-marked test, on a GPU with TensorRT-LLM.
"""

from collections import OrderedDict
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
from polygraphy import util
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType
from polygraphy.exception import DataTypeConversionException, PolygraphyException

from conftest import DTYPES
from parity.check import build_candidate, check_component, needs_decode_graph
from reference import DeciCoderConfig, random_model
from reference.inputs import CaseShape, make_inputs
from trt_layers.network import Profile, TrtEngine, TrtllmBackend, largest_activation_bytes, to_feed

# What TrtRunner reports for the engine's inputs: TensorRT's types as polygraphy DataTypes.
ENGINE_TYPES = {np.dtype(np.float32): DataType.FLOAT32, np.dtype(np.float16): DataType.FLOAT16,
                np.dtype(ml_dtypes.bfloat16): DataType.BFLOAT16, np.dtype(np.int32): DataType.INT32}


class EchoRunner(BaseRunner):
    """A TrtRunner whose engine returns its inputs: polygraphy checks the feed against the engine's
    input types (``BaseRunner.infer``), and each output is host bytes viewed as the engine's type,
    as ``TrtRunner._infer_impl`` returns them (torch buffers for a torch feed, numpy otherwise)."""

    def __init__(self, metadata: TensorMetadata):
        super().__init__(prefix="echo-runner")
        self.metadata = metadata

    def get_input_metadata_impl(self):
        return self.metadata

    def infer_impl(self, feed_dict):
        outputs = OrderedDict()
        for name, array in feed_dict.items():
            host_bytes = util.array.view(util.array.make_contiguous(array), DataType.UINT8, (util.array.nbytes(array),))
            outputs[f"{name}.out"] = util.array.view(host_bytes, self.metadata[name].dtype, util.array.shape(array))
        return outputs


def echo_runner(feed: dict[str, np.ndarray]) -> EchoRunner:
    metadata = TensorMetadata()
    for name, array in feed.items():
        metadata.add(name, ENGINE_TYPES[array.dtype], (-1,) * array.ndim)
    return EchoRunner(metadata)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_trt_engine_feeds_and_reads_every_dtype_through_polygraphy(tiny_config, dtype):
    inputs = make_inputs("decoder_layer", tiny_config, CaseShape(2, 5, 3), DTYPES[dtype])
    feed = to_feed(inputs)  # int32 positions, hidden states and caches in the model dtype
    engine = TrtEngine(echo_runner(feed), serialized=b"", device="cpu")
    outputs = engine.infer(feed)
    assert list(outputs) == [f"{name}.out" for name in feed]
    for name, array in feed.items():
        out = outputs[f"{name}.out"]
        assert out.dtype == array.dtype and out.shape == array.shape, name
        assert out.tobytes() == array.tobytes(), name  # bit for bit


def test_numpy_bfloat16_is_what_polygraphy_refuses(tiny_config):
    """The failure the torch feed avoids, reproduced by the same polygraphy code the test above passes."""
    feed = to_feed(make_inputs("rmsnorm", tiny_config, CaseShape(1, 3), torch.bfloat16))
    with pytest.raises(PolygraphyException, match="unexpected dtype"), echo_runner(feed) as runner:
        runner.infer(feed)
    raw = np.zeros(8, dtype=np.uint8)  # TrtRunner's host buffer for a numpy feed
    with pytest.raises(DataTypeConversionException):
        util.array.view(raw, DataType.BFLOAT16, (4,))


def test_profile_is_the_case_and_the_whole_context_only_on_request(tiny_config):
    assert Profile.of(CaseShape(3, 7, 5)).dim_ranges() == {"batch": (1, 3, 3), "seq": (1, 7, 7), "past": (0, 5, 5)}
    assert Profile.whole_context(tiny_config) == Profile(8, 256, 255)
    assert TrtllmBackend().profile is None  # build() falls back to the whole context


def test_largest_activation_is_the_fp32_scores_or_the_logits():
    decicoder = DeciCoderConfig.from_preset("decicoder-1b")  # 32 heads, vocab 49152
    whole = Profile.whole_context(decicoder)
    assert largest_activation_bytes(decicoder, whole, torch.bfloat16) == 4 * 8 * 32 * 2048 * 4095  # scores, 8.6 GB
    default_case = Profile(2, 7)  # the command line's --batch 2 --seq-len 7
    assert largest_activation_bytes(decicoder, default_case, torch.float32) == 4 * 2 * 7 * 49152  # logits, 2.8 MB
    assert largest_activation_bytes(decicoder, default_case, torch.float32) < largest_activation_bytes(
        decicoder, whole, torch.float32) / 3000


@pytest.mark.trtllm
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("component", ["decoder_layer", "causal_lm"])
def test_trtllm_engines_sized_to_the_case_match_the_reference(tiny_config, component, dtype):
    """Prefill and decode engines built for exactly the case, bf16 included, tap by tap."""
    model = random_model(replace(tiny_config, num_key_value_heads=2), seed=0, dtype=DTYPES[dtype])
    for shape in (CaseShape(2, 9, 0), CaseShape(3, 1, 12)):
        backend = TrtllmBackend(Profile.of(shape))
        engine = build_candidate(component, model, backend, needs_decode_graph(component, shape))
        check_component(component, model, engine, backend.description, shape).assert_passed()
