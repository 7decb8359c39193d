"""GPU baseline of the reference DeciCoder: latency, throughput, memory, and fp16/bf16 error per tap.

    python benchmarks/bench_gpu.py                       # decicoder-1b on cuda, bf16 and fp16
    python benchmarks/bench_gpu.py --model tiny --device cpu --prompt-lens 16 --decode-batches 1

Prints, per dtype: prefill latency for each prompt length (batch 1), decode tokens/s at each
batch size (after a 128-token prefill), peak device memory; then each tap's error against the
fp32 reference on the same device (TF32 off), as the atol that tap needs in units of its
magnitude (the form of parity.compare.row_scale, per tap), which calibrates the tolerance table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import DeciCoderConfig, capture_taps, random_model, resolve_dtype  # noqa: E402
from reference.taps import LAYER_TAPS, causal_lm_taps  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def speed(model, device: str, prompt_lens: list[int], decode_batches: list[int], decode_steps: int) -> dict:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    figures = {"prefill_ms": {}, "decode_tokens_per_s": {}}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for length in prompt_lens:
        ids = torch.randint(0, vocab, (1, length), generator=generator).to(device)
        figures["prefill_ms"][length] = 1000 * timed(lambda: model(ids), device, repeats=5)
    for batch in decode_batches:
        ids = torch.randint(0, vocab, (batch, 128), generator=generator).to(device)
        out = model(ids)
        next_ids = out.logits[:, -1:].argmax(-1)

        def decode():
            past, tokens = out.past_key_values, next_ids
            for _ in range(decode_steps):
                step = model(tokens, past_key_values=past)
                past, tokens = step.past_key_values, step.logits[:, -1:].argmax(-1)

        figures["decode_tokens_per_s"][batch] = batch * decode_steps / timed(decode, device, repeats=3)
    figures["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None
    return figures


def tap_names(num_layers: int) -> tuple[str, ...]:
    inside = tuple(f"layer_{i}.{t}" for i in range(num_layers) for t in LAYER_TAPS if t != "out")
    return causal_lm_taps(num_layers) + inside


@torch.no_grad()
def taps_of(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with capture_taps(model, tap_names(model.config.num_hidden_layers)) as taps:
        model(ids)
    return {name: t.float().cpu() for name, t in taps.items()}


def needed_atol(golden: torch.Tensor, candidate: torch.Tensor) -> float:
    """The smallest atol (in units of max(1, max|golden|)) under which every element passes with rtol 0."""
    return float((candidate - golden).abs().max()) / max(1.0, float(golden.abs().max()))


def error_per_tap(fp32_taps: dict, low_taps: dict) -> dict[str, float]:
    """Worst needed atol per tap kind across layers (layer_i.attn.q_rot -> attn.q_rot)."""
    worst: dict[str, float] = {}
    for name, golden in fp32_taps.items():
        kind = name.split(".", 1)[1] if name.startswith("layer_") else name
        worst[kind] = max(worst.get(kind, 0.0), needed_atol(golden, low_taps[name]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="decicoder-1b", choices=["decicoder-1b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--error-seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    dtypes = args.dtype or ["bf16", "fp16"]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 truth means fp32
    torch.backends.cudnn.allow_tf32 = False

    config = DeciCoderConfig.from_preset(args.model)
    start = time.perf_counter()
    fp32 = random_model(config, seed=0)  # one set of weights; each dtype is a cast of it
    print(f"weights: seeded init {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} CPU threads")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device_name}, model {args.model}")
    ids = torch.randint(0, config.vocab_size, (1, args.error_seq_len), generator=torch.Generator().manual_seed(1))

    fp32_model = fp32.to(args.device)
    fp32_taps = taps_of(fp32_model, ids.to(args.device))
    fp32_model.cpu()
    results = {"device": device_name, "torch": torch.__version__, "model": args.model, "dtypes": {}}
    for name in dtypes:
        model = random_model(config, seed=0, dtype=resolve_dtype(name)).to(args.device)
        figures = speed(model, args.device, args.prompt_lens, args.decode_batches, args.decode_steps)
        figures["needed_atol_vs_fp32"] = error_per_tap(fp32_taps, taps_of(model, ids.to(args.device)))
        results["dtypes"][name] = figures
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        prefill = ", ".join(f"{n} tok {ms:.1f} ms" for n, ms in figures["prefill_ms"].items())
        decode = ", ".join(f"batch {b} {tps:.0f} tok/s" for b, tps in figures["decode_tokens_per_s"].items())
        memory = f"{figures['peak_memory_gib']:.2f} GiB" if figures["peak_memory_gib"] is not None else "n/a"
        print(f"\n{name}: prefill {prefill}; decode {decode}; peak memory {memory}")
        worst = sorted(figures["needed_atol_vs_fp32"].items(), key=lambda kv: -kv[1])
        print("  needed atol vs fp32 (worst first): " + ", ".join(f"{k} {v:.2e}" for k, v in worst[:12]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
