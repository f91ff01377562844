"""Data parallelism and gradient accumulation, with real horovodrun processes (Gloo)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, "tests", "distributed_worker.py")
HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which(
    "horovodrun")
pytestmark = pytest.mark.skipif(HOROVODRUN is None, reason="horovodrun is not installed")


def launch(ranks: int, out_dir, *args, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, WORKER, str(out_dir), *args]
    if ranks > 1:
        command = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def weights(out_dir, rank=0) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out_dir, f"weights-rank{rank}.npz")) as data:
        return dict(data)


def checksums(result) -> list[int]:
    line = next(l for l in result.stdout.splitlines() if "CHECKSUMS" in l)
    return json.loads(line.split("CHECKSUMS", 1)[1].split("SKIPPED")[0])


def assert_close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def assert_not_close(a, b, rtol, atol):
    """Guards against a vacuous comparison: a different run fails the same tolerance."""
    with pytest.raises(AssertionError):
        assert_close(a, b, rtol, atol)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    return out, launch(2, out, "--batch=4")


@pytest.fixture(scope="module")
def one_rank_double_batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    launch(1, out, "--batch=8")
    return out


def test_two_ranks_equal_one_rank_with_twice_the_batch(two_ranks, one_rank_double_batch,
                                                       tmp_path):
    out, result = two_ranks
    # Tolerance: float32 sums in another order (per-rank means, then the average), 3 LAMB steps.
    assert_close(weights(out), weights(one_rank_double_batch), rtol=1e-4, atol=2e-6)
    # The ranks hold bit-identical weights.
    assert len(set(checksums(result))) == 1
    np.testing.assert_array_equal(weights(out)["bert/pooler/dense/kernel"],
                                  weights(out, 1)["bert/pooler/dense/kernel"])
    # Not vacuous: half the global batch gives different weights.
    half = tmp_path / "half"
    launch(1, half, "--batch=4")
    assert_not_close(weights(half), weights(out), rtol=1e-4, atol=2e-6)


def test_accumulation_equals_one_big_batch(one_rank_double_batch, tmp_path):
    launch(1, tmp_path, "--batch=4", "--accumulation=2")
    assert_close(weights(tmp_path), weights(one_rank_double_batch), rtol=1e-4, atol=2e-6)


def test_float16_accumulation_stays_close_to_float32(tmp_path):
    # fp16 compute (the only mode with float16 accumulators); CPUs emulate float16, so it is small.
    fp32_acc, fp16_acc = tmp_path / "fp32", tmp_path / "fp16"
    launch(1, fp32_acc, "--batch=4", "--accumulation=2", "--precision=fp16", "--steps=2")
    result = launch(1, fp16_acc, "--batch=4", "--accumulation=2", "--precision=fp16",
                    "--accum_dtype=float16", "--steps=2")
    assert "SKIPPED 0" in result.stdout
    assert_close(weights(fp16_acc), weights(fp32_acc), rtol=1e-2, atol=1e-4)


def test_fp16_compression_keeps_ranks_identical_and_close(two_ranks, tmp_path):
    result = launch(2, tmp_path, "--batch=4", "--fp16_compression")
    assert len(set(checksums(result))) == 1
    assert checksums(result) != checksums(two_ranks[1])  # compression did change the sums
    assert_close(weights(tmp_path), weights(two_ranks[0]), rtol=1e-2, atol=1e-4)


def test_sparse_as_dense_gives_the_same_result(two_ranks, tmp_path):
    launch(2, tmp_path, "--batch=4", "--sparse_as_dense")
    assert_close(weights(tmp_path), weights(two_ranks[0]), rtol=1e-5, atol=1e-7)


def test_a_failing_rank_ends_the_job_non_zero_in_bounded_time(tmp_path, tfbert_cache):
    from tfbert.data.sample import prepare_sample_data

    prepare_sample_data()  # outside the timed launch
    command = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
               "tfbert.run", f"--output_dir={tmp_path}", "--num_train_steps=50",
               "--train_batch_size=8", "--debug_fail_at_step=3", "--debug_fail_rank=1"]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 3" in result.stdout + result.stderr
    assert time.monotonic() - start < 240
    assert not (tmp_path / "summary.json").exists()
