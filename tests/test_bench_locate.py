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
