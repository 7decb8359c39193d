"""benchmarks/bench_locate.py prints and writes the figures issue 12 names (tiny model: seconds, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_locate.py"
KEYS = {"transformers_s", "reference_s", "candidate_build_s", "candidate_run_s", "locate_s", "locate_peak_rss_gib",
        "weights_gib", "weight_init_s", "verdict"}


def test_bench_locate_writes_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--phase", "decode", "--past-len", "9",
                          "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())
    assert KEYS <= set(figures) and figures["verdict"] == "PASSED" and figures["past_len"] == 9
    assert "locate --component causal_lm" in run.stdout and "peak RSS" in run.stdout


def test_bench_locate_refuses_a_case_past_the_context(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--seq-len", "100000",
                          "--json", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "exceed tiny's context" in run.stderr and not (tmp_path / "x.json").exists()


def test_bench_locate_judges_no_candidate_ratio_against_a_gpu_golden(capsys):
    """With --device cuda transformers runs on the GPU and the candidate on the CPU: their ratio
    is no measure of the candidate, so no target is marked met or MISSED for it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_locate", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = {"machine": "x86_64, 16 CPUs, H100", "torch_threads": 16, "model": "decicoder-1b", "dtype": "fp32",
               "phase": "prefill", "seq_len": 2048, "past_len": 0, "golden_device": "cuda", "repeats": 3,
               "weights_gib": 4.15, "weight_init_s": 0.9, "transformers_s": 0.15, "reference_s": 0.15,
               "candidate_build_s": 4.5, "candidate_first_run_s": 6.5, "candidate_run_s": 6.8, "locate_s": 11.3,
               "locate_peak_rss_gib": 4.8, "verdict": "PASSED", "per_layer": ["layer 1/20: 0.9 s"]}
    bench.report(figures)
    candidate_line = next(line for line in capsys.readouterr().out.splitlines() if "candidate run" in line)
    assert "not judged" in candidate_line and "MISSED" not in candidate_line
