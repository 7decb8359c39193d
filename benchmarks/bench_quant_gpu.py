"""Quantized goldens on a GPU's real low-precision kernels, against the emulated golden the judge uses.

    python benchmarks/bench_quant_gpu.py [--model decicoder-1b] [--dtype fp16] [--seq-len 512] [--json PATH]

The judge's quantized golden (trt_layers.quantization.quantized_golden) emulates a quantized port: weights
dequantized into the model dtype and an ordinary matmul, and (fp8) each linear's input rounded to e4m3 and
back. A port on a GPU computes otherwise: an fp8 GEMM takes e4m3 operands, accumulates in fp32 and applies both
scales to the result (torch._scaled_mm on cuBLASLt, the form of TensorRT's fp8 tactics and of TensorRT-LLM's fp8
gemm plugin); a weight-only int8 GEMM dequantizes inside the kernel (torch._weight_int8pack_mm, where torch has
it for the device). Here each quantized linear of a copy of the model runs on that kernel (the real-kernel
golden), and the model runs a layer at a time, each layer of the three (full precision, emulated, real kernels)
on the same input, the real-kernel golden's previous output, as locate streams a port. Per layer and tap:

- the real-kernel golden against the emulated one at the dtype's tolerance, the emulated one teacher-forced on
  the real one's linear inputs as the judge forces it on a port's (parity.quantized.teacher_forced): would a
  correct port on real kernels pass?
- the budget it uses against full precision (parity.quantized.tap_budgets): is the budget measured from the
  emulated golden wide enough for real kernels?
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.compare import TOLERANCES, compare_taps  # noqa: E402
from parity.quantized import tap_budgets, teacher_forced  # noqa: E402
from reference import DeciCoderConfig, random_model, resolve_dtype  # noqa: E402
from reference import taps  # noqa: E402
from reference.components import run_layer  # noqa: E402
from trt_layers.quantization import (MODES, QUANTIZED_LINEARS, activation_scale_name, calibrate,  # noqa: E402
                                     fp8_values, quantized_golden, symmetric_quantize, weight_scale)

LAYER_OUTPUTS = ("attn.present_k", "attn.present_v", "out")
LINEAR_INPUTS = tuple(taps.LINEAR_INPUTS["layer"])  # the taps the judge rounds fp8 on


class Fp8ScaledMm(nn.Module):
    """A linear on the fp8 GEMM: e4m3 input and weight, fp32 accumulation, both scales applied to the result."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor):
        super().__init__()
        self.weight_fp8 = fp8_values(weight.detach(), weight_scale)  # [out, in]
        self.weight_scale = weight_scale.float().to(weight.device)
        self.input_scale = input_scale.to(weight.dtype).float().to(weight.device)  # the port casts it to its dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        y = torch._scaled_mm(fp8_values(rows, self.input_scale), self.weight_fp8.t(), scale_a=self.input_scale,
                             scale_b=self.weight_scale, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], -1)


class Int8WeightOnly(nn.Module):
    """A linear on the weight-only int8 GEMM: int8 weights and their per-channel scales, dequantized in-kernel."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = symmetric_quantize(weight, 8)  # [in, out], [out]
        self.q, self.scale = q.t().contiguous(), scale  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(rows, self.q, self.scale).reshape(*x.shape[:-1], -1)


def real_kernel_golden(model: nn.Module, mode_name: str) -> nn.Module:
    """A copy of ``model`` (sharing its other weights) whose quantized linears run on ``mode_name``'s kernel."""
    real = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
    calibrated = calibrate(model, MODES[mode_name])
    for i, layer in enumerate(real.model.layers):
        for linear, paths in QUANTIZED_LINEARS.items():
            weights = [layer.get_submodule(path).weight for path in paths]
            for path, weight in zip(paths, weights):
                parent, name = path.rsplit(".", 1)
                if mode_name == "fp8":  # q, k and v share the fused QKV's scale
                    kernel = Fp8ScaledMm(weight, weight_scale(weights), calibrated[activation_scale_name(i, linear)])
                else:
                    kernel = Int8WeightOnly(weight)
                setattr(layer.get_submodule(parent), name, kernel)
    return real


@torch.no_grad()
def compare_layers(model: nn.Module, mode_name: str, seq_len: int, forced: bool = True) -> dict:
    """Each layer's taps: the real-kernel golden against the emulated one (teacher-forced unless not ``forced``),
    and the budgets against full precision."""
    dtype = model.lm_head.weight.dtype
    tolerance, emulated = TOLERANCES[dtype], quantized_golden(model, MODES[mode_name])
    real = real_kernel_golden(model, mode_name)
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (1, seq_len), generator=generator).to(device)
    positions = torch.arange(seq_len, device=device)[None]
    hidden = model.model.embed_tokens(tokens)
    layers = []
    for i in range(model.config.num_hidden_layers):
        marks = LAYER_OUTPUTS + (LINEAR_INPUTS if mode_name == "fp8" else ())
        real_taps = run_layer(real, i, hidden, positions, None, marks)
        with teacher_forced(emulated, "layer", real_taps if forced else {}, tolerance, layer=i):
            emulated_taps = run_layer(emulated, i, hidden, positions, None, LAYER_OUTPUTS)
        full_taps = run_layer(model, i, hidden, positions, None, LAYER_OUTPUTS)
        results = compare_taps(emulated_taps, real_taps, tolerance, LAYER_OUTPUTS)
        budgets = tap_budgets(full_taps, emulated_taps, real_taps, results, tolerance)
        layers.append({r.name: {"passes": r.passed, "max_abs": r.max_abs, "budget_used": b.used,
                                "emulated_deviation": b.own, "real_deviation": b.deviation}
                       for r, b in zip(results, budgets)})
        hidden = real_taps["out"]
    return {"layers": layers, "failed_taps": sum(not t["passes"] for layer in layers for t in layer.values()),
            "max_budget_used": max(t["budget_used"] for layer in layers for t in layer.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="decicoder-1b", help="a preset (default: decicoder-1b)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="default: fp16")
    parser.add_argument("--seq-len", type=int, default=512, help="prompt tokens, a multiple of 16 (default: 512)")
    parser.add_argument("--modes", default="fp8,int8_wo", help="comma-separated, of fp8 and int8_wo (default: both)")
    parser.add_argument("--no-teacher-forcing", action="store_true",
                        help="run the emulated golden on its own linear inputs (what the judge would see unforced)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant_gpu: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    model = random_model(DeciCoderConfig.from_preset(args.model), seed=0, dtype=resolve_dtype(args.dtype)).cuda()
    figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
               "dtype": args.dtype, "seq_len": args.seq_len, "teacher_forcing": not args.no_teacher_forcing,
               "modes": {}}
    print(f"{figures['device']}, torch {torch.__version__}, {args.model} {args.dtype}, {args.seq_len} tokens"
          + (", no teacher forcing" if args.no_teacher_forcing else ""))
    for mode_name in args.modes.split(","):
        try:
            result = compare_layers(model, mode_name, args.seq_len, forced=not args.no_teacher_forcing)
        except (RuntimeError, NotImplementedError) as e:  # no such kernel for this device or dtype
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            print(f"{mode_name}: no real-kernel golden here: {result['error']}")
        else:
            print(f"{mode_name}: real kernels against the emulated golden: {result['failed_taps']} of "
                  f"{3 * len(result['layers'])} layer taps beyond the {args.dtype} tolerance; most budget used "
                  f"{result['max_budget_used']:.3g}")
            for i, layer in enumerate(result["layers"]):
                print(f"  layer {i:>2}: " + ", ".join(
                    f"{name.removeprefix('attn.')} {'pass' if t['passes'] else 'FAIL'} max abs {t['max_abs']:.2e} "
                    f"budget used {t['budget_used']:.2f}" for name, t in layer.items()))
        figures["modes"][mode_name] = result
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
