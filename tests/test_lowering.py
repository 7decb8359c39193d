"""The ONNX lowering as the project uses it: its build-time shapes, its graphs as files, its strictness.

Op-by-op fidelity to TensorRT-LLM (its unit tests' cases, its refusals) is ``test_fidelity.py``.
"""

import subprocess

import numpy as np
import onnx
import pytest
import torch
from test_polygraphy_workflows import readme_command, run

from parity.cli import main as parity_main
from parity.export import POLYGRAPHY
from reference import COMPONENTS
from trt_layers import functional as F
from trt_layers import lowering
from trt_layers.network import InputSpec, OnnxBackend


DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32", torch.int64: "int64"}


def run_lowered(graph, **inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Build ``graph`` (named lowered inputs -> named outputs) and run it; every input dim but the
    last is dynamic, as batch and sequence are in the port."""
    specs = [InputSpec(name, DTYPE_NAMES[t.dtype], (*(f"{name}_{i}" for i in range(t.ndim - 1)), t.shape[-1]))
             for name, t in inputs.items()]
    engine = OnnxBackend().build("op", specs, graph, config=None, dtype=None)
    return engine.infer({name: t.numpy() for name, t in inputs.items()})


def test_lowering_implements_the_whole_vocabulary():
    assert [name for name in F.VOCABULARY if not hasattr(lowering, name)] == []


def test_torch_to_numpy_keeps_bfloat16_bits():
    x = torch.randn(4).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(lowering.torch_to_numpy(x).astype(np.float32)), x.float())


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
        x = torch.randn(2, seq_len, 4)
        specs = [InputSpec("x", "float32", ("batch", "seq", 4))]
        engine = OnnxBackend().build("branch", specs, graph, config=None, dtype=None)
        np.testing.assert_array_equal(engine.infer({"x": x.numpy()})["y"], x.view(2, seq_len * 2, 2).numpy())
    assert seen == {"shape": (-1, -1, 4), "branch": "dynamic"}


def test_graph_outputs_carry_their_build_time_shapes():
    """Outputs declare the shape the network was built with (dynamic dims unnamed), so the model
    passes onnx's full check; a 0-d constant stays 0-d (ONNX Range takes only scalars)."""
    network = lowering.Network("shapes")
    with lowering.net_guard(network):
        x = network.add_input("x", "float32", (-1, 5, 4), ["batch", None, None])
        positions = lowering.arange(lowering.constant(np.array(0, np.int64)), lowering.shape(x, 1) * 5, "int64")
        (x * 2.0).view(lowering.concat([lowering.shape(x, 0), 20])).mark_output("flat")
        positions.mark_output("positions")
        lowering.constant(np.array(1.5, np.float32)).mark_output("scalar")
    model = network.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    shapes = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
              for o in model.graph.output}
    assert shapes == {"flat": [None, 20], "positions": [25], "scalar": []}


# ---- strictness

def _build(graph, **inputs):
    with pytest.raises(Exception) as error:
        run_lowered(graph, **inputs)
    return error


def test_unmirrored_arguments_raise_naming_them():
    x = torch.randn(2, 3)
    assert "slice(mode=, fill_value=)" in str(_build(lambda i: {"y": lowering.slice(i["x"], [0, 0], [1, 1],
                                                                                  mode="wrap")}, x=x).value)
    ids = torch.zeros(1, 2, dtype=torch.int32)
    error = _build(lambda i: {"y": F.embedding(i["ids"], F.constant(np.zeros((3, 2), np.float32)), tp_size=2)},
                   ids=ids)
    assert error.type is NotImplementedError and "tensor parallelism" in str(error.value)


def test_ops_outside_the_vocabulary_or_a_network_raise():
    with pytest.raises(AttributeError, match="not in the DeciCoder port's TensorRT-LLM vocabulary"):
        F.gelu
    with pytest.raises(RuntimeError, match="outside a network"):
        F.matmul


# ---- every component exports at every length (static shapes: shape arithmetic folds, ranges stay)

EXPORT_LENGTHS = (1, 7, 17, 64, 250)  # the tiny preset has 256 positions


def export_and_recheck(directory, component: str, seq_len: int, model: str = "tiny") -> subprocess.CompletedProcess:
    """`python -m parity export` at this length; its graph passes onnx's full check, and the re-check
    command its README prints (polygraphy run against golden.json, per-tap tolerances) passes."""
    out = directory / f"{component}-{seq_len}"
    argv = ["export", "--component", component, "--model", model, "--seq-len", str(seq_len), "--out", str(out)]
    assert parity_main(argv) == 0
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    recheck = run(readme_command(out, f"{POLYGRAPHY} run model.onnx --onnxrt"), out)
    assert recheck.returncode == 0 and "PASSED" in recheck.stdout, recheck.stdout + recheck.stderr
    return recheck


@pytest.mark.parametrize("component,seq_len", [("gqa_masked", 17), ("causal_lm", 250)])
def test_export_rechecks_past_sixteen_tokens(tmp_path, component, seq_len):
    """Past 16 positions the causal mask's ranges no longer fold into constants: ONNX Range runs."""
    export_and_recheck(tmp_path, component, seq_len)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", EXPORT_LENGTHS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_exports_and_rechecks_at_every_length(tmp_path, component, seq_len):
    export_and_recheck(tmp_path, component, seq_len)


@pytest.mark.slow
def test_decicoder_1b_decoder_layer_exports_and_rechecks_at_2048(tmp_path):
    """The full-size layer at the full context (about 5 GiB: run alone)."""
    export_and_recheck(tmp_path, "decoder_layer", 2048, model="decicoder-1b")
