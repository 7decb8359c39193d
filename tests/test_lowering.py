"""The ONNX lowering, op by op, against torch; its TensorRT-style static shapes; its strictness."""

import numpy as np
import pytest
import torch

from trt_layers import functional as F
from trt_layers import lowering
from trt_layers.network import InputSpec, OnnxBackend

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3}  # one op: a rounding or two of the result dtype
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32", torch.int64: "int64"}


def run_lowered(graph, **inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Build ``graph`` (named lowered inputs -> named outputs) and run it; every input dim but the
    last is dynamic, as batch and sequence are in the port."""
    specs = [InputSpec(name, DTYPE_NAMES[t.dtype], (*(f"{name}_{i}" for i in range(t.ndim - 1)), t.shape[-1]))
             for name, t in inputs.items()]
    engine = OnnxBackend().build("op", specs, graph, config=None, dtype=None)
    return engine.infer({name: t.numpy() for name, t in inputs.items()})


def assert_close(actual: np.ndarray, expected: torch.Tensor):
    atol = ATOL.get(expected.dtype, 0)
    np.testing.assert_allclose(actual.astype(np.float64), expected.double().numpy(), atol=atol, rtol=atol)


@pytest.fixture(params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def dtype(request):
    return request.param


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def test_matmul_transb_and_fp32_accumulation(dtype):
    x, w = randn(2, 3, 8, dtype=dtype), randn(5, 8, dtype=dtype)
    out = run_lowered(lambda i: {"y": F.matmul(i["x"], F.constant(w.numpy()), transb=True)}, x=x)
    assert_close(out["y"], (x.float() @ w.float().T).to(dtype))


def test_elementwise_with_python_scalars_and_broadcast(dtype):
    x, y = randn(2, 3, 4, dtype=dtype), randn(4, dtype=dtype)
    out = run_lowered(lambda i: {"z": (i["x"] * 0.5 + i["y"]) / 2.0 - 1.0}, x=x, y=y)
    assert_close(out["z"], (x * 0.5 + y) / 2.0 - 1.0)


def test_cast_silu_softmax(dtype):
    x = randn(2, 5, 7)
    out = run_lowered(lambda i: {"silu": F.silu(F.cast(i["x"], DTYPE_NAMES[dtype])),
                                 "softmax": F.softmax(i["x"], dim=-1)}, x=x)
    assert_close(out["silu"], torch.nn.functional.silu(x.to(dtype)))
    assert_close(out["softmax"], torch.softmax(x, dim=-1))


def test_rms_norm_matches_llama_formula(dtype):
    x, w = randn(2, 3, 16, dtype=dtype), randn(16, dtype=dtype)
    out = run_lowered(lambda i: {"y": F.rms_norm(i["x"], 16, weight=F.constant(w.numpy()), eps=1e-5)}, x=x)
    x32 = x.float()
    expected = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * w
    assert_close(out["y"], expected)


def test_view_permute_split_concat_with_shape_tensors():
    x = randn(2, 3, 12)

    def graph(i):
        x = i["x"]
        heads = x.view(F.concat([F.shape(x, 0), F.shape(x, 1), 3, 4])).permute([0, 2, 1, 3])  # [b, 3, s, 4]
        a, b = F.split(x, [5, 7], dim=2)
        return {"heads": heads, "rejoined": F.concat([b, a], dim=2), "unsqueezed": F.unsqueeze(a, 1)}

    out = run_lowered(graph, x=x)
    assert_close(out["heads"], x.view(2, 3, 3, 4).permute(0, 2, 1, 3))
    assert_close(out["rejoined"], torch.cat([x[..., 5:], x[..., :5]], dim=2))
    assert_close(out["unsqueezed"], x[..., :5].unsqueeze(1))


def test_repeat_interleave_and_expand():
    k = randn(2, 2, 5, 4)

    def graph(i):
        ones = F.unsqueeze(F.unsqueeze(F.shape(i["k"], 0), 0), 0)  # [1, 1] int64, value b
        return {"rep": F.repeat_interleave(i["k"], 3, 1),
                "expanded": F.expand(F.unsqueeze(i["k"], 0), F.concat([2, 2, 2, 5, 4])),
                "ones": ones}

    out = run_lowered(graph, k=k)
    assert_close(out["rep"], k.repeat_interleave(3, dim=1))
    assert_close(out["expanded"], k.unsqueeze(0).expand(2, 2, 2, 5, 4))
    assert out["ones"].tolist() == [[2]]


def test_embedding_arange_where_identity():
    table, ids = randn(10, 4), torch.tensor([[1, 7, 3]], dtype=torch.int32)

    def graph(i):
        zero = F.constant(np.asarray(0, dtype=np.int64))
        positions = F.arange(zero, F.shape(i["ids"], 1), "int64")  # [s]
        mask = F.where(F.unsqueeze(positions, 0) > F.unsqueeze(positions, 1), float("-inf"), 0.0)
        return {"emb": F.embedding(i["ids"], F.constant(table.numpy())), "mask": mask,
                "same": F.identity(positions)}

    out = run_lowered(graph, ids=ids)
    assert_close(out["emb"], table[ids.long()])
    np.testing.assert_array_equal(out["mask"], torch.full((3, 3), float("-inf")).triu(1).numpy())
    assert out["same"].tolist() == [0, 1, 2]


def test_rope_utils_match_transformers_rotations():
    from transformers.models.llama.modeling_llama import rotate_half

    x = randn(1, 2, 3, 8)
    out = run_lowered(lambda i: {"half": F.RopeEmbeddingUtils.rotate_half(i["x"]),
                                 "two": F.RopeEmbeddingUtils.rotate_every_two(i["x"])}, x=x)
    assert_close(out["half"], rotate_half(x))
    assert_close(out["two"], torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2))
    table = lowering.RopeEmbeddingUtils.create_sinusoidal_positions(16, 8, 10000.0)[0]  # [pos, d]: sin | cos
    angles = torch.arange(16.0)[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    np.testing.assert_allclose(table, torch.cat([angles.sin(), angles.cos()], -1).numpy(), atol=1e-6)


def test_torch_to_numpy_keeps_bfloat16_bits():
    x = torch.randn(4).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(lowering.torch_to_numpy(x).astype(np.float32)), x.float())


def test_lowering_implements_the_whole_vocabulary():
    assert [name for name in F.VOCABULARY if not hasattr(lowering, name)] == []


# ---- TensorRT's build-time view of shapes

def test_python_branching_on_a_dynamic_dim_sees_minus_one():
    """As in a TensorRT network: dynamic dims read -1 at build time, static ones their size;
    shape tensors carry the run-time value, so one graph serves every length."""
    seen = {}

    def graph(i):
        x = i["x"]
        seen["shape"] = x.shape
        seen["branch"] = "static" if x.shape[1] > 1 else "dynamic"  # -1 > 1 is False
        with pytest.raises(ValueError, match="dynamic"):
            F.split(x, 2, dim=1)  # TensorRT-LLM asserts the split dim is static
        return {"y": x.view(F.concat([F.shape(x, 0), F.shape(x, 1) * 2, 2]))}

    for seq_len in (1, 6):
        x = randn(2, seq_len, 4)
        specs = [InputSpec("x", "float32", ("batch", "seq", 4))]
        engine = OnnxBackend().build("branch", specs, graph, config=None, dtype=None)
        assert_close(engine.infer({"x": x.numpy()})["y"], x.view(2, seq_len * 2, 2))
    assert seen == {"shape": (-1, -1, 4), "branch": "dynamic"}


# ---- strictness

def _build(graph, **inputs):
    with pytest.raises(Exception) as error:
        run_lowered(graph, **inputs)
    return error


def test_unmirrored_arguments_raise_naming_them():
    x = randn(2, 3)
    assert "slice(mode=, fill_value=)" in str(_build(lambda i: {"y": lowering.slice(i["x"], [0, 0], [1, 1],
                                                                                  mode="wrap")}, x=x).value)
    ids = torch.zeros(1, 2, dtype=torch.int32)
    error = _build(lambda i: {"y": F.embedding(i["ids"], F.constant(np.zeros((3, 2), np.float32)), tp_size=2)},
                   ids=ids)
    assert error.type is NotImplementedError and "tensor parallelism" in str(error.value)


def test_dtype_mismatch_is_rejected_as_strongly_typed_tensorrt_would():
    error = _build(lambda i: {"y": i["a"] + i["b"]}, a=randn(2), b=randn(2, dtype=torch.float16))
    assert error.type is TypeError and "float32 vs float16" in str(error.value)


def test_float64_constants_are_rejected():
    error = _build(lambda i: {"y": i["x"] * F.constant(np.ones(2))}, x=randn(2))
    assert error.type is TypeError and "float64" in str(error.value)


def test_ops_outside_the_vocabulary_or_a_network_raise():
    with pytest.raises(AttributeError, match="not in the DeciCoder port's TensorRT-LLM vocabulary"):
        F.gelu
    with pytest.raises(RuntimeError, match="outside a network"):
        F.matmul
