"""A locate report as JSON (stable: the same run writes the same bytes), Markdown and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .compare import TOLERANCES, TapResult, first_failure
from .locate import LocateReport


def _number(x: float) -> float | None:
    """Six significant digits: stable across runs, ample for error figures; NaN -> null."""
    return None if math.isnan(x) else float(f"{x:.6g}")


def _tap(r: TapResult) -> dict:
    return {"name": r.name, "shape": list(r.shape), "max_abs": _number(r.max_abs), "max_rel": _number(r.max_rel),
            "mean_abs": _number(r.mean_abs), "cosine": _number(r.cosine), "passed": r.passed, "note": r.note}


def to_json(report: LocateReport, model: str) -> dict:
    check, first = report.check, report.first_failure
    tolerance = TOLERANCES[check.dtype]
    return {
        "component": check.component,
        "model": model,
        "candidate": check.backend,
        "golden": "reference (torch, cpu)",
        "dtype": str(check.dtype).removeprefix("torch."),
        "shape": {"batch": check.shape.batch, "seq_len": check.shape.seq_len, "past_len": check.shape.past_len,
                  "seed": check.shape.seed},
        "inject": report.bug,
        "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol, "atol_scaled_by_tap_magnitude": True},
        "taps": [_tap(r) for r in check.results],
        "outputs_only": None if report.outputs_only is None else [_tap(r) for r in report.outputs_only],
        "layer_detail": None if report.layer_detail is None else {
            "layer": report.layer_detail[0], "taps": [_tap(r) for r in report.layer_detail[1]]},
        "first_failure": None if first is None else first.name,
        "notes": report.notes,
        "passed": report.exit_code == 0,
    }


def write_json(report: LocateReport, model: str, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(report, model), indent=2) + "\n", encoding="utf-8")


def to_markdown(report: LocateReport, model: str) -> str:
    check, first = report.check, report.first_failure
    lines = [f"# {check.component}: {'PASSED' if report.exit_code == 0 else 'DIVERGED'}", "",
             f"- model: `{model}`, {str(check.dtype).removeprefix('torch.')}, batch {check.shape.batch}, "
             f"seq {check.shape.seq_len}, past {check.shape.past_len}, seed {check.shape.seed}",
             f"- candidate: {check.backend}; golden: reference (torch, cpu)"]
    if report.bug:
        lines.append(f"- injected bug: `{report.bug}`")
    lines += ["", "| tap | shape | max abs | max rel | mean abs | cosine | verdict |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in check.results:
        verdict = "pass" if r.passed else ("**FAIL (first)**" if r is first else "FAIL")
        lines.append(f"| `{r.name}` | {list(r.shape)} | {r.max_abs:.3e} | {r.max_rel:.3e} | {r.mean_abs:.3e} | "
                     f"{r.cosine:.6f} | {verdict} |")
    lines += [""] + [f"> {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: LocateReport, model: str, path: str | Path) -> None:
    Path(path).write_text(to_markdown(report, model), encoding="utf-8")


def plot(report: LocateReport):
    """A matplotlib figure: error per tap (log scale); for causal_lm, error growth across layers."""
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
    floor = 1e-12  # log scale: exact zeros drawn at the floor
    series = {"max abs error": [max(r.max_abs, floor) for r in points],
              "mean abs error": [max(r.mean_abs, floor) for r in points],
              "1 - cosine similarity": [max(1.0 - r.cosine, floor) for r in points]}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(points)), 4.5))
    for label, values in series.items():
        ax.plot(range(len(points)), values, marker="o", label=label)
    if (first := first_failure(points)) is not None:
        ax.axvline(points.index(first), color="red", linestyle="--", label=f"first divergence: {first.name}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(points)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error vs golden (log scale)")
    ax.set_title(f"{check.component} ({str(check.dtype).removeprefix('torch.')}): candidate vs reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plot(report: LocateReport, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)
