"""The benchmark scripts run and write one CSV row per setup."""

import os
import subprocess
import sys

import pandas as pd

from conftest import REPO_ROOT


def run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs benchmarks/SCRIPT ARGS from the repository root; asserts it succeeded."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_throughput_benchmark_writes_a_row_per_setup(tmp_path, tfbert_cache):
    csv = tmp_path / "throughput.csv"
    result = run_benchmark("throughput.py", "--precisions=fp32", "--xla_modes=off,jit",
                           "--steps=3", "--batch=8", f"--csv={csv}")
    table = pd.read_csv(csv)
    assert list(table["setup"]) == ["fp32+xla=off", "fp32+xla=jit"]
    assert (table["examples_per_sec"] > 0).all()
    assert "| setup" in result.stdout  # the printed Markdown table


def test_ablation_writes_a_row_per_setup_a_table_and_a_chart(tmp_path, tfbert_cache):
    out = tmp_path / "ablation"
    run_benchmark("ablation.py", "--setups=baseline,optimal,optimald", "--steps=2",
                  "--size=--model=tiny --train_batch_size=4 --max_seq_length=32 "
                  "--max_predictions_per_seq=5", "--fp16_as=bf16", f"--out={out}", timeout=900)
    table = pd.read_csv(f"{out}.csv")
    assert list(table["setup"]) == ["baseline", "optimal", "optimald"]
    assert list(table["status"]) == ["ok", "ok", "ok"]
    # optimal is fp16 with Horovod's fp16 compression (from base.cfg): run as bf16, it drops the
    # compression too, and says so; baseline (fp32) runs as its flagfile says. optimald (ZeRO-2,
    # float16 accumulators) also accumulates in float32 and, ZeRO refusing one process, runs
    # with 2 ranks.
    assert list(table["substituted"].fillna("")) == [
        "", "precision fp16->bf16; hvd_fp16_compression off",
        "precision fp16->bf16; hvd_fp16_compression off; grad_accum_dtype float16->float32; "
        "ranks 1->2 (ZeRO needs 2)"]
    assert list(table["ranks"]) == [1, 1, 2]
    assert "--nohvd_fp16_compression" in table["flags"][1]
    assert (table["examples_per_sec"] > 0).all()
    # The notes' own figures sit beside the measured ones.
    assert table["notes_max_gb"].tolist() == [69.4, 30.8, 26.61]
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "| optimal |" in (tmp_path / "ablation.md").read_text()


def test_zero_benchmark_halves_the_optimizer_state_per_rank(tmp_path, tfbert_cache):
    # One 2-rank job (ZeRO-2, flat): data parallelism's m and v are twice the parameter bytes.
    out = tmp_path / "zero"
    result = run_benchmark("zero.py", "--setups=zero2-flat", "--steps=2", "--repeats=1",
                           "--size=--model=tiny --train_batch_size=4 --max_seq_length=32 "
                           "--max_predictions_per_seq=5", f"--out={out}")
    table = pd.read_csv(f"{out}.csv").set_index("setup")
    assert list(table.index) == ["zero2-flat"]
    zero = table.loc["zero2-flat"]
    assert zero["status"] == "ok" and zero["zero_stage"] == 2
    assert zero["examples_per_sec_total"] > 0
    # Two ranks: each holds half of m and v (2 x 4 bytes per parameter); flat splits to one
    # element, so the largest and smallest shares agree.
    assert abs(zero["optimizer_state_bytes_max"] / zero["param_bytes_max"] - 1.0) < 0.005
    assert abs(zero["optimizer_state_bytes_min"] / zero["optimizer_state_bytes_max"] - 1) < 0.01
    assert "| zero2-flat |" in result.stdout  # the printed Markdown table
    assert (tmp_path / "zero.png").stat().st_size > 0


def test_reference_comparison_runs_both_implementations(tmp_path, tfbert_cache):
    csv = tmp_path / "reference.csv"
    run_benchmark("compare_reference.py", "--steps=2", "--batch=8", "--seq=32",
                  "--predictions=5", f"--csv={csv}")
    table = pd.read_csv(csv)
    assert list(table["implementation"]) == ["tfbert", "tf-models-official BertPretrainer"]
    assert (table["examples_per_sec"] > 0).all()
    # Same model size and data: the untrained losses agree (ln V + ln 2 give or take).
    assert abs(table["first_loss"][0] - table["first_loss"][1]) < 0.1
