"""tfbert's own checkpoints: the training state keyed by documented names, atomic and resumable.

A checkpoint `<dir>/ckpt-<step>` is one TensorFlow tensor bundle (`.index` + `.data-*`) whose
tensors are named, not keyed by Python object paths:

    bert/..., cls/...                  the weights, under google-research/bert's names (README
                                       "Variable names"); a TF1 reader lists them as they are
    <weight name>/adam_m, /adam_v      the optimizer's first and second moments (google's names)
    global_step                        training steps taken (skipped ones included)
    optimizer/iterations               optimizer updates applied
    training/...                       skipped-step counters and the float16 loss scale

Renaming a Python attribute therefore changes nothing on disk. Checkpoints of tfbert 0.1, keyed
by object paths (`model/bert/blocks/0/...`), still restore (`restore_latest` reads them through
the object graph they carry), and `python -m tfbert.tools.convert --to=native` rewrites them.

TensorFlow writes a bundle under temporary names and renames it when complete; the small
`checkpoint` index file is rewritten atomically after that. A job killed mid-save therefore
leaves the index pointing at the previous, complete checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.weights import WEIGHT_PREFIXES

# Present in every object-based (TF2 `tf.train.Checkpoint`) bundle, absent from named ones.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def latest_checkpoint(path: str) -> str | None:
    """The checkpoint prefix `path` names: itself if it is a prefix, else the newest in a dir."""
    if tf.io.gfile.isdir(path):
        return tf.train.latest_checkpoint(path)
    if tf.io.gfile.exists(path + ".index"):
        return path
    return None


def checkpoint_step(prefix: str) -> int:
    """The step number in a `ckpt-<step>` prefix."""
    return int(os.path.basename(prefix).rsplit("-", 1)[1])


def write_tensors(prefix: str, tensors: dict) -> None:
    """Writes {name: Tensor, Variable or array} as one tensor bundle at `prefix`."""
    names = sorted(tensors)
    values = [tf.convert_to_tensor(tensors[name]) for name in names]
    with tf.device("CPU:0"):
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                          shape_and_slices=[""] * len(names), tensors=values)


def write_index(directory: str, latest: str, kept: list[str]) -> None:
    """Writes `directory`'s `checkpoint` index (atomically: a temporary file, then renamed):
    `latest` and `kept` are checkpoint names in it, stored relative to it."""
    # An absolute directory: given a relative one, TensorFlow would store the names relative to
    # the working directory ("../../ckpt-500"), which no reader of the index then finds.
    tf.compat.v1.train.update_checkpoint_state(os.path.abspath(directory), latest, list(kept))


def open_reader(prefix: str, what: str):
    """A `tf.train.load_checkpoint` reader, or a CheckpointError saying why there is none."""
    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
            ValueError) as e:
        raise CheckpointError(f"{what} {prefix} is unreadable (missing or corrupt files): "
                              f"{str(e).splitlines()[0]}") from None


def check_shapes(expected: dict[str, tuple], found: dict[str, tuple], what: str) -> None:
    """Raises a CheckpointError naming every missing tensor and every shape mismatch."""
    missing = sorted(set(expected) - set(found))
    wrong = [f"{name}: checkpoint {list(found[name])}, model {list(shape)}"
             for name, shape in sorted(expected.items())
             if name in found and tuple(found[name]) != tuple(shape)]
    problems = []
    if wrong:
        problems.append("shapes differ (" + "; ".join(wrong[:8])
                        + (f"; and {len(wrong) - 8} more" if len(wrong) > 8 else "") + ")")
    if missing:
        problems.append(f"it lacks {len(missing)} tensor(s): {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    if problems:
        raise CheckpointError(
            f"{what} does not fit this model: " + "; ".join(problems) + ". It was written for a "
            "different model shape; compare its config with this run's --model/--bert_config_file.")


def restore_named(variables: dict[str, tf.Variable], prefix: str, what: str = "checkpoint") -> None:
    """Assigns each variable the tensor of its name in the bundle at `prefix`, one at a time
    (a whole-model read would hold a second copy of the model in memory)."""
    reader = open_reader(prefix, what)
    found = reader.get_variable_to_shape_map()
    check_shapes({name: tuple(v.shape) for name, v in variables.items()}, found, f"{what} {prefix}")
    for name, variable in variables.items():
        value = reader.get_tensor(name)
        if np.dtype(value.dtype) != variable.dtype.as_numpy_dtype:
            raise CheckpointError(f"{what} {prefix}: {name} is {value.dtype}, the model's "
                                  f"variable is {variable.dtype.name}")
        variable.assign(value)


def _restore_objects(checkpoint: tf.train.Checkpoint, prefix: str, what: str):
    try:
        return checkpoint.read(prefix)
    except (ValueError, tf.errors.InvalidArgumentError) as e:
        raise CheckpointError(
            f"{what} {prefix} does not fit this model: {e}\n"
            f"It was written for a different model shape; compare its config.json with this "
            f"run's --model/--bert_config_file.") from None
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError) as e:
        raise CheckpointError(f"{what} {prefix} is unreadable (missing or corrupt files): {e}") from None


def restore_objects(objects: dict, prefix: str, what: str = "checkpoint") -> None:
    """Restores an object-based checkpoint into `objects`, every one of which must be there."""
    status = _restore_objects(tf.train.Checkpoint(**objects), prefix, what)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise CheckpointError(f"{what} {prefix} lacks part of this run's state: {e}") from None
    status.expect_partial()  # a manager's save counter is not part of the run state


class _Index:
    """The `checkpoint` index file of a directory and the retention of its checkpoints, as
    `tf.train.CheckpointManager` keeps them (same file, relative paths): `tf.train.latest_
    checkpoint` and TensorBoard read it."""

    def __init__(self, directory: str, max_to_keep: int):
        self.directory = directory
        self.max_to_keep = max_to_keep
        state = tf.train.get_checkpoint_state(directory)
        self._kept = [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []

    @property
    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(self.directory)

    def record(self, name: str) -> None:
        """Makes `name` the newest checkpoint, then deletes the ones beyond max_to_keep."""
        kept = [n for n in self._kept if n != name] + [name]
        dropped, kept = kept[:-self.max_to_keep], kept[-self.max_to_keep:]
        write_index(self.directory, name, kept)
        self._kept = kept
        for old in dropped:
            for path in tf.io.gfile.glob(os.path.join(self.directory, old + ".*")):
                tf.io.gfile.remove(path)


class NamedCheckpointKeeper:
    """Saves and restores a run's shared state in `directory` as named bundles (module doc).

    Args:
      directory: where checkpoints (`ckpt-<step>.*`) and the `checkpoint` index live.
      max_to_keep: how many of the newest checkpoints to keep.
      variables: {documented name: variable}, everything the checkpoint holds.
      legacy_objects: the objects of tfbert 0.1's object-based checkpoints, {"model": ...,
        "optimizer": ..., ...}: a checkpoint of that format is restored through them.
      markers: {name: constant} written into every checkpoint and never restored: facts about
        the run that wrote it (ZeRO's "zero/num_ranks", ...).
    """

    def __init__(self, directory: str, max_to_keep: int, variables: dict[str, tf.Variable],
                 legacy_objects: dict | None = None, markers: dict | None = None):
        self.variables = dict(variables)
        self.markers = dict(markers or {})
        self.legacy_objects = dict(legacy_objects or {})
        self._index = _Index(directory, max_to_keep)

    @property
    def latest(self) -> str | None:
        return self._index.latest

    def save(self, step: int) -> str:
        name = f"ckpt-{step}"
        prefix = os.path.join(self._index.directory, name)
        write_tensors(prefix, {**self.markers, **self.variables})
        self._index.record(name)
        return prefix

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint, if any (either format); returns its prefix."""
        return self.restore(self.latest)

    def restore(self, prefix: str | None) -> str | None:
        """Restores the checkpoint at `prefix` (either format; None: nothing); returns it."""
        if prefix is None:
            return None
        reader = open_reader(prefix, "checkpoint")
        found = reader.get_variable_to_shape_map()
        if reader.has_tensor(OBJECT_GRAPH_KEY) and not self.variables.keys() & set(found):
            restore_objects(self.legacy_objects, prefix)  # tfbert 0.1
            return prefix
        missing_state = sorted(name for name in set(self.variables) - set(found)
                               if not name.startswith(WEIGHT_PREFIXES))
        if missing_state and all(name in found for name in self.variables
                                 if name.startswith(WEIGHT_PREFIXES)):
            raise CheckpointError(
                f"checkpoint {prefix} lacks part of this run's state: {missing_state}; it was "
                f"written by a run with other settings (--precision, --optimizer), which a "
                f"resume cannot change: use --init_checkpoint={self._index.directory} in a new "
                f"--output_dir to start from its weights")
        restore_named(self.variables, prefix)
        return prefix


class CheckpointKeeper:
    """Saves and restores state that has no documented names, object-based: each rank's data
    position and dropout generator (`tf.train.Checkpoint`, `tf.train.CheckpointManager`).

    Args:
      directory: where checkpoints (`ckpt-<step>.*`) and the `checkpoint` index live.
      max_to_keep: how many of the newest checkpoints to keep.
      **objects: what to save (a data iterator, a tf.random.Generator, ...).
    """

    def __init__(self, directory: str, max_to_keep: int, **objects):
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=max_to_keep, checkpoint_name="ckpt")

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def restore_step(self, step: int) -> str | None:
        """Restores the checkpoint saved at `step`, if this keeper has one."""
        prefix = os.path.join(self.manager.directory, f"ckpt-{step}")
        if not tf.io.gfile.exists(prefix + ".index"):
            return None
        restore_objects(self.objects, prefix)
        return prefix
