"""Checkpoints: atomic saves, exact resume, and weights-only initialisation.

TensorFlow writes a checkpoint's data under a temporary name and renames it when complete, and
`CheckpointManager` then rewrites the small `checkpoint` index file atomically. A job killed
mid-save therefore leaves the index pointing at the previous, complete checkpoint.
"""

from __future__ import annotations

import os

import tensorflow as tf


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run; the message says which and why."""


def latest_checkpoint(path: str) -> str | None:
    """The checkpoint prefix `path` names: itself if it is a prefix, else the newest in a dir."""
    if tf.io.gfile.isdir(path):
        return tf.train.latest_checkpoint(path)
    if tf.io.gfile.exists(path + ".index"):
        return path
    return None


def _restore(checkpoint: tf.train.Checkpoint, prefix: str, what: str):
    try:
        return checkpoint.read(prefix)
    except (ValueError, tf.errors.InvalidArgumentError) as e:
        raise CheckpointError(
            f"{what} {prefix} does not fit this model: {e}\n"
            f"It was written for a different model shape; compare its config.json with this "
            f"run's --model/--bert_config_file.") from None
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError) as e:
        raise CheckpointError(f"{what} {prefix} is unreadable (missing or corrupt files): {e}") from None


class CheckpointKeeper:
    """Saves and restores the whole training state of one run in `directory`.

    Args:
      directory: where checkpoints (`ckpt-<step>.*`) and the `checkpoint` index live.
      max_to_keep: how many of the newest checkpoints to keep.
      **objects: what to save (model, optimizer, step counter, loss scale, RNG, data iterator).
    """

    def __init__(self, directory: str, max_to_keep: int, **objects):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=max_to_keep, checkpoint_name="ckpt")

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint, if any; returns its prefix."""
        prefix = self.latest
        if prefix is None:
            return None
        status = _restore(self.checkpoint, prefix, "checkpoint")
        # Every object of the run must come back, or the resume would not be exact.
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise CheckpointError(f"checkpoint {prefix} lacks part of this run's state: {e}") from None
        status.expect_partial()  # the manager's own save counter is not part of the run state
        return prefix

    def restore_step(self, step: int) -> str | None:
        """Restores the checkpoint saved at `step`, if this keeper has one."""
        prefix = os.path.join(self.manager.directory, f"ckpt-{step}")
        if not tf.io.gfile.exists(prefix + ".index"):
            return None
        status = _restore(self.checkpoint, prefix, "checkpoint")
        status.assert_existing_objects_matched().expect_partial()
        return prefix


def init_from_checkpoint(model: tf.Module, path: str) -> str:
    """Loads only the model's weights from a checkpoint prefix or a run directory.

    The optimizer state, step counter and data position are not loaded: this starts a new run
    from trained weights (--init_checkpoint). Returns the prefix used.
    """
    prefix = latest_checkpoint(path)
    if prefix is None:
        raise CheckpointError(f"--init_checkpoint={path}: no checkpoint there")
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        raise CheckpointError(f"--init_checkpoint={path}: {prefix} is a name-based (TF1) "
                              f"checkpoint; tfbert reads its own object-based checkpoints")
    status = _restore(tf.train.Checkpoint(model=model), prefix, "--init_checkpoint")
    try:
        status.expect_partial().assert_existing_objects_matched()
    except AssertionError as e:
        raise CheckpointError(f"--init_checkpoint={path}: {prefix} lacks some model weights: {e}") from None
    return prefix


def checkpoint_step(prefix: str) -> int:
    """The step number in a `ckpt-<step>` prefix."""
    return int(os.path.basename(prefix).rsplit("-", 1)[1])
