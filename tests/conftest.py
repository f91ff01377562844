"""Shared fixtures: BERT's odd-sized tester model, synthetic batches, small run configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Quiet TensorFlow's C++ INFO lines in test output (tests that need them set their own env).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tfbert  # noqa: E402,F401  (before TensorFlow: it sets TensorFlow's environment)
import tensorflow as tf  # noqa: E402

from tfbert import config as cfg  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# google-research/bert's tester sizes: nothing is a multiple of 8.
ODD = dict(batch=13, seq=7, predictions=3, vocab=99)


def odd_model_config(**overrides) -> cfg.ModelConfig:
    values = dict(vocab_size=ODD["vocab"], hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    values.update(overrides)
    return cfg.ModelConfig(**values)


def synthetic_batch(batch=ODD["batch"], seq=ODD["seq"], predictions=ODD["predictions"],
                    vocab=ODD["vocab"], seed=0) -> dict[str, tf.Tensor]:
    """A batch with the pretraining features; the last two positions of each row are padding."""
    g = tf.random.Generator.from_seed(seed)
    real = seq - 2
    mask = tf.concat([tf.ones([batch, real], tf.int32), tf.zeros([batch, 2], tf.int32)], axis=1)
    return dict(
        input_ids=g.uniform([batch, seq], 5, vocab, tf.int32) * mask,
        input_mask=mask,
        segment_ids=tf.concat([tf.zeros([batch, seq // 2], tf.int32),
                               tf.ones([batch, seq - seq // 2], tf.int32)], axis=1) * mask,
        masked_lm_positions=g.uniform([batch, predictions], 1, real, tf.int32),
        masked_lm_ids=g.uniform([batch, predictions], 5, vocab, tf.int32),
        masked_lm_weights=tf.ones([batch, predictions], tf.float32),
        next_sentence_labels=g.uniform([batch, 1], 0, 2, tf.int32),
    )


def synthetic_dataset(batch=8, seq=16, predictions=3, vocab=ODD["vocab"], examples=256, seed=0):
    """A small repeating, seeded dataset of synthetic examples (checkpointable)."""
    features = synthetic_batch(examples, seq, predictions, vocab, seed)
    # No shuffle op: its order would depend on the global seed at creation time.
    return (tf.data.Dataset.from_tensor_slices(features).repeat()
            .batch(batch, drop_remainder=True))


def run_config(output_dir, model=None, **runtime) -> cfg.Config:
    """A Config for the tiny odd model on synthetic data of seq 16, 3 predictions."""
    optimizer = runtime.pop("optimizer", cfg.OptimizerConfig(learning_rate=1e-3))
    batch = runtime.pop("train_batch_size", 8)
    values = dict(output_dir=str(output_dir), num_train_steps=10, log_every_n_steps=1,
                  save_checkpoints_steps=1000)
    values.update(runtime)
    return cfg.Config(
        model=model or odd_model_config(),
        data=cfg.DataConfig(input_files=("synthetic",), max_seq_length=16,
                            max_predictions_per_seq=3, train_batch_size=batch),
        optimizer=optimizer, runtime=cfg.RuntimeConfig(**values))


# `make test` runs two pytest-xdist workers, each taking whole files in collection order: the
# longest files go first, so that the workers finish together instead of one running a long
# file alone at the end.
LONGEST_FIRST = ("test_flagfiles.py", "test_tensor_parallel.py", "test_finetuning.py",
                 "test_benchmarks.py", "test_distributed.py", "test_zero.py", "test_run.py",
                 "test_resilience.py", "test_training.py", "test_distillation.py",
                 "test_checkpoints.py", "test_multitask.py", "test_inference_benchmark.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(autouse=True)
def _reset_tf_global_state():
    """Each test starts with float32, no auto-clustering and a fresh Keras name space."""
    yield
    tf.keras.mixed_precision.set_global_policy("float32")
    tf.config.optimizer.set_jit(False)
    tf.keras.backend.clear_session()


@pytest.fixture(scope="session")
def tfbert_cache(tmp_path_factory):
    """A cache dir shared by the tests that prepare the sample corpus (built once)."""
    path = tmp_path_factory.mktemp("tfbert-cache")
    os.environ["TFBERT_CACHE_DIR"] = str(path)
    return path


def run_tfbert(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs `python -m tfbert.run ARGS` in a subprocess; returns the completed process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tfbert.run", *args], cwd=REPO_ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
