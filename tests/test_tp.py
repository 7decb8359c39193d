"""Tensor-parallel ports (trt_layers.tensor_parallel, trt_layers.ranks, parity.tensor_parallel): the checkpoint split
as TensorRT-LLM 1.2's LLaMA conversion splits it, a rank's graph cut at its collectives, the collectives against
torch.distributed, and the port passing rank by rank at TP 2, 4 and 8 on tiny (8 heads, 2 KV heads: duplicated at
TP 4 and 8), prefill and decode, while each TP catalog bug is caught at its tap and rank.

Rank processes take seconds to start on 2 cores: one pool per TP size serves the module. One case per TP size runs
by default, the sweep with -m slow.
"""

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from parity.cli import main
from parity.tensor_parallel import TP_COMPONENTS, check_tp, kv_heads_of, stream_tp
from reference.inputs import CaseShape
from trt_layers import lowering as L
from trt_layers.bugs import BUGS
from trt_layers.network import OnnxBackend
from trt_layers.ranks import RankEngine, RankPool, cut_at_collectives
from trt_layers.tensor_parallel import TpMapping, padded_vocab, split, split_qkv, unsupported

PREFILL, DECODE = CaseShape(batch=2, seq_len=7), CaseShape(batch=2, seq_len=7, past_len=5)


@pytest.fixture(scope="module")
def pools():
    """RankPool per TP size, started when first asked for, stopped with the module."""
    started: dict[int, RankPool] = {}

    def pool(tp: int) -> RankPool:
        if tp not in started:
            started[tp] = RankPool(tp)
        return started[tp]

    yield pool
    for running in started.values():
        running.__exit__(None, None, None)


# ---------------------------------------------------------------- the split

def test_qkv_split_duplicates_kv_heads_in_a_row(tiny_config):
    """8 heads, 2 KV heads, TP 4: rank r holds query heads 2r, 2r + 1 and KV head r * 2 // 4 (dup_kv_weight)."""
    d, hidden = tiny_config.head_dim, tiny_config.hidden_size
    heads = torch.arange(8 + 2 + 2, dtype=torch.float32).repeat_interleave(d)[:, None].expand(-1, hidden)  # row: head
    for rank, kv_head in enumerate([0, 0, 1, 1]):
        rows = split_qkv(heads, tiny_config, TpMapping(4, rank))[:, 0].reshape(-1, d)[:, 0].tolist()
        assert rows == [2 * rank, 2 * rank + 1, 8 + kv_head, 10 + kv_head], rank
        assert kv_heads_of(tiny_config, TpMapping(4, rank)) == slice(kv_head, kv_head + 1)


def test_linears_split_as_row_and_column_parallel(tiny_config):
    weight = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)  # [out, in]
    mapping = TpMapping(2, 1)
    assert torch.equal(split("transformer.layers.0.attention.dense.weight", weight, tiny_config, mapping),
                       weight[:, 2:])  # RowLinear: the input columns
    assert torch.equal(split("transformer.layers.0.mlp.fc.weight", weight, tiny_config, mapping), weight[3:])
    assert torch.equal(split("transformer.layers.0.mlp.proj.weight", weight, tiny_config, mapping), weight[:, 2:])
    assert split("transformer.ln_f.weight", weight, tiny_config, mapping) is weight  # replicated


def test_lm_head_is_padded_to_a_multiple_of_tp(tiny_config):
    """A vocabulary of 5 rows at TP 4: padded with 3 zero rows to 8, two a rank."""
    weight = torch.ones(5, 2)
    assert padded_vocab(5, 4) == 8
    assert split("lm_head.weight", weight, tiny_config, TpMapping(4, 2)).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_unsupported_splits_name_their_reason(tiny_config):
    assert unsupported(tiny_config, 3) == "8 attention heads do not split into 3 ranks"
    assert unsupported(tiny_config, 8) is None  # 2 KV heads divide 8: each duplicated onto 4 ranks


# ---------------------------------------------------------------- the cut and the collectives

def _graph(build) -> onnx.ModelProto:
    with L.net_guard(L.Network("cut")) as network:
        x = network.add_input("x", "float32", (2, 3), [None, None])
        for name, tensor in build(x).items():
            tensor.mark_output(name)
    return network.to_onnx()


def test_cut_runs_each_op_once_and_two_collectives_in_a_row():
    """x -> a = x * 2 -> allreduce -> allreduce -> out = r + a: three pieces, the second empty, a handed on."""
    def build(x):
        a = x * 2.0
        twice = L.allreduce(L.allreduce(a, [0, 1]), [0, 1])
        return {"a": a, "out": twice + a}

    pieces = cut_at_collectives(_graph(build))
    assert [len(p.collectives) for p in pieces] == [1, 1, 0]
    ops = [node.op_type for piece in pieces for node in piece.model.graph.node]
    assert ops.count("Mul") == 1 and ops.count("Add") == 1 and not pieces[1].model.graph.node
    assert "mul_0:0" in pieces[0].outputs and "mul_0:0" in pieces[2].inputs


def _run_collectives(rank: int) -> dict:
    """In a rank: allreduce of x, allgather of x along 0 and along -1, x = (rank + 1) * [[1, 2, 3], [4, 5, 6]]."""
    def build(x):
        return {"sum": L.allreduce(x, [0, 1]), "rows": L.allgather(x, [0, 1]),
                "columns": L.allgather(x, [0, 1], gather_dim=-1)}

    model = _graph(build)
    engine = RankEngine(cut_at_collectives(model), {}, [o.name for o in model.graph.output],
                        lambda m: OnnxBackend._session(OnnxBackend.session_options(), m))
    x = (rank + 1) * np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    return dict(engine.infer({"x": x}))


def test_collectives_are_torch_distributeds(pools):
    """TensorRT-LLM's allreduce sums over the group; allgather concatenates in rank order along gather_dim."""
    x = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    for outputs in pools(2).run(_run_collectives, lambda rank: ()):
        assert np.array_equal(outputs["sum"], 3 * x)
        assert np.array_equal(outputs["rows"], np.concatenate([x, 2 * x], axis=0))
        assert np.array_equal(outputs["columns"], np.concatenate([x, 2 * x], axis=1))
    assert helper.make_opsetid(L.COLLECTIVES, 1) in _graph(lambda x: {"s": L.allreduce(x, [0])}).opset_import


# ---------------------------------------------------------------- the port, rank by rank

def _cases(tp: int):
    components = [(c, shape) for c in TP_COMPONENTS for shape in (PREFILL, DECODE)
                  if c != "gqa_unmasked" or shape.past_len] + [("causal_lm", PREFILL), ("causal_lm", DECODE)]
    components = [(c, s) for c, s in components if c != "gqa_masked" or not s.past_len]
    default = {2: ("decoder_layer", DECODE), 4: ("causal_lm", DECODE), 8: ("gqa_masked", PREFILL)}[tp]
    return [pytest.param(tp, c, s, id=f"tp{tp}-{c}-{'decode' if s.past_len else 'prefill'}",
                         marks=[] if (c, s) == default else [pytest.mark.slow]) for c, s in components]


@pytest.mark.parametrize("tp, component, shape", [case for tp in (2, 4, 8) for case in _cases(tp)])
def test_tp_port_passes_on_every_rank(pools, tiny_model, tp, component, shape):
    if component == "causal_lm":
        result = stream_tp(tiny_model, pools(tp), shape)
    else:
        result = check_tp(component, tiny_model, pools(tp), shape)
    assert len(result.ranks) == tp and result.exit_code == 0, result.table()


TP_BUGS = [bug for bug in BUGS.values() if bug.shows.tp]


@pytest.mark.parametrize("bug", TP_BUGS, ids=lambda bug: bug.name)
def test_tp_catalog_bug_is_caught_at_its_tap_and_rank(pools, tiny_model, bug):
    if bug.component == "causal_lm":
        result = stream_tp(tiny_model, pools(bug.tp_size), bug.shape, bug.name)
    else:
        result = check_tp(bug.component, tiny_model, pools(bug.tp_size), bug.shape, bug.name)
    rank, tap = result.first_failure
    assert (tap.name, rank) == (bug.first_tap, bug.first_rank), result.verdict()


def test_kv_duplication_bug_needs_tp_beyond_the_kv_heads(pools, tiny_model):
    """At TP 2 each rank holds one of the 2 KV heads: nothing is duplicated, the tiled order computes the same."""
    assert not BUGS["kv_heads_tiled_across_ranks"].shows.allows("gqa_masked", PREFILL, tiny_model.config, tp=2)
    assert check_tp("gqa_masked", tiny_model, pools(2), PREFILL, "kv_heads_tiled_across_ranks").exit_code == 0


def test_a_rank_that_fails_to_build_is_a_divergence(pools, tiny_model):
    """The fused QKV sliced whole at TP 4 gives rank 0 48 rows where its q, k and v take 32 + 16 + 16."""
    result = check_tp("gqa_masked", tiny_model, pools(4), PREFILL, "qkv_split_fused")
    assert result.exit_code == 1 and "split: sections [32, 16, 16] do not sum to 48" in result.verdict()


def test_locate_tp_cli(capsys):
    assert main(["locate", "--component", "mlp", "--tp", "2"]) == 0
    assert "PASSED: mlp at TP 2, 8 rank taps within fp32 tolerance" in capsys.readouterr().out
    assert main(["locate", "--component", "mlp", "--tp", "2", "--inject", "allreduce_missing"]) == 1
    assert "DIVERGED: 1 of 1 checks at TP 2; first: mlp at down on rank 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--component", "rope", "--tp", "2"], "rope holds no weight a rank splits"),
    (["--tp", "3"], "8 attention heads do not split into 3 ranks"),
    (["--tp", "2", "--quant", "int8_wo"], "--tp 2 with --quant: not supported"),
    (["--tp", "2", "--backend", "trtllm"], "use --backend onnx"),
    (["--inject", "allreduce_twice"], "shows only with --tp N (N > 1)"),
    (["--tp", "2", "--inject", "kv_heads_tiled_across_ranks"], "--tp N beyond 2 or more KV heads"),
])
def test_locate_tp_bad_usage_exits_2(capsys, argv, says):
    assert main(["locate", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_build_fast_path_tp_writes_a_checkpoint_per_rank(tmp_path, capsys):
    """rank{r}.safetensors under TP 1's names, each rank's split; config.json maps tp_size ranks (head size 32: the
    fast path's attention plugin has kernels for it)."""
    from safetensors.torch import load_file

    from reference import DeciCoderConfig, random_model
    from reference.configuration import TINY

    model = random_model(DeciCoderConfig.from_dict({**TINY, "num_attention_heads": 4}), seed=0)
    model.save_pretrained(tmp_path / "model")
    assert main(["build", "--model", str(tmp_path / "model"), "--fast-path", "--tp", "2", "--out",
                 str(tmp_path / "out")]) == 0
    checkpoint = tmp_path / "out" / "trtllm_checkpoint"
    assert "2 ranks (rank0..1.safetensors)" in capsys.readouterr().out
    ranks = [load_file(str(checkpoint / f"rank{r}.safetensors")) for r in range(2)]
    dense = "transformer.layers.0.attention.dense.weight"
    assert torch.equal(torch.cat([rank[dense] for rank in ranks], dim=1), model.model.layers[0].self_attn.o_proj.weight)
    assert set(ranks[0]) == set(ranks[1]) and "lm_head.weight" in ranks[1]
    import json
    assert json.loads((checkpoint / "config.json").read_text())["mapping"] == {"world_size": 2, "tp_size": 2,
                                                                               "pp_size": 1}
    assert main(["build", "--model", str(tmp_path / "model"), "--tp", "2", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bug", TP_BUGS, ids=lambda bug: bug.name)
def test_tp_suite_fails_exactly_where_a_tp_bug_shows(capsys, bug):
    """locate --tp N --inject BUG over every tensor-parallel check: exit 1, and the checks that fail are those
    bug.shows allows at that TP size."""
    from parity.locate import plan_checks
    from reference import DeciCoderConfig

    assert main(["locate", "--tp", str(bug.tp_size), "--inject", bug.name]) == 1
    out = capsys.readouterr().out
    failed = {line.split("  ")[1].strip() for line in out.splitlines()
              if line.startswith("  ") and ("FAIL at" in line or "FAIL:" in line)}
    tiny = DeciCoderConfig.from_preset("tiny")
    expected = {c.label for c in plan_checks(None, None, 2, 7, None)
                if c.component in (*TP_COMPONENTS, "causal_lm") and bug.shows.allows(c.component, c.shape, tiny,
                                                                                      tp=bug.tp_size)}
    assert failed == expected, out


LAYOUT_CASES = [pytest.param(layout, dtype, id=f"{layout}-{str(dtype)[6:]}",
                             marks=[] if (layout, dtype) == ("variant-mqa", torch.float16) else [pytest.mark.slow])
                for layout in ("kvheads8", "kvheads1", "variant", "variant-mqa") for dtype in (torch.float32,
                                                                                             torch.float16)]


@pytest.mark.parametrize("layout, dtype", LAYOUT_CASES)
def test_tp2_passes_in_every_layout(pools, reference_model, layout, dtype):
    """MHA, MQA (one KV head duplicated onto both ranks), tiny-variant's 6 heads of 24 with GQA 3:1 and as MQA,
    fp32 and fp16: every split component and the whole model, decode (the cache split by KV heads)."""
    from reference import random_model
    from conftest import layout_config

    model = (random_model(layout_config("variant").with_kv_heads(1), seed=0, dtype=dtype) if layout == "variant-mqa"
             else reference_model(layout, dtype))
    results = [check_tp(c, model, pools(2), DECODE if c != "gqa_masked" else PREFILL) for c in TP_COMPONENTS]
    results.append(stream_tp(model, pools(2), DECODE))
    assert all(r.exit_code == 0 for r in results), [r.verdict() for r in results]


def _exit_on_rank_1(rank: int) -> int:
    import os
    if rank == 1:
        os._exit(3)  # as a rank killed for memory would vanish
    return rank


def test_a_rank_process_that_dies_is_reported_not_waited_for():
    from trt_layers.ranks import RankError

    with RankPool(2) as pool, pytest.raises(RankError, match=r"rank 1: its process exited \(code 3\)"):
        pool.run(_exit_on_rank_1, lambda rank: ())


WEIGHT_MAPPING_BUGS = ("lm_head_tied", "layernorms_swapped", "mlp_gate_up_swapped")  # injected where weights are mapped


@pytest.mark.parametrize("bug", [pytest.param(bug, id=bug.name, marks=[] if bug.name in WEIGHT_MAPPING_BUGS
                                              else [pytest.mark.slow])
                                 for bug in BUGS.values() if not bug.shows.tp and bug.shows.quant is None])
def test_every_catalog_bug_shows_at_tp_2_where_it_can(pools, tiny_model, bug):
    """A bug of the port (or of its weight mapping, which the parent applies before the ranks split the weights)
    fails the TP checks it can show in, as at TP 1: with --tp it passed once (the mapping ran outside the bug)."""
    checks = [(c, s) for c in TP_COMPONENTS for s in (PREFILL, DECODE) if c != "gqa_unmasked" or s.past_len]
    checks += [("causal_lm", PREFILL), ("causal_lm", DECODE)]
    shown = [(c, s) for c, s in checks if (c, s.past_len) != ("gqa_masked", 5)
             and bug.shows.allows(c, s, tiny_model.config, tp=2)]
    if not shown:
        pytest.skip(f"{bug.name} shows in no check a rank splits")
    component, shape = shown[0]
    run = stream_tp if component == "causal_lm" else functools.partial(check_tp, component)
    assert run(tiny_model, pools(2), shape, bug.name).exit_code == 1, bug.name
