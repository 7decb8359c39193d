"""Benchmark the reference DeciCoder on the CPU (or a GPU): weights, prefill, decode, peak memory.

    python benchmarks/bench_reference.py                         # decicoder-1b, fp32 and bf16, cpu
    python benchmarks/bench_reference.py --dtype bf16 --load     # also time loading a saved checkpoint
    python benchmarks/bench_reference.py --model tiny --device cuda

Each dtype runs in a fresh process so that its peak RSS is its own. Weight creation is timed
apart from the forward passes (seeded random weights in one pass; --load also writes them to
a temporary safetensors checkpoint and times from_pretrained on it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import DeciCoderConfig, DeciCoderForCausalLM, random_model, resolve_dtype  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def measure(model_name: str, dtype_name: str, device: str, prompt_len: int, decode_tokens: int, repeats: int,
            load: bool) -> dict:
    dtype = resolve_dtype(dtype_name)
    config = DeciCoderConfig.from_preset(model_name)
    model, init_s = _timed(lambda: random_model(config, seed=0, dtype=dtype), "cpu")
    figures = {"model": model_name, "dtype": dtype_name, "device": device, "threads": torch.get_num_threads(),
               "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
               "init_s": init_s}
    if load:
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            del model
            model, figures["load_s"] = _timed(lambda: DeciCoderForCausalLM.from_pretrained(directory, dtype), "cpu")
    model.to(device)

    ids = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    model(ids)  # warm-up: allocator, kernels
    prefill_times = []
    for _ in range(repeats):
        out, seconds = _timed(lambda: model(ids), device)
        prefill_times.append(seconds)
    figures["prefill_s"] = statistics.median(prefill_times)

    next_ids = out.logits[:, -1:].argmax(-1)
    past = out.past_key_values
    step_times = []
    for _ in range(decode_tokens):
        out, seconds = _timed(lambda: model(next_ids, past_key_values=past), device)
        step_times.append(seconds)
        past, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
    figures["decode_ms_per_token"] = 1000 * statistics.median(step_times)
    figures["peak_gib"] = peak_memory_gib(device)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="decicoder-1b", choices=["decicoder-1b", "tiny"])
    parser.add_argument("--dtype", action="append", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", action="store_true", help="also time from_pretrained on a saved checkpoint")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one dtype
    args = parser.parse_args()
    dtypes = args.dtype or ["fp32", "bf16"]

    if args.one:
        figures = measure(args.model, dtypes[0], args.device, args.prompt_len, args.decode_tokens, args.repeats,
                          args.load)
        print(json.dumps(figures))
        return

    print(f"torch {torch.__version__}, model {args.model}, device {args.device}, prompt {args.prompt_len} tokens, "
          f"decode {args.decode_tokens} tokens, median of {args.repeats} prefills")
    header = f"{'dtype':<6} {'weights GiB':>11} {'init s':>7} {'load s':>7} {'prefill s':>10} {'decode ms/tok':>14} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        child = [sys.executable, __file__, "--one", "--model", args.model, "--dtype", dtype, "--device", args.device,
                 "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
                 "--repeats", str(args.repeats)] + (["--load"] if args.load else [])
        f = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        load = f"{f['load_s']:7.2f}" if "load_s" in f else f"{'-':>7}"
        print(f"{dtype:<6} {f['weights_gib']:>11.2f} {f['init_s']:>7.2f} {load} {f['prefill_s']:>10.3f} "
              f"{f['decode_ms_per_token']:>14.1f} {f['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
