"""The ONNX lowering held to TensorRT-LLM's own functional unit tests, and to what TensorRT-LLM refuses.

Every verdict on a machine without TensorRT rests on ``trt_layers.lowering`` standing in for
TensorRT-LLM 1.2. Each ``UPSTREAM`` case below is a case of a test in TensorRT-LLM's
``tests/unittest/functional/`` (``tests/functional/`` before the tests moved): its inputs, its
graph written with the lowering's functions, its torch expectation and tolerance. It runs twice,
at the upstream's static shapes and with every input dim dynamic that the op allows, and the
build-time shape of each output must agree with what ONNX Runtime computes. bf16 cases are left
out (ONNX Runtime has no CPU kernels for them). Where TensorRT-LLM has no test for a function the
lowering implements, ``SOURCE`` cases are written from ``tensorrt_llm/functional.py`` itself.
``REFUSED`` cases are graphs a strongly typed TensorRT-LLM network refuses; the lowering refuses
them too. Every function and Tensor member the lowering mirrors is covered (last test).

fp16 cases check the graph (dtypes, casts, shapes); ONNX Runtime on CPU computes most fp16 ops in
fp32, so they do not show fp16 rounding.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from trt_layers import lowering as L
from trt_layers.network import InputSpec, OnnxBackend

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32", torch.int64: "int64",
               torch.int8: "int8", torch.bool: "bool"}
EXACT = {"rtol": 0, "atol": 0}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Case:
    mirrors: str  # the upstream test (file::test[params]) or the functional.py function a case is written from
    inputs: Callable[[], dict[str, torch.Tensor]]  # graph inputs; "_name" ones feed the expectation only
    graph: Callable[[dict[str, L.Tensor]], dict[str, L.Tensor]]
    expected: Callable[..., dict[str, torch.Tensor]]  # torch inputs -> torch outputs
    tolerance: dict = field(default_factory=dict)  # torch.testing.assert_close's; default: its dtype defaults
    static: tuple[str, ...] = ()  # "name" or "name:dim" that stay static in the dynamic variant
    dynamic: bool = True  # False: the op needs every dim static (no dynamic variant)
    compare: Callable | None = None  # (actual, expected, inputs) -> None, where the upstream compares otherwise
    sizes_from_values: bool = False  # output sizes read from input values (shape tensors): unknown at build time


def run(case: Case, inputs: dict[str, torch.Tensor], dynamic: bool):
    """Build the case's graph through the lowering and run it with ONNX Runtime: its outputs, and their
    shapes as the lowering saw them at build time."""
    inputs = {name: t for name, t in inputs.items() if not name.startswith("_")}  # "_name": reference only
    specs = []
    for name, t in inputs.items():
        dims = tuple(d if not dynamic or name in case.static or f"{name}:{i}" in case.static else f"{name}_{i}"
                     for i, d in enumerate(t.shape))
        specs.append(InputSpec(name, DTYPE_NAMES[t.dtype], dims))
    built = {}

    def graph(tensors):
        outputs = case.graph(tensors)
        built.update({name: t.shape for name, t in outputs.items()})
        return outputs

    engine = OnnxBackend().build("fidelity", specs, graph, config=None, dtype=None)
    outputs = engine.infer({name: t.numpy() for name, t in inputs.items()})
    return {name: torch.from_numpy(np.asarray(v)) for name, v in outputs.items()}, built


def check(case: Case, dynamic: bool):
    inputs = case.inputs()
    actual, built = run(case, inputs, dynamic)
    expected = case.expected(**inputs)
    assert list(actual) == list(expected)
    for name, value in actual.items():
        # TensorRT's build-time view: a dim is -1 or the size the engine computes; at static input
        # shapes shape arithmetic folds, so every size is known unless it is read from input values.
        static = not dynamic and not case.sizes_from_values
        assert len(built[name]) == value.ndim and all(b in ((a,) if static else (-1, a))
                                                      for b, a in zip(built[name], value.shape)), \
            f"{name}: built as {list(built[name])}, computed {list(value.shape)}"
        if case.compare is not None:
            case.compare(value, expected[name], inputs)
        else:
            torch.testing.assert_close(value, expected[name], **case.tolerance)


def const(array) -> L.Tensor:
    return L.constant(np.asarray(array))


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape).to(dtype)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------- cases from TensorRT-LLM's unit tests

def _arange_tensor_cases() -> list[Case]:
    """test_arange.py::test_arange_tensor: a 0-d start, a [1] end, of every int dtype pairing, into four dtypes."""
    cases = []
    for s_dtype in ("int32", "int64"):
        for e_dtype in ("int32", "int64"):
            for r_dtype in ("int32", "int64", "float32", "float16"):
                def graph(_, s_dtype=s_dtype, e_dtype=e_dtype, r_dtype=r_dtype):
                    start = const(np.array(0, dtype=s_dtype))
                    end = const(np.array([128], dtype=e_dtype))
                    return {"output": L.arange(start=start, end=end, dtype=r_dtype)}
                cases.append(Case(
                    f"test_arange.py::TestArange::test_arange_tensor[{s_dtype}-{e_dtype}-{r_dtype}]", dict, graph,
                    lambda r_dtype=r_dtype: {"output": torch.arange(0, 128, dtype=TORCH_DTYPES[r_dtype])}))
    return cases


def _split_cases() -> list[Case]:
    params = [(dtype, dim, 4) for dtype in ("float32", "float16") for dim in (0, 1, -1, -2)]
    params += [(dtype, dim, sections) for dtype in ("float32", "float16")
               for dim, sections in ((0, [2, 100, 26]), (1, [2, 100, 100, 52, 2]), (-1, [2, 100, 100, 52, 2]),
                                     (-2, [2, 100, 26]))]
    cases = []
    for dtype, dim, sections in params:
        torch_dtype = TORCH_DTYPES[dtype]
        cases.append(Case(
            f"test_split.py::TestSplit::test_split[{dtype}-{dim}-{sections}]",
            lambda torch_dtype=torch_dtype: {"x": rand(128, 256, dtype=torch_dtype)},
            lambda i, dim=dim, sections=sections: {f"output_{k}": t for k, t in
                                                   enumerate(L.split(i["x"], sections, dim))},
            lambda x, dim=dim, sections=sections: {f"output_{k}": t for k, t in
                                                   enumerate(torch.split(x, sections, dim))}, static=(f"x:{dim % 2}",)))
    return cases


def _matmul_cases() -> list[Case]:
    """test_matmul.py::test_matmul: the qkv and mlp GEMMs of a 768-hidden layer, each transposition.
    The reference is fp32 matmul cast to the dtype (torch's fp16 matmul on CPU is slow), within
    the upstream tolerances."""
    tolerances = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "float16": {"rtol": 1e-2, "atol": 1e-2}}
    m, k = 2 * 16, 768
    cases = []
    for dtype in ("float16", "float32"):
        for transa in (False, True):
            for transb in (False, True):
                def inputs(dtype=dtype, transa=transa, transb=transb):
                    out = {}
                    for gemm, n in (("qkv", 3 * 768), ("mlp", 4 * 768)):
                        out[f"{gemm}_x"] = randn(*((k, m) if transa else (m, k)), dtype=TORCH_DTYPES[dtype]) * 1e-1
                        out[f"{gemm}_y"] = randn(*((n, k) if transb else (k, n)), dtype=TORCH_DTYPES[dtype]) * 1e-1
                    return out

                def graph(i, transa=transa, transb=transb):
                    return {gemm: L.matmul(i[f"{gemm}_x"], i[f"{gemm}_y"], transa=transa, transb=transb)
                            for gemm in ("qkv", "mlp")}

                def expected(transa=transa, transb=transb, **t):
                    def product(x, y):
                        x, y = (x.T if transa else x), (y.T if transb else y)
                        return (x.float() @ y.float()).to(x.dtype)
                    return {gemm: product(t[f"{gemm}_x"], t[f"{gemm}_y"]) for gemm in ("qkv", "mlp")}

                def compare(actual, expected, inputs, tolerance=tolerances[dtype]):
                    np.testing.assert_allclose(expected.float().numpy(), actual.float().numpy(), **tolerance)

                cases.append(Case(f"test_matmul.py::TestMatmul::test_matmul[{dtype}-{transa}-{transb}]", inputs,
                                  graph, expected, compare=compare))
    return cases


def _rms_norm_cases() -> list[Case]:
    """test_rms_norm.py::test_rms_norm_plugin: against a float64 reference. That test ran TensorRT-LLM's
    rmsnorm plugin, since removed; 1.2's rms_norm (mirrored here) is the layer graph, called by keyword
    because its signature gained num_groups before weight."""
    atol = {"float16": 8e-2, "float32": 2e-6}
    weight = torch.randn(1024, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    cases = []
    for remove_batch_dim in (True, False):
        for dtype in ("float16", "float32"):
            def inputs(shape=(8 * 128, 1024) if remove_batch_dim else (8, 128, 1024), dtype=dtype):
                x64 = torch.randn(shape, dtype=torch.float64)
                return {"x": x64.to(TORCH_DTYPES[dtype]), "_x64": x64}

            def graph(i, dtype=dtype):
                gamma = const(weight.to(TORCH_DTYPES[dtype]).numpy())
                return {"output": L.rms_norm(i["x"], 1024, weight=gamma, eps=1e-5)}

            def expected(x, _x64):
                return {"output": _x64 / (_x64.pow(2.0).mean(-1, keepdim=True) + 1e-5).sqrt() * weight}

            def compare(actual, expected, inputs, atol=atol[dtype]):
                np.testing.assert_allclose(expected.numpy(), actual.float().numpy(), atol=atol)

            cases.append(Case(f"test_rms_norm.py::TestFunctional::test_rms_norm_plugin[{remove_batch_dim}-{dtype}]",
                              inputs, graph, expected, compare=compare))
    return cases


def _alibi_biases(slopes: L.Tensor, key_length: L.Tensor) -> L.Tensor:
    """functional.generate_alibi_biases, op for op: slopes [1, H, 1, 1] * arange(0, key_len) as [1, 1, 1, k]."""
    start = const(np.array(0, dtype=np.int32))
    return slopes * L.arange(start, key_length, "float32").view(L.concat([1, 1, 1, key_length]))


def _alibi_cases() -> list[Case]:
    """test_alibi.py::test_alibi_biases: against transformers' Bloom ALiBi on the valid positions of a
    random padding mask. The slopes are Bloom's (TensorRT-LLM's generate_alibi_slopes gives the same,
    which is what that test checks)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    cases = []
    for num_heads, batch_size, seq_len in ((1, 64, 32), (16, 1, 64), (24, 20, 500), (32, 128, 60), (64, 32, 1024),
                                           (80, 12, 20), (112, 4, 389)):
        slopes = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1].reshape(1, num_heads, 1, 1)

        def mask(batch_size=batch_size, seq_len=seq_len):  # [b, 1, 1, s]: the same random padding each call
            lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=torch.Generator().manual_seed(seq_len))
            return (torch.arange(seq_len)[None, :] < lengths[:, None]).reshape(batch_size, 1, 1, seq_len)

        def expected(fake_key, num_heads=num_heads, mask=mask):
            binary_mask = mask()
            ref = build_alibi_tensor(binary_mask.flatten(1), num_heads, torch.float32)
            return {"output": ref.reshape(binary_mask.shape[0], num_heads, 1, -1) * binary_mask}

        def compare(actual, expected, inputs, mask=mask):
            binary_mask = mask()
            actual = torch.repeat_interleave(actual, binary_mask.shape[0], dim=0) * binary_mask
            torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-2)

        cases.append(Case(
            f"test_alibi.py::TestAlibi::test_alibi_biases[{num_heads}-{batch_size}-{seq_len}]",
            lambda seq_len=seq_len: {"fake_key": torch.zeros(seq_len, dtype=torch.int32)},
            lambda i, slopes=slopes: {"output": _alibi_biases(const(slopes.numpy()), L.shape(i["fake_key"], 0))},
            expected, compare=compare))
    return cases


def _cumsum_last_dim(x: L.Tensor) -> L.Tensor:
    """functional.cumsum(prefer_plugin=False) on the last dim, op for op: a lower-triangular mask built
    from arange and <=, summed."""
    positions = L.arange(L.constant_to_tensor_(0, dtype="int64", to_array=False), L.shape(x, -1), dtype="int64")
    lower_triangle = L.cast(L.unsqueeze(positions, 0) <= L.unsqueeze(positions, 1), dtype=x.dtype)
    return L.sum(L.unsqueeze(x, -2) * lower_triangle, dim=-1)


def _cumsum_cases() -> list[Case]:
    """test_cumsum.py::test_cumsum_dynamic_last_dim with prefer_plugin=False (the layer path; the
    plugin path is not mirrored). The upstream's dynamic last dim is the dynamic variant here."""
    tolerances = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "float16": {"rtol": 1e-2, "atol": 1e-2}, "int32": EXACT}
    cases = []
    for dtype in ("float32", "float16", "int32"):
        for shape in ((256,), (3, 16), (5, 6, 8)):
            def inputs(dtype=dtype, shape=shape):
                if dtype == "int32":
                    return {"x": torch.randint(-100, 100, shape, dtype=torch.int32)}
                return {"x": rand(*shape, dtype=TORCH_DTYPES[dtype])}
            cases.append(Case(
                f"test_cumsum.py::TestCumsum::test_cumsum_dynamic_last_dim[{dtype}-{shape}-False]", inputs,
                lambda i: {"output": _cumsum_last_dim(i["x"])},
                lambda x: {"output": torch.cumsum(x, dim=-1).to(x.dtype)}, tolerances[dtype]))
    return cases


def _log_softmax(x: L.Tensor, dim: int) -> L.Tensor:
    """functional.log_softmax, op for op."""
    shifted = x - L.max(x, dim=dim, keepdim=True)
    return shifted - L.log(L.sum(L.exp(shifted), dim=dim, keepdim=True))


def _meshgrid2d(x: L.Tensor, y: L.Tensor) -> tuple[L.Tensor, L.Tensor]:
    """functional.meshgrid2d, op for op (static shapes only: it views to build-time sizes)."""
    x, y = L.expand_dims(x, 0), L.expand_dims(y, 0)
    grid_x = L.repeat_interleave(x, L.shape(y, 1), 1).view([x.shape[-1], y.shape[-1]])
    return grid_x, L.repeat(y, (x.shape[-1], 1))


def _gather_graph(i):
    """test_gather.py: one row per batch, picked by index, through view, expand and gather."""
    x, y = i["x"], i["y"]
    y = y.view(L.concat([L.shape(y, 0), 1, 1]))
    y = L.expand(y, L.concat([L.shape(y, 0), 1, L.shape(x, 2)]))
    return {"output": L.gather(x, dim=1, indices=y).view(L.concat([L.shape(x, 0), L.shape(x, 2)]))}


def _gather_expected(x, y):
    index = y.reshape(-1, 1, 1).expand(-1, 1, x.shape[-1]).long()
    return {"output": torch.gather(x, 1, index).view(x.shape[0], x.shape[2])}


def _slice_implicit(i):
    output_length = const(np.zeros(128, dtype=np.int32))
    sizes = L.shape(output_length, 0)
    return {"output": L.slice(i["x"], const(np.array([0], dtype=np.int32)), sizes.view([1]))}


def _expand_implicit(i):
    input_length = const(np.zeros(8, dtype=np.int32))
    return {"output": L.expand(i["input"], L.concat([L.shape(input_length, 0), 10]))}


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's symmetric int8 quantization (zero point 0): round half to even, saturate."""
    return torch.round(x.float() / scale.float()).clamp(-128, 127).to(torch.int8)


SQUEEZE_DATA = [[[-3.0, -2.0, -1.0, 10.0, -25.0]], [[0.0, 1.0, 2.0, -2.0, -1.0]]]

UPSTREAM: list[Case] = [
    Case("test_arange.py::TestArange::test_arange_int", dict, lambda _: {"output": L.arange(0, 128, "int32")},
         lambda: {"output": torch.arange(0, 128).int()}),
    *_arange_tensor_cases(),
    Case("test_cast.py::TestCast::test_cast_fp16_to_fp32", lambda: {"x": randn(2, 3, 4, 5, dtype=torch.float16)},
         lambda i: {"output": L.cast(i["x"], "float32")}, lambda x: {"output": x.to(torch.float32)}),
    Case("test_expand.py::TestExpand::test_expand_2d",
         lambda: {"input": rand(1, 10), "shape": torch.tensor([2, 10], dtype=torch.int32)},
         lambda i: {"output": L.expand(i["input"], i["shape"])},
         lambda input, shape: {"output": input.expand(2, 10)}, static=("shape",), sizes_from_values=True),
    Case("test_expand.py::TestExpand::test_expand_4d",
         lambda: {"input": rand(2, 1, 1, 10), "shape": torch.tensor([2, 1, 12, 10], dtype=torch.int32)},
         lambda i: {"output": L.expand(i["input"], i["shape"])},
         lambda input, shape: {"output": input.expand(2, 1, 12, 10)}, static=("shape",), sizes_from_values=True),
    Case("test_expand.py::TestExpand::test_expand_implicit", lambda: {"input": rand(1, 10)}, _expand_implicit,
         lambda input: {"output": input.expand(8, 10)}),
    *(Case(f"test_where.py::TestWhere::test_where_from_bool[{condition}]",
           lambda: {"t": randn(2, 3), "f": randn(2, 3)},
           lambda i, condition=condition: {"output": L.where(condition, i["t"], i["f"])},
           lambda t, f, condition=condition: {"output": torch.where(torch.tensor(condition), t, f)})
      for condition in (True, False)),
    Case("test_where.py::TestWhere::test_where_from_tensor",
         lambda: {"t": randn(3, 4), "f": randn(3, 4), "c": torch.randint(2, size=(3, 1), dtype=torch.bool)},
         lambda i: {"output": L.where(i["c"], i["t"], i["f"])},
         lambda t, f, c: {"output": torch.where(c, t, f)}),
    *_split_cases(),
    *(Case(f"test_slice.py::TestFunctional::test_slice_explicit[{dtype}]",
           lambda dtype=dtype: {"x": rand(1, 256, dtype=TORCH_DTYPES[dtype]),
                                "starts": torch.tensor([0, 128], dtype=torch.int32),
                                "sizes": torch.tensor([1, 1], dtype=torch.int32)},
           lambda i: {"output": L.slice(i["x"], i["starts"], i["sizes"])},
           lambda x, starts, sizes: {"output": x[0:1, 128:129]}, static=("starts", "sizes"), sizes_from_values=True)
      for dtype in ("float32", "float16")),
    Case("test_slice.py::TestFunctional::test_slice_implicit", lambda: {"x": rand(256)}, _slice_implicit,
         lambda x: {"output": x[0:128]}),
    Case("test_select.py::TestSelect::test_select_from_int", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"output": L.select(i["x"], dim=0, index=0)},
         lambda x: {"output": torch.select(x, dim=0, index=0)}),
    Case("test_select.py::TestSelect::test_select_from_tensor", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"output": L.select(i["x"], dim=2, index=const(np.array([1], dtype=np.int32)))},
         lambda x: {"output": torch.select(x, dim=2, index=1)}),
    Case("test_gather.py::TestGather::test_gather",
         lambda: {"x": randn(2, 128, 768), "y": torch.tensor([101, 127], dtype=torch.int32)},
         _gather_graph, _gather_expected),
    *(Case(f"test_embedding_single_gpu.py::TestEmbedding::test_embedding[{dtype}]",
           lambda dtype=dtype: {"index": torch.randint(0, 1000, (10,), dtype=torch.int32),
                                "weight": rand(1000, 1024, dtype=TORCH_DTYPES[dtype])},
           lambda i: {"output": L.embedding(input=i["index"], weight=i["weight"])},
           lambda index, weight: {"output": torch.nn.functional.embedding(index.long(), weight)})
      for dtype in ("float32", "float16")),
    Case("test_repeat.py::TestRepeat::test_repeat", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"output": L.repeat(i["x"], (3, 1, 2))}, lambda x: {"output": x.repeat(3, 1, 2)}),
    Case("test_silu.py::TestSiLU::test_silu", lambda: {"x": randn(2, 3, 4, 5)}, lambda i: {"output": L.silu(i["x"])},
         lambda x: {"output": torch.nn.functional.silu(x)}),
    Case("test_sigmoid.py::TestSigmoid::test_sigmoid", lambda: {"x": randn(2, 3, 4, 5)},
         lambda i: {"output": L.sigmoid(i["x"])}, lambda x: {"output": torch.sigmoid(x)}),
    *_matmul_cases(),
    Case("test_matmul.py::TestMatmul::test_matmul_broadcast",
         lambda: {"x": randn(16, 4, 4, 5), "y": randn(16, 1, 5, 4)},
         lambda i: {"output": L.matmul(i["x"], i["y"])}, lambda x, y: {"output": torch.matmul(x, y)},
         {"rtol": 1e-7, "atol": 1e-5}),
    *(Case(f"test_identity.py::TestFunctional::test_identity[{dtype}-False]",
           lambda dtype=dtype: {"x": randn(4, 6, 3, 4, dtype=TORCH_DTYPES[dtype])},
           lambda i: {"output": L.identity(i["x"])}, lambda x: {"output": x}, EXACT)
      for dtype in ("float32", "float16")),
    Case("test_permute.py::TestFunctional::test_permute[float32]", lambda: {"x": rand(4, 12, 64, 129)},
         lambda i: {"output": L.permute(i["x"], [0, 1, 3, 2])},
         lambda x: {"output": torch.permute(x, [0, 1, 3, 2])}, EXACT),
    *(Case(f"test_repeat_interleave.py::TestFunctional::test_repeat_interleave[{axis}]", lambda: {"x": randn(2, 3, 4)},
           lambda i, axis=axis: {"output": L.repeat_interleave(i["x"], 3, axis)},
           lambda x, axis=axis: {"output": torch.repeat_interleave(x, 3, axis)}, EXACT)
      for axis in (0, 1, 2)),
    *_rms_norm_cases(),
    Case("test_transpose.py::TestFunctional::test_transpose", lambda: {"x": randn(2, 3)},
         lambda i: {"output": L.transpose(i["x"], 0, 1)}, lambda x: {"output": x.transpose(0, 1)}),
    Case("test_unsqueeze.py::TestUnsqueeze::test_unsqueeze", lambda: {"input": torch.tensor(SQUEEZE_DATA)},
         lambda i: {"output": L.unsqueeze(i["input"], axis=0)},
         lambda input: {"output": input.unsqueeze(0)}),
    Case("test_view.py::TestView::test_view_static", lambda: {"input": rand(4, 3)},
         lambda i: {"output": L.view(input=i["input"], shape=(12, 1))},
         lambda input: {"output": input.view(12, 1)}),
    Case("test_view.py::TestView::test_view_dynamic",
         lambda: {"input": rand(4, 3), "shape": torch.tensor([2, 6], dtype=torch.int32)},
         lambda i: {"output": L.view(input=i["input"], shape=i["shape"])},
         lambda input, shape: {"output": input.view(2, 6)}, static=("shape",), sizes_from_values=True),
    Case("test_squeeze.py::TestSqueeze::test_squeeze[data-1]", lambda: {"input": torch.tensor(SQUEEZE_DATA)},
         lambda i: {"output": L.squeeze(i["input"], dim=1)}, lambda input: {"output": input.squeeze(1)},
         static=("input:1",)),  # squeeze drops only the dims that are 1 at build time
    Case("test_squeeze.py::TestSqueeze::test_squeeze[[1.0]-0]", lambda: {"input": torch.tensor([1.0])},
         lambda i: {"output": L.squeeze(i["input"], dim=0)}, lambda input: {"output": input.squeeze(0)},
         static=("input",)),
    Case("test_logsoftmax.py::TestLogSoftmax::test_lt", lambda: {"x": rand(2, 3), "y": rand(2, 3)},
         lambda i: {"output": L.lt(i["x"], i["y"])}, lambda x, y: {"output": torch.lt(x, y)}),
    Case("test_logsoftmax.py::TestLogSoftmax::test_log[float32]", lambda: {"x": rand(4, 6, 8)},
         lambda i: {"output": L.log(i["x"])}, lambda x: {"output": x.log()}),
    *(Case(f"test_logsoftmax.py::TestLogSoftmax::test_sum[float32-{dim}-{keepdim}]", lambda: {"x": rand(4, 6, 8)},
           lambda i, dim=dim, keepdim=keepdim: {"output": L.sum(i["x"], dim, keepdim)},
           lambda x, dim=dim, keepdim=keepdim: {"output": x.sum(dim=dim, keepdim=keepdim)})
      for dim in (0, 1, 2) for keepdim in (False, True)),
    *(Case(f"test_logsoftmax.py::TestLogSoftmax::test_log_softmax[float32-{dim}]", lambda: {"x": rand(4, 6, 8)},
           lambda i, dim=dim: {"output": _log_softmax(i["x"], dim)},
           lambda x, dim=dim: {"output": x.log_softmax(dim=dim)})
      for dim in (0, 1, 2)),
    Case("test_exp.py::TestFunctional::test_exp", lambda: {"x": randn(2, 3, 4, 5)}, lambda i: {"output": L.exp(i["x"])},
         lambda x: {"output": torch.exp(x)}, {"rtol": 1e-7, "atol": 1e-5}),
    Case("test_meshgrid2d.py::TestMeshgrid2d::test_meshgrid2d",
         lambda: {"x": torch.tensor([1.0, 2.0, 3.0]), "y": torch.tensor([4.0, 5.0, 6.0])},
         lambda i: dict(zip(("output_x", "output_y"), _meshgrid2d(i["x"], i["y"]))),
         lambda x, y: dict(zip(("output_x", "output_y"), torch.meshgrid([x, y], indexing="ij"))), dynamic=False),
    *_alibi_cases(),
    *_cumsum_cases(),
    # tests/unittest/trt/quantization/test_functional.py: int8 Q/DQ against torch's quantized tensors, whose
    # int_repr (torch.quantize_per_tensor/_per_channel, deprecated in torch 2.13) is written out by _int8.
    Case("quantization/test_functional.py::TestQuantizationFunctional::test_quantize_per_tensor",
         lambda: {"x": randn(1, 2, 2, 4)}, lambda i: {"output": L.quantize(i["x"], const(np.float32(0.4)), "int8")},
         lambda x: {"output": _int8(x, torch.tensor(0.4))}, EXACT),
    Case("quantization/test_functional.py::TestQuantizationFunctional::test_quantize_per_channel",
         lambda: {"x": randn(4, 2, 4, 8)},
         lambda i: {"output": L.quantize(i["x"], const(np.array([0.4, 0.3], np.float32)), "int8", 1)},
         lambda x: {"output": _int8(x, torch.tensor([0.4, 0.3])[:, None, None])}, EXACT, static=("x:1",)),
    Case("quantization/test_functional.py::TestQuantizationFunctional::test_dequantize",
         lambda: {"x": _int8(torch.tensor([-1.0, 0.0, 1.0, 2.0]), torch.tensor(0.1))},
         lambda i: {"output": L.dequantize(i["x"], const(np.float32(0.1)), output_type="float32")},
         lambda x: {"output": x.float() * torch.tensor(0.1)}),
]


# ---------------------------------------------------------------- cases written from functional.py

def _operators_on_floats(i):
    x, y = i["x"], i["y"]
    return {"lt": x < y, "gt": x > y, "eq": x == y, "le": x <= y, "ge": y >= x, "floordiv": x // y, "mod": x % y,
            "add": 1 + x + 2, "sub": 2 - x - 1, "mul": 3 * x * 0.5, "div": x / y, "xor": (x > 0) ^ (y > 0)}


def _operators_on_floats_expected(x, y):
    return {"lt": x < y, "gt": x > y, "eq": x == y, "le": x <= y, "ge": y >= x, "floordiv": torch.floor_divide(x, y),
            "mod": x - torch.floor_divide(x, y) * y, "add": 1 + x + 2, "sub": 2 - x - 1, "mul": 3 * x * 0.5,
            "div": x / y, "xor": (x > 0) ^ (y > 0)}


def _float_operands():
    """x/y stays at least 0.05 from an integer, so floor() cannot round differently here and in torch."""
    x = torch.randint(-20, 20, (3, 4)).float() + 0.25
    y = torch.randint(1, 5, (3, 4)).float() * torch.where(torch.rand(3, 4) > 0.5, 1.0, -1.0)
    y[0, :2] = x[0, :2]  # some equal pairs for ==, <=, >=
    return {"x": x, "y": y}


def _operators_on_ints(i):
    a, b, c = i["a"], i["b"], i["c"]
    return {"floordiv": a // b, "mod": a % b, "div": c / b.abs(), "promoted": a + i["d"], "truncated": c * 2.5,
            "lt": a < 3, "reflected": 3 < a, "eq": 0 == a}


def _operators_on_ints_expected(a, b, c, d):
    return {"floordiv": torch.floor_divide(a, b), "mod": torch.remainder(a, b), "div": c // b.abs(), "promoted": a + d,
            "truncated": c * 2, "lt": a < 3, "reflected": 3 < a, "eq": 0 == a}


def _expand_mask(mask: L.Tensor) -> L.Tensor:
    """functional.expand_mask, op for op: [b, s] -> additive [b, 1, s, s], -inf where mask == 0."""
    bsz, src_len = L.shape(mask, 0), L.shape(mask, 1)
    mask = mask.view(L.concat([bsz, 1, 1, src_len]))
    mask = L.expand(mask, L.concat([bsz, 1, src_len, src_len]))
    return L.where(mask == 0, float("-inf"), 0.0)


def _causal_mask(i):
    """The port's causal mask: positions from arange over a 0-d start, compared as [1, s] > [s, 1]."""
    positions = L.arange(const(np.array(0, dtype=np.int64)), L.shape(i["x"], 1), "int64")  # [s]
    return {"mask": L.where(L.unsqueeze(positions, 0) > L.unsqueeze(positions, 1), float("-inf"), 0.0),
            "positions_int32": L.arange(const(np.array(0, dtype=np.int32)), L.shape(i["x"], 1), "int32")}


def _tensor_methods(i):
    x = i["x"]  # [2, 3, 4]
    first, rest = x.split([1, 2], dim=1)
    return {"view": x.view(L.concat([L.shape(x, 0), 12])), "flatten": x.flatten(1), "permute": x.permute([2, 0, 1]),
            "transpose": x.transpose(0, 2), "mean": x.mean(1, keepdim=True), "max": x.max(2), "abs": x.abs(),
            "sqrt": x.abs().sqrt(), "log": (x.abs() + 1.0).log(), "cast": x.cast("float16"),
            "squeeze": first.squeeze(1, False), "unsqueeze": x.unsqueeze(-1), "rest": rest,
            "select": x.select(1, 2), "repeat": x.repeat([1, 2, 1]),
            **{f"unbind_{k}": t for k, t in enumerate(x.unbind(1))}}


def _tensor_methods_expected(x):
    return {"view": x.reshape(2, 12), "flatten": x.flatten(1), "permute": x.permute(2, 0, 1),
            "transpose": x.transpose(0, 2), "mean": x.mean(1, keepdim=True), "max": x.amax(2), "abs": x.abs(),
            "sqrt": x.abs().sqrt(), "log": (x.abs() + 1.0).log(), "cast": x.half(), "squeeze": x[:, :1].squeeze(1),
            "unsqueeze": x.unsqueeze(-1), "rest": x[:, 1:], "select": x[:, 2], "repeat": x.repeat(1, 2, 1),
            **{f"unbind_{k}": t for k, t in enumerate(x.unbind(1))}}


def _rotations(i):
    x = i["x"]  # [b, heads, s, d]
    table = L.RopeEmbeddingUtils.create_sinusoidal_positions(16, 8, 10000.0)  # [1, positions, d]: sin | cos
    return {"half": L.RopeEmbeddingUtils.rotate_half(x), "every_two": L.RopeEmbeddingUtils.rotate_every_two(x),
            "table": const(table)}


def _rotations_expected(x):
    from transformers.models.llama.modeling_llama import rotate_half

    angles = torch.arange(16.0)[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    return {"half": rotate_half(x), "every_two": torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2),
            "table": torch.cat([angles.sin(), angles.cos()], -1)[None]}


WEIGHT = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))  # [out, in], as Linear stores it
TABLE = torch.randn(10, 4, generator=torch.Generator().manual_seed(10))  # [vocab, hidden]

# [in, out], as TensorRT-LLM's weight-only converter stores a linear's int8 weight
INT8_WEIGHT = torch.randint(-128, 128, (6, 5), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
CHANNEL_SCALE = torch.rand(5, generator=torch.Generator().manual_seed(7)).half()  # [out]

# An int4_wo weight [in 256, out 6], two groups of 128 along in, packed as TensorRT's INT4 constants: two a byte,
# low nibble first, row-major.
INT4_WEIGHT = torch.randint(-8, 8, (256, 6), generator=torch.Generator().manual_seed(8), dtype=torch.int8)
GROUP_SCALE = torch.rand(2, 6, generator=torch.Generator().manual_seed(9)).half()  # [groups, out]


def _int4_weight() -> L.Tensor:
    return L.constant(L.pack_int4(INT4_WEIGHT.numpy()), as_dtype=L.int4, as_shape=(256, 6))


SOURCE: list[Case] = [
    Case("quantization/functional.py:dequantize (an INT4 weight constant [in, out], fp16 scales per group of 128 "
         "inputs: TensorRT's blocked dequantize along axis 0)",
         lambda: {"x": randn(256, 6, dtype=torch.float16)},
         lambda i: {"output": i["x"] * L.dequantize(_int4_weight(), const(GROUP_SCALE.numpy()), 0, "float16")},
         lambda x: {"output": x * (INT4_WEIGHT.half() * GROUP_SCALE.repeat_interleave(128, 0))}, EXACT,
         static=("x:0", "x:1")),
    Case("quantization/functional.py:dequantize (a weight-only linear's int8 [in, out] weight, fp16 scale per "
         "output channel, as weight_only_quant_matmul reads it without its plugin)",
         lambda: {"w": INT8_WEIGHT}, lambda i: {"output": L.dequantize(i["w"], const(CHANNEL_SCALE.numpy()), 1,
                                                                       "float16")},
         lambda w: {"output": w.half() * CHANNEL_SCALE}, EXACT, static=("w:1",)),
    Case("quantization/functional.py:quantize (fp16 input and scale, per channel)",
         lambda: {"x": randn(3, 5, dtype=torch.float16) * 40},
         lambda i: {"output": L.quantize(i["x"], const(CHANNEL_SCALE.numpy()), "int8", 1)},
         lambda x: {"output": _int8(x, CHANNEL_SCALE)}, EXACT, static=("x:1",)),
    Case("quantization/functional.py:quantize and dequantize (fp8 e4m3, an fp32 scale per tensor: a quantized KV "
         "cache's round trip; beyond 448 saturates)",
         lambda: {"x": randn(4, 64) * 3},
         lambda i: {"output": L.dequantize(L.quantize(i["x"], const(np.float32(0.0123)), "fp8"),
                                           const(np.float32(0.0123)), output_type="float32")},
         lambda x: {"output": (x / 0.0123).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.0123}, EXACT),
    Case("functional.py:where (the issue's example: x == 0 is an EQUAL layer)",
         lambda: {"x": torch.tensor([[0, 1, 0]], dtype=torch.int32)},
         lambda i: {"output": L.where(i["x"] == 0, 1.0, 2.0)}, lambda x: {"output": torch.tensor([[1.0, 2.0, 1.0]])}),
    Case("functional.py:expand_mask", lambda: {"mask": torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.int32)},
         lambda i: {"output": _expand_mask(i["mask"])},
         lambda mask: {"output": torch.where(mask[:, None, None, :].expand(2, 1, 3, 3) == 0, float("-inf"), 0.0)}),
    Case("functional.py:where (0 beside an int64 Tensor becomes int64: constants_to_tensors_)",
         lambda: {"x": torch.arange(6, dtype=torch.int64).reshape(2, 3)},
         lambda i: {"output": L.where(i["x"] > 2, i["x"], 0)}, lambda x: {"output": torch.where(x > 2, x, 0)}),
    Case("functional.py:where (fp16 branches, a broadcast bool condition)",
         lambda: {"c": torch.tensor([True, False, True]), "t": randn(2, 3, dtype=torch.float16),
                  "f": randn(2, 3, dtype=torch.float16)},
         lambda i: {"output": L.where(i["c"], i["t"], i["f"])}, lambda c, t, f: {"output": torch.where(c, t, f)}),
    Case("functional.py:Tensor operators on floats (scalars take the Tensor's dtype)", _float_operands,
         _operators_on_floats, _operators_on_floats_expected),
    Case("functional.py:Tensor operators on ints (FLOOR_DIV floors; int32 meets int64 as int64; 2.5 is int32 2)",
         lambda: {"a": torch.tensor([[-7, -1, 0, 5, 9]], dtype=torch.int32),
                  "b": torch.tensor([[2, -3, 4, -2, 3]], dtype=torch.int32),
                  "c": torch.tensor([[7, 1, 0, 5, 9]], dtype=torch.int32),
                  "d": torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.int64)},
         _operators_on_ints, _operators_on_ints_expected),
    Case("functional.py:elementwise_binary (an fp16 Tensor and a float: an fp16 constant)",
         lambda: {"x": randn(2, 3, dtype=torch.float16)}, lambda i: {"output": i["x"] * 0.5 + 1.0},
         lambda x: {"output": x * 0.5 + 1.0}),
    Case("modeling.py:causal_mask (arange from 0-d constants to a shape)", lambda: {"x": randn(2, 5, 4)}, _causal_mask,
         lambda x: {"mask": torch.full((5, 5), float("-inf")).triu(1),
                    "positions_int32": torch.arange(5, dtype=torch.int32)}),
    Case("functional.py:concat (ints beside an int64 shape are int64; 0-d inputs become [1])",
         lambda: {"x": randn(2, 3, 4)},
         lambda i: {"shape": L.concat([L.shape(i["x"], 0), 3, L.shape(i["x"], 2)]), "ints": L.concat([1, 2]),
                    "joined": L.concat([i["x"], i["x"] * 2.0], dim=-1)},
         lambda x: {"shape": torch.tensor([2, 3, 4]), "ints": torch.tensor([1, 2], dtype=torch.int32),
                    "joined": torch.cat([x, x * 2], -1)}),
    Case("functional.py:shape", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"full": L.shape(i["x"]), "dim": L.shape(i["x"], 1), "last": L.shape(i["x"], -1)},
         lambda x: {"full": torch.tensor([2, 3, 4]), "dim": torch.tensor(3), "last": torch.tensor(4)}),
    Case("functional.py:constant (a 0-d constant stays 0-d)", dict,
         lambda _: {"scalar": const(np.array(3.5, dtype=np.float32)), "matrix": const(np.ones((2, 3), np.int64))},
         lambda: {"scalar": torch.tensor(3.5), "matrix": torch.ones(2, 3, dtype=torch.int64)}),
    Case("functional.py:unsqueeze, expand_dims", lambda: {"x": randn(3, 4)},
         lambda i: {"last": L.unsqueeze(i["x"], -1), "middle": L.unsqueeze(i["x"], -2),
                    "two": L.expand_dims(i["x"], [0, 2])},
         lambda x: {"last": x[:, :, None], "middle": x[:, None], "two": x[None, :, None]}),
    Case("functional.py:view (0 copies a dim, -1 is inferred), permute with negative dims",
         lambda: {"x": randn(2, 3, 4)},
         lambda i: {"view": L.view(i["x"], [0, -1]), "permute": L.permute(i["x"], [-1, 0, 1])},
         lambda x: {"view": x.reshape(2, 12), "permute": x.permute(2, 0, 1)}, static=("x:1", "x:2")),
    *(Case(f"functional.py:softmax[{dtype}-{dim}]",
           lambda dtype=dtype: {"x": randn(2, 3, 4, dtype=TORCH_DTYPES[dtype])},
           lambda i, dim=dim: {"output": L.softmax(i["x"], dim)},
           lambda x, dim=dim: {"output": torch.softmax(x.float(), -1 if dim is None else dim).to(x.dtype)},
           {"float16": {"rtol": 1e-3, "atol": 1e-3}}.get(dtype, {}))
      for dtype, dim in (("float32", None), ("float32", 0), ("float32", 1), ("float32", -1), ("float16", -1))),
    Case("functional.py:mean, max (reduce)", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"mean": L.mean(i["x"], (1, 2)), "mean_kept": L.mean(i["x"], -1, keepdim=True),
                    "max": L.max(i["x"], 0), "max_int": L.max(L.cast(i["x"] * 10.0, "int32"), 1)},
         lambda x: {"mean": x.mean((1, 2)), "mean_kept": x.mean(-1, keepdim=True), "max": x.amax(0),
                    "max_int": (x * 10).int().amax(1)}),
    Case("functional.py:abs (float and int)",
         lambda: {"x": randn(2, 3), "n": torch.tensor([-3, 0, 4], dtype=torch.int32)},
         lambda i: {"float": L.abs(i["x"]), "int": L.abs(i["n"])}, lambda x, n: {"float": x.abs(), "int": n.abs()}),
    Case("functional.py:Tensor methods", lambda: {"x": randn(2, 3, 4) + 0.5}, _tensor_methods,
         _tensor_methods_expected, static=("x:1", "x:2")),  # split, unbind and flatten need static dims
    Case("functional.py:flatten", lambda: {"x": randn(2, 3, 4)},
         lambda i: {"all": L.flatten(i["x"]), "tail": L.flatten(i["x"], 1, -1), "none": L.flatten(i["x"], 2, 1)},
         lambda x: {"all": x.flatten(), "tail": x.flatten(1), "none": x}, dynamic=False),
    Case("functional.py:gather (GatherElements, its docstring's example)",
         lambda: {"x": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
                  "i": torch.tensor([[1], [0]], dtype=torch.int32)},
         lambda i: {"output": L.gather(i["x"], -1, i["i"])}, lambda x, i: {"output": torch.tensor([[2.0], [4.0]])}),
    Case("functional.py:slice (strides, sizes from shape arithmetic)", lambda: {"x": randn(3, 8)},
         lambda i: {"output": L.slice(i["x"], [0, 1], L.concat([L.shape(i["x"], 0), L.shape(i["x"], 1) / 2]), [1, 2])},
         lambda x: {"output": x[:, 1::2]}),
    Case("functional.py:split (the port's qkv split: dynamic batch and sequence)", lambda: {"x": randn(2, 5, 12)},
         lambda i: dict(zip("qkv", L.split(i["x"], [6, 3, 3], dim=2))),
         lambda x: dict(zip("qkv", torch.split(x, [6, 3, 3], 2))), static=("x:2",)),
    Case("functional.py:repeat_interleave (the port's repeat_kv: KV heads on dim 1)", lambda: {"k": randn(2, 2, 5, 4)},
         lambda i: {"output": L.repeat_interleave(i["k"], 3, 1)}, lambda k: {"output": k.repeat_interleave(3, 1)}),
    *(Case(f"functional.py:matmul (a constant weight, transb: the port's linear)[{dtype}]",
           lambda dtype=dtype: {"x": randn(2, 3, 8, dtype=TORCH_DTYPES[dtype])},
           lambda i, dtype=dtype: {
               "xwt": L.matmul(i["x"], const(WEIGHT.to(TORCH_DTYPES[dtype]).numpy()), transb=True),
               "xw": L.matmul(i["x"], const(WEIGHT.T.contiguous().to(TORCH_DTYPES[dtype]).numpy()))},
           lambda x: {"xwt": (x.float() @ WEIGHT.T).to(x.dtype), "xw": (x.float() @ WEIGHT.T).to(x.dtype)},
           {"float16": {"rtol": 1e-3, "atol": 1e-3}}.get(dtype, {}))
      for dtype in ("float32", "float16")),
    Case("functional.py:embedding (a constant table, [b, s] int32 ids: the port's embedding)",
         lambda: {"ids": torch.tensor([[1, 7, 3], [0, 9, 9]], dtype=torch.int32)},
         lambda i: {"output": L.embedding(i["ids"], const(TABLE.numpy()))},
         lambda ids: {"output": TABLE[ids.long()]}),
    Case("functional.py:rms_norm (small activations, where eps matters)", lambda: {"x": randn(2, 3, 16) * 1e-2},
         lambda i: {"output": L.rms_norm(i["x"], (16,), eps=1e-3)},
         lambda x: {"output": x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)}),
    Case("functional.py:cast, identity (integers and bool)",
         lambda: {"n": torch.tensor([[1, -2, 3]], dtype=torch.int64)},
         lambda i: {"int32": L.cast(i["n"], "int32"), "float": L.cast(i["n"] > 0, "float32"),
                    "same": L.identity(i["n"])},
         lambda n: {"int32": n.int(), "float": (n > 0).float(), "same": n}),
    Case("functional.py:silu (fp16)", lambda: {"x": randn(2, 5, dtype=torch.float16)},
         lambda i: {"output": L.silu(i["x"])}, lambda x: {"output": torch.nn.functional.silu(x.float()).half()},
         {"rtol": 1e-3, "atol": 1e-3}),
    Case("_utils.py:torch_to_numpy (a torch weight as a constant)", dict,
         lambda _: {"output": L.constant(L.torch_to_numpy(TABLE.half()))}, lambda: {"output": TABLE.half()}),
    Case("functional.py:RopeEmbeddingUtils (rotate_half, rotate_every_two, create_sinusoidal_positions)",
         lambda: {"x": randn(1, 2, 3, 8)}, _rotations, _rotations_expected),
]


# ---------------------------------------------------------------- what a strongly typed TensorRT-LLM network refuses

@dataclass(frozen=True)
class Refusal:
    reason: str  # what TensorRT-LLM (or TensorRT under it) does with this graph
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape with -1 for a dynamic dim)
    build: Callable[[dict[str, L.Tensor]], object]
    error: type[Exception]
    match: str


F32 = {"x": ("float32", (2, 3))}
F32_F16 = {"x": ("float32", (2, 3)), "h": ("float16", (2, 3))}
BOOL = {"c": ("bool", (2, 3)), "x": ("float32", (2, 3))}
I32 = {"n": ("int32", (3,)), "x": ("float32", (2, 3))}
DYNAMIC = {"x": ("float32", (-1, -1, 4))}


def _mark_twice(i):
    i["x"].mark_output("y")
    i["x"].mark_output("y")


REFUSED: list[Refusal] = [
    Refusal("quantize: int4 outputs are not mirrored (INT4 weights arrive quantized, as constants)", F32,
            lambda i: L.quantize(i["x"], const(np.float32(0.5)), "int4"), NotImplementedError, "int4"),
    Refusal("quantize: fp8 with a per-channel scale is not mirrored", F32,
            lambda i: L.quantize(i["x"], const(np.ones(3, np.float32)), "fp8", 1), NotImplementedError, "per-channel"),
    Refusal("quantize: a per-tensor scale in another float type than the input's", F32,
            lambda i: L.quantize(i["x"], const(np.float16(0.5)), "int8"), TypeError, "scale"),
    Refusal("quantize: a 2-D scale is TensorRT's blocked quantization, not mirrored", F32,
            lambda i: L.quantize(i["x"], const(np.ones((2, 3), np.float32)), "int8"), NotImplementedError, "blocked"),
    Refusal("dequantize: a float input", F32, lambda i: L.dequantize(i["x"], const(np.float32(0.5))),
            NotImplementedError, "float32"),
    Refusal("dequantize: TensorRT takes INT4 input only from a constant", {"q": ("int4", (256, 6))},
            lambda i: L.dequantize(i["q"], const(GROUP_SCALE.numpy()), 0), TypeError, "only from a constant"),
    Refusal("dequantize: a blocked scale whose rows do not tile the input's", F32,
            lambda i: L.dequantize(_int4_weight(), const(np.ones((3, 6), np.float16)), 0), ValueError, "tile"),
    Refusal("cast: TensorRT reads INT4 weights only through dequantize", F32,
            lambda i: L.cast(_int4_weight(), "float16"), TypeError, "only through dequantize"),
    Refusal("constant: as_dtype other than INT4 (fp8, fp4 packed weights) is not mirrored", F32,
            lambda i: L.constant(np.zeros(4, np.int8), as_dtype="fp8", as_shape=(4,)), NotImplementedError, "fp8"),
    Refusal("concat: TensorRT-LLM promotes Python ints, not int32 Tensors; the layer takes one dtype", I32,
            lambda i: L.concat([L.shape(i["x"], 0), i["n"]]), TypeError, "dtypes"),
    Refusal("concat: a float beside ints is an fp32 constant", I32, lambda i: L.concat([i["n"], 1.5]), TypeError,
            "dtypes"),
    Refusal("elementwise: fp32 and fp16 operands are not promoted", F32_F16, lambda i: i["x"] + i["h"], TypeError,
            "float32 vs float16"),
    Refusal("matmul: fp32 x fp16", F32_F16, lambda i: L.matmul(i["x"], i["h"], transb=True), TypeError, "differ"),
    Refusal("where: 0.0 is an fp32 constant whatever the other branch",
            {"c": ("bool", (2, 3)), "h": ("float16", (2, 3))},
            lambda i: L.where(i["c"], i["h"], 0.0), TypeError, "branch dtypes differ"),
    Refusal("where: 1 is int32, 2.0 fp32", BOOL, lambda i: L.where(i["c"], 1, 2.0), TypeError, "branch dtypes differ"),
    Refusal("where: the select layer's condition is bool", I32, lambda i: L.where(i["n"], 1.0, 0.0), TypeError,
            "takes bool"),
    Refusal("EQUAL takes no bool inputs", BOOL, lambda i: i["c"] == i["c"], TypeError, "not bool"),
    Refusal("arithmetic takes no bool inputs", BOOL, lambda i: i["c"] + i["c"], TypeError, "not bool"),
    Refusal("XOR takes bool inputs only", F32, lambda i: i["x"] ^ i["x"], TypeError, "not float32"),
    Refusal("OR takes bool inputs only (x >= y on ints builds OR of two bools: fine; of ints: not)", I32,
            lambda i: L.op_or(i["n"], i["n"]), TypeError, "not int32"),
    Refusal("integer POW is not mirrored (TensorRT 10.7's table has none)", I32, lambda i: L.pow(i["n"], 2),
            NotImplementedError, "not int32"),
    Refusal("elementwise: static dims 2 and 4 do not broadcast", {"x": ("float32", (2, 3)), "y": ("float32", (4, 3))},
            lambda i: i["x"] * i["y"], ValueError, "do not broadcast"),
    Refusal("arange: an int start needs an int end", I32, lambda i: L.arange(0, L.shape(i["x"], 0), "int32"),
            TypeError, "int end"),
    Refusal("arange: float Tensors", F32, lambda i: L.arange(const(np.float32(0)), const(np.float32(4)), "float32"),
            TypeError, "int32 or int64"),
    Refusal("arange: a float start", F32, lambda i: L.arange(0.0, 4.0, "float32"), TypeError, "not supported"),
    Refusal("arange: the fill layer's start is a scalar", I32, lambda i: L.arange(i["n"], L.shape(i["x"], 0), "int32"),
            ValueError, "scalar"),
    Refusal("split: TensorRT-LLM asserts the split dim is static", DYNAMIC, lambda i: L.split(i["x"], 2, dim=1),
            ValueError, "dynamic"),
    Refusal("split: sections must sum to the dim", DYNAMIC, lambda i: L.split(i["x"], [1, 2], dim=2), ValueError,
            "do not sum"),
    Refusal("split: the size must divide the dim", DYNAMIC, lambda i: L.split(i["x"], 3, dim=2), ValueError,
            "not divisible"),
    Refusal("view: TensorRT infers one -1 at most", F32, lambda i: L.view(i["x"], [-1, -1]), ValueError, "inferred"),
    Refusal("view: a static reshape keeps the element count", F32, lambda i: L.view(i["x"], [4, 2]), ValueError,
            "elements"),
    Refusal("unbind views to build-time sizes: two dynamic dims are two -1s", DYNAMIC,
            lambda i: L.unbind(i["x"], 2), ValueError, "inferred"),
    Refusal("flatten multiplies build-time sizes: a dynamic one is not mirrored", DYNAMIC,
            lambda i: L.flatten(i["x"], 1), NotImplementedError, "dynamic"),
    Refusal("constant: numpy float64 has no TensorRT dtype", F32, lambda i: L.constant(np.ones(2)), TypeError,
            "float64"),
    Refusal("constant_to_tensor_: no int8 constants from scalars", F32, lambda i: L.constant_to_tensor_(1, "int8"),
            TypeError, "int8"),
    Refusal("cast: a dtype name, not a torch dtype", F32, lambda i: L.cast(i["x"], torch.float16), TypeError,
            "not a dtype name"),
    Refusal("cast: an unknown dtype name", F32, lambda i: L.cast(i["x"], "fp16"), TypeError, "dtype names"),
    Refusal("concat: the axis must lie in the rank", F32, lambda i: L.concat([i["x"], i["x"]], dim=2), ValueError,
            "out of range"),
    Refusal("concat: other dims must agree", {"x": ("float32", (2, 3)), "y": ("float32", (4, 4))},
            lambda i: L.concat([i["x"], i["y"]]), ValueError, "differ outside"),
    Refusal("concat of nothing", F32, lambda i: L.concat([]), ValueError, "nothing"),
    Refusal("repeat: fewer sizes than dims", F32, lambda i: L.repeat(i["x"], [2]), ValueError, "sizes"),
    Refusal("softmax: the axis must lie in the rank", F32, lambda i: L.softmax(i["x"], 2), ValueError, "out of range"),
    Refusal("expand_dims: TensorRT-LLM inserts no axis for a dim outside [0, out_ndim)", F32,
            lambda i: L.expand_dims(i["x"], -1), ValueError, "must lie"),
    Refusal("gather: input and indices of one rank", I32, lambda i: L.gather(i["x"], 0, i["n"]), ValueError, "rank"),
    Refusal("select: one index", I32, lambda i: L.select(i["x"], 0, const(np.array([0, 1], np.int32))), ValueError,
            "[1]"),
    Refusal("select with a negative dim: TensorRT-LLM views to every dim", F32, lambda i: L.select(i["x"], -1, 0),
            NotImplementedError, "negative"),
    Refusal("repeat_interleave with a negative dim inserts the axis at the front", F32,
            lambda i: L.repeat_interleave(i["x"], 2, -1), NotImplementedError, "negative"),
    Refusal("expand: TensorRT's slice would shrink a dim that ONNX Expand keeps", F32,
            lambda i: L.expand(i["x"], L.concat([1, 3])), NotImplementedError, "expand of a dim"),
    Refusal("embedding: integer indices", F32, lambda i: L.embedding(i["x"], const(np.zeros((3, 2), np.float32))),
            TypeError, "integers"),
    Refusal("mean on ints is not mirrored", I32, lambda i: L.mean(i["n"], 0), NotImplementedError, "ReduceMean"),
    Refusal("an output name is marked once", F32, _mark_twice, ValueError, "marked twice"),
    Refusal("an output cannot take an input's name", F32, lambda i: (i["x"] * 2.0).mark_output("x"), ValueError,
            "input's name"),
    # Tensor members TensorRT-LLM leaves to Python, or that act on TensorRT layers: refused by name.
    Refusal("!=: TensorRT-LLM's Tensor has no __ne__ (Python's is always False there)", F32,
            lambda i: i["x"] != i["x"], NotImplementedError, "Tensor.__ne__"),
    Refusal("truth value: TensorRT-LLM calls every Tensor true", F32, lambda i: bool(i["x"] > 0), NotImplementedError,
            "Tensor.__bool__"),
    Refusal("`in` compares with __eq__, then takes the truth value", F32, lambda i: i["x"] in [i["x"] * 2.0],
            NotImplementedError, "Tensor.__bool__"),
    Refusal("dtype is read-only: a strongly typed network casts", F32, lambda i: setattr(i["x"], "dtype", "float16"),
            NotImplementedError, "Tensor.dtype"),
    Refusal("location: no host/device placement", F32, lambda i: i["x"].location, NotImplementedError,
            "Tensor.location"),
    Refusal("network: use default_net()", F32, lambda i: i["x"].network, NotImplementedError, "Tensor.network"),
    *(Refusal(f"graph rewriting: Tensor.{member}", F32, lambda i, member=member: getattr(i["x"], member)(),
              NotImplementedError, f"Tensor.{member}")
      for member in ("get_parent", "get_users", "replace_all_uses_with", "is_trt_wrapper")),
    # Operators TensorRT-LLM's Tensor does not define: Python raises TypeError there and here.
    *(Refusal(f"TensorRT-LLM's Tensor defines no {operator}", F32, build, TypeError, "")
      for operator, build in (("__neg__", lambda i: -i["x"]), ("__pow__", lambda i: i["x"] ** 2),
                              ("__getitem__", lambda i: i["x"][0]), ("__rtruediv__", lambda i: 2.0 / i["x"]),
                              ("__matmul__", lambda i: i["x"] @ i["x"]), ("__len__", lambda i: len(i["x"])),
                              ("__iter__", lambda i: list(i["x"])), ("__abs__", lambda i: abs(i["x"])),
                              ("__and__", lambda i: (i["x"] > 0) & (i["x"] > 0)))),
    # Collectives: what they compute is held to torch.distributed across rank processes (tests/test_tp.py).
    Refusal("allreduce: a fused norm, residual or another strategy (all_reduce_params) is not mirrored", F32,
            lambda i: L.allreduce(i["x"], [0, 1], all_reduce_params=object()), NotImplementedError,
            "all_reduce_params"),
    Refusal("allreduce: the AllReduce plugin reduces float types", I32, lambda i: L.allreduce(i["n"], [0, 1]),
            TypeError, "int32"),
    Refusal("allgather: a group lists distinct ranks", F32, lambda i: L.allgather(i["x"], [0, 0]), ValueError,
            "distinct"),
]


def build_refusal(refusal: Refusal):
    with L.net_guard(L.Network("refused")) as network:
        inputs = {name: network.add_input(name, dtype, shape, [f"{name}_{k}" if d == -1 else None
                                                               for k, d in enumerate(shape)])
                  for name, (dtype, shape) in refusal.inputs.items()}
        return refusal.build(inputs)


# ---------------------------------------------------------------- the tests

def _variants(cases: list[Case]):
    for case in cases:
        label = case.mirrors.replace("::", ".").replace(" ", "_")
        yield pytest.param(case, False, id=f"static-{label}")
        if case.dynamic and any(t.ndim for name, t in case.inputs().items() if not name.startswith("_")):
            yield pytest.param(case, True, id=f"dynamic-{label}")


@pytest.mark.parametrize("case,dynamic", list(_variants(UPSTREAM)))
def test_tensorrt_llm_unit_test_case(case, dynamic):
    check(case, dynamic)


@pytest.mark.parametrize("case,dynamic", list(_variants(SOURCE)))
def test_case_from_tensorrt_llm_source(case, dynamic):
    check(case, dynamic)


@pytest.mark.parametrize("refusal", REFUSED, ids=[r.reason for r in REFUSED])
def test_refused_as_tensorrt_llm_refuses(refusal):
    with pytest.raises(refusal.error) as error:
        build_refusal(refusal)
    assert refusal.match in str(error.value)


def test_fidelity_suite_counts():
    """≥ 100 upstream cases, each named once; prints where they come from (pytest -s shows it)."""
    mirrors = [case.mirrors for case in UPSTREAM]
    assert len(set(mirrors)) == len(mirrors)
    by_file = Counter(m.split("::")[0] for m in mirrors)
    print(f"\n{len(UPSTREAM)} TensorRT-LLM unit-test cases from {len(by_file)} files "
          f"({', '.join(f'{f} {n}' for f, n in sorted(by_file.items()))}), "
          f"{len(SOURCE)} cases from functional.py, {len(REFUSED)} refusals")
    assert len(UPSTREAM) >= 100


# tensorrt_llm.functional.Tensor's members in the 1.2 line (besides __init__ and __repr__).
TENSORRT_LLM_TENSOR_MEMBERS = (
    "network", "name", "dtype", "shape", "location", "mark_output", "__add__", "__radd__", "__sub__", "__rsub__",
    "__mul__", "__rmul__", "__truediv__", "__floordiv__", "__mod__", "__lt__", "__gt__", "__eq__", "__ge__", "__le__",
    "view", "flatten", "permute", "transpose", "mean", "max", "abs", "sqrt", "squeeze", "unsqueeze", "log", "cast",
    "size", "rank", "ndim", "split", "select", "unbind", "repeat", "is_dynamic", "get_parent", "get_users",
    "replace_all_uses_with", "is_trt_wrapper", "__hash__", "__xor__")


def test_lowering_tensor_has_every_tensorrt_llm_tensor_member():
    assert [m for m in TENSORRT_LLM_TENSOR_MEMBERS if m not in vars(L.Tensor)] == []


def test_tensor_hashes_by_identity_without_building():
    with L.net_guard(L.Network()) as network:
        x = network.add_input("x", "float32", (2,), [None])
        nodes = len(network.nodes)
        assert {x: "x"}[x] == "x" and hash(x) == id(x) and len(network.nodes) == nodes


def _mirrored_functions() -> dict:
    """code object -> name of each function the lowering mirrors (docstring "Mirrors ...") and each
    Tensor / RopeEmbeddingUtils member that builds something."""
    refused = L._not_mirrored("", "").__code__
    mirrored = {}
    for name, obj in vars(L).items():
        obj = inspect.unwrap(obj) if inspect.isfunction(obj) else obj
        if inspect.isfunction(obj) and not name.startswith("_") and (obj.__doc__ or "").startswith("Mirrors"):
            mirrored[obj.__code__] = name
    for cls in (L.Tensor, L.RopeEmbeddingUtils):
        for name, member in vars(cls).items():
            member = member.__func__ if isinstance(member, staticmethod) else member
            if inspect.isfunction(member) and member.__code__ is not refused and name not in ("__init__", "__repr__",
                                                                                               "__hash__"):
                mirrored[member.__code__] = f"{cls.__name__}.{name}"
    return mirrored


def test_every_mirrored_function_and_tensor_member_is_exercised():
    """Traced, not declared: every case's graph is built under a profiler recording the lowering's calls."""
    mirrored = _mirrored_functions()
    called = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in mirrored:
            called.add(mirrored[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        for case in UPSTREAM + SOURCE:
            inputs = {name: t for name, t in case.inputs().items() if not name.startswith("_")}
            with L.net_guard(L.Network("trace")) as network:
                tensors = {name: network.add_input(name, DTYPE_NAMES[t.dtype], tuple(t.shape), [None] * t.ndim)
                           for name, t in inputs.items()}
                for name, tensor in case.graph(tensors).items():
                    tensor.mark_output(name)
        for refusal in REFUSED:
            with contextlib.suppress(refusal.error):
                build_refusal(refusal)
    finally:
        sys.setprofile(previous)
    assert sorted(set(mirrored.values()) - called) == []
    refusing = L._not_mirrored("", "").__code__
    refused_members = {name for name, member in vars(L.Tensor).items()
                       if getattr(getattr(member, "fget", member), "__code__", None) is refusing}
    refused_members.add("dtype")  # its setter refuses
    assert sorted(m for m in refused_members if not any(f"Tensor.{m}" == r.match for r in REFUSED)) == []
