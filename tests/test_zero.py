"""ZeRO-1/2 (tfbert.training.gradient_sync) against data parallelism, with real horovodrun
processes (Gloo): the same weights, 1/n of the optimizer state per rank, exact sharded resume,
gathered checkpoints that resume on one rank, and the start-up errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from test_distributed import HOROVOD_ENV, assert_close, assert_not_close

WORKER = os.path.join(REPO_ROOT, "tests", "zero_worker.py")
HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which(
    "horovodrun")
needs_horovod = pytest.mark.skipif(HOROVODRUN is None, reason="horovodrun is not installed")

# Float32 sums in another order (reduce-scatter vs all-reduce, LAMB's norms summed per segment):
# after 3 steps the weights differ by about 1e-7; a float16 run differs by about 1e-3.
TIGHT = dict(rtol=1e-5, atol=1e-6)
# ZeRO at 4 ranks, a large reduce-scatter at 4 ranks and the collectives of a ZeRO step are in
# test_distributed.py (its 4-rank job).
TWO_RANK_SETUPS = ["dp", "z1_greedy2_fused", "z2_flat", "z2_flat@resumed", "z2_greedy4_accum2",
                   "z2_naive_accum2_fp16_compressed", "reducescatter"]


def launch(ranks: int, out_dir, *setups, timeout=900) -> subprocess.CompletedProcess:
    command = [sys.executable, WORKER, str(out_dir), *setups]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    if ranks > 1:
        command = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
        env.update(HOROVOD_ENV)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def weights(out_dir, setup, rank=0) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out_dir, f"{setup}-rank{rank}.npz")) as data:
        return dict(data)


def summary(out_dir, setup) -> dict:
    with open(os.path.join(out_dir, f"{setup}.json")) as f:
        return json.load(f)


def step_losses(out_dir, setup) -> dict[int, float]:
    with open(os.path.join(out_dir, setup, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    return out, launch(2, out, *TWO_RANK_SETUPS)


@needs_horovod
@pytest.mark.parametrize("setup", ["z1_greedy2_fused", "z2_flat", "z2_greedy4_accum2"])
def test_zero_reaches_the_weights_of_data_parallelism(two_ranks, setup):
    # With the fused shard ops (z1_greedy2_fused) as with tensorflow_addons' LAMB (dp).
    out, _ = two_ranks
    assert_close(weights(out, setup), weights(out, "dp"), **TIGHT)
    # Every rank holds the same weights, bit for bit (the all-gather of the updated shards).
    assert len(set(summary(out, setup)["per_rank"]["weights_checksum"])) == 1
    np.testing.assert_array_equal(weights(out, setup)["bert/embeddings/word_embeddings"],
                                  weights(out, setup, 1)["bert/embeddings/word_embeddings"])


@needs_horovod
def test_the_tolerance_would_see_a_float16_run(two_ranks):
    out, _ = two_ranks
    assert_not_close(weights(out, "z2_naive_accum2_fp16_compressed"), weights(out, "dp"), **TIGHT)


@needs_horovod
def test_zero2_with_float16_accumulation_and_compression(two_ranks):
    out, _ = two_ranks
    setup = "z2_naive_accum2_fp16_compressed"
    assert summary(out, setup)["skipped_steps"] == 0
    assert len(set(summary(out, setup)["per_rank"]["weights_checksum"])) == 1
    assert_close(weights(out, setup), weights(out, "dp"), rtol=1e-2, atol=1e-3)


@needs_horovod
def test_each_rank_holds_half_the_optimizer_state(two_ranks):
    out, _ = two_ranks
    dp = summary(out, "dp")["per_rank"]
    params = dp["param_bytes"][0]
    # m and v of every parameter, plus the 8-byte step counter.
    assert dp["optimizer_state_bytes"] == [2 * params + 8] * 2
    for setup in ("z1_greedy2_fused", "z2_flat"):
        per_rank = summary(out, setup)["per_rank"]
        assert sum(per_rank["optimizer_state_bytes"]) == 2 * params
        assert max(per_rank["optimizer_state_bytes"]) <= 1.15 * params  # about 1/2 each
    flat = summary(out, "z2_flat")["per_rank"]
    assert max(flat["optimizer_state_bytes"]) - min(flat["optimizer_state_bytes"]) <= 8
    # ZeRO-2: the step's gradients and the accumulators are this rank's share too.
    assert sum(flat["gradient_bytes"]) == params
    accumulated = summary(out, "z2_greedy4_accum2")["per_rank"]["accumulator_bytes"]
    assert sum(accumulated) == params and max(accumulated) <= 0.6 * params


@needs_horovod
def test_rank_zero_prints_what_each_rank_holds(two_ranks):
    _, result = two_ranks
    assert "ZeRO-2: what each rank holds" in result.stderr
    assert "--state_split_strategy=greedy:4" in result.stderr
    assert "optimizer state max/mean" in result.stderr


@needs_horovod
def test_sharded_resume_is_exact(two_ranks):
    out, _ = two_ranks
    for rank in range(2):
        resumed, straight = weights(out, "z2_flat@resumed", rank), weights(out, "z2_flat", rank)
        for name in straight:
            np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def gather(run_dir, output_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfbert.tools.gather_checkpoint",
                           f"--run_dir={run_dir}", f"--output_dir={output_dir}", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT))


@needs_horovod
def test_gathered_moments_equal_data_parallelism(two_ranks, tmp_path):
    out, _ = two_ranks
    result = gather(out / "z2_flat", tmp_path / "gathered")
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = tf.train.load_checkpoint(str(tmp_path / "gathered" / "ckpt-3"))
    reference = tf.train.load_checkpoint(str(out / "dp" / "ckpt-3"))
    names = reference.get_variable_to_shape_map()
    slots = [name for name in names if name.endswith(("/adam_m", "/adam_v"))]
    assert slots and set(slots) <= set(gathered.get_variable_to_shape_map())
    for name in slots:
        np.testing.assert_allclose(gathered.get_tensor(name), reference.get_tensor(name),
                                   rtol=1e-4, atol=1e-9, err_msg=name)
    assert not any(name.startswith("zero/") for name in gathered.get_variable_to_shape_map())


@needs_horovod
def test_a_gathered_checkpoint_resumes_on_one_rank(two_ranks):
    out, _ = two_ranks
    # Step 2 of the 2-rank ZeRO-2 run, gathered, then step 3 in one process without ZeRO.
    result = gather(out / "z2_flat@resumed", out / "z2_flat@gathered", "--step=2")
    assert result.returncode == 0, result.stderr[-3000:]
    launch(1, out, "z2_flat@gathered")
    # Tolerance as for 2 ranks against 1 rank with twice the batch (test_distributed).
    assert_close(weights(out, "z2_flat@gathered"), weights(out, "z2_flat"), rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(step_losses(out, "z2_flat@gathered")[3],
                               step_losses(out, "z2_flat")[3], rtol=1e-5)


@needs_horovod
def test_gathering_refuses_what_it_cannot_gather(two_ranks, tmp_path):
    out, _ = two_ranks
    not_sharded = gather(out / "dp", tmp_path / "a")
    assert not_sharded.returncode == 2 and "is not sharded" in not_sharded.stderr
    broken = tmp_path / "broken"
    shutil.copytree(out / "z2_flat", broken)
    shutil.rmtree(broken / "zero_state" / "rank-1")
    missing = gather(broken, tmp_path / "b")
    assert missing.returncode == 2 and "rank 1's optimizer-state shard" in missing.stderr


@needs_horovod
def test_data_parallelism_does_not_resume_a_sharded_checkpoint(two_ranks):
    from tfbert.checkpoints import CheckpointError
    from tfbert.checkpoints.sharded import check_not_sharded

    out, _ = two_ranks
    with pytest.raises(CheckpointError, match="gather_checkpoint"):
        check_not_sharded(str(out / "z2_flat" / "ckpt-3"))
    check_not_sharded(str(out / "dp" / "ckpt-3"))


@needs_horovod
def test_a_large_reduce_scatter_equals_the_all_reduce_slice(two_ranks):
    for rank in range(2):
        shard, expected = np.load(os.path.join(two_ranks[0], f"reducescatter-rank{rank}.npy"))
        np.testing.assert_allclose(shard, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Start-up errors and the flags (in process).

def test_zero_needs_two_ranks_and_a_known_strategy():
    from tfbert import config as cfg

    with pytest.raises(cfg.ConfigError, match="horovodrun -np N"):
        cfg.DistributionConfig(zero_stage=1)
    with pytest.raises(cfg.ConfigError, match="state_split_strategy='greedy:0'"):
        cfg.DistributionConfig(num_processes=2, zero_stage=1, state_split_strategy="greedy:0")
    with pytest.raises(cfg.ConfigError, match="'best'"):
        cfg.DistributionConfig(num_processes=2, zero_stage=2, state_split_strategy="best")
    with pytest.raises(cfg.ConfigError, match="which is off"):
        cfg.DistributionConfig(num_processes=2, state_split_strategy="flat")
    with pytest.raises(cfg.ConfigError, match="--zero_stage=3"):
        cfg.DistributionConfig(num_processes=2, zero_stage=3)
    cfg.DistributionConfig(num_processes=2, zero_stage=2, state_split_strategy="greedy:16")


@pytest.mark.parametrize("flags, stage", [
    ([], 0), (["--custom_memory_optimization"], 1), (["--split_opt_state"], 1),
    (["--split_grad_accum"], 2), (["--custom_memory_optimization", "--split_grad_accum"], 2),
    (["--custom_memory_optimization", "--zero_stage=2"], 2), (["--zero_stage=1"], 1)])
def test_the_notes_flag_names_map_to_zero_stages(flags, stage):
    from absl import flags as absl_flags

    from tfbert import run

    values = absl_flags.FlagValues()
    run.define_flags(values)
    values(["tfbert.run", *flags])
    assert run.zero_stage_from_flags(values) == stage


@pytest.mark.parametrize("flags, message", [
    (["--zero_stage=1", "--split_grad_accum"], "contradicts --zero_stage=1"),
    (["--zero_stage=0", "--custom_memory_optimization"], "turns ZeRO off")])
def test_contradictory_zero_flags_fail(flags, message):
    from absl import flags as absl_flags

    from tfbert import config as cfg
    from tfbert import run

    values = absl_flags.FlagValues()
    run.define_flags(values)
    values(["tfbert.run", *flags])
    with pytest.raises(cfg.ConfigError, match=message):
        run.zero_stage_from_flags(values)
