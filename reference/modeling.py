"""A faithful PyTorch DeciCoder-1b, runnable on transformers 5.x without trust_remote_code.

Deci's ``modeling_decicoder.py`` (written for transformers 4.31) is a Llama with one twist in
attention: without a KV cache (prefill) it runs causally masked attention over the prompt;
with a cache (decode) it attends to every cached key and passes only the mask Llama's model
builds (none for a single new token). This file keeps those two paths explicit, names
tensors as Hugging Face's ``modeling_llama.py`` does, and offers each named intermediate
as a tap (see ``taps.py``). Parameter names match the Hugging Face Llama layout, so a
DeciCoder checkpoint loads as is.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DeciCoderConfig
from .inputs import SCALED_TOKENS
from .taps import tap, tapped

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: (key, value), [b, kv_heads, len, head_dim]


class DeciCoderRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype, as Llama does: fp16 squares overflow.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return tap(self, "out", self.weight * hidden_states.to(input_dtype))


class DeciCoderRotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, gathered at ``position_ids``."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        # A plain fp32 CPU attribute, not a buffer: Module.to(fp16) would round the
        # frequencies, and a model built on the meta device would leave them empty.
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even for fp16 models: positions up to 2048 times a frequency lose
        # whole radians in half precision.
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return tap(self, "cos", emb.cos().to(x.dtype)), tap(self, "sin", emb.sin().to(x.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * n_rep, s, d], each KV head repeated n_rep times in a row."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive [q_len, kv_len] mask: query i (at position kv_len - q_len + i) sees keys up to itself."""
    offset = kv_len - q_len
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


def decode_mask(q_len: int, past_len: int, dtype: torch.dtype, device=None) -> torch.Tensor | None:
    """The mask Llama's model hands attention when a cache is present: none for one new token,
    causal over the new tokens (offset by the cache) when several arrive at once."""
    return None if q_len == 1 else causal_mask(q_len, past_len + q_len, dtype, device)


class DeciCoderMLP(nn.Module):
    def __init__(self, config: DeciCoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up, holding two [tokens, intermediate] buffers at a time, not four (184 MiB at
        # 2048 tokens of DeciCoder-1b): gate and up are freed once used unless tapped, and the product
        # lands in silu's output. The same values; a tapped gate or up is never written.
        act = F.silu(tap(self, "gate", self.gate_proj(x)))
        act = tap(self, "act", act.mul_(tap(self, "up", self.up_proj(x))))
        return tap(self, "down", self.down_proj(act))


class DeciCoderAttention(nn.Module):
    """GQA with rotate-half RoPE and Deci's two paths.

    ``past_key_value is None`` (prefill): causal attention over the prompt.
    ``past_key_value`` given (decode): new K/V are appended to the cache and the queries attend
    to every key, masked only by ``attention_mask`` (the model passes none for one new token).
    """

    def __init__(self, config: DeciCoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_key_value_groups
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary_emb = DeciCoderRotaryEmbedding(self.head_dim, config.rope_theta)

    @staticmethod
    def kv_cache(x: torch.Tensor, name: str) -> torch.Tensor:
        """K or V (``name`` "k" or "v") of the new tokens as the cache stores them: as computed. A quantized KV
        cache's golden (trt_layers.quantization.quantized_golden) rounds them here, on an instance."""
        return x

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        bsz, q_len, _ = hidden_states.shape
        q = tap(self, "q", self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2))
        k = tap(self, "k", self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2))
        v = tap(self, "v", self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2))
        # q: [b, heads, s, d]; k, v: [b, kv_heads, s, d]

        cos, sin = self.rotary_emb(v, position_ids)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        tap(self, "q_rot", q_rot)
        tap(self, "k_rot", k_rot)

        # Attention reads the new tokens' K and V as computed and the cached tokens' as the cache holds them,
        # and the cache stores the new ones as kv_cache makes them (a quantized cache rounds them there).
        keys, values = k_rot, v
        present_k, present_v = self.kv_cache(k_rot, "k"), self.kv_cache(v, "v")
        if past_key_value is not None:
            past_k, past_v = past_key_value
            keys = torch.cat([past_k, k_rot], dim=2)  # [b, kv_heads, past + s, d]
            values = torch.cat([past_v, v], dim=2)
            present_k = keys if present_k is k_rot else torch.cat([past_k, present_k], dim=2)
            present_v = values if present_v is v else torch.cat([past_v, present_v], dim=2)
        tap(self, "present_k", present_k)
        tap(self, "present_v", present_v)

        # An ONNX export takes the explicit path too: polygraphy debug reduce cuts the graph between
        # the steps, and torch.onnx cannot lower SDPA's enable_gqa.
        if tapped(self, "k_rep", "v_rep", "scores", "probs", "context") or torch.onnx.is_in_onnx_export():
            k_rep = tap(self, "k_rep", repeat_kv(keys, self.num_key_value_groups))  # [b, heads, kv_len, d]
            v_rep = tap(self, "v_rep", repeat_kv(values, self.num_key_value_groups))
            mask = causal_mask(q_len, q_len, q.dtype, q.device) if past_key_value is None else attention_mask
            context = self._eager_attention(q_rot, k_rep, v_rep, mask)
        else:
            # Deci's own call, fused: causal over the prompt in prefill; in decode, the mask the model
            # passes. Each KV head serves its group of query heads in place (repeat_kv's result, uncopied).
            context = F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=attention_mask,
                                                     is_causal=past_key_value is None, scale=self.scaling,
                                                     enable_gqa=self.num_key_value_groups > 1)
        context = context.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        out = tap(self, "out", self.o_proj(context))
        return out, (present_k, present_v)

    def _eager_attention(self, q_rot, k_rep, v_rep, mask):
        """Attention one step at a time, each step a tap: what a capture inside attention runs."""
        scores = tap(self, "scores", torch.matmul(q_rot, k_rep.transpose(2, 3)) * self.scaling)  # [b, heads, s, kv_len]
        if mask is not None:
            scores = scores + mask
        # Softmax in fp32, as Llama's eager attention and SDPA's kernels do.
        probs = tap(self, "probs", F.softmax(scores, dim=-1, dtype=torch.float32).to(q_rot.dtype))
        return tap(self, "context", torch.matmul(probs, v_rep))  # [b, heads, s, d]


class DeciCoderDecoderLayer(nn.Module):
    def __init__(self, config: DeciCoderConfig):
        super().__init__()
        self.self_attn = DeciCoderAttention(config)
        self.mlp = DeciCoderMLP(config)
        self.input_layernorm = DeciCoderRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeciCoderRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_ids, past_key_value=None, attention_mask=None):
        input_norm = tap(self, "input_norm", self.input_layernorm(hidden_states))
        attn_out, present = self.self_attn(input_norm, position_ids, past_key_value, attention_mask)
        resid_1 = tap(self, "resid_1", hidden_states + tap(self, "attn_out", attn_out))
        post_norm = tap(self, "post_norm", self.post_attention_layernorm(resid_1))
        mlp_out = tap(self, "mlp_out", self.mlp(post_norm))
        return tap(self, "out", resid_1 + mlp_out), present


class DeciCoderModel(nn.Module):
    def __init__(self, config: DeciCoderConfig):
        super().__init__()
        # Weights are assigned after construction (empty_model), so Embedding's own init is skipped: its
        # normal_ on the meta device would first import torch's Python meta kernels (1 s).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DeciCoderDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = DeciCoderRMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [b, s, vocab]
    past_key_values: KVCache | None


class DeciCoderForCausalLM(nn.Module):
    def __init__(self, config: DeciCoderConfig):
        super().__init__()
        self.config = config
        self.model = DeciCoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> "DeciCoderForCausalLM":
        """Load a Hugging Face checkpoint directory (config.json + safetensors or .bin weights)."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = True,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> CausalLMOutput:
        """Hugging Face compatible forward. ``cache`` is transformers 5.24's name for ``past_key_values``."""
        if cache is not None and past_key_values is not None:
            raise TypeError("pass the KV cache as past_key_values or as cache, not both")
        past = _as_kv_cache(cache if cache is not None else past_key_values)
        bsz, q_len = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        self._check_inputs(input_ids, past_len, attention_mask)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=input_ids.device).expand(bsz, q_len)

        hidden_states = tap(self, "embed", self.model.embed_tokens(input_ids))
        # Prefill masks inside attention; decode takes the mask Llama's model would build.
        mask = None if past is None else decode_mask(q_len, past_len, hidden_states.dtype, hidden_states.device)

        presents = []
        for i, layer in enumerate(self.model.layers):
            hidden_states, present = layer(hidden_states, position_ids, None if past is None else past[i], mask)
            presents.append(present)
        hidden_states = tap(self, "final_norm", self.model.norm(hidden_states))
        logits = tap(self, "logits", self.lm_head(hidden_states))
        return CausalLMOutput(logits=logits, past_key_values=tuple(presents) if use_cache else None)

    def _check_inputs(self, input_ids: torch.Tensor, past_len: int, attention_mask: torch.Tensor | None) -> None:
        total = past_len + input_ids.shape[1]
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} with {past_len} cached tokens need {total} positions; "
                f"the context is max_position_embeddings={self.config.max_position_embeddings}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids hold values in [{int(input_ids.min())}, {int(input_ids.max())}], "
                f"outside the vocabulary [0, {self.config.vocab_size})"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            # Deci's prefill calls SDPA with is_causal=True and no mask: padding is ignored there.
            raise NotImplementedError("DeciCoder's attention does not support padding: attention_mask must be all ones")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of exactly ``max_new_tokens`` (no early stop), prompt included in the result."""
        out = self(input_ids)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                out = self(next_token, past_key_values=out.past_key_values)
        return torch.cat(tokens, dim=1)


def _as_kv_cache(past) -> KVCache | None:
    """Legacy tuples as is; a transformers ``Cache`` (5.x ``DynamicCache``) read layer by layer."""
    if past is None or isinstance(past, (tuple, list)):
        return None if past is None or len(past) == 0 else tuple(past)
    if hasattr(past, "layers"):
        if not past.layers or past.get_seq_length() == 0:
            return None
        return tuple((layer.keys, layer.values) for layer in past.layers)
    raise TypeError(f"past_key_values of type {type(past).__name__} is not a KV cache")


def _init_scale(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) of a parameter: O(1) activations through norms, embeddings and linears."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    return 0.0, 1.0 / math.sqrt(shape[1])  # nn.Linear weight, [out, in]


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Seeded random weights, scaled so activations stay O(1) through the model.

    Unit-scale activations make a porting bug move every tap by far more than the fp32
    tolerance; Hugging Face's std=0.02 init would shrink logits and hide small errors. The
    embedding rows of a few tokens (SCALED_TOKENS) are far from RMS 1, as real residual
    streams are.
    DeciCoder-1b has 1.1 B weights, so speed matters: uniform draws with the intended std
    (three times faster than normal_), one generator per parameter so that parameters fill in
    parallel threads yet come out the same on every run. Materialises a meta-device model.
    """
    params = list(model.named_parameters())

    def draw(index: int) -> torch.Tensor:
        name, param = params[index]
        mean, std = _init_scale(name, param.shape)
        half_width = std * math.sqrt(3.0)  # U(-a, a) has std a / sqrt(3)
        generator = torch.Generator().manual_seed(seed * 2**20 + index)
        data = torch.empty(param.shape, dtype=torch.float32)
        data.uniform_(mean - half_width, mean + half_width, generator=generator)
        if name.endswith("embed_tokens.weight"):
            _scale_token_rows(data)
        return data.to(dtype)

    largest_first = sorted(range(len(params)), key=lambda i: -params[i][1].numel())  # the embedding goes first
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:  # uniform_ releases the GIL
        for index, data in zip(largest_first, pool.map(draw, largest_first)):
            assign_parameter(model, params[index][0], data)
    if isinstance(model, DeciCoderForCausalLM) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _scale_token_rows(embedding: torch.Tensor) -> None:
    """Give the rows of SCALED_TOKENS their RMS: hidden states of real scale (see reference.inputs)."""
    for token, rms in SCALED_TOKENS.items():
        if token < embedding.shape[0]:
            row = embedding[token]
            row.mul_(rms / row.pow(2).mean().sqrt())


def assign_parameter(model: nn.Module, name: str, data: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, nn.Parameter(data, requires_grad=False))


def empty_model(config: DeciCoderConfig) -> DeciCoderForCausalLM:
    """The model's structure on the meta device: no memory, no init time; weights come next."""
    with torch.device("meta"):
        return DeciCoderForCausalLM(config).eval()


def random_model(config: DeciCoderConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> DeciCoderForCausalLM:
    return init_random_weights(empty_model(config), seed, dtype)
