"""The deployment fast path: TensorRT-LLM's own LLaMA model, fed DeciCoder's weights.

DeciCoder-1b is a Llama as far as TensorRT-LLM's native model is concerned (GQA, rotate-half
RoPE, RMSNorm, SiLU-gated MLP, untied lm_head), so the fast path is a checkpoint conversion:
``config.json`` + ``rank0.safetensors`` in TensorRT-LLM's checkpoint format (what its
``convert_checkpoint.py`` writes and ``LLaMAForCausalLM.from_checkpoint`` reads), built with the
GPT attention plugin (``build_options``; ``trtllm_build_command`` prints the same build as
a ``trtllm-build`` line). Deci's decode path (no mask for one new token) is what the plugin's
causal attention computes with a KV cache, so the engine is a second candidate for the whole
model, compared against the same golden.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from safetensors.torch import save_file

from reference import DeciCoderConfig, DeciCoderForCausalLM

from . import tensor_parallel
from . import weights as weight_mapping
from .network import TORCH_TO_TRTLLM_DTYPE


def checkpoint_config(model: DeciCoderForCausalLM, tp_size: int = 1) -> dict:
    """TensorRT-LLM's PretrainedConfig for the model, every Llama default that differs set explicitly; split
    across ``tp_size`` tensor-parallel ranks."""
    config = model.config
    return {
        "architecture": "LlamaForCausalLM",  # a MODEL_MAP key; DeciCoder's own name is not one
        "dtype": TORCH_TO_TRTLLM_DTYPE[model.lm_head.weight.dtype],
        "logits_dtype": "float32",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_size": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",  # PretrainedConfig's default is gelu
        "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",  # rotate-half; the default is learned_absolute
        "rotary_base": config.rope_theta,
        "rotary_scaling": None,
        "attn_bias": False,
        "mlp_bias": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def write_checkpoint(model: DeciCoderForCausalLM, directory: str | Path, tp_size: int = 1) -> Path:
    """Write config.json and rank{r}.safetensors for each of ``tp_size`` ranks, each rank's tensors split as
    TensorRT-LLM's LLaMA conversion splits them under TP 1's names (tensor_parallel); lm_head is always stored
    (a missing one would be tied)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weight_mapping.to_trtllm(model.state_dict(), model.config)
    dtype = model.lm_head.weight.dtype
    for rank in range(tp_size):
        rank_weights = tensor_parallel.RankWeights(weights, model.config, tensor_parallel.TpMapping(tp_size, rank))
        tensors = {name: t.detach().to(dtype).contiguous().clone() for name, t in rank_weights.items()}
        save_file(tensors, str(directory / f"rank{rank}.safetensors"), metadata={"format": "pt"})
    config = checkpoint_config(model, tp_size)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


# Head sizes the GPT attention plugin's decoder kernels (masked MHA) exist for; its constructor
# refuses any other ("Head size %d is not supported by MMHA.", a failed check that ends the
# process): MMHA_SUPPORTED_HEAD_SIZES in NVIDIA/TensorRT-LLM
# cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention.cu@0ab9d17a59c2, checked by
# GPTAttentionPluginCommon's constructor (cpp/tensorrt_llm/plugins/gptAttentionCommon/gptAttentionCommon.cpp).
GPT_ATTENTION_HEAD_SIZES = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)

# BuildConfig fields among the build options; the others are PluginConfig fields.
BUILD_CONFIG_FIELDS = ("max_batch_size", "max_input_len", "max_seq_len", "gather_generation_logits")


def build_options(config: DeciCoderConfig, dtype: torch.dtype, max_batch_size: int = 8,
                  max_input_len: int | None = None, max_seq_len: int | None = None) -> dict[str, int | str | bool]:
    """The fast-path engine as BuildConfig and PluginConfig fields, which trtllm-build takes as ``--<field>``.

    Lengths default to the model's context. A model the GPT attention plugin cannot build is
    refused here (ValueError), before anything is written or built.
    """
    if config.head_dim not in GPT_ATTENTION_HEAD_SIZES:
        raise ValueError(f"the fast path's GPT attention plugin has no kernels for head size {config.head_dim} "
                         f"(hidden {config.hidden_size} / {config.num_attention_heads} heads); it supports "
                         f"{', '.join(map(str, GPT_ATTENTION_HEAD_SIZES))}: use a model whose head size is one of "
                         "them (decicoder-1b's is 64, or a checkpoint directory)")
    context = config.max_position_embeddings
    options = {"max_batch_size": max_batch_size, "max_input_len": max_input_len or context,
               "max_seq_len": max_seq_len or context,
               "gather_generation_logits": True,  # generate() returns them; context logits are never read
               "gpt_attention_plugin": "auto", "gemm_plugin": "auto"}
    if dtype == torch.float32:
        # Fused context attention has fp16/bf16 kernels only, so the plugin runs fp32 unfused
        # ("Fall back to unfused MHA because of unsupported data type", gptAttentionCommon.cpp),
        # and paged context FMHA, on by default (PluginConfig), would need it.
        options.update(context_fmha=False, use_paged_context_fmha=False)
    return options


def trtllm_build_command(checkpoint_dir: str | Path, engine_dir: str | Path, options: dict) -> str:
    """The ``trtllm-build`` line that builds the engine ``build_engine`` builds with ``options``."""
    words = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir)]
    for name, value in options.items():
        if name in BUILD_CONFIG_FIELDS and isinstance(value, bool):  # a store_true flag, off by default
            words += [f"--{name}"] if value else []
        elif isinstance(value, bool):  # plugin features take enable / disable
            words += [f"--{name}", "enable" if value else "disable"]
        else:
            words += [f"--{name}", str(value)]
    return shlex.join(words)


def make_build_config(options: dict, **fields):
    """TensorRT-LLM's BuildConfig for ``options``, and other BuildConfig ``fields`` (needs TensorRT-LLM)."""
    from tensorrt_llm.builder import BuildConfig

    build_config = BuildConfig(**{name: options[name] for name in BUILD_CONFIG_FIELDS}, **fields)
    for name in options.keys() - set(BUILD_CONFIG_FIELDS):
        setattr(build_config.plugin_config, name, options[name])  # PluginConfig (pydantic) refuses unknown names
    return build_config


def build_engine(checkpoint_dir: str | Path, engine_dir: str | Path, options: dict, tp_size: int = 1,
                 **fields) -> Path:
    """TensorRT-LLM's LLaMA engine from the checkpoint, one rank{r}.engine a rank, with the GPT attention plugin,
    and other BuildConfig ``fields`` (e.g. enable_debug_output=True) (needs TensorRT-LLM)."""
    from tensorrt_llm.builder import build
    from tensorrt_llm.models import LLaMAForCausalLM

    for rank in range(tp_size):
        model = LLaMAForCausalLM.from_checkpoint(str(checkpoint_dir), rank=rank)
        build(model, make_build_config(options, **fields)).save(str(engine_dir))
    return Path(engine_dir)


def generate(engine_dir: str | Path, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [b, prompt + new] and generation logits [b, new, vocab] from the engine (needs TensorRT-LLM)."""
    from tensorrt_llm.runtime import ModelRunner

    runner = ModelRunner.from_dir(str(engine_dir))
    outputs = runner.generate(
        [row.to(torch.int32) for row in input_ids], max_new_tokens=max_new_tokens,
        end_id=-1,  # never sampled: every row gets exactly max_new_tokens (DeciCoder's eos is 0)
        pad_id=0, top_k=1, return_dict=True, output_sequence_lengths=True, output_generation_logits=True)
    tokens = outputs["output_ids"][:, 0, : input_ids.shape[1] + max_new_tokens].cpu()
    logits = outputs["generation_logits"][:, 0].float().cpu()
    return tokens, logits
