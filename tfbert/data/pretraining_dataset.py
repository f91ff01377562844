"""Reads pretraining TFRecords into batches, and checks them before a run starts.

The records carry google-research/bert's features (written by `create_pretraining_data`, or by
google's and NVIDIA's tools):

    input_ids, input_mask, segment_ids          int64 [max_seq_length]
    masked_lm_positions, masked_lm_ids          int64 [max_predictions_per_seq]
    masked_lm_weights                           float [max_predictions_per_seq]
    next_sentence_labels                        int64 [1]   (0: B follows A, 1: B is random)

and, for multi-task pretraining (`create_pretraining_data --label_columns`), per sequence:

    cls_label                                   int64 [1]   a class of the sequence
    teacher_score                               float [1]   a teacher model's score

Start-up checks (`resolve_input_files`, `check_records`, `check_token_ids`) read only the first
record(s) of each file, so they stay cheap for thousands of files. A bad record deep inside a
file (corrupt or truncated, of another length, or lacking a feature) shows up only when training
reaches it; `describe_data_error` then finds it with `find_bad_record` and names the file, the
record and what is wrong, and

    python -m tfbert.data.pretraining_dataset --check_all='records/*.tfrecord'

reads every record of every file with the same scanner (`scan_file`) and reports the bad ones.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import time

import tensorflow as tf
from absl import logging

FEATURE_NAMES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions",
                 "masked_lm_ids", "masked_lm_weights", "next_sentence_labels")
_SEQUENCE_FEATURES = ("input_ids", "input_mask", "segment_ids")
_PREDICTION_FEATURES = ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights")
# Multi-task pretraining's labels, read when a run asks for them.
LABEL_FEATURES = ("cls_label", "teacher_score")
_FLOAT_FEATURES = ("masked_lm_weights", "teacher_score")


class DataError(ValueError):
    """Input files are missing, empty, corrupt, or do not match the run's settings."""


@dataclasses.dataclass(frozen=True)
class RecordShape:
    """The lengths every record of a run must have; the one source of the parsing spec (the
    input pipeline, `check_records` and the scanner all use it)."""

    max_seq_length: int
    max_predictions_per_seq: int
    labels: tuple[str, ...] = ()  # of LABEL_FEATURES

    def lengths(self) -> dict[str, int]:
        """{feature name: number of values} for the seven features and the labels."""
        lengths = dict.fromkeys(_SEQUENCE_FEATURES, self.max_seq_length)
        lengths.update(dict.fromkeys(_PREDICTION_FEATURES, self.max_predictions_per_seq),
                       next_sentence_labels=1)
        lengths.update(dict.fromkeys(self.labels, 1))
        return lengths

    def feature_spec(self) -> dict[str, tf.io.FixedLenFeature]:
        """tf.io.parse_example's spec. FixedLenFeature (no default value) raises
        InvalidArgumentError on a record whose feature is missing or has another number of
        values, instead of padding or truncating it silently, as VarLenFeature would."""
        return {name: tf.io.FixedLenFeature(
                    [length], tf.float32 if name in _FLOAT_FEATURES else tf.int64)
                for name, length in self.lengths().items()}

    @classmethod
    def of(cls, values: dict[str, list]) -> RecordShape:
        """The shape of a record given as `_example_values` returns it."""
        return cls(len(values["input_ids"]), len(values["masked_lm_positions"]))

    def describe(self) -> str:
        return (f"max_seq_length={self.max_seq_length}, "
                f"max_predictions_per_seq={self.max_predictions_per_seq}")


class _BadRecord(Exception):
    """A record that is not a tf.train.Example with the seven features; the text says why."""


# ----------------------------------------------------------------------------------------------
# Start-up checks.

# What create_pretraining_data writes while a shard is incomplete (`<name>.tmp-<pid>`).
_TEMP_FILE = re.compile(r"\.tmp-\d+$")


def _glob(file_patterns: str | list[str]) -> tuple[list[str], list[str]]:
    """Expands comma-separated globs. Returns (sorted matched files without duplicates, the
    patterns that matched nothing). A wildcard never matches an unfinished shard of
    create_pretraining_data (`*.tmp-<pid>`), which a killed job may have left behind."""
    if isinstance(file_patterns, str):
        file_patterns = [file_patterns]
    patterns = [p.strip() for item in file_patterns for p in item.split(",") if p.strip()]
    files, unmatched = set(), []
    for pattern in patterns:
        matched = tf.io.gfile.glob(pattern)
        if pattern not in matched:  # a wildcard, not a file named in full
            matched = [path for path in matched if not _TEMP_FILE.search(path)]
        if not matched:
            unmatched.append(pattern)
        files.update(matched)
    return sorted(files), unmatched


def resolve_input_files(file_patterns: str | list[str]) -> list[str]:
    """Expands comma-separated globs into a sorted list of files, without duplicates.

    Args:
      file_patterns: "a/*.tfrecord,b/*.tfrecord", or a list of such strings.
    Raises:
      DataError: a pattern that matches nothing, no pattern at all, or an empty (0-byte) file.
    """
    files, unmatched = _glob(file_patterns)
    if unmatched:
        raise DataError(f"--input_files pattern {unmatched[0]!r} matches no file")
    if not files:
        raise DataError("no input files given (--input_files is empty)")
    for path in files:
        if tf.io.gfile.stat(path).length == 0:
            raise DataError(f"input file {path} is empty (0 bytes): remove it or leave it out of "
                            f"--input_files")
    return files


def _first_records(path: str, count: int) -> list[bytes]:
    """Up to `count` serialized records from the start of `path`; DataError if unreadable."""
    try:
        return [r.numpy() for r in tf.data.TFRecordDataset(path).take(count)]
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError,
            tf.errors.OutOfRangeError) as e:
        raise DataError(f"{path}: the first record cannot be read, the file is corrupt or "
                        f"truncated, or not a TFRecord file ({_clean_message(e)})") from None
    except tf.errors.NotFoundError:
        raise DataError(f"input file {path} does not exist") from None


def _example_values(serialized: bytes, labels: tuple[str, ...] = ()) -> dict[str, list]:
    """A record's features as {name: list of values}: the seven and `labels`.

    Raises:
      _BadRecord: not a tf.train.Example, or without the seven pretraining features (and
        `labels`) of the right kinds.
    """
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:  # google.protobuf.message.DecodeError
        raise _BadRecord(f"is not a tf.train.Example ({e})") from None
    feature = example.features.feature
    values = {}
    for name in FEATURE_NAMES + tuple(labels):
        if name in labels and name not in feature:
            raise _BadRecord(f"lacks the label {name!r} that multi-task pretraining reads (make "
                             f"the records with create_pretraining_data --label_columns={name})")
        if name not in feature:
            raise _BadRecord(f"lacks the feature {name!r} (it has {sorted(feature)}; "
                             f"pretraining records need {list(FEATURE_NAMES)})")
        kind = "float_list" if name in _FLOAT_FEATURES else "int64_list"
        if feature[name].WhichOneof("kind") != kind:
            raise _BadRecord(f"has the feature {name!r} as a "
                             f"{feature[name].WhichOneof('kind')}, expected a {kind}")
        values[name] = list(getattr(feature[name], kind).value)
    return values


def _length_problem(values: dict[str, list], shape: RecordShape) -> str | None:
    """Why a record's feature lengths differ from `shape`, or None when they match."""
    for name, expected in shape.lengths().items():
        if len(values[name]) != expected:
            setting = ("max_seq_length" if name in _SEQUENCE_FEATURES else
                       "max_predictions_per_seq" if name in _PREDICTION_FEATURES else None)
            because = f" ({setting}={expected})" if setting else ""
            return f"feature {name!r} has {len(values[name])} values, expected {expected}{because}"
    return None


def _parse_example(path: str, serialized: bytes, which: str = "the first record",
                   labels: tuple[str, ...] = ()) -> dict[str, list]:
    """A record of `path` as {name: list of values}; DataError naming the file (and `which`
    record) if it is not a tf.train.Example with the seven pretraining features of the right
    kinds."""
    try:
        return _example_values(serialized, labels)
    except _BadRecord as e:
        raise DataError(f"{path}: {which} {e}") from None


def _first_record_of_each(files: list[str]) -> dict[str, bytes]:
    """{file: its first serialized record}, files without records left out. One parallel tf.data
    pass over all files (a dataset per file costs ~20 ms each, too slow for thousands)."""
    firsts = (tf.data.Dataset.from_tensor_slices(files)
              .interleave(lambda path: tf.data.TFRecordDataset(path).take(1).map(
                  lambda record: (path, record)), cycle_length=16,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
              .batch(256))
    try:
        return {path.decode(): record for paths, records in firsts.as_numpy_iterator()
                for path, record in zip(paths, records)}
    except tf.errors.OpError as e:
        # Some file is bad; its error may not say which: read them one by one to name it.
        for path in files:
            _first_records(path, 1)
        raise DataError(f"reading the first records of {len(files)} files failed "
                        f"({_clean_message(e)})") from None


def check_records(files: list[str], max_seq_length: int, max_predictions_per_seq: int,
                  labels: tuple[str, ...] = ()) -> None:
    """Checks the first record of each file: readable, the seven features, the run's lengths.

    Only the first record is read, so this scales to thousands of files; a bad record further
    into a file is found when training reaches it (see `describe_data_error`), or by
    `python -m tfbert.data.pretraining_dataset --check_all=...`.

    Raises:
      DataError naming the file: a corrupt or truncated record, no records, a missing feature,
      or lengths different from `max_seq_length` / `max_predictions_per_seq`, or without the
      multi-task `labels` asked for.
    """
    if not files:
        raise DataError("no input files to check")
    firsts = _first_record_of_each(list(files))
    for path in files:
        if path not in firsts:
            raise DataError(f"{path} holds no records")
        values = _parse_example(path, firsts[path], labels=tuple(labels))
        found = RecordShape.of(values)
        if found.max_seq_length != max_seq_length:
            raise DataError(
                f"records in {path} have max_seq_length={found.max_seq_length} but "
                f"--max_seq_length={max_seq_length}; use --max_seq_length={found.max_seq_length} "
                f"or records made with --max_seq_length={max_seq_length}")
        if found.max_predictions_per_seq != max_predictions_per_seq:
            raise DataError(
                f"records in {path} have max_predictions_per_seq={found.max_predictions_per_seq} "
                f"but --max_predictions_per_seq={max_predictions_per_seq}; use "
                f"--max_predictions_per_seq={found.max_predictions_per_seq} or records made with "
                f"--max_predictions_per_seq={max_predictions_per_seq}")
        problem = _length_problem(values, found)
        if problem:
            raise DataError(f"{path}: malformed first record: {problem}")


def check_token_ids(files: list[str], vocab_size: int, num_records: int = 64) -> None:
    """Checks that the first `num_records` records of the first file hold only token ids below
    `vocab_size` (records made with another tokenizer usually fail this at once).

    Raises:
      DataError: an id >= vocab_size or < 0 (tokenizer/model vocabulary mismatch).
    """
    if not files:
        return
    path = files[0]
    for index, serialized in enumerate(_first_records(path, num_records)):
        values = _parse_example(path, serialized, f"record {index}")
        weights = values["masked_lm_weights"]
        ids = values["input_ids"] + [i for i, w in zip(values["masked_lm_ids"], weights) if w > 0]
        if ids and (max(ids) >= vocab_size or min(ids) < 0):
            bad = max(ids) if max(ids) >= vocab_size else min(ids)
            raise DataError(
                f"records in {path} hold token id {bad} but the model's vocabulary has "
                f"{vocab_size} tokens (ids 0..{vocab_size - 1}): tokenizer/model vocabulary "
                f"mismatch; the records were made with a different vocabulary")


def check_class_labels(files: list[str], num_classes: int, num_records: int = 64) -> None:
    """Checks that the first `num_records` records of the first file have a "cls_label" in
    [0, num_classes).

    Raises:
      DataError: a label outside that range (--num_cls_labels too small for the records).
    """
    if not files:
        return
    path = files[0]
    for index, serialized in enumerate(_first_records(path, num_records)):
        label = _parse_example(path, serialized, f"record {index}", ("cls_label",))["cls_label"][0]
        if not 0 <= label < num_classes:
            raise DataError(f"record {index} of {path} has cls_label {label}, outside "
                            f"[0, --num_cls_labels={num_classes})")


# ----------------------------------------------------------------------------------------------
# Dynamic masking.


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """How `pretraining_dataset(dynamic_masking=...)` re-masks every batch.

    Positions are chosen among the real tokens except [CLS], [SEP] and [PAD]:
    ceil(masked_lm_prob * count), at most max_predictions_per_seq per sequence (google's
    create_pretraining_data rounds instead of ceil, and counts [CLS]/[SEP]). A chosen token
    becomes [MASK] with probability mask_token_rate, a uniformly random id with probability
    random_token_rate, and stays as it is otherwise (80/10/10).
    """

    vocab_size: int
    mask_id: int
    cls_id: int
    sep_id: int
    pad_id: int
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    mask_token_rate: float = 0.8
    random_token_rate: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise DataError(f"--masked_lm_prob={self.masked_lm_prob} must be in (0, 1]")
        if self.max_predictions_per_seq < 1:
            raise DataError(f"--max_predictions_per_seq={self.max_predictions_per_seq} must "
                            f"be >= 1")
        if min(self.mask_token_rate, self.random_token_rate) < 0 or (
                self.mask_token_rate + self.random_token_rate > 1.0):
            raise DataError(f"mask_token_rate={self.mask_token_rate} and random_token_rate="
                            f"{self.random_token_rate} must be >= 0 and sum to <= 1")
        for name in ("mask_id", "cls_id", "sep_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise DataError(f"MaskingSpec.{name}={getattr(self, name)} is outside the "
                                f"vocabulary [0, {self.vocab_size})")


def _restore_original_ids(features: dict[str, tf.Tensor]) -> tf.Tensor:
    """input_ids with the masked tokens put back: masked_lm_ids scattered to
    masked_lm_positions where masked_lm_weights > 0. Returns int32 [batch, seq]."""
    positions = features["masked_lm_positions"]  # [B, P]
    batch_index = tf.broadcast_to(tf.range(tf.shape(positions)[0])[:, None], tf.shape(positions))
    indices = tf.stack([batch_index, positions], axis=-1)  # [B, P, 2]
    real = features["masked_lm_weights"] > 0  # padding slots point at position 0 ([CLS])
    return tf.tensor_scatter_nd_update(features["input_ids"], tf.boolean_mask(indices, real),
                                       tf.boolean_mask(features["masked_lm_ids"], real))


@tf.autograph.experimental.do_not_convert  # plain TensorFlow ops, no Python control flow
def apply_dynamic_masking(features: dict[str, tf.Tensor], spec: MaskingSpec,
                          seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Re-masks a batch: restores the original tokens, then chooses new masked positions with
    tensorflow_text (`RandomItemSelector`, `MaskValuesChooser`, `mask_language_model`).

    All randomness is stateless and comes from `seed`, so the same batch and seed give the same
    masks, and a tf.data pipeline using this can be checkpointed and resumed exactly.

    Args:
      features: a batch as `pretraining_dataset` yields it: int32 input_ids, input_mask,
        segment_ids [batch, seq]; int32 masked_lm_positions, masked_lm_ids and float32
        masked_lm_weights [batch, predictions]; int32 next_sentence_labels [batch, 1].
      spec: the masking settings; spec.max_predictions_per_seq <= predictions.
      seed: int64 Tensor of shape [2], the stateless seed for this batch.
    Returns:
      The batch with new input_ids, masked_lm_positions, masked_lm_ids and masked_lm_weights
      (same shapes and dtypes; unused prediction slots are 0 with weight 0).
    """
    from tfbert.tokenization import import_tensorflow_text

    text = import_tensorflow_text()
    input_ids = features["input_ids"]
    num_predictions = features["masked_lm_positions"].shape[1]
    row_seed, choice_seed, random_id_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3))

    def shuffle(positions):
        # Called once per sequence with that row's selectable positions (flat indices into the
        # batch, disjoint between rows): the smallest one gives each row its own seed.
        first = tf.cast(tf.reduce_min(positions), tf.int64)
        return tf.random.experimental.stateless_shuffle(
            positions, seed=tf.random.experimental.stateless_fold_in(row_seed, first))

    class SeededMaskValuesChooser(text.MaskValuesChooser):
        """tf-text's 80/10/10 choice, drawn from stateless random numbers."""

        def get_mask_values(self, masked_lm_ids):
            ids = masked_lm_ids.flat_values
            draw = tf.random.stateless_uniform(tf.shape(ids), seed=choice_seed)
            random_ids = tf.random.stateless_uniform(tf.shape(ids), seed=random_id_seed,
                                                     minval=0, maxval=spec.vocab_size,
                                                     dtype=ids.dtype)
            values = tf.where(
                draw < spec.mask_token_rate, tf.cast(spec.mask_id, ids.dtype),
                tf.where(draw < spec.mask_token_rate + spec.random_token_rate, random_ids, ids))
            return masked_lm_ids.with_flat_values(values)

    original = _restore_original_ids(features)
    lengths = tf.reduce_sum(features["input_mask"], axis=1)
    sequences = tf.RaggedTensor.from_tensor(original, lengths=lengths)  # [B, (real tokens)]
    selector = text.RandomItemSelector(
        max_selections_per_batch=spec.max_predictions_per_seq,  # per sequence, in fact
        selection_rate=spec.masked_lm_prob,
        unselectable_ids=[spec.cls_id, spec.sep_id, spec.pad_id], shuffle_fn=shuffle)
    chooser = SeededMaskValuesChooser(spec.vocab_size, spec.mask_id, spec.mask_token_rate,
                                      spec.random_token_rate)
    masked, positions, labels = text.mask_language_model(sequences, selector, chooser)
    # Padding keeps whatever the record had there.
    masked_dense = masked.to_tensor(default_value=0, shape=tf.shape(input_ids))
    new_input_ids = tf.where(features["input_mask"] > 0, masked_dense, original)
    positions, weights = text.pad_model_inputs(positions, num_predictions)
    labels, _ = text.pad_model_inputs(labels, num_predictions)
    return dict(features, input_ids=new_input_ids,
                masked_lm_positions=tf.cast(positions, tf.int32),
                masked_lm_ids=tf.cast(labels, tf.int32),
                masked_lm_weights=tf.cast(weights, tf.float32))


# ----------------------------------------------------------------------------------------------
# The input pipeline.


def _parse_batch(serialized: tf.Tensor, max_seq_length: int, max_predictions_per_seq: int,
                 labels: tuple[str, ...] = ()) -> dict[str, tf.Tensor]:
    """Parses a [batch] string Tensor of records into the feature dict (int64 -> int32).

    A record with a missing feature or another length raises InvalidArgumentError (see
    `RecordShape.feature_spec`); `describe_data_error` turns it into a message.
    """
    spec = RecordShape(max_seq_length, max_predictions_per_seq, tuple(labels)).feature_spec()
    parsed = tf.io.parse_example(serialized, spec)
    # tf.train.Example has only int64; int32 is what the model and TPUs/GPUs want (as google).
    return {name: tf.cast(parsed[name], tf.int32) if parsed[name].dtype == tf.int64
            else parsed[name] for name in FEATURE_NAMES + tuple(labels)}


def pretraining_dataset(files: list[str], *, batch_size: int, max_seq_length: int,
                        max_predictions_per_seq: int, is_training: bool = True,
                        num_readers: int = 4, shuffle_buffer: int = 1000, seed: int | None = None,
                        input_pipeline_id: int = 0, num_input_pipelines: int = 1,
                        dynamic_masking: MaskingSpec | None = None,
                        labels: tuple[str, ...] = ()) -> tf.data.Dataset:
    """The batches of one rank (input pipeline).

    Sharding between pipelines (ranks): with at least `num_input_pipelines` files, each rank
    reads its own files (file i goes to rank i % num_input_pipelines); with fewer files, every
    rank reads all files and keeps every num_input_pipelines-th record of each. Either way the
    ranks see disjoint data, whatever their seeds.

    Training: the file order is shuffled (each epoch anew), `num_readers` files are read
    interleaved, the stream repeats forever and records pass a `shuffle_buffer`-deep shuffle.
    With a `seed` the order is reproducible (deterministic interleave); without one, readers may
    deliver out of order, which is faster. Evaluation: files in order, one pass, no shuffling.

    The pipeline holds no Python-side state, so `tf.train.Checkpoint(iterator=iter(ds))` saves
    and restores its position exactly (shuffle buffers included).

    Args:
      files: TFRecord files (see `resolve_input_files`).
      batch_size: examples per batch; the last partial batch is dropped (static shapes).
      max_seq_length, max_predictions_per_seq: the records' lengths (see `check_records`).
      dynamic_masking: re-mask every batch (see `apply_dynamic_masking`); None keeps the masks
        written in the records.
      labels: multi-task pretraining's label features to read too (of LABEL_FEATURES).
    Returns:
      A dataset of dicts: int32 input_ids, input_mask, segment_ids [batch_size, max_seq_length];
      int32 masked_lm_positions, masked_lm_ids and float32 masked_lm_weights
      [batch_size, max_predictions_per_seq]; int32 next_sentence_labels [batch_size, 1].
    """
    files = list(files)
    if not files:
        raise DataError("pretraining_dataset: no input files")
    if not 0 <= input_pipeline_id < num_input_pipelines:
        raise DataError(f"input_pipeline_id={input_pipeline_id} is not in "
                        f"[0, num_input_pipelines={num_input_pipelines})")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if num_readers < 1 or shuffle_buffer < 1:
        raise DataError(f"--num_readers={num_readers} and --shuffle_buffer={shuffle_buffer} "
                        f"must be >= 1")
    if dynamic_masking is not None and (
            dynamic_masking.max_predictions_per_seq > max_predictions_per_seq):
        raise DataError(f"dynamic masking makes up to {dynamic_masking.max_predictions_per_seq} "
                        f"predictions but records have room for {max_predictions_per_seq}")

    shard_by_file = len(files) >= num_input_pipelines
    if shard_by_file:
        files = files[input_pipeline_id::num_input_pipelines]

    def read(path):
        records = tf.data.TFRecordDataset(path, buffer_size=8 * 1024 * 1024)
        if not shard_by_file:
            records = records.shard(num_input_pipelines, input_pipeline_id)
        return records

    deterministic = seed is not None or not is_training
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if is_training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
        dataset = dataset.interleave(read, cycle_length=min(num_readers, len(files)),
                                     num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=deterministic)
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        dataset = dataset.flat_map(read)
    # Batch first, then parse the whole batch at once (faster than one parse per record).
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(
        lambda serialized: _parse_batch(serialized, max_seq_length, max_predictions_per_seq,
                                        labels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if dynamic_masking is not None:
        # One random int64 per batch, from a dataset (its state is checkpointed with the
        # iterator), turned into the stateless seed of that batch's masks.
        seeds = tf.data.Dataset.random(seed=seed)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda features, s: apply_dynamic_masking(
                features, dynamic_masking, tf.stack([s, tf.constant(0, tf.int64)])),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Bad records found during training, and the scanner that finds them.


def _clean_message(err: Exception) -> str:
    """A TensorFlow error's message without the runtime's decoration ("{{function_node ...}}",
    "[Op:IteratorGetNext]")."""
    message = getattr(err, "message", None) or str(err)
    message = re.sub(r"\{\{[^}]*\}\}", "", message)
    message = re.sub(r"\[Op:[^\]]*\].*$", "", message, flags=re.S)
    return message.strip()


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What `scan_file` found in one file.

    Attributes:
      path: the file.
      num_good: records read and found good before the first bad one (all of them if none).
      bad_index: index (from 0) of the first bad record; None when every record is good.
      reason: what is wrong with that record; None when every record is good.
      kind: "corrupt" (CRC mismatch, truncated: a DataLossError), "unreadable" (another read
        error), "malformed" (not an Example, a feature missing or of the wrong type), or
        "wrong_length" (a feature with another number of values); None when all are good.
    """

    path: str
    num_good: int
    bad_index: int | None = None
    reason: str | None = None
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_index is None


def _record_problem(serialized: bytes, shape: RecordShape | None) -> tuple[str, str] | None:
    """(kind, reason) of what is wrong with one record (see ScanResult), or None if it is good.
    None `shape`: only the features and their types are checked, not their lengths."""
    try:
        values = _example_values(serialized)
    except _BadRecord as e:
        return "malformed", f"the record {e}"
    if shape is None:
        return None
    problem = _length_problem(values, shape)
    if problem:
        return "wrong_length", problem
    try:  # what the input pipeline does, in case it refuses something the checks above let by
        tf.io.parse_example([serialized], shape.feature_spec())
    except tf.errors.InvalidArgumentError as e:
        return "malformed", _clean_message(e)
    return None


def _scan_one_by_one(path: str, start: int, shape: RecordShape | None) -> ScanResult:
    """Reads `path` from record `start` one record at a time (slow) up to the first bad one."""
    index = start
    iterator = iter(tf.data.TFRecordDataset(path).skip(start))
    while True:
        try:
            serialized = next(iterator).numpy()
        except StopIteration:
            return ScanResult(path, index)
        except tf.errors.DataLossError as e:  # CRC mismatch, truncated record
            return ScanResult(path, index, index, f"corrupt or truncated "
                                                  f"({_clean_message(e)})", "corrupt")
        except tf.errors.OpError as e:
            return ScanResult(path, index, index, f"cannot be read ({_clean_message(e)})",
                              "unreadable")
        problem = _record_problem(serialized, shape)
        if problem:
            return ScanResult(path, index, index, problem[1], problem[0])
        if shape is None:  # the first good record sets the lengths of the others
            shape = RecordShape.of(_example_values(serialized))
        index += 1


def scan_file(path: str, shape: RecordShape | None = None, batch_size: int = 1024) -> ScanResult:
    """Reads every record of `path` (CRCs checked) and parses it as the input pipeline does, up
    to the first bad record.

    Fast path: records are read and parsed `batch_size` at a time; only a batch that fails is
    read again one record at a time, to find the exact record and say what is wrong with it.

    Args:
      path: a TFRecord file.
      shape: the lengths records must have; None: those of the file's first record.
    Returns:
      A ScanResult: the number of good records, and the first bad one's index and reason.
    """
    index = 0
    batches = iter(tf.data.TFRecordDataset(path, buffer_size=8 * 1024 * 1024)
                   .batch(batch_size).prefetch(1))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return ScanResult(path, index)
        except tf.errors.OpError:  # some record of the next batch cannot be read
            return _scan_one_by_one(path, index, shape)
        if shape is None:
            try:
                shape = RecordShape.of(_example_values(batch[0].numpy()))
            except _BadRecord:
                return _scan_one_by_one(path, index, shape)
        try:
            tf.io.parse_example(batch, shape.feature_spec())
        except tf.errors.InvalidArgumentError:  # some record of this batch is malformed
            return _scan_one_by_one(path, index, shape)
        index += int(batch.shape[0])


def reference_shape(files: list[str]) -> tuple[RecordShape, str] | None:
    """(the shape of the first well-formed first record among `files`, its file), or None. What
    the other records are compared with when the run's lengths are not known: a run reads
    records of one shape only, and `check_records` has compared the first ones with its flags."""
    for path in files:
        try:
            records = [r.numpy() for r in tf.data.TFRecordDataset(path).take(1)]
            if records:
                return RecordShape.of(_example_values(records[0])), path
        except (tf.errors.OpError, _BadRecord):
            continue
    return None


def find_bad_record(files: list[str], shape: RecordShape | None = None,
                    time_limit_s: float | None = None) -> ScanResult | None:
    """Scans `files` in order (see `scan_file`) and returns the first bad record found, or None
    if every record is good or `time_limit_s` ran out first.

    Args:
      files: TFRecord files.
      shape: the lengths records must have; None: those of `reference_shape(files)`.
      time_limit_s: stop after the file being scanned when this many seconds have passed.
    """
    if shape is None:
        found = reference_shape(files)
        shape = found[0] if found else None
    started = time.monotonic()
    for path in files:
        if time_limit_s is not None and time.monotonic() - started > time_limit_s:
            logging.warning("Gave up looking for the bad record after %.0f s", time_limit_s)
            return None
        result = scan_file(path, shape)
        if not result.ok:
            return result
    return None


def describe_data_error(err: Exception, files: list[str], time_limit_s: float = 600.0) -> str:
    """A helpful message for an error raised while training reads records: a DataLossError
    (corrupt or truncated record) or an InvalidArgumentError from tf.io.parse_example (a record
    lacking a feature or of another length, e.g. shards of two --max_seq_length concatenated).

    TensorFlow's error names neither the file nor the record, so the input files are scanned
    (`find_bad_record`, the file named in the error first) for the first bad record. That runs
    only after a failure: it may take minutes for a large data set, and stops after
    `time_limit_s`.

    Args:
      err: the error.
      files: the run's input files or their glob patterns (--input_files).
    Returns:
      The message: the file, the record index and what is wrong when found; the files being read
      otherwise; and how to check every file.
    """
    message = _clean_message(err)
    paths, named, found = [], [], None
    try:  # never raise from here: the caller is handling an error already
        paths, _ = _glob(list(files))
        named = [f for f in paths if f in message]
        if paths:
            logging.info("Looking for the bad record in %d input file(s)", len(paths))
            found = find_bad_record(named + [f for f in paths if f not in named],
                                    time_limit_s=time_limit_s)
    except Exception as e:  # noqa: BLE001
        logging.warning("Looking for the bad record failed: %s", e)
    lines = []
    if found is not None:
        lines.append(f"a bad record was met while reading the training data: {found.path}, "
                     f"record {found.bad_index} (counting from 0): {found.reason}")
        if found.kind == "wrong_length":
            lines.append("All records of a run must have the same lengths: records made with "
                         "other --max_seq_length / --max_predictions_per_seq settings were mixed "
                         "in (or such files concatenated).")
    else:
        what = ("a malformed record" if isinstance(err, tf.errors.InvalidArgumentError)
                else "a corrupt or truncated record")
        listed = paths or list(files)
        shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5
                                         else "")
        lines.append(f"{what} was met while reading the training data: {message}")
        if named:
            lines.append(f"The error names {named[0]}.")
        lines.append(f"Files being read: {shown}.")
    lines.append("Check every file (each is read in full, CRC-checked and parsed) with:\n"
                 f"    python -m tfbert.data.pretraining_dataset "
                 f"--check_all={shlex.quote(','.join(files))}\n"
                 "then remove or regenerate the bad ones and start again with the same "
                 "--output_dir: the run resumes from its last checkpoint.")
    return "\n".join(lines)


def check_all(file_patterns: str, shape: RecordShape | None = None) -> int:
    """Reads every record of every file matched by the comma-separated globs (`scan_file`),
    prints one line per file (ok / BAD, which record and why) and returns the exit status: 0
    all good, 1 some bad, 2 a pattern that matches nothing.

    Args:
      file_patterns: "a/*.tfrecord,b/*.tfrecord".
      shape: the lengths records must have; None: those of the first file's first record (one
        run reads one shape).
    """
    files, unmatched = _glob(file_patterns)
    if unmatched or not files:
        print(f"error: {(unmatched or [file_patterns])[0]!r} matches no file", file=sys.stderr)
        return 2
    if shape is None:
        found = reference_shape(files)
        if found:
            shape = found[0]
            print(f"expecting {shape.describe()} (as the first record of {found[1]})",
                  flush=True)
    bad = 0
    for path in files:
        result = scan_file(path, shape)
        if result.ok and result.num_good == 0:
            bad += 1
            print(f"BAD  {path}: no records", flush=True)
        elif result.ok:
            print(f"ok   {path}: {result.num_good} records", flush=True)
        else:
            bad += 1
            print(f"BAD  {path}: record {result.bad_index}: {result.reason}", flush=True)
    print(f"{len(files)} files checked, {bad} bad", flush=True)
    return 1 if bad else 0


def _main(argv) -> int:
    from absl import flags

    fv = flags.FLAGS
    if not fv.check_all:
        print("usage: python -m tfbert.data.pretraining_dataset --check_all='<glob>[,<glob>...]' "
              "[--max_seq_length=N --max_predictions_per_seq=M]", file=sys.stderr)
        return 2
    shape = None
    if fv.max_seq_length or fv.max_predictions_per_seq:
        if not (fv.max_seq_length and fv.max_predictions_per_seq):
            print("error: give both --max_seq_length and --max_predictions_per_seq, or neither",
                  file=sys.stderr)
            return 2
        shape = RecordShape(fv.max_seq_length, fv.max_predictions_per_seq)
    # An unquoted glob is expanded by the shell: its other files arrive as arguments.
    return check_all(",".join([fv.check_all] + list(argv[1:])), shape)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("check_all", "", "Comma-separated globs of TFRecord files to read in full "
                                         "(CRC-checked and parsed); reports the bad ones.")
    flags.DEFINE_integer("max_seq_length", 0, "Length records must have (default: that of the "
                                              "first file's first record).")
    flags.DEFINE_integer("max_predictions_per_seq", 0, "Masked positions records must have "
                                                       "(default: as the first record).")
    app.run(lambda argv: sys.exit(_main(argv)))
