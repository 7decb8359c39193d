"""Diagnose, not only locate: what kind of bug left the divergence at the first diverging tap?

Most porting bugs leave a fingerprint in the tensor where they first show: heads in another
order, a mask's triangle, the other half of a rotation, two branches exchanged. Each hypothesis
below is an exact transformation of the golden (the reference's own arithmetic with one thing
changed: another head order, another mask, the other RoPE layout, another weight). It explains the
candidate when the transformed golden passes against the candidate by the judge's own rule and
tolerance (parity.compare); the first hypothesis in ``HYPOTHESES`` (the most specific first) that
explains it is the diagnosis. When none does, the diagnosis says so and where the error lies: a
guess would send the engineer after the wrong bug.

A hypothesis is a generator over ``Evidence`` yielding ``Fit``s (a finding, a hint in porting
terms, the transformed golden); adding one is adding a function to ``HYPOTHESES``. Evidence names
tensors as one decoder layer names its taps (LAYER_TAPS: ``input_norm``, ``attn.q_rot``,
``mlp.gate``...), whichever check produced them (``scoped``); the model's own are ``embed``,
``final_norm``, ``logits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from reference import DeciCoderForCausalLM, modeling
from reference.inputs import past_names
from trt_layers.quantization import RoundedCache

from .compare import BLOCK_ELEMENTS, TOLERANCES, TapResult, Tolerance, elements_within, first_failure

NO_PATTERN = "no_known_pattern"


@dataclass(frozen=True)
class Diagnosis:
    tap: str  # as the report names it: "q_rot", "layer_3.attn.k_rep"
    hypothesis: str  # a HYPOTHESES name, or NO_PATTERN
    finding: str  # what the transformation is, or (no pattern) where the error lies
    hint: str = ""  # what to look for in the port
    residual: float = float("nan")  # max |candidate - transformed golden|: what the hypothesis leaves unexplained

    def text(self) -> str:
        """'diagnosis: <hypothesis> at <tap>: <finding> (...)', then the hint on a line of its own."""
        if self.hypothesis == NO_PATTERN:
            return f"diagnosis: no known pattern at {self.tap}: {self.finding}"
        return (f"diagnosis: {self.hypothesis} at {self.tap}: {self.finding} (explains the candidate within "
                f"tolerance: residual max abs {self.residual:.2e})\n  hint: {self.hint}")


@dataclass
class Evidence:
    """The first diverging tap, golden and candidate, and what the golden knows around it."""

    tap: str  # in layer scope (module docstring)
    golden: torch.Tensor  # in the run's dtype
    candidate: torch.Tensor  # fp32
    known: Mapping[str, torch.Tensor]  # the golden's other taps and the check's inputs, in layer scope
    model: DeciCoderForCausalLM
    layer: int | None  # the decoder layer holding the tap; None for embed, final_norm, logits
    mask: torch.Tensor | None = None  # the golden attention's additive mask [s, kv_len], None where it has none
    tolerance: Tolerance = field(init=False)

    def __post_init__(self):
        self.tolerance = TOLERANCES[self.golden.dtype]

    def explains(self, transformed: torch.Tensor, tolerance: Tolerance | None = None) -> bool:
        """Whether ``transformed`` passes against the candidate, non-finite values matching in place."""
        return _matches(transformed, self.candidate, tolerance or self.tolerance)

    @property
    def config(self):
        return self.model.config

    def module(self, path: str) -> torch.nn.Module:
        """A module of the tap's layer (``self_attn.q_proj``) or, outside a layer, of the model (``lm_head``)."""
        root = self.model if self.layer is None else self.model.model.layers[self.layer]
        return root.get_submodule(path)


def _matches(transformed: torch.Tensor, candidate: torch.Tensor, tolerance: Tolerance) -> bool:
    """Judged a block of rows at a time, stopping at the first block that fails: most hypotheses fail
    at once, and a 2048-token attention tap is 512 MiB a tensor."""
    if transformed.shape != candidate.shape:
        return False
    width = candidate.shape[-1] if candidate.ndim else 1
    t_rows, c_rows = transformed.reshape(-1, width), candidate.reshape(-1, width)
    step = max(1, BLOCK_ELEMENTS // width)
    for start in range(0, len(c_rows), step):
        t, c = t_rows[start:start + step].float(), c_rows[start:start + step]
        # Non-finite values explain only themselves, in place (the judge's rule fails any NaN error).
        within = elements_within(t, c, tolerance) & t.isfinite()
        if not bool((within | (t == c) | (t.isnan() & c.isnan())).all()):
            return False
    return True


@dataclass(frozen=True)
class Fit:
    finding: str
    hint: str
    transformed: torch.Tensor
    tolerance: Tolerance | None = None  # another dtype's, for a hypothesis about precision


Hypothesis = Callable[[Evidence], Iterator[Fit]]

_HEAD_TAPS = {f"attn.{t}" for t in ("q", "k", "v", "q_rot", "k_rot", "present_k", "present_v", "k_rep", "v_rep",
                                    "scores", "probs", "context")}  # [b, heads, s, ...]
_REPEATED = {"attn.k_rep", "attn.v_rep"}


def _seq_axis(e: Evidence) -> int | None:
    """The token axis of the tap: [b, heads, s, ...] or [b, s, ...]."""
    if e.tap in _HEAD_TAPS:
        return 2
    return 1 if e.golden.ndim == 3 else None


# ---------------------------------------------------------------- two tensors exchanged

# Pairs of taps a port confuses, and what the confusion means in TensorRT-LLM terms.
_EXCHANGED = {
    frozenset({"mlp.gate", "mlp.up"}): "gate_proj and up_proj exchanged: TensorRT-LLM's GatedMLP applies the "
                                       "activation to mlp.fc, so HF gate_proj maps to mlp.fc and up_proj to mlp.gate",
    frozenset({"attn.k", "attn.v"}): "k_proj and v_proj exchanged: the fused QKV weight is [q; k; v] in that order",
    frozenset({"attn.present_k", "attn.present_v"}): "the K and V caches exchanged",
    frozenset({"attn.k_rep", "attn.v_rep"}): "K and V exchanged before attention",
    frozenset({"attn.q", "attn.q_rot"}): "RoPE not applied to q",
    frozenset({"attn.k", "attn.k_rot"}): "RoPE not applied to k",
    frozenset({"attn.cos", "attn.sin"}): "the cos and sin tables exchanged",
}


def other_tap(e: Evidence) -> Iterator[Fit]:
    """The candidate holds another golden tensor of the same shape (gate for up, K for V)."""
    for name, tensor in e.known.items():
        if name != e.tap and tensor.shape == e.golden.shape and tensor.is_floating_point():
            hint = _EXCHANGED.get(frozenset({e.tap, name}), f"the port computes {name} where {e.tap} belongs")
            yield Fit(f"{e.tap} holds what the golden computes as {name}", hint, tensor)


# ---------------------------------------------------------------- RoPE

_ROPE_TAPS = {"attn.cos", "attn.sin", "attn.q_rot", "attn.k_rot"}


def _rope_tap(e: Evidence, cos: torch.Tensor, sin: torch.Tensor,
              rotate: Callable[[torch.Tensor], torch.Tensor] = modeling.rotate_half) -> torch.Tensor:
    """The tap computed from the tables ``cos``, ``sin`` [b, s, d], rotating with ``rotate``."""
    if e.tap in ("attn.cos", "attn.sin"):
        return cos if e.tap == "attn.cos" else sin
    x = e.known["attn.q" if e.tap == "attn.q_rot" else "attn.k"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate(x) * sin


def _tables(e: Evidence, positions: torch.Tensor, theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The golden's cos and sin at ``positions`` (the reference's rotary embedding, with another base)."""
    rotary = e.module("self_attn.rotary_emb") if theta is None else modeling.DeciCoderRotaryEmbedding(
        e.config.head_dim, theta)
    return rotary(e.golden, positions.to(e.golden.device))


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotation of interleaved pairs: (x0, x1, x2, x3) -> (-x1, x0, -x3, x2)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rope_layout(e: Evidence) -> Iterator[Fit]:
    """The other RoPE layout: interleaved pairs (GPT-J) instead of rotate-half, or the rotated half's sign flipped."""
    if e.tap not in _ROPE_TAPS or "position_ids" not in e.known:
        return
    cos, sin = _tables(e, e.known["position_ids"])
    half = e.config.head_dim // 2
    cos_il, sin_il = (t[..., :half].repeat_interleave(2, dim=-1) for t in (cos, sin))  # [f0, f0, f1, f1, ...]
    gptj = ("TensorRT-LLM's rope_gptj rotates interleaved pairs (rotate_every_two); DeciCoder, as Llama, rotates "
            "halves: PositionEmbeddingType.rope_gpt_neox")
    if e.tap in ("attn.cos", "attn.sin"):
        yield Fit("the tables laid out for interleaved pairs (f0, f0, f1, f1, ...)", gptj, _rope_tap(e, cos_il, sin_il))
        return
    yield Fit("interleaved pairs rotated (rotate_every_two) with rotate-half tables", gptj,
              _rope_tap(e, cos, sin, _rotate_every_two))
    yield Fit("the GPT-J layout: interleaved pairs and tables", gptj, _rope_tap(e, cos_il, sin_il, _rotate_every_two))
    yield Fit("rotated the other way: the rotated half's sign flipped", "rotate_half is cat(-x2, x1); the port "
              "computes cat(x2, -x1) (or subtracts the sin term)", _rope_tap(e, cos, -sin))


def rope_positions(e: Evidence) -> Iterator[Fit]:
    """RoPE at other positions: restarting at 0 after a cache, off by one or two, the cache counted twice."""
    if e.tap not in _ROPE_TAPS or "position_ids" not in e.known:
        return
    positions = e.known["position_ids"]
    past = int(positions.min())
    shifts = {
        -past: (f"positions restart at 0 instead of continuing after the {past} cached tokens",
                "decode positions are past_len + i: derive them from the cache length (TensorRT-LLM: position_ids "
                "of the generation step)"),
        past: (f"positions offset by the {past} cached tokens twice", "the cache length is added to position ids "
               "that already include it"),
    }
    for k in (1, -1, 2, -2):
        shifts.setdefault(k, (f"positions off by {k:+d}: token i rotated as position i{k:+d}",
                              "position ids start at the wrong index (0-based in the golden)"))
    for shift, (finding, hint) in shifts.items():
        if shift:
            yield Fit(finding, hint, _rope_tap(e, *_tables(e, positions + shift)))


def rope_theta(e: Evidence) -> Iterator[Fit]:
    """RoPE tables with another base."""
    if e.tap not in _ROPE_TAPS or "position_ids" not in e.known:
        return
    theta = e.config.rope_theta
    for other in (1e4, 1e5, 5e5, 1e6):
        if not math.isclose(other, theta):
            yield Fit(f"RoPE base {other:g} where the config says {theta:g}",
                      "pass config.rope_theta as rotary_embedding_base (TensorRT-LLM's default is 10000)",
                      _rope_tap(e, *_tables(e, e.known["position_ids"], other)))


# ---------------------------------------------------------------- attention mask and scale

def _attends(e: Evidence) -> bool:
    """Whether the tap is computed from the attention scores: the probabilities, or the context they weight."""
    return "attn.scores" in e.known and (e.tap == "attn.probs" or e.tap == "attn.context" and "attn.v_rep" in e.known)


def _attention(e: Evidence, mask: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """The tap (probs or context) from the golden's pre-mask scores with another mask or scale; the softmax
    in fp32, as the reference's."""
    scores = e.known["attn.scores"].float()
    scores = scores * scale if scale != 1.0 else scores
    probs = F.softmax(scores if mask is None else scores + mask, dim=-1).to(e.golden.dtype)
    return probs if e.tap == "attn.probs" else torch.matmul(probs, e.known["attn.v_rep"])


def _masks(q_len: int, kv_len: int, device) -> dict[str, torch.Tensor]:
    past = kv_len - q_len

    def below(diagonal: int) -> torch.Tensor:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal)
        return torch.zeros(q_len, kv_len, device=device).masked_fill(~visible, torch.finfo(torch.float32).min)

    masks = {"causal": below(past), "diagonal": below(past - 1)}
    if past:
        masks["unshifted"] = below(0)
    return masks


def attention_mask(e: Evidence) -> Iterator[Fit]:
    """Attention under another mask: none, causal where none belongs, not offset by the cache, the diagonal
    excluded. Seen in the probabilities, or in the context where those are not tapped (an external graph)."""
    if not _attends(e):
        return
    q_len, kv_len = e.known["attn.scores"].shape[-2:]
    masks = _masks(q_len, kv_len, e.golden.device)
    golden_has = "no mask" if e.mask is None else "a causal mask"
    if e.mask is not None:
        yield Fit("no mask where the golden masks causally", "prefill attention is causal: build it with the causal "
                  "mask (TensorRT-LLM: AttentionMaskType.causal)", _attention(e, None))
    else:
        yield Fit("a causal mask where the golden has none", "Deci's decode path attends to every cached key "
                  "unmasked: build the decode graph without the mask", _attention(e, masks["causal"]))
    if "unshifted" in masks:
        yield Fit(f"a causal mask not offset by the {kv_len - q_len} cached tokens (new token i sees keys 0..i), "
                  f"where the golden has {golden_has}", "offset the mask's diagonal by the cache length",
                  _attention(e, masks["unshifted"]))
    yield Fit("the diagonal masked too: no token sees itself", "the mask must keep key j <= query position "
              "(tril with diagonal past_len, not past_len - 1)", _attention(e, masks["diagonal"]))


def _factors(e: Evidence) -> dict[str, float]:
    d, hidden = e.config.head_dim, e.config.hidden_size
    return {"1/sqrt(head_dim)": d**-0.5, "sqrt(head_dim)": d**0.5, "1/head_dim": 1 / d, "head_dim": float(d),
            "sqrt(hidden_size)": hidden**0.5, "1/sqrt(hidden_size)": hidden**-0.5, "-1": -1.0, "2": 2.0, "1/2": 0.5}


def _scale_hint(e: Evidence, name: str) -> str:
    if e.tap in ("attn.scores", "attn.probs", "attn.context"):
        if name == "1/sqrt(head_dim)":
            return ("the attention scale 1/sqrt(head_dim) applied twice: TensorRT-LLM scales q before Q K^T "
                    "(norm_before_bmm1) or in the softmax (q_scaling), not both")
        if name == "sqrt(head_dim)":
            return "the attention scale 1/sqrt(head_dim) not applied (or divided instead of multiplied)"
    if name == "-1":
        return "a sign flipped (a subtraction reversed, or a weight negated in conversion)"
    return f"a constant factor {name}: look for a scale applied twice or not at all"


_CHANNEL_FIT_TOKENS = 4


def scale(e: Evidence) -> Iterator[Fit]:
    """A constant factor (at probs and context: on the scores before the softmax), or one factor per head, or
    per output channel."""
    if _attends(e):
        for name, factor in _factors(e).items():
            if factor > 0:
                yield Fit(f"the softmax of the scores times {name}", _scale_hint(e, name),
                          _attention(e, e.mask, factor))
        return
    g, c = e.golden.double(), e.candidate.double()
    norm2 = float((g * g).sum())
    if not norm2:
        return
    factor = float((g * c).sum()) / norm2  # least squares: c ~ factor * g
    if not math.isfinite(factor):
        return
    if factor == 0:
        yield Fit("all zeros", "the tap is never written: an output left unset or a buffer never filled",
                  torch.zeros_like(e.candidate))
        return
    name = next((n for n, f in _factors(e).items() if math.isclose(factor, f, rel_tol=1e-3)), f"{factor:.6g}")
    yield Fit(f"the golden times {name}", _scale_hint(e, name), e.golden.float() * factor)
    if e.tap in _HEAD_TAPS and g.shape[1] > 1:
        per_head = (g * c).sum((0, 2, 3)) / (g * g).sum((0, 2, 3)).clamp_min(1e-30)  # [heads]
        shown = ", ".join(f"{f:.4g}" for f in per_head[:8].tolist()) + (", ..." if len(per_head) > 8 else "")
        yield Fit(f"each head scaled by its own factor ({shown})", "a per-head scale: look for weights scaled per "
                  "head in conversion", e.golden.float() * per_head.float()[None, :, None, None])
    # One factor per output channel of a linear ([b, s, out], or [b, heads, s, d]: channel (head, d)), fitted
    # over the tokens: with fewer than _CHANNEL_FIT_TOKENS any tensor would fit.
    if (per_channel := _per_channel(e, e.golden)) is not None:
        yield Fit("each output channel scaled by its own factor", "per-channel scales misapplied: a quantized "
                  "weight's per_channel_scale missing, one scale for every channel, or along the wrong axis; or "
                  "weight rows scaled in conversion", per_channel)


def _per_channel(e: Evidence, g: torch.Tensor) -> torch.Tensor | None:
    """``g`` times one factor per output channel of a linear ([b, s, out], or [b, heads, s, d]: channel (head, d)),
    least squares against the candidate over the tokens; None with fewer than _CHANNEL_FIT_TOKENS tokens, where
    any tensor would fit."""
    token_axis = _seq_axis(e)
    if token_axis is None or g.ndim not in (3, 4) or g.shape[0] * g.shape[token_axis] < _CHANNEL_FIT_TOKENS:
        return None
    g, c, tokens = g.double(), e.candidate.double(), (0, token_axis)
    factor = (g * c).sum(tokens, keepdim=True) / (g * g).sum(tokens, keepdim=True).clamp_min(1e-30)
    return (g * factor).float()


# ---------------------------------------------------------------- order along heads and tokens

def _sources(e: Evidence, axis: int, pool: torch.Tensor | None = None) -> list[int] | None:
    """For each index along ``axis`` of the candidate, the index of ``pool`` (default the golden) holding the
    same values (itself where it does), or None when one has no match. Matched on a sample of each slice;
    the caller verifies the whole."""
    g, c = (e.golden if pool is None else pool).float().movedim(axis, 0), e.candidate.movedim(axis, 0)
    g, c = g.reshape(g.shape[0], -1), c.reshape(c.shape[0], -1)
    columns = torch.linspace(0, g.shape[1] - 1, min(g.shape[1], 256)).long()
    gs, cs = g[:, columns], c[:, columns]
    # The sample's own unit of atol: a match passes, so each element is within it or within rtol.
    unit = e.tolerance.atol * max(1.0, float(gs.abs().max())) + e.tolerance.rtol * gs.abs()
    sources = []
    for j in range(c.shape[0]):
        matches = ((cs[j] - gs).abs() <= unit).all(dim=1).nonzero().flatten().tolist()
        if not matches:
            return None
        sources.append(j if j in matches else matches[0])
    return sources


def _shown(order: list[int]) -> str:
    return "(" + ",".join(map(str, order[:12])) + (",...)" if len(order) > 12 else ")")


def _describe_heads(e: Evidence, sources: list[int]) -> tuple[str, str]:
    n = len(sources)
    if e.tap in _REPEATED:
        n_rep = e.config.num_key_value_groups
        kv = [s // n_rep for s in sources]
        kv_heads = n // n_rep
        if kv == [j % kv_heads for j in range(n)]:
            in_place = _shown([j // n_rep for j in range(n)])
            return (f"K/V heads tiled {_shown(kv)} where each repeats in place {in_place}",
                    "TensorRT-LLM's repeat_interleave repeats each KV head in place (0,0,1,1); concat or expand on "
                    "a new leading axis tiles them (0,1,0,1)")
        if kv == [kv_heads - 1 - j // n_rep for j in range(n)]:
            return "the KV heads in reverse order", "check the order of the KV heads in the fused QKV weight"
        return f"query heads read KV heads {_shown(kv)}", "check how KV heads are shared among query heads"
    if sources == list(range(n))[::-1]:
        return "the heads in reverse order", "check the head order of the split (view/permute) and of the weights"
    return (f"the heads permuted: candidate head j holds golden head {_shown(sources)}",
            "check the head split (view [b, s, heads, d], then permute) and the fused QKV weight's layout")


def head_order(e: Evidence) -> Iterator[Fit]:
    """The heads in another order: tiled vs repeated in place, reversed KV heads, any permutation."""
    if e.tap in _HEAD_TAPS and e.golden.shape[1] > 1 and (sources := _sources(e, 1)) is not None:
        yield Fit(*_describe_heads(e, sources), e.golden[:, sources])


def qkv_layout(e: Evidence) -> Iterator[Fit]:
    """q, k or v heads taken from other parts of the fused QKV: its rows read in another layout."""
    if e.tap not in ("attn.q", "attn.k", "attn.v") or not {"attn.q", "attn.k", "attn.v"} <= e.known.keys():
        return
    parts = {name: e.known[f"attn.{name}"] for name in "qkv"}
    pool = torch.cat(list(parts.values()), dim=1)  # [b, heads + 2 kv_heads, s, d]
    labels = [f"{name}{h}" for name, t in parts.items() for h in range(t.shape[1])]
    sources = _sources(e, 1, pool)
    if sources is not None and any(labels[i][0] != e.tap[-1] for i in sources):
        shown = ",".join(labels[i] for i in sources[:12]) + (",..." if len(sources) > 12 else "")
        yield Fit(f"heads taken across the fused QKV: ({shown})", "TensorRT-LLM's LLaMA fuses QKV as [all q heads; "
                  "all k heads; all v heads]; the port reads another layout (per head q_h, k_h, v_h, as GPT-NeoX)",
                  pool[:, sources])


def channel_pairs(e: Evidence) -> Iterator[Fit]:
    """The tap's channels (its last axis) exchanged in adjacent pairs: output channels read two at a time in the
    wrong order."""
    if not e.golden.ndim or e.golden.shape[-1] % 2:
        return
    hint = ("an INT4 checkpoint packs two output channels a byte, the even one in the low nibble (ModelOpt's export; "
            "TensorRT's INT4 constants likewise): the port reads the high nibble first")
    swapped = e.golden.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    yield Fit("adjacent channels exchanged in pairs (0<->1, 2<->3, ...)", hint, swapped)
    if (rescaled := _per_channel(e, swapped)) is not None:  # the values exchanged, each channel's scale kept
        yield Fit("adjacent channels' values exchanged in pairs (0<->1, 2<->3, ...), each channel keeping its own "
                  "scale", hint, rescaled)


def cache_scale(e: Evidence) -> Iterator[Fit]:
    """A quantized KV cache's new entries stored with the layer's scale missing, or applied as a multiply where
    the cache holds x / scale (the golden's kv_cache a quantization.RoundedCache)."""
    source = {"attn.present_k": "attn.k_rot", "attn.present_v": "attn.v"}.get(e.tap)
    cache = getattr(e.module("self_attn"), "kv_cache", None) if e.layer is not None else None
    if source not in e.known or not isinstance(cache, RoundedCache):
        return
    x = e.known[source].float()  # the new tokens' K or V [b, kv_heads, s, d]
    past = e.golden[:, :, :e.golden.shape[2] - x.shape[2]]
    scale = torch.tensor(cache.scale, dtype=torch.float32)
    hint = ("TensorRT-LLM's cache holds x / kv_cache_scaling_factor (its attention multiplies by the inverse, "
            "kv_cache_quant_scale) and reads it back times the factor")
    for finding, stored in (("stored without its kv_cache_scaling_factor (scale 1)", cache.kv.stored(x, 1.0)),
                            ("stored as x * kv_cache_scaling_factor, where the cache holds x / it",
                             cache.kv.stored(x * scale * scale, cache.scale))):
        yield Fit(f"the new tokens' cache entries {finding}", hint, torch.cat([past, stored.to(past.dtype)], dim=2))


def kv_groups(e: Evidence) -> Iterator[Fit]:
    """Each KV head repeated for another group size than the config's heads / KV heads (another head count)."""
    present = e.known.get({"attn.k_rep": "attn.present_k", "attn.v_rep": "attn.present_v"}.get(e.tap, ""))
    if present is None or e.candidate.ndim != 4:
        return
    kv_heads, heads = present.shape[1], e.candidate.shape[1]
    if heads % kv_heads == 0 and heads != e.golden.shape[1]:
        yield Fit(f"each KV head repeated for {heads // kv_heads} query heads ({heads} heads) where the config's "
                  f"{e.golden.shape[1]}:{kv_heads} grouping has {e.golden.shape[1] // kv_heads}",
                  "derive the group size from the config, num_attention_heads // num_key_value_heads (4 is "
                  "DeciCoder-1b's 32:4)", modeling.repeat_kv(present, heads // kv_heads))


def sequence_order(e: Evidence) -> Iterator[Fit]:
    """The tokens in another order: new tokens before the cache, reversed, any permutation."""
    axis = _seq_axis(e)
    if axis is None or e.golden.shape[axis] < 2 or (sources := _sources(e, axis)) is None:
        return
    n = len(sources)
    shift = sources[0]
    if sources == [(t + shift) % n for t in range(n)]:
        finding = f"the tokens rotated by {shift}: candidate token t holds golden token (t + {shift}) mod {n}"
        past = e.known["past_k"].shape[2] if "past_k" in e.known else 0
        hint = ("new K/V concatenated before the cache: append after it, concat([past, new]) on the sequence axis"
                if past and shift == past else "a concat or roll along the sequence axis in the wrong order")
    elif sources == list(range(n))[::-1]:
        finding, hint = "the tokens in reverse order", "a flip along the sequence axis"
    else:
        finding = f"the tokens permuted: candidate token t holds golden token {_shown(sources)}"
        hint = "check concat order and indexing along the sequence axis"
    yield Fit(finding, hint, e.golden.index_select(axis, torch.tensor(sources, device=e.golden.device)))


# ---------------------------------------------------------------- another weight

# tap -> (its input among the known tensors, the module computing it). Projections to heads are split to
# [b, heads, s, d]; the attention's own output reads the context merged back to [b, s, heads * d].
_LINEAR = {"attn.q": ("input_norm", "self_attn.q_proj"), "attn.k": ("input_norm", "self_attn.k_proj"),
           "attn.v": ("input_norm", "self_attn.v_proj"), "attn.out": ("attn.context", "self_attn.o_proj"),
           "mlp.gate": ("post_norm", "mlp.gate_proj"), "mlp.up": ("post_norm", "mlp.up_proj"),
           "mlp.down": ("mlp.act", "mlp.down_proj"), "logits": ("final_norm", "lm_head")}
_NORMS = {"input_norm": ("hidden_states", "input_layernorm"), "post_norm": ("resid_1", "post_attention_layernorm"),
          "final_norm": ("final_hidden", "model.norm")}
_SAMPLE_TOKENS = 16  # another weight is first tried on this many tokens, then verified on all


def _linear_tap(e: Evidence, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if e.tap == "attn.out":
        x = x.transpose(1, 2).flatten(2)  # [b, heads, s, d] -> [b, s, heads * d]
    y = F.linear(x, weight)
    return y.unflatten(-1, (-1, e.config.head_dim)).transpose(1, 2) if e.tap in _HEAD_TAPS else y


def _norm_tap(e: Evidence, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None):
    """The reference's RMSNorm of the tap with another weight or eps (the model's own left untouched)."""
    norm = e.module(_NORMS[e.tap][1])
    other = SimpleNamespace(weight=norm.weight if weight is None else weight,
                            variance_epsilon=norm.variance_epsilon if eps is None else eps)
    return modeling.DeciCoderRMSNorm.forward(other, x)


def _sample(e: Evidence, t: torch.Tensor, tap: bool) -> torch.Tensor:
    """The first tokens of an input (tap False) or of the tap."""
    axis = 2 if tap and e.tap in _HEAD_TAPS else 1
    return t.narrow(axis, 0, min(_SAMPLE_TOKENS, t.shape[axis]))


def _weight_hint(e: Evidence, own: str, other: str) -> str:
    if other == own + " transposed":
        return "the weight transposed: TensorRT-LLM's Linear stores [out, in] as HF does"
    if other.startswith("model.layers.") and own.startswith("model.layers."):
        if other.split(".", 3)[3] == own.split(".", 3)[3]:
            return "another layer's weight: check the layer index in the weight mapping"
    if {own, other} == {"lm_head.weight", "model.embed_tokens.weight"}:
        return "DeciCoder's lm_head is its own weight (tie_word_embeddings false): map lm_head.weight, do not tie it"
    return "two weights exchanged in the weight mapping (HF name -> TensorRT-LLM name)"


def other_weight(e: Evidence) -> Iterator[Fit]:
    """A projection or norm computed with another weight of the same shape (another module's, another
    layer's, the tied embedding) or with its own transposed."""
    spec = _LINEAR.get(e.tap) or _NORMS.get(e.tap)
    if spec is None or spec[0] not in e.known:
        return
    x, own_module = e.known[spec[0]], e.module(spec[1])
    compute = _linear_tap if e.tap in _LINEAR else _norm_tap
    # Each module's weight as it computes with it (a quantized golden's dequantized), by module, not parameter.
    weights = {f"{path}.weight": module.weight for path, module in e.model.named_modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor)}
    own_name = next(name for name, module in e.model.named_modules() if module is own_module) + ".weight"
    own = weights.pop(own_name)
    others = {name: weight for name, weight in weights.items() if weight.shape == own.shape}
    if own.ndim == 2 and own.shape[0] == own.shape[1]:
        others[own_name + " transposed"] = own.T
    candidate_sample = _sample(e, e.candidate, tap=True)
    for name, weight in others.items():
        if _matches(compute(e, _sample(e, x, tap=False), weight.detach()), candidate_sample, e.tolerance):
            yield Fit(f"computed with {name} in place of {own_name}", _weight_hint(e, own_name, name),
                      compute(e, x, weight.detach()))


def _fitted_eps(e: Evidence, x: torch.Tensor) -> float | None:
    """The eps that would give the candidate, from its token of smallest RMS (where eps weighs most):
    candidate = w x / sqrt(mean(x^2) + eps), so eps = 1 / factor^2 - mean(x^2) with factor = <c, w x> / |w x|^2.
    Rounded to two significant digits, as configs write it."""
    weighted = (e.module(_NORMS[e.tap][1]).weight.float() * x.float()).flatten(0, -2)  # [tokens, hidden]
    candidate, mean_square = e.candidate.flatten(0, -2), x.float().pow(2).mean(-1).flatten()
    token = int(mean_square.argmin())
    factor = float((candidate[token] * weighted[token]).sum() / weighted[token].pow(2).sum().clamp_min(1e-30))
    if not math.isfinite(factor) or factor <= 0:
        return None
    eps = 1 / factor**2 - float(mean_square[token])
    return float(f"{eps:.2g}") if eps > 0 else None


def norm_eps(e: Evidence) -> Iterator[Fit]:
    """RMSNorm with another epsilon (a common default, or the one the candidate's smallest token implies):
    the error concentrates in tokens of small RMS."""
    if e.tap not in _NORMS or _NORMS[e.tap][0] not in e.known:
        return
    x, eps = e.known[_NORMS[e.tap][0]], e.config.rms_norm_eps
    for other in dict.fromkeys((1e-6, 1e-5, 1e-8, 1e-12, 0.0, _fitted_eps(e, x))):
        if other is not None and not math.isclose(other, eps):
            yield Fit(f"RMSNorm eps {other:g} where the config says {eps:g}", "pass config.rms_norm_eps to "
                      "rms_norm (TensorRT-LLM's default eps is 1e-6)", _norm_tap(e, x, eps=other))


# What a port computes for SiLU(gate) * up instead, each as the MLP's act tap from the golden's gate and up.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "x * tanh(x): tanh where SiLU's sigmoid belongs": lambda gate, up: gate * torch.tanh(gate) * up,
    "GELU (erf) where SiLU belongs": lambda gate, up: F.gelu(gate) * up,
    "GELU (tanh approximation) where SiLU belongs": lambda gate, up: F.gelu(gate, approximate="tanh") * up,
    "ReLU where SiLU belongs": lambda gate, up: F.relu(gate) * up,
    "sigmoid(x) where SiLU's x * sigmoid(x) belongs": lambda gate, up: torch.sigmoid(gate) * up,
    "no activation": lambda gate, up: gate * up,
    "the activation on the up branch: SiLU(up) * gate": lambda gate, up: F.silu(up) * gate,
}


def activation(e: Evidence) -> Iterator[Fit]:
    """The gated MLP with another activation, or the activation on the other branch."""
    if e.tap != "mlp.act" or not {"mlp.gate", "mlp.up"} <= e.known.keys():
        return
    gate, up = e.known["mlp.gate"], e.known["mlp.up"]
    for finding, act in _ACTIVATIONS.items():
        yield Fit(finding, "DeciCoder's hidden_act is silu, x * sigmoid(x), applied to gate_proj's output "
                  "(TensorRT-LLM: hidden_act='silu' in a GatedMLP, on mlp.fc)", act(gate, up))


# ---------------------------------------------------------------- precision

def lower_precision(e: Evidence) -> Iterator[Fit]:
    """Computed in a narrower dtype than the run's: every value is one of its numbers, within its tolerance."""
    finite = e.candidate[e.candidate.isfinite()]
    for dtype in (torch.float16, torch.bfloat16):
        if torch.finfo(dtype).bits < torch.finfo(e.golden.dtype).bits and torch.equal(finite.to(dtype).float(), finite):
            name = str(dtype).removeprefix("torch.")
            yield Fit(f"every value a {name} number, within {name} tolerance: computed in {name}",
                      f"a cast to {name} (or a kernel in {name}) inside the port where the run is "
                      f"{str(e.golden.dtype).removeprefix('torch.')}", e.golden.to(dtype), TOLERANCES[dtype])


def overflow(e: Evidence) -> Iterator[Fit]:
    """Values past fp16's range became infinite where the golden holds them."""
    if bool(e.candidate.isfinite().all()):
        return
    limit = torch.finfo(torch.float16).max
    golden = e.golden.float()
    saturated = torch.where(golden.abs() > limit, golden.sign() * math.inf, golden)
    yield Fit(f"infinite exactly where the golden exceeds fp16's range ({limit:g})",
              "an fp16 intermediate overflows: keep this op (and its accumulation) in fp32", saturated)


HYPOTHESES: dict[str, Hypothesis] = {h.__name__: h for h in (
    other_tap, rope_layout, rope_positions, rope_theta, attention_mask, other_weight, scale, head_order, qkv_layout,
    channel_pairs, cache_scale, kv_groups, sequence_order, norm_eps, activation, lower_precision, overflow)}
# The hypotheses that explain a candidate of another shape than the golden's; the others need the same shape.
RESHAPING = {"kv_groups"}


def diagnose(e: Evidence, name: str | None = None) -> Diagnosis | None:
    """The first hypothesis that explains the candidate; NO_PATTERN with where the error lies if none
    does; None if the candidate passes (nothing to diagnose). ``name``: the tap as the report names it."""
    e.candidate = e.candidate.float()
    name = name or e.tap
    same_shape = e.candidate.shape == e.golden.shape
    if same_shape and e.explains(e.golden):
        return None
    for hypothesis, generate in HYPOTHESES.items():
        if not same_shape and hypothesis not in RESHAPING:
            continue
        with torch.no_grad():
            for fit in generate(e):
                if e.explains(fit.transformed, fit.tolerance):
                    residual = (fit.transformed.float() - e.candidate).abs().nan_to_num(0.0).max().item()
                    return Diagnosis(name, hypothesis, fit.finding, fit.hint, residual)
    if not same_shape:
        return Diagnosis(name, NO_PATTERN, f"shape {list(e.candidate.shape)} where the golden's is "
                                           f"{list(e.golden.shape)}; no hypothesis explains it")
    return Diagnosis(name, NO_PATTERN, _error_statistics(e))


def _error_statistics(e: Evidence) -> str:
    """Where the error lies: how much of the tap fails, along which heads or tokens, and its worst element."""
    golden = e.golden.float()
    failing = ~elements_within(golden, e.candidate, e.tolerance)
    share = float(failing.float().mean())
    parts = [f"{share:.1%} of elements beyond tolerance"]
    axis = _seq_axis(e)
    if axis is not None:
        tokens = failing.movedim(axis, 0).flatten(1).any(1).nonzero().flatten().tolist()
        parts.append(f"in {len(tokens)} of {golden.shape[axis]} token positions (first {tokens[0]})")
    if e.tap in _HEAD_TAPS:
        heads = failing.movedim(1, 0).flatten(1).any(1).sum().item()
        parts.append(f"{heads} of {golden.shape[1]} heads")
    error = (e.candidate - golden).abs().nan_to_num(math.inf)
    worst = np.unravel_index(int(error.argmax()), tuple(golden.shape))
    parts.append(f"worst at {list(map(int, worst))}: golden {golden[worst].item():.4g}, candidate "
                 f"{e.candidate[worst].item():.4g}")
    return "; ".join(parts) + "; no hypothesis explains it"


# ---------------------------------------------------------------- evidence from each check

# Each component check's tensors in layer scope: its taps under a prefix, its inputs by what they are in a layer.
_SCOPES = {"repeat_kv": "attn.", "rope": "attn.", "gqa_masked": "attn.", "gqa_unmasked": "attn.", "mlp": "mlp.",
           "decoder_layer": ""}
_INPUTS = {"repeat_kv": {"k": "attn.present_k", "v": "attn.present_v"}, "rope": {"q": "attn.q", "k": "attn.k"},
           "gqa_masked": {"hidden_states": "input_norm"}, "gqa_unmasked": {"hidden_states": "input_norm"},
           "mlp": {"hidden_states": "post_norm"}}


def scoped(component: str, tap: str) -> str:
    """A component check's tap name as one decoder layer names it: rope's q_rot is attn.q_rot."""
    return "input_norm" if component == "rmsnorm" else _SCOPES[component] + tap


def golden_mask(q_len: int, kv_len: int, component: str = "decoder_layer", device=None) -> torch.Tensor | None:
    """The additive mask the golden attention applies: causal in prefill, none in Deci's bare decode
    attention (gqa_unmasked), Llama's decode mask (causal, offset by the cache) inside a layer."""
    if component == "gqa_unmasked" or q_len == 1 < kv_len:  # Llama's decode mask for one token: none
        return None
    return modeling.causal_mask(q_len, kv_len, torch.float32, device)


def diagnose_check(component: str, model: DeciCoderForCausalLM, inputs: Mapping[str, torch.Tensor],
                   golden: Mapping[str, torch.Tensor], candidate: Mapping[str, object],
                   results: list[TapResult]) -> Diagnosis | None:
    """The diagnosis of a component check's first diverging tap (layer 0's modules, as components run; the
    whole model's, run whole, by diagnose_whole)."""
    if component == "causal_lm":
        return diagnose_whole(model, results, golden, candidate, inputs)
    first = first_failure(results)
    if first is None or first.name not in candidate:
        return None
    known = {_INPUTS.get(component, {}).get(name, name): tensor for name, tensor in inputs.items()}
    known.update((scoped(component, name), tensor) for name, tensor in golden.items())
    return diagnose_layer_tap(model, 0, scoped(component, first.name), known, candidate[first.name], first.name,
                              component)


def diagnose_layer_tap(model: DeciCoderForCausalLM, layer: int, tap: str, known: Mapping[str, torch.Tensor],
                       candidate, name: str, component: str = "decoder_layer") -> Diagnosis | None:
    """The diagnosis of ``tap`` inside decoder layer ``layer``; ``known`` holds the layer's golden taps and inputs."""
    mask = None
    if "attn.scores" in known:
        mask = golden_mask(*known["attn.scores"].shape[-2:], component, known["attn.scores"].device)
    return diagnose(Evidence(tap, known[tap], _on(candidate, known[tap]), known, model, layer, mask), name)


def diagnose_layer(model: DeciCoderForCausalLM, i: int, results: list[TapResult], golden: Mapping[str, torch.Tensor],
                   candidate: Mapping[str, object], inputs: Mapping[str, torch.Tensor]) -> Diagnosis | None:
    """The diagnosis of the first diverging tap among ``results`` of decoder layer ``i`` (names in layer scope),
    run on ``inputs`` (hidden_states, position_ids, and past_k, past_v in decode)."""
    first = first_failure(results)
    if first is None or first.name not in candidate:
        return None
    return diagnose_layer_tap(model, i, first.name, {**inputs, **golden}, candidate[first.name],
                              f"layer_{i}.{first.name}")


def diagnose_whole(model: DeciCoderForCausalLM, results: list[TapResult], golden: Mapping[str, torch.Tensor],
                   candidate: Mapping[str, object], inputs: Mapping[str, torch.Tensor]) -> Diagnosis | None:
    """The diagnosis of the first diverging tap of a whole-model run: ``golden`` and ``candidate`` hold the
    model's taps (``layer_{i}.attn.q_rot``, ``logits``), ``inputs`` the run's (input_ids, position_ids, caches)."""
    first = first_failure(results)
    if first is None or first.name not in candidate:
        return None
    layers = model.config.num_hidden_layers
    if not first.name.startswith("layer_"):
        known = {**golden, "input_ids": inputs["input_ids"]}
        if f"layer_{layers - 1}.out" in golden:
            known["final_hidden"] = golden[f"layer_{layers - 1}.out"]
        return diagnose_model_tap(model, first.name, known, candidate[first.name])
    layer, tap = first.name.split(".", 1)
    i = int(layer.removeprefix("layer_"))
    known = {_in_layer(name.split(".", 1)[1]): tensor for name, tensor in golden.items()
             if name.startswith(f"{layer}.")}
    if (before := "embed" if i == 0 else f"layer_{i - 1}.out") in golden:
        known["hidden_states"] = golden[before]
    known["position_ids"] = inputs["position_ids"]
    if (past := past_names(i))[0] in inputs:
        known.update(past_k=inputs[past[0]], past_v=inputs[past[1]])
    return diagnose_layer_tap(model, i, _in_layer(tap), known, candidate[first.name], first.name)


def _in_layer(tap: str) -> str:
    """A whole-model tap inside a layer as the layer names it: the registry's layer_{i}.present_k is attn.present_k."""
    return f"attn.{tap}" if tap in ("present_k", "present_v") else tap


def diagnose_model_tap(model: DeciCoderForCausalLM, tap: str, known: Mapping[str, torch.Tensor], candidate,
                       name: str | None = None) -> Diagnosis | None:
    """The diagnosis of embed, final_norm or logits; ``known`` holds the golden's tensors around it."""
    return diagnose(Evidence(tap, known[tap], _on(candidate, known[tap]), known, model, None), name)


def _on(candidate, golden: torch.Tensor) -> torch.Tensor:
    """The candidate's tensor (numpy or torch) in fp32 where the golden lies (the CPU, or a GPU with --device cuda)."""
    return torch.as_tensor(np.asarray(candidate) if not isinstance(candidate, torch.Tensor) else candidate,
                           device=golden.device).float()


