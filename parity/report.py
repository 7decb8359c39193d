"""A locate report as JSON (stable: the same run writes the same bytes), Markdown and a PNG plot."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from .compare import TOLERANCES, TapResult, first_failure
from .diagnose import Diagnosis
from .quantized import BUDGET_MARGIN
from .locate import LocateReport


def _number(x: float) -> float | None:
    """Six significant digits: stable across runs, ample for error figures; NaN -> null."""
    return None if math.isnan(x) else float(f"{x:.6g}")


def _tap(r: TapResult) -> dict:
    return {"name": r.name, "shape": list(r.shape), "max_abs": _number(r.max_abs), "max_rel": _number(r.max_rel),
            "mean_abs": _number(r.mean_abs), "cosine": _number(r.cosine), "atol": _number(r.atol),
            "passed": r.passed, "note": r.note}


def _diagnosis(diagnosis: Diagnosis | None) -> dict | None:
    if diagnosis is None:
        return None
    return {"tap": diagnosis.tap, "hypothesis": diagnosis.hypothesis, "finding": diagnosis.finding,
            "hint": diagnosis.hint, "residual_max_abs": _number(diagnosis.residual)}


def _golden(report: LocateReport) -> str:
    if report.quant is None:
        return "reference (torch, cpu)"
    return f"reference (torch, cpu) computing as the {report.quant} port must; full precision sets the budget"


def _verdict(report: LocateReport) -> str:
    return "PASSED" if report.exit_code == 0 else "DIVERGED"


def to_json(report: LocateReport, model: str) -> dict:
    check, first = report.check, report.first_failure
    tolerance = TOLERANCES[check.dtype]
    return {
        "component": check.component,
        "model": model,
        "candidate": check.backend,
        "golden": _golden(report),
        "quant": report.quant,
        "dtype": str(check.dtype).removeprefix("torch."),
        "shape": {"batch": check.shape.batch, "seq_len": check.shape.seq_len, "past_len": check.shape.past_len,
                  "seed": check.shape.seed},
        "inject": report.bug,
        "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol, "atol_scaled_by_row_magnitude": True,
                      "element_passes_if": "abs_error <= atol * max(1, max|golden row|) or abs_error <= rtol * "
                                           "|golden| (row: the tap's last axis)"},
        "taps": [_tap(r) for r in check.results],
        "outputs_only": None if report.outputs_only is None else [_tap(r) for r in report.outputs_only],
        "layer_detail": None if report.layer_detail is None else {
            "layer": report.layer_detail[0], "taps": [_tap(r) for r in report.layer_detail[1]]},
        "first_failure": None if first is None else first.name,
        "diagnosis": _diagnosis(report.diagnosis),
        "budget": None if check.budget is None else {
            "margin": BUDGET_MARGIN,
            "taps": [{"name": b.name, "deviation": _number(b.deviation), "quantized_golden_deviation": _number(b.own),
                      "budget_used": _number(b.used), "verdict": b.verdict} for b in check.budget]},
        "candidate_error": check.error,
        "notes": report.notes,
        "passed": report.exit_code == 0,
    }


def write_json(report: LocateReport, model: str, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(report, model), indent=2) + "\n", encoding="utf-8")


def to_markdown(report: LocateReport, model: str) -> str:
    check, first = report.check, report.first_failure
    lines = [f"# {check.component}: {_verdict(report)}", "",
             f"- model: `{model}`, {str(check.dtype).removeprefix('torch.')}, batch {check.shape.batch}, "
             f"seq {check.shape.seq_len}, past {check.shape.past_len}, seed {check.shape.seed}",
             f"- candidate: {check.backend}; golden: {_golden(report)}"]
    if report.bug:
        lines.append(f"- injected bug: `{report.bug}`")
    if check.error:
        lines.append(f"- **{check.error}**")
    lines += ["", "| tap | shape | max abs | max rel | mean abs | cosine | verdict |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in check.results:
        verdict = "pass" if r.passed else ("**FAIL (first)**" if r is first else "FAIL")
        lines.append(f"| `{r.name}` | {list(r.shape)} | {r.max_abs:.3e} | {r.max_rel:.3e} | {r.mean_abs:.3e} | "
                     f"{r.cosine:.6f} | {verdict} |")
    if report.diagnosis is not None:
        lines += ["", report.diagnosis.text().replace("\n  ", "  \n")]  # the hint on a line of its own
    if check.budget is not None:
        lines += ["", f"Against full precision (budget: the quantized golden's own deviation + {BUDGET_MARGIN:.0%}, "
                      "+ the atol, element by element):", "",
                  "| tap | deviation | quantized golden's | budget used | verdict |",
                  "| --- | ---: | ---: | ---: | --- |"]
        lines += [f"| `{b.name}` | {b.deviation:.3e} | {b.own:.3e} | {b.used:.2f} | {b.verdict} |"
                  for b in check.budget]
    lines += [""] + [f"> {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: LocateReport, model: str, path: str | Path) -> None:
    Path(path).write_text(to_markdown(report, model), encoding="utf-8")


def plot(report: LocateReport, model: str | None = None):
    """A matplotlib figure: error per tap (log scale) against the tap's atol; for causal_lm, error
    growth across layers. The title names the model, component, verdict and injected bug."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    check = report.check
    if check.component == "causal_lm":
        points = [r for r in check.results if r.name == "embed" or r.name.endswith(".out") or r.name == "logits"]
        labels = ["embed", *(str(i) for i in range(len(points) - 2)), "logits"]
        xlabel = "layer (embed, decoder layers 0..N-1, logits)"
    else:
        points, labels, xlabel = check.results, [r.name for r in check.results], "tap (execution order)"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(points)), 4.5))
    x = range(len(points))
    title = f"{model + ' ' if model else ''}{check.component} ({str(check.dtype).removeprefix('torch.')}): "
    ax.set_title(title + _verdict(report) + (f", injected bug {report.bug}" if report.bug else ""), fontsize=10)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    if check.error is not None:  # no tap was computed: nothing to draw but why
        ax.text(0.5, 0.5, textwrap.fill(check.error, 70), transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        fig.tight_layout()
        return fig
    floor = 1e-12  # log scale: exact zeros drawn at the floor
    series = {"max abs error": [r.max_abs for r in points], "mean abs error": [r.mean_abs for r in points],
              "1 - cosine similarity": [1.0 - r.cosine for r in points]}
    for label, values in series.items():
        ax.plot(x, [max(v, floor) for v in values], marker="o", label=label)
    # One segment per tap (a collection, not a line): the error no element may exceed where golden is 0.
    ax.hlines([r.atol for r in points], [i - 0.4 for i in x], [i + 0.4 for i in x], color="gray",
              label="atol of the tap's largest row (elements also pass within rtol x |golden|)")
    if any(v == 0 for values in series.values() for v in values):
        ax.text(0.01, 0.02, f"errors of exactly 0 drawn at {floor:g}", transform=ax.transAxes, fontsize=8,
                color="dimgray")
    if (first := report.first_failure) is not None:
        # causal_lm plots one point per layer: mark the layer holding the first diverging tap.
        layer = first.name.split(".")[0]
        at = next((i for i, r in enumerate(points) if r.name.split(".")[0] == layer),
                  points.index(first_failure(points) or points[-1]))
        ax.axvline(at, color="red", linestyle="--", label=f"first divergence: {first.name}")
    ax.set_yscale("log")
    ax.set_ylabel("error vs golden (log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plot(report: LocateReport, model: str, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot(report, model)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
