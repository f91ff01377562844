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
# The environment of a multi-rank job: a 10 ms Horovod cycle (1 ms by default), so that ranks
# sharing two cores spend less time polling. (Imported by the other multi-rank test files.)
HOROVOD_ENV = dict(HOROVOD_CYCLE_TIME="10")


def launch(ranks: int, out_dir, *args, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, WORKER, str(out_dir), *args]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    if ranks > 1:
        command = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
        env.update(HOROVOD_ENV)
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


def assert_close_but_for_sign_flips(a, b, rtol, atol, learning_rate, steps,
                                    max_fraction=0.01):
    """assert_close for runs in other precisions: LAMB and Adam move a weight by about the
    learning rate per step whatever the size of its gradient, so an element whose gradient is
    near 0 can move the other way under other rounding, up to 2 * learning_rate * steps from
    its twin. Such elements must stay rare (max_fraction of all); the others meet the tolerance."""
    assert a.keys() == b.keys()
    outside, total = 0, 0
    for name in a:
        diff = np.abs(a[name] - b[name])
        assert diff.max() <= 2 * learning_rate * steps + atol, (name, diff.max())
        outside += int((diff > atol + rtol * np.abs(b[name])).sum())
        total += diff.size
    assert outside <= max_fraction * total, f"{outside} of {total} elements differ"


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
    result = launch(2, tmp_path, "--batch=4", "--fp16_compression", "--precision=fp16")
    assert len(set(checksums(result))) == 1
    assert checksums(result) != checksums(two_ranks[1])  # compression did change the sums
    # Against the float32 run without compression (the worker's learning rate is 1e-3).
    assert_close_but_for_sign_flips(weights(tmp_path), weights(two_ranks[0]), rtol=1e-2,
                                    atol=1e-3, learning_rate=1e-3, steps=3)


def test_gather_lookup_gives_the_same_result(two_ranks, tmp_path):
    # --nosparse_as_dense: token types by gather, their sparse gradient all-gathered.
    launch(2, tmp_path, "--batch=4", "--nosparse_as_dense")
    assert_close(weights(tmp_path), weights(two_ranks[0]), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """tests/comm_worker.py under 4 ranks: one launch, read by the tests below."""
    out = tmp_path_factory.mktemp("comm")
    command = [HOROVODRUN, "-np", "4", "-H", "localhost:4", "--gloo", sys.executable,
               os.path.join(REPO_ROOT, "tests", "comm_worker.py"), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT, **HOROVOD_ENV))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = [json.loads((out / f"comm-rank{rank}.json").read_text()) for rank in range(4)]
    results[0]["out_dir"] = str(out)
    return results


def four_ranks_dir(four_ranks):
    import pathlib

    return pathlib.Path(four_ranks[0]["out_dir"])


def test_fp16_compression_divides_before_the_float16_sum(four_ranks):
    # 8000, 16000, 24000, 32000: the sum (80000) overflows float16, the mean (20000) does not.
    for rank in four_ranks:
        assert rank["fp16_headroom"] == dict(min=20000.0, max=20000.0)


def test_ranks_agree_on_the_default_output_dir(four_ranks):
    # Rank r asked for it 1.1 r seconds after rank 0: by its own clock it would differ.
    assert len(four_ranks[0]["output_dirs"]) == 4
    assert len(set(four_ranks[0]["output_dirs"])) == 1


def by_kind(collectives):
    steps = [c for c in collectives if "sum_over_ranks" not in c["name"]]
    return ([c for c in steps if c["op"] == "HorovodAllreduce"],
            [c for c in steps if c["op"] == "HorovodAllgather"],
            [c for c in collectives if "sum_over_ranks" in c["name"]])


def test_what_crosses_horovod_in_a_step(four_ranks):
    found = four_ranks[0]["collectives"]
    trainable_bytes = four_ranks[0]["trainable_bytes"]  # float32
    token_type_bytes = 2 * 32 * 4  # [type_vocab_size, hidden] float32

    # Default (--sparse_as_dense): every gradient in one all-reduce each, float16 on the wire;
    # plus the 2 float32 stop/save requests.
    reduced, gathered, requests = by_kind(found["sparse_as_dense"])
    assert not gathered
    assert {c["dtype"] for c in reduced} == {"float16"}
    assert sum(c["bytes"] for c in reduced) == trainable_bytes // 2
    assert [(c["dtype"], c["bytes"]) for c in requests] == [("float32", 8)]

    # --nosparse_as_dense: the token-type gradient is all-gathered as one row of 32 floats per
    # token (batch 8 x seq 16) with its indices, from every rank.
    reduced, gathered, _ = by_kind(found["gather_lookup"])
    assert sum(c["bytes"] for c in reduced) == (trainable_bytes - token_type_bytes) // 2
    values = [c for c in gathered if c["dtype"] == "float32"]
    assert [c["shape"] for c in values] == [[8 * 16, 32]] and values[0]["bytes"] == 8 * 16 * 32 * 4
    assert len(gathered) == 2  # values and indices

    # Under accumulation the rows are summed into a dense accumulator: all-reduced, not gathered.
    reduced, gathered, _ = by_kind(found["gather_lookup_accumulation"])
    assert not gathered and sum(c["bytes"] for c in reduced) == trainable_bytes // 2


def test_a_zero2_step_is_a_few_large_collectives(four_ranks):
    # One reduce-scatter of every gradient (flat: no padding), one all-gather of the updated
    # elements; beside them only small all-reduces (LAMB's [variables, 2] norms, the gradient
    # norm, the stop/save requests): not one collective per variable.
    found = four_ranks[0]["collectives"]["zero2_flat"]
    trainable_bytes = four_ranks[0]["trainable_bytes"]
    kinds = sorted(c["op"] for c in found)
    assert kinds.count("HorovodReducescatter") == 1 and kinds.count("HorovodAllgather") == 1
    (scatter,) = [c for c in found if c["op"] == "HorovodReducescatter"]
    (gather,) = [c for c in found if c["op"] == "HorovodAllgather"]
    # This job's group compresses: float16 on the wire, half the float32 bytes.
    assert scatter["bytes"] == trainable_bytes // 2 and scatter["dtype"] == "float16"
    elements = trainable_bytes // 4
    # Rank 0's part of Horovod's split (the first ranks get one more), float32.
    assert gather["shape"] == [elements // 4 + (1 if elements % 4 else 0)]
    assert gather["dtype"] == "float32"
    small = [c for c in found if c["op"] == "HorovodAllreduce"]
    assert len(small) == 3 and sum(c["bytes"] for c in small) < 1024


def test_zero2_at_four_ranks_reaches_the_weights_of_two_rank_data_parallelism(four_ranks,
                                                                             two_ranks, tmp_path):
    comm = four_ranks_dir(four_ranks)
    with np.load(comm / "z2_greedy2-rank0.npz") as data:
        zero = dict(data)
    assert_close(zero, weights(two_ranks[0]), rtol=1e-5, atol=1e-6)
    with open(comm / "z2_greedy2.json") as f:
        per_rank = json.load(f)["per_rank"]
    assert len(set(per_rank["weights_checksum"])) == 1
    params = per_rank["param_bytes"][0]
    assert sum(per_rank["optimizer_state_bytes"]) == 2 * params
    assert max(per_rank["optimizer_state_bytes"]) <= 0.6 * params  # about 1/4 each


def test_a_large_reduce_scatter_at_four_ranks_equals_the_all_reduce_slice(four_ranks):
    comm = four_ranks_dir(four_ranks)
    for rank in range(4):
        shard, expected = np.load(comm / f"reducescatter-rank{rank}.npy")
        np.testing.assert_allclose(shard, expected, rtol=1e-6, atol=1e-7)


def test_a_failing_rank_ends_the_job_non_zero_in_bounded_time(tmp_path, tfbert_cache):
    from tfbert.data.sample import prepare_sample_data

    prepare_sample_data()  # outside the timed launch
    command = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
               "tfbert.run", f"--output_dir={tmp_path}", "--num_train_steps=50",
               "--train_batch_size=8", "--debug_fail_at_step=3", "--debug_fail_rank=1",
               "--num_hidden_layers=1"]  # one layer: most of the launch is tracing the step
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT, **HOROVOD_ENV))
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 3" in result.stdout + result.stderr
    assert time.monotonic() - start < 240
    assert not (tmp_path / "summary.json").exists()
