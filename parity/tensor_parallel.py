"""A tensor-parallel port judged rank by rank (trt_layers.tensor_parallel holds the split, trt_layers.ranks the
rank processes).

Each rank runs its own engine over its own weights, the collectives between ranks; each of its taps is compared
with the golden's matching slice: the rank's query heads (q, q_rot, k_rep, v_rep, scores, probs, context), its KV
heads after duplication (k, v, k_rot, present_k, present_v), its MLP columns (gate, up, act), and the whole tensor
where the rank holds it whole (a component's input side, and every output after an all-reduce or all-gather).
The first diverging tap is named with its rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from reference import DeciCoderForCausalLM
from reference.components import layer_past, run_component, run_layer
from reference.inputs import CaseShape, make_inputs
from reference.taps import component_outputs
from trt_layers import weights as weight_mapping
from trt_layers.bugs import BUGS
from trt_layers.network import OnnxBackend, build_component, numpy_to_torch, to_feed
from trt_layers.ranks import RankError, RankPool
from trt_layers.tensor_parallel import RankWeights, TpMapping, rank_heads
from trt_layers.weights import layer_prefix

from .check import CheckResult, needs_decode_graph
from .compare import TOLERANCES, TapResult, compare_taps, first_failure

QUERY_HEAD_TAPS = ("q", "q_rot", "k_rep", "v_rep", "scores", "probs", "context")
KV_HEAD_TAPS = ("k", "v", "k_rot", "present_k", "present_v", "past_k", "past_v")
COLUMN_TAPS = ("gate", "up", "act")
# The components a rank computes a part of; the others (rope, rmsnorm, repeat_kv) hold no weight a rank splits.
TP_COMPONENTS = ("gqa_masked", "gqa_unmasked", "mlp", "decoder_layer")


def kv_heads_of(config, mapping: TpMapping) -> slice:
    """The golden's KV heads rank ``mapping.rank`` holds: its share, or (TP beyond the KV heads) the one head
    duplicated onto it, r * kv_heads // tp."""
    kv_heads, tp, rank = config.num_key_value_heads, mapping.tp_size, mapping.rank
    if kv_heads >= tp:
        share = kv_heads // tp
        return slice(rank * share, (rank + 1) * share)
    head = rank * kv_heads // tp
    return slice(head, head + 1)


def rank_slice(tap: str, golden: torch.Tensor, config, mapping: TpMapping) -> torch.Tensor:
    """The part of the golden's ``tap`` (a name, scoped or not) that rank ``mapping.rank`` computes."""
    name = tap.rsplit(".", 1)[-1]
    heads, _ = rank_heads(config, mapping)
    if name in QUERY_HEAD_TAPS:
        return golden[:, mapping.rank * heads:(mapping.rank + 1) * heads]  # [b, heads, ...]
    if name in KV_HEAD_TAPS:
        return golden[:, kv_heads_of(config, mapping)]
    if name in COLUMN_TAPS:
        columns = golden.shape[-1] // mapping.tp_size
        return golden[..., mapping.rank * columns:(mapping.rank + 1) * columns]
    return golden


def _run_rank(rank: int, component: str, config, weights, tp_size: int, dtype: torch.dtype, decode: bool,
              feed: dict[str, np.ndarray], bug: str | None = None, layer: int = 0,
              marked: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """In rank ``rank``'s process: build its engine of ``component`` (a streaming piece: layer ``layer``) over its
    split of ``weights`` (catalog bug ``bug`` injected there), with ``marked`` outputs, and run it on ``feed``."""
    rank_weights = RankWeights(weights, config, TpMapping(tp_size, rank))
    with BUGS[bug].injected() if bug else contextlib.nullcontext():
        engine = build_component(component, config, rank_weights, dtype, OnnxBackend(), decode, layer=layer,
                                 marked=marked)
    return dict(engine.infer(feed))


@dataclass
class TpCheckResult:
    """One component checked at TP ``tp_size``: every rank's taps against the golden's slices."""

    ranks: list[CheckResult]
    error: RankError | None = None  # a rank failed to build or run its engine (then no tap was computed)

    @property
    def exit_code(self) -> int:
        return int(self.error is not None or self.first_failure is not None)

    @property
    def first_failure(self) -> tuple[int, object] | None:
        """(rank, tap result) of the earliest diverging tap in execution order, the lowest rank first."""
        if self.error is not None:
            return self.error.rank, self.ranks[self.error.rank].results[0]
        failures = [(rank, first_failure(check.results)) for rank, check in enumerate(self.ranks)]
        order = [r.name for r in self.ranks[0].results]
        failures = [(rank, f) for rank, f in failures if f is not None]
        return min(failures, key=lambda rf: (order.index(rf[1].name), rf[0]), default=None)

    def verdict(self) -> str:
        if self.error is not None:
            return f"FAIL: the candidate failed on {self.error}"
        if (first := self.first_failure) is None:
            return "pass"
        rank, tap = first
        return f"FAIL at {tap.name} on rank {rank} (max abs {tap.max_abs:.3e}, cosine {tap.cosine:.6f})"

    def table(self) -> str:
        return "\n".join(check.table() for check in self.ranks)


def check_tp(component: str, model: DeciCoderForCausalLM, pool: RankPool, shape: CaseShape,
             bug: str | None = None) -> TpCheckResult:
    """``component`` at TP ``pool.tp_size`` on the seeded inputs of ``shape`` (catalog bug ``bug`` injected in
    every rank): the golden once, every rank's engine at once, each rank's taps against the golden's slices."""
    if component not in TP_COMPONENTS:
        raise ValueError(f"{component} is not split across ranks; TP checks: {', '.join(TP_COMPONENTS)}")
    config, dtype, tp = model.config, model.lm_head.weight.dtype, pool.tp_size
    inputs = make_inputs(component, config, shape, dtype)
    golden = run_component(component, model, inputs)
    mapped = _candidate_weights(model, bug)
    weights = {name: mapped[name] for name in mapped if name.startswith(layer_prefix(0))}  # what a component reads
    decode = needs_decode_graph(component, shape)

    def rank_feed(rank: int) -> dict[str, np.ndarray]:
        mapping = TpMapping(tp, rank)
        return to_feed({name: rank_slice(name, tensor, config, mapping) for name, tensor in inputs.items()})

    order = component_outputs(component)
    try:
        outputs = pool.run(_run_rank, lambda rank: (component, config, weights, tp, dtype, decode, rank_feed(rank),
                                                    bug))
    except RankError as e:
        return _failed(component, pool, dtype, shape, order, e)
    checks = []
    for rank, candidate in enumerate(outputs):
        mapping = TpMapping(tp, rank)
        sliced = {name: rank_slice(name, tensor, config, mapping) for name, tensor in golden.items()}
        results = compare_taps(sliced, candidate, TOLERANCES[dtype], order)
        checks.append(CheckResult(_label(component, rank, tp), _backend(pool), dtype, shape, results))
    return TpCheckResult(checks)


def _candidate_weights(model: DeciCoderForCausalLM, bug: str | None) -> Mapping[str, torch.Tensor]:
    """The port's checkpoint under TensorRT-LLM names, mapped with ``bug`` injected (a weight-mapping bug applies
    here, in this process; the ranks split what it maps). Tensors are read when asked for (a fused QKV is made
    then), so a stream hands the ranks one layer's at a time."""
    with BUGS[bug].injected() if bug else contextlib.nullcontext():
        return weight_mapping.to_trtllm(model.state_dict(), model.config)


def _label(component: str, rank: int, tp: int) -> str:
    return f"{component} rank {rank}/{tp}"


def _backend(pool: RankPool) -> str:
    return f"onnx lowering, TP {pool.tp_size}: one process a rank, collectives by torch.distributed ({pool.backend})"


def _failed(component: str, pool: RankPool, dtype, shape: CaseShape, order, error: RankError) -> TpCheckResult:
    """Every rank's taps uncomputed: rank ``error.rank``'s engine failed to build or run (the port's divergence)."""
    results = [TapResult(name, (), *(float("nan"),) * 4, False, "not computed") for name in order]
    return TpCheckResult([CheckResult(_label(component, rank, pool.tp_size), _backend(pool), dtype, shape, results,
                                      str(error) if rank == error.rank else f"not run: rank {error.rank} failed")
                          for rank in range(pool.tp_size)], error)


LAYER_OUTPUTS = ("attn.present_k", "attn.present_v", "out")


@torch.no_grad()
def stream_tp(model: DeciCoderForCausalLM, pool: RankPool, shape: CaseShape, bug: str | None = None,
              progress: Callable[[str], None] = lambda message: None) -> TpCheckResult:
    """The whole model at TP ``pool.tp_size``, a layer at a time as locate streams it: the embedding (replicated:
    every rank computes what TP 1 does) once, then each decoder layer on every rank at once, each rank fed the
    candidate's previous layer output (rank 0's: a correct port's ranks agree after the all-reduce, and one that
    does not shows at that tap on its rank), the golden rerunning the layer on that same input; then the head
    (lm_head split by vocabulary, its logits all-gathered). Each rank's present K/V (its KV heads) and outputs are
    judged against the golden's slices."""
    config, dtype, tp = model.config, model.lm_head.weight.dtype, pool.tp_size
    tolerance, decode = TOLERANCES[dtype], shape.past_len > 0
    inputs = make_inputs("causal_lm", config, shape, dtype)
    feed = to_feed(inputs)
    weights = _candidate_weights(model, bug)
    order = component_outputs("causal_lm", config.num_hidden_layers)
    results: list[dict[str, TapResult]] = [{} for _ in range(tp)]

    def judge(golden: dict, outputs: list[dict], names, prefix: str = "") -> None:
        for rank, candidate in enumerate(outputs):
            mapping = TpMapping(tp, rank)
            sliced = {name: rank_slice(name, golden[name], config, mapping) for name in names}
            for r in compare_taps(sliced, candidate, tolerance, names):
                name = prefix + r.name.removeprefix("attn.")
                results[rank][name] = replace(r, name=name)

    with BUGS[bug].injected() if bug else contextlib.nullcontext():
        embed = build_component("embed", config, weights, dtype, OnnxBackend())
        hidden = embed.infer({"input_ids": feed["input_ids"]})["embed"]
    judge({"embed": model.model.embed_tokens(inputs["input_ids"])}, [{"embed": hidden}] * tp, ["embed"])
    try:
        for i in range(config.num_hidden_layers):
            layer_weights = {name: weights[name] for name in weights if name.startswith(layer_prefix(i))}
            past = layer_past(inputs, i) if decode else None

            def rank_feed(rank: int) -> dict[str, np.ndarray]:
                layer_feed = {"hidden_states": hidden, "position_ids": feed["position_ids"]}
                if past is not None:
                    mapping = TpMapping(tp, rank)
                    layer_feed.update(past_k=to_feed({"k": rank_slice("past_k", past[0], config, mapping)})["k"],
                                      past_v=to_feed({"v": rank_slice("past_v", past[1], config, mapping)})["v"])
                return layer_feed

            outputs = pool.run(_run_rank, lambda rank: ("layer", config, layer_weights, tp, dtype, decode,
                                                        rank_feed(rank), bug, i, LAYER_OUTPUTS))
            golden = run_layer(model, i, numpy_to_torch(hidden), inputs["position_ids"], past, LAYER_OUTPUTS)
            judge(golden, outputs, LAYER_OUTPUTS, prefix=f"layer_{i}.")
            hidden = outputs[0]["out"]
            progress(f"layer {i + 1}/{config.num_hidden_layers}")
        head_weights = {name: weights[name] for name in ("transformer.ln_f.weight", "lm_head.weight")}
        outputs = pool.run(_run_rank, lambda rank: ("head", config, head_weights, tp, dtype, False,
                                                    {"hidden_states": hidden}, bug))
    except RankError as e:
        return _failed("causal_lm", pool, dtype, shape, order, e)
    final_norm = model.model.norm(numpy_to_torch(hidden))
    judge({"final_norm": final_norm, "logits": model.lm_head(final_norm)}, outputs, ["final_norm", "logits"])
    return TpCheckResult([CheckResult(_label("causal_lm", rank, tp), _backend(pool), dtype, shape,
                                      [results[rank][name] for name in order]) for rank in range(tp)])
