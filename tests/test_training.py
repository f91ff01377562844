"""The training loop: resume exactness, mixed precision, loss scaling, checkpoints."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import odd_model_config, run_config, synthetic_dataset
from tfbert import config as cfg
from tfbert.checkpoints import CheckpointError
from tfbert.training.optimization import WarmupPolynomialDecay
from tfbert.training.trainer import Pretrainer


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_resume_reproduces_the_next_steps_exactly(tmp_path):
    # Dropout on: the masks, the data position and the optimizer state must all come back.
    model = odd_model_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    straight = tmp_path / "straight"
    Pretrainer(run_config(straight, model, num_train_steps=8), synthetic_dataset()).train()

    interrupted = tmp_path / "interrupted"
    config = run_config(interrupted, model, num_train_steps=8)
    first = Pretrainer(config, synthetic_dataset()).train(max_steps=5)
    assert first["steps"] == 5 and first["checkpoint"].endswith("ckpt-5")
    tf.keras.backend.clear_session()
    resumed = Pretrainer(config, synthetic_dataset()).train()
    assert resumed["steps"] == 8 and resumed["steps_this_run"] == 3

    a, b = read_log(straight), read_log(interrupted)
    for step in (6, 7, 8):
        for key in ("loss", "mlm_loss", "nsp_loss", "learning_rate", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    # Steps before the interruption differ from those after it: the comparison is not vacuous.
    assert a[5]["loss"] != a[8]["loss"]


def test_fp16_skips_a_step_on_overflow_and_lowers_the_scale(tmp_path):
    # A scale of 2^40 overflows float16 gradients; the step must be skipped, weights untouched.
    config = run_config(tmp_path, precision="fp16", num_train_steps=1, initial_loss_scale=2.0 ** 40)
    trainer = Pretrainer(config, synthetic_dataset(batch=4))
    before = [v.numpy().copy() for v in trainer.variables]
    summary = trainer.train()
    assert summary["skipped_steps"] == 1
    assert summary["loss_scale"] == 2.0 ** 39
    for old, var in zip(before, trainer.variables):
        np.testing.assert_array_equal(old, var.numpy())
    assert int(trainer.update.optimizer.iterations) == 0


def test_fp16_steps_apply_with_a_sane_scale(tmp_path):
    config = run_config(tmp_path, precision="fp16", num_train_steps=2, initial_loss_scale=128.0)
    trainer = Pretrainer(config, synthetic_dataset(batch=4))
    before = trainer.variables[0].numpy().copy()
    summary = trainer.train()
    assert summary["skipped_steps"] == 0 and summary["loss_scale"] == 128.0
    assert not np.array_equal(before, trainer.variables[0].numpy())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precisions_train(tmp_path, precision):
    summary = Pretrainer(run_config(tmp_path, precision=precision, num_train_steps=3),
                         synthetic_dataset()).train()
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert summary["loss_scale"] is None


def test_summary_and_checkpoint_files(tmp_path):
    config = run_config(tmp_path, num_train_steps=4, save_checkpoints_steps=2, keep_checkpoint_max=1)
    summary = Pretrainer(config, synthetic_dataset()).train()
    with open(tmp_path / "summary.json") as f:
        on_disk = json.load(f)
    for key in ("steps", "first_loss", "final_loss", "examples_per_sec", "tokens_per_sec",
                "peak_memory_bytes"):
        assert on_disk[key] == summary[key]
    # (peak_memory_bytes is checked on the default run: this model's tensors are all below the
    # size the CPU allocator counts.)
    assert summary["examples_per_sec"] > 0 and summary["peak_rss_bytes"] > 0
    assert summary["tokens_per_sec"] == pytest.approx(summary["examples_per_sec"] * 16)
    # Only the newest checkpoint is kept, and the index points at it.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    assert not list(tmp_path.glob("ckpt-2.*"))
    assert list((tmp_path / "train").iterdir())  # TensorBoard events


def test_init_checkpoint_loads_weights_but_not_the_step(tmp_path):
    source = tmp_path / "source"
    first = Pretrainer(run_config(source, num_train_steps=2), synthetic_dataset())
    first.train()
    target = Pretrainer(run_config(tmp_path / "target", init_checkpoint=str(source)),
                        synthetic_dataset())
    assert target.restore_or_initialize() == 0
    for a, b in zip(first.variables, target.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    Pretrainer(run_config(tmp_path / "small", num_train_steps=1), synthetic_dataset()).train()
    bigger = run_config(tmp_path / "big", odd_model_config(hidden_size=48),
                        init_checkpoint=str(tmp_path / "small"))
    with pytest.raises(CheckpointError, match="different model shape"):
        Pretrainer(bigger, synthetic_dataset()).restore_or_initialize()


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
    config = run_config(tmp_path, num_train_steps=2)
    Pretrainer(config, synthetic_dataset()).train()
    # A save killed midway leaves temporary files but never updates the index.
    (tmp_path / "ckpt-3_temp").mkdir()
    (tmp_path / "ckpt-3_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 10)
    resumed = Pretrainer(run_config(tmp_path, num_train_steps=3), synthetic_dataset())
    assert resumed.restore_or_initialize() == 2


def test_schedule_warms_up_then_decays():
    schedule = WarmupPolynomialDecay(1e-3, num_train_steps=100, num_warmup_steps=10)
    values = [float(schedule(s)) for s in (0, 5, 10, 55, 100)]
    assert values[0] == 0.0 and values[1] == pytest.approx(5e-4)
    assert values[2] == pytest.approx(9e-4) and values[3] == pytest.approx(4.5e-4)
    assert values[4] == 0.0


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_optimizers_decay_weights_but_not_layer_norm_or_biases(tmp_path, name):
    # With zero gradients (lr > 0, no data signal) only weight decay moves the weights.
    optimizer = cfg.OptimizerConfig(optimizer=name, learning_rate=0.1, weight_decay_rate=0.5,
                                    clip_norm=0.0)
    trainer = Pretrainer(run_config(tmp_path, optimizer=optimizer), synthetic_dataset())
    trainer.restore_or_initialize()
    variables = trainer.model.variables_by_name()
    gamma = variables["bert/embeddings/LayerNorm/gamma"]
    kernel = variables["bert/pooler/dense/kernel"]
    gamma_before, kernel_before = gamma.numpy().copy(), kernel.numpy().copy()
    trainer.update.apply([tf.zeros_like(v) for v in trainer.variables], trainer.variables)
    np.testing.assert_array_equal(gamma.numpy(), gamma_before)
    assert np.abs(kernel.numpy()).sum() < np.abs(kernel_before).sum()


def test_sparse_gradient_norm_counts_repeated_tokens_once():
    from tfbert.training.precision import deduplicate_indexed_slices

    grad = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                            tf.constant([2, 0, 2]), tf.constant([4, 2]))
    dense = tf.convert_to_tensor(grad)
    deduplicated = deduplicate_indexed_slices(grad)
    assert float(tf.linalg.global_norm([deduplicated])) == pytest.approx(
        float(tf.linalg.global_norm([dense])))
    # Without deduplication the norm is wrong: the reason the trainer deduplicates.
    assert float(tf.linalg.global_norm([grad])) != pytest.approx(
        float(tf.linalg.global_norm([dense])))
    np.testing.assert_array_equal(tf.convert_to_tensor(deduplicated).numpy(), dense.numpy())


def test_scale_learning_rate_multiplies_the_peak_by_the_ranks(tmp_path):
    from tfbert.distributed import SingleProcess

    class FourRanks(SingleProcess):
        size = 4

    base = run_config(tmp_path / "a", num_train_steps=10)
    scaled = cfg.Config(model=base.model, data=base.data, optimizer=base.optimizer,
                        runtime=run_config(tmp_path / "b", num_train_steps=10).runtime,
                        distribution=cfg.DistributionConfig(scale_learning_rate=True))
    plain = Pretrainer(base, synthetic_dataset(), FourRanks())
    scaled_trainer = Pretrainer(scaled, synthetic_dataset(), FourRanks())
    assert float(scaled_trainer.schedule(0)) == pytest.approx(4 * float(plain.schedule(0)))


def test_accumulation_reads_k_batches_per_step_and_all_reduces_once(tmp_path):
    from tfbert.distributed import SingleProcess

    class CountingGroup(SingleProcess):
        calls = 0

        def allreduce_gradients(self, grads):
            CountingGroup.calls += 1  # counted while tracing: once per traced step function
            return grads

    config = run_config(tmp_path, num_train_steps=3)
    config = cfg.Config(model=config.model, data=config.data, optimizer=config.optimizer,
                        runtime=config.runtime,
                        distribution=cfg.DistributionConfig(num_accumulation_steps=3))
    trainer = Pretrainer(config, synthetic_dataset(), CountingGroup())
    summary = trainer.train()
    assert summary["global_batch_size"] == 8 * 3 and summary["steps"] == 3
    assert CountingGroup.calls == 1  # only the apply step all-reduces, not the micro-batches
    # 3 steps x 3 micro-batches consumed: the next batch is the 10th of the stream.
    expected = list(synthetic_dataset().skip(9).take(1))[0]["input_ids"].numpy()
    np.testing.assert_array_equal(next(trainer.iterator)["input_ids"].numpy(), expected)
    assert all(float(tf.reduce_max(tf.abs(a))) == 0.0 for a in trainer.accumulators)


def test_loss_scale_doubles_after_the_growth_interval(tmp_path):
    config = run_config(tmp_path, precision="fp16", num_train_steps=2, initial_loss_scale=128.0,
                        loss_scale_growth_interval=1)
    summary = Pretrainer(config, synthetic_dataset(batch=4)).train()
    assert summary["skipped_steps"] == 0 and summary["loss_scale"] == 512.0


def test_schedule_end_rate_and_power():
    schedule = WarmupPolynomialDecay(1e-3, num_train_steps=100, end=1e-4, power=2.0)
    assert float(schedule(100)) == pytest.approx(1e-4)
    # (1 - 50/100)^2 of the way from end to peak.
    assert float(schedule(50)) == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.25)


def poisoned_dataset(nan_batches: int, batch=4):
    """`nan_batches` batches whose MLM weights are NaN (so are the loss and every gradient),
    then the ordinary synthetic stream."""
    bad = synthetic_dataset(batch=batch).take(nan_batches).map(
        lambda f: dict(f, masked_lm_weights=f["masked_lm_weights"] * float("nan")))
    return bad.concatenate(synthetic_dataset(batch=batch))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_with_non_finite_gradients_is_skipped_in_every_precision(tmp_path, precision):
    config = run_config(tmp_path, precision=precision, num_train_steps=1,
                        initial_loss_scale=128.0)
    trainer = Pretrainer(config, poisoned_dataset(1))
    before = [v.numpy().copy() for v in trainer.variables]
    summary = trainer.train()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 1
    for old, var in zip(before, trainer.variables):
        np.testing.assert_array_equal(old, var.numpy(), err_msg=var.name)
    assert int(trainer.update.optimizer.iterations) == 0
    # The next, finite steps train again; the skipped step's NaN is not in the logged loss.
    summary = Pretrainer(dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, num_train_steps=3)),
        poisoned_dataset(1)).train()
    assert summary["skipped_steps"] == 1 and np.isfinite(summary["final_loss"])


def test_consecutive_non_finite_steps_stop_the_run_without_a_checkpoint(tmp_path):
    from tfbert.training.trainer import TrainingDiverged

    config = run_config(tmp_path, num_train_steps=10, save_checkpoints_steps=2,
                        max_consecutive_nonfinite_steps=2)
    # Two good steps (checkpoint at 2), then NaN for ever: the run stops at step 4, before the
    # checkpoint of step 4.
    good = synthetic_dataset(batch=4).take(2)
    trainer = Pretrainer(config, good.concatenate(poisoned_dataset(1000)))
    with pytest.raises(TrainingDiverged, match="2 steps in a row .to step 4."):
        trainer.train()
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    assert all(np.isfinite(v.numpy()).all() for v in trainer.variables)
    assert not (tmp_path / "summary.json").exists()


def test_the_log_averages_over_ranks_and_reports_the_memory_range(tmp_path):
    from tfbert.distributed import SingleProcess

    class TwoRanks(SingleProcess):
        """Rank 0 of two, whose partner reports 3x every figure."""

        def allgather_values(self, values):
            values = np.asarray(values, np.float64)
            return np.stack([values, 3 * values])

    trainer = Pretrainer(run_config(tmp_path, num_train_steps=1), synthetic_dataset(), TwoRanks())
    trainer.train()
    record = read_log(tmp_path)[1]
    # The logged loss is the mean of 1x and 3x this rank's: twice this rank's own (the first
    # step's, which the summary keeps unaveraged).
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert record["loss"] == pytest.approx(2 * summary["first_loss"])
    assert record["peak_memory_bytes_max"] == 3 * record["peak_memory_bytes_min"]
    assert record["peak_memory_bytes"] == record["peak_memory_bytes_min"]


def test_a_finished_run_says_so_and_rewrites_nothing(tmp_path):
    config = run_config(tmp_path, num_train_steps=2)
    Pretrainer(config, synthetic_dataset()).train()
    summary_before = (tmp_path / "summary.json").read_text()
    again = Pretrainer(config, synthetic_dataset()).train()
    assert again["steps"] == 2 and again["steps_this_run"] == 0
    assert (tmp_path / "summary.json").read_text() == summary_before
    fewer = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime,
                                                                   num_train_steps=1))
    assert Pretrainer(fewer, synthetic_dataset()).train()["steps_this_run"] == 0


def test_a_job_killed_between_the_rank_and_shared_saves_resumes_exactly(tmp_path):
    # keep_checkpoint_max=1: the rank state of the last shared checkpoint must survive the
    # rank-state save of the next one.
    model = odd_model_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    straight = tmp_path / "straight"
    Pretrainer(run_config(straight, model, num_train_steps=6, save_checkpoints_steps=2,
                          keep_checkpoint_max=1), synthetic_dataset()).train()

    killed = tmp_path / "killed"
    config = run_config(killed, model, num_train_steps=6, save_checkpoints_steps=2,
                        keep_checkpoint_max=1)
    trainer = Pretrainer(config, synthetic_dataset())

    def killed_before_the_shared_save(step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return shared_save(step)

    shared_save = trainer.checkpoints.save
    trainer.checkpoints.save = killed_before_the_shared_save
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert tf.train.latest_checkpoint(str(killed)).endswith("ckpt-2")
    tf.keras.backend.clear_session()
    resumed = Pretrainer(config, synthetic_dataset())
    assert resumed.restore_or_initialize() == 2
    resumed.train()
    a, b = read_log(straight), read_log(killed)
    for step in (5, 6):
        assert a[step]["loss"] == b[step]["loss"], step


def test_save_checkpoints_secs_adds_checkpoints_by_time(tmp_path):
    # Every step is "due" by time here; by steps alone only the last step would be saved.
    config = run_config(tmp_path, num_train_steps=3, save_checkpoints_steps=1000,
                        save_checkpoints_secs=1e-6)
    Pretrainer(config, synthetic_dataset()).train()
    saved = sorted(p.name for p in tmp_path.glob("ckpt-*.index"))
    assert saved == ["ckpt-1.index", "ckpt-2.index", "ckpt-3.index"]
    assert sorted(p.name for p in (tmp_path / "rank_state" / "rank-0").glob("ckpt-*.index")) == saved


def test_sigterm_ends_the_run_after_a_step_with_a_checkpoint_and_it_resumes_exactly(tmp_path):
    import signal

    from tfbert.training.trainer import Preempted

    model = odd_model_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    straight = tmp_path / "straight"
    Pretrainer(run_config(straight, model, num_train_steps=6), synthetic_dataset()).train()

    config = run_config(tmp_path / "stopped", model, num_train_steps=6)
    trainer = Pretrainer(config, synthetic_dataset())
    run_step, calls = trainer.run_step, []

    def signalled_during_the_third_step(requests, **kwargs):
        calls.append(requests)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-step
        return run_step(requests, **kwargs)

    trainer.run_step = signalled_during_the_third_step
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 4") as stopped:
        trainer.train()
    assert stopped.value.signal_number == signal.SIGTERM
    assert calls[3] == [1.0, 0.0]  # the request rode with the next step
    assert tf.train.latest_checkpoint(str(tmp_path / "stopped")).endswith("ckpt-4")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    tf.keras.backend.clear_session()
    Pretrainer(config, synthetic_dataset()).train()
    a, b = read_log(straight), read_log(tmp_path / "stopped")
    for step in (5, 6):
        assert a[step]["loss"] == b[step]["loss"], step


def test_embeddings_from_word_vectors_stay_frozen_for_the_first_steps(tmp_path):
    from tfbert.tokenization import load_tokenizer
    from tfbert.training.embedding_init import embedding_init_from_vectors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = load_tokenizer("wordpiece", str(tmp_path / "vocab.txt"))
    rng = np.random.default_rng(0)
    lines = [f"w{i} " + " ".join(f"{x:.4f}" for x in rng.standard_normal(32)) for i in range(40)]
    (tmp_path / "words.vec").write_text("40 32\n" + "\n".join(lines) + "\n")
    config = run_config(tmp_path / "run", num_train_steps=3, init_embeddings_from=str(
        tmp_path / "words.vec"), freeze_embeddings_steps=2)
    # Under gradient accumulation: the accumulators skip the frozen table too.
    config = dataclasses.replace(config, distribution=cfg.DistributionConfig(
        num_accumulation_steps=2))
    trainer = Pretrainer(config, synthetic_dataset(), tokenizer=tokenizer)
    random_table = trainer.model.word_embeddings.numpy()
    trainer.restore_or_initialize()
    expected, report = embedding_init_from_vectors(
        str(tmp_path / "words.vec"), tokenizer, 32, initial_table=random_table,
        initializer_range=0.02, seed=config.runtime.seed)
    assert report["covered_direct"] == 40
    initialised = trainer.model.word_embeddings.numpy()
    np.testing.assert_array_equal(initialised, expected)
    assert not np.array_equal(initialised, random_table)
    others = [v.numpy() for v in trainer.variables[1:]]
    trainer.train(max_steps=2)
    np.testing.assert_array_equal(trainer.model.word_embeddings.numpy(), initialised)
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(others, trainer.variables[1:])
               if v.name.startswith("bert/encoder"))
    trainer.run_step(frozen=False)  # step 3, as train() runs it: trained again
    assert not np.array_equal(trainer.model.word_embeddings.numpy(), initialised)


def test_init_embeddings_max_words_reads_only_the_first_words(tmp_path):
    from tfbert.tokenization import load_tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rng = np.random.default_rng(1)
    lines = [f"w{i} " + " ".join(f"{x:.4f}" for x in rng.standard_normal(32)) for i in range(40)]
    (tmp_path / "words.vec").write_text("\n".join(lines) + "\n")
    config = run_config(tmp_path / "run", num_train_steps=1, init_embeddings_from=str(
        tmp_path / "words.vec"), init_embeddings_max_words=10)
    trainer = Pretrainer(config, synthetic_dataset(),
                         tokenizer=load_tokenizer("wordpiece", str(tmp_path / "vocab.txt")))
    random_table = trainer.model.word_embeddings.numpy()
    trainer.restore_or_initialize()
    table = trainer.model.word_embeddings.numpy()
    first, later = [vocab.index(f"w{i}") for i in range(10)], [vocab.index("w10"), vocab.index("w39")]
    assert not np.array_equal(table[first], random_table[first])  # the 10 words read
    np.testing.assert_array_equal(table[later], random_table[later])  # beyond --init_embeddings_max_words
