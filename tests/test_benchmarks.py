"""The benchmark scripts run and write one CSV row per setup."""

import os
import subprocess
import sys

import pandas as pd

from conftest import REPO_ROOT


def test_throughput_benchmark_writes_a_row_per_setup(tmp_path, tfbert_cache):
    csv = tmp_path / "throughput.csv"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--precisions=fp32", "--xla_modes=off,jit",
         "--steps=3", "--batch=8", f"--csv={csv}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(csv)
    assert list(table["setup"]) == ["fp32+xla=off", "fp32+xla=jit"]
    assert (table["examples_per_sec"] > 0).all()
    assert "| setup" in result.stdout  # the printed Markdown table
