"""flags/: every setup of the notes parses and trains 2 steps, or fails at start-up saying why
(ZeRO and tensor parallelism need more than the one rank these run on); nested --flagfile
inclusion works from any directory."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import app

from conftest import REPO_ROOT, run_tfbert
from tfbert import run

FLAGS_DIR = os.path.join(REPO_ROOT, "flags")
FLAGFILES = sorted(glob.glob(os.path.join(FLAGS_DIR, "*.cfg")))
HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which(
    "horovodrun")

# Tensor parallelism splits the model over 2 or 4 ranks: one process is a start-up error
# (benchmarks/ablation.py runs these with 4 ranks; tests/test_tensor_parallel.py trains them).
TENSOR_PARALLEL = {"tp2.cfg", "tp4.cfg", "tp2_fused.cfg"}
# ZeRO shards across ranks: one process is a start-up error (benchmarks/ablation.py runs these
# with two ranks).
ZERO = {"optimal_split_opt_state.cfg", "zero1.cfg", "optimald.cfg", "xlarge_zero.cfg",
        "48x2048.cfg", "48x2048_bs16.cfg", "64x2048.cfg", "36x3072.cfg", "48x3072.cfg",
        "48x3072_naive.cfg", "48x3072_greedy8.cfg", "48x3072_greedy16.cfg"}


# Tracing and compiling a setup's step is mostly single-threaded: two workers, each a
# `horovodrun -np 1` job taking the next flagfile the other has not taken, keep both cores busy.
WORKERS = 2


@pytest.fixture(scope="module")
def flagfile_runs(tmp_path_factory, tfbert_cache):
    if HOROVODRUN is None:
        pytest.skip("horovodrun is not installed")
    from tfbert.data.sample import prepare_sample_data

    prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)  # not by two at once
    out = tmp_path_factory.mktemp("flagfiles")
    jobs = []
    for worker in range(WORKERS):
        results = out / f"results-{worker}.json"
        command = [HOROVODRUN, "-np", "1", "-H", "localhost:1", "--gloo", sys.executable,
                   os.path.join(REPO_ROOT, "tests", "flagfile_worker.py"), str(results),
                   str(out), *FLAGFILES]
        jobs.append((results, subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=REPO_ROOT))))
    runs = {}
    for results, job in jobs:
        stdout, stderr = job.communicate(timeout=1200)
        assert job.returncode == 0, stdout[-3000:] + stderr[-5000:]
        runs.update(json.loads(results.read_text()))
    # A setup with the config of another (at the tiny size) was not trained again: it is that
    # run (tests/flagfile_worker.py).
    for outcome in runs.values():
        if "same_as" in outcome:
            outcome["summary"] = runs[outcome["same_as"]]["summary"]
    return runs


def test_every_flagfile_trains_two_steps_or_says_why_not(flagfile_runs):
    assert set(flagfile_runs) == {os.path.basename(f) for f in FLAGFILES}
    for name, outcome in flagfile_runs.items():
        if name in TENSOR_PARALLEL:
            assert outcome["status"] == "config_error", name
            assert "splits each model over that many ranks" in outcome["message"], name
        elif name in ZERO:
            assert outcome["status"] == "config_error", name
            assert "--custom_memory_optimization (ZeRO-" in outcome["message"], name
            assert "horovodrun -np N" in outcome["message"], name
        else:
            assert outcome["status"] == "ok", (name, outcome)
            assert outcome["summary"]["steps"] == 2, name
            if "same_as" in outcome:  # the run it shares is its own, output_dir aside
                assert not differences(outcome, flagfile_runs[outcome["same_as"]]), name


def setting(outcome, section, key):
    return outcome["config"][section][key]


def test_the_setups_switch_what_their_names_say(flagfile_runs):
    runs = {name: outcome for name, outcome in flagfile_runs.items() if outcome["status"] == "ok"}
    assert setting(runs["baseline.cfg"], "runtime", "precision") == "fp32"
    assert setting(runs["fp16.cfg"], "runtime", "precision") == "fp16"
    assert setting(runs["fp16_xla.cfg"], "runtime", "xla") == "auto"
    assert setting(runs["base.cfg"], "distribution", "hvd_fp16_compression")
    assert setting(runs["base_wordpiece.cfg"], "data", "tokenizer_type") == "wordpiece"
    assert setting(runs["basef_memopt_recomputation.cfg"], "runtime",
                   "memory_optimization") == "recomputation"
    assert setting(runs["basef_recomputation_suppress_grappler.cfg"], "runtime",
                   "suppress_grappler")
    assert setting(runs["optimal_gradaccum_fp16.cfg"], "distribution", "grad_accum_dtype") == \
        "float16"
    assert setting(runs["optimal_adamw.cfg"], "optimizer", "optimizer") == "adamw"
    assert not setting(runs["optimal_recomputation_no_fused_ln.cfg"], "ops", "ln_ytf_impl")
    assert setting(runs["xlarge.cfg"], "distribution", "sparse_as_dense")
    assert not setting(runs["xlarge_no_sparse_as_dense.cfg"], "distribution", "sparse_as_dense")


def differences(a: dict, b: dict) -> dict:
    """{(section, key): (a's value, b's value)} over the config sections, output_dir aside."""
    changed = {}
    for section in a["config"]:
        for key, value in a["config"][section].items():
            other = b["config"][section][key]
            if value != other and key != "output_dir":
                changed[(section, key)] = (value, other)
    return changed


def test_optimal_reads_as_basef_plus_fused_gelu(flagfile_runs):
    assert differences(flagfile_runs["basef.cfg"], flagfile_runs["optimal.cfg"]) == {
        ("ops", "ytf_gelu"): (False, True)}
    assert differences(flagfile_runs["base.cfg"], flagfile_runs["basef.cfg"]) == {
        ("ops", "ln_ytf_impl"): (False, True), ("ops", "attn_softmax_ytf_impl"): (False, True),
        ("optimizer", "optimizer"): ("lamb", "fused_lamb")}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_nested_flagfiles_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    write(tmp_path / "setups" / "a.cfg", "# comment\n--model=mini\n--flagfile=b.cfg\n"
                                         "--precision=bf16\n")
    write(tmp_path / "setups" / "b.cfg", "// another comment\n\n--precision=fp16\n--xla=auto\n")
    monkeypatch.chdir(REPO_ROOT)
    expanded = run.expand_flagfiles(["prog", f"--flagfile={tmp_path / 'setups' / 'a.cfg'}",
                                     "--xla=off"])
    assert expanded == ["prog", "--model=mini", "--precision=fp16", "--xla=auto",
                        "--precision=bf16", "--xla=off"]
    # The shipped files work from another directory.
    monkeypatch.chdir(tmp_path)
    assert "--ytf_gelu" in run.expand_flagfiles(
        ["prog", f"--flagfile={os.path.join(FLAGS_DIR, 'optimal.cfg')}"])


def test_missing_and_cyclic_flagfiles_are_clear_errors(tmp_path):
    write(tmp_path / "a.cfg", "--flagfile=missing.cfg\n")
    with pytest.raises(app.UsageError, match="missing.cfg: no such file .included from"):
        run.expand_flagfiles(["prog", f"--flagfile={tmp_path / 'a.cfg'}"])
    write(tmp_path / "b.cfg", "--flagfile=c.cfg\n")
    write(tmp_path / "c.cfg", "--flagfile=b.cfg\n")
    with pytest.raises(app.UsageError, match="includes itself"):
        run.expand_flagfiles(["prog", f"--flagfile={tmp_path / 'b.cfg'}"])


def test_the_entry_point_reports_a_missing_flagfile_and_exits_2(tmp_path):
    result = run_tfbert(f"--flagfile={tmp_path / 'absent.cfg'}", f"--output_dir={tmp_path}")
    assert result.returncode == 2
    assert "tfbert: error: --flagfile=" in result.stderr and "no such file" in result.stderr
