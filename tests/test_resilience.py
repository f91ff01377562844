"""Multi-rank runs that do not lose work: hangs, preemption, exact resume, --xla=jit, all with
real `horovodrun --gloo` processes running `python -m tfbert.run` on the sample corpus."""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from test_distributed import HOROVOD_ENV

HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which(
    "horovodrun")
pytestmark = pytest.mark.skipif(HOROVODRUN is None, reason="horovodrun is not installed")

# One layer and the short records: these tests check the job's behaviour, not the model's, and
# tracing (or compiling, under --xla=jit) the step is most of a launch's time.
TINY = ["--train_batch_size=4", "--max_seq_length=32", "--max_predictions_per_seq=5",
        "--num_hidden_layers=1", "--log_every_n_steps=1"]


@pytest.fixture(scope="module")
def sample(tfbert_cache):
    from tfbert.data.sample import prepare_sample_data

    # Outside the timed launches (and not by two ranks at once).
    return prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)


def tfbert_command(ranks: int, *args) -> list[str]:
    return [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable,
            "-m", "tfbert.run", *args]


def run_job(command, cwd=REPO_ROOT, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Runs a job; on a time-out ends the launcher's whole process group (the ranks would
    otherwise keep the output pipes open) and fails."""
    job = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": REPO_ROOT, **HOROVOD_ENV,
                                **(env or {})})
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{(stdout + stderr)[-3000:]}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def logged_steps(out_dir) -> dict[int, dict]:
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_a_hung_rank_ends_the_job_non_zero_in_bounded_time(tmp_path, sample):
    # Rank 1 sleeps forever at step 3; rank 0 waits in the next step's all-reduce. The step
    # watchdog ends the stuck rank (and the waiting one), and horovodrun then ends the job.
    command = tfbert_command(2, f"--output_dir={tmp_path}", "--num_train_steps=50", *TINY,
                             "--debug_fail_at_step=3", "--debug_fail_rank=1",
                             "--debug_fail_mode=hang", "--step_timeout_secs=20")
    result = run_job(command, timeout=300)
    ended = datetime.datetime.now()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Timeout (0:00:20)!" in output  # the watchdog's report, with the stuck stacks
    # Timed from the hang (the log line's absl time stamp), not from the launch: starting two
    # ranks on a loaded 2-core machine can take minutes by itself.
    hang = re.search(r"W(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*hangs at step 3", output)
    assert hang, output[-3000:]
    hung_at = datetime.datetime.strptime(f"{ended.year}{hang.group(1)} {hang.group(2)}",
                                         "%Y%m%d %H:%M:%S.%f")
    assert (ended - hung_at).total_seconds() < 90, (ended, hung_at)
    assert not (tmp_path / "summary.json").exists()


def test_the_step_watchdog_ends_a_stuck_process(tmp_path):
    code = ("import time; from tfbert.training.interruption import StepWatchdog; "
            "StepWatchdog().arm(2); time.sleep(60)")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 1 and time.monotonic() - start < 30
    assert "Timeout" in result.stderr  # faulthandler's report, with the stuck stack


# fp16 with its loss scale, float16 gradient compression, 2 micro-batches, the fused LAMB and the
# fused attention softmax with dropout (the model's default 0.1): every piece of state a resume
# must bring back. keep_checkpoint_max=1: the rank state must still match the shared checkpoint.
# A small model (one layer) and short sequences: horovodrun kills the ranks 5 s after it forwards
# SIGTERM (they need up to two steps and a save by then), and float16 is emulated, slowly, on a
# CPU.
RESUME_FLAGS = ["--precision=fp16", "--hvd_fp16_compression", "--num_accumulation_steps=2",
                "--optimizer=fused_lamb", "--attn_softmax_ytf_impl", "--keep_checkpoint_max=1",
                "--num_train_steps=10", "--initial_loss_scale=1024",
                "--loss_scale_growth_interval=2", "--train_batch_size=2", "--max_seq_length=32",
                "--max_predictions_per_seq=5", "--log_every_n_steps=1", "--hidden_size=64",
                "--intermediate_size=256", "--num_hidden_layers=1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, sample):
    out = tmp_path_factory.mktemp("straight")
    result = run_job(tfbert_command(2, f"--output_dir={out}", *RESUME_FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_continues_exactly(tmp_path, sample,
                                                                          straight_run):
    out = tmp_path / "preempted"
    job = subprocess.Popen(tfbert_command(2, f"--output_dir={out}", *RESUME_FLAGS),
                           cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=REPO_ROOT, **HOROVOD_ENV))
    deadline = time.monotonic() + 240
    while max(logged_steps(out), default=0) < 3 and job.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail("the run never reached step 3")
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler would
    output, _ = job.communicate(timeout=120)
    # Each rank ends with status 143 and says why. (horovodrun itself, having forwarded the
    # signal, exits 0 when its ranks end within its 5 s grace, and non-zero if it kills them.)
    assert output.count("tfbert: error: stopped by SIGTERM after step") == 2, output[-3000:]
    stopped_at = int(output.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 3 <= stopped_at < 10
    assert f'"ckpt-{stopped_at}"' in (out / "checkpoint").read_text()
    for rank in (0, 1):
        assert (out / "rank_state" / f"rank-{rank}" / f"ckpt-{stopped_at}.index").exists()

    resumed = run_job(tfbert_command(2, f"--output_dir={out}", *RESUME_FLAGS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    straight, interrupted = logged_steps(straight_run), logged_steps(out)
    for step in range(stopped_at + 1, 11):
        for key in ("loss", "mlm_loss", "grad_norm", "loss_scale", "learning_rate"):
            assert straight[step][key] == interrupted[step][key], (step, key)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight_run, out)]
    assert summaries[0]["per_rank"]["weights_checksum"] == summaries[1]["per_rank"]["weights_checksum"]
    # The loss scale grew during the run (so restoring it mattered).
    assert straight[10]["loss_scale"] > 1024


def test_xla_jit_under_horovodrun_and_one_default_run_directory(tmp_path, sample):
    # No --output_dir: every rank must use rank 0's runs/tfbert-<time>.
    result = run_job(tfbert_command(2, "--xla=jit", "--num_train_steps=3", *TINY), cwd=tmp_path,
                     env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiled cluster using XLA" in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "rank_state").iterdir()) == ["rank-0", "rank-1"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
