"""Megatron-style tensor parallelism (Shoeybi et al., 2019) over a tensor-parallel process group.

The T ranks of a tensor-parallel group hold the parts of one model replica and read the same
batch. Activations outside the parallel regions are replicated (every rank computes the same
values); inside a region each rank holds its slice:

  attention   Q, K, V column-parallel (rank r holds heads r*N/T .. (r+1)*N/T - 1), the output
              projection row-parallel: its partial products are summed, then its bias added once.
  FFN         the first projection column-parallel (GeGLU: rank r holds the matching slices of
              the gate and the value halves), the second row-parallel.
  vocabulary  the word embeddings and the MLM output bias split by rows (V/T tokens per rank):
              the lookup sums the ranks' rows (zeros for ids outside a rank's range); the MLM
              logits stay split and the cross-entropy is computed from an all-reduced max and an
              all-reduced sum of exponentials, never gathering [B, P, V].

Two conjugate operators enter and leave a region (`copy_to_region`, `reduce_from_region`). They
are written with `tf.custom_gradient`: Horovod's registered gradient of an all-reduce is another
all-reduce, which would multiply the gradients by T.

A variable's split is a property of its documented name (`split_of`): the same rule slices a
whole checkpoint into a rank's part and gathers the parts back (`shard_array`, `unshard_arrays`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf


# -------------------------------------------------------------------------------------------
# The two operators.

def copy_to_region(x: tf.Tensor, group) -> tf.Tensor:
    """Megatron's f: identity forward; backward, the gradients of the ranks' slices summed (each
    rank's part of the region contributed only its own share of dL/dx)."""
    if group.size == 1:
        return x

    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return group.sum_activations(dy)

        return tf.identity(x), grad

    return f(x)


def reduce_from_region(x: tf.Tensor, group) -> tf.Tensor:
    """Megatron's g: forward, the ranks' partial results summed; backward, identity (the sum is
    replicated, so its gradient is already the same on every rank)."""
    if group.size == 1:
        return x

    @tf.custom_gradient
    def g(x):
        def grad(dy):
            return tf.identity(dy)

        return group.sum_activations(x), grad

    return g(x)


# -------------------------------------------------------------------------------------------
# Which variables are split, and how.

@dataclasses.dataclass(frozen=True)
class Split:
    """How a variable is split across a tensor-parallel group.

    axis: the axis cut into T equal slices. halves: the axis holds two halves ([gate, value]
    of GeGLU), each cut into T slices; rank r holds [gate_r, value_r].
    """

    axis: int
    halves: bool = False


_LAYER = r"bert/encoder/layer_\d+/"
_COLUMN = re.compile(_LAYER + r"attention/self/(query|key|value)/(kernel|bias)$")
_ROW = re.compile(_LAYER + r"(attention/output|output)/dense/kernel$")
_FFN_IN = re.compile(_LAYER + r"intermediate/dense/(kernel|bias)$")
_VOCAB = re.compile(r"^(bert/embeddings/word_embeddings|cls/predictions/output_bias)$")
# Optimizer slots carry their variable's name and split.
_SLOT = re.compile(r"/(adam_m|adam_v|m|v)$")


def split_of(name: str, gated_ffn: bool) -> Split | None:
    """The split of the variable (or optimizer slot) `name` under tensor parallelism; None for a
    replicated one.

    Args:
      name: a documented variable name ("bert/encoder/layer_0/attention/self/query/kernel"),
        optionally with an optimizer-slot suffix ("/adam_m").
      gated_ffn: whether the FFN's first projection holds [gate, value] halves (geglu).
    """
    base = _SLOT.sub("", name)
    if _VOCAB.search(base):
        return Split(0)
    column = _COLUMN.search(base)
    if column:
        return Split(1 if column.group(2) == "kernel" else 0)
    ffn = _FFN_IN.search(base)
    if ffn:
        return Split(1 if ffn.group(1) == "kernel" else 0, halves=gated_ffn)
    if _ROW.search(base):
        return Split(0)
    return None


def _slices(length: int, split: Split, index: int, parts: int) -> list[slice]:
    """The index ranges of rank `index`'s part along an axis of `length` elements."""
    if split.halves:
        half = length // 2
        step = half // parts
        return [slice(index * step, (index + 1) * step),
                slice(half + index * step, half + (index + 1) * step)]
    step = length // parts
    return [slice(index * step, (index + 1) * step)]


def shard_array(full: np.ndarray, split: Split, index: int, parts: int) -> np.ndarray:
    """Rank `index`'s part of a whole array."""
    axis_slices = _slices(full.shape[split.axis], split, index, parts)
    pieces = [full[(slice(None),) * split.axis + (s,)] for s in axis_slices]
    return np.concatenate(pieces, axis=split.axis)


def unshard_arrays(pieces: list[np.ndarray], split: Split) -> np.ndarray:
    """The whole array from every rank's part, in rank order (the inverse of `shard_array`)."""
    if not split.halves:
        return np.concatenate(pieces, axis=split.axis)
    halves = [np.split(piece, 2, axis=split.axis) for piece in pieces]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=split.axis)


def shard_tensor(full: tf.Tensor, split: Split, index: int, parts: int) -> tf.Tensor:
    """`shard_array` for a Tensor of static shape."""
    axis_slices = _slices(int(full.shape[split.axis]), split, index, parts)
    pieces = [full[(slice(None),) * split.axis + (s,)] for s in axis_slices]
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=split.axis)


class ShardInitializer(tf.keras.initializers.Initializer):
    """Initialises a rank's part as the slice of a whole tensor drawn by `initializer`, so that
    a tensor-parallel model starts from the weights one process would draw with the same seed.

    The whole tensor exists only while one variable is initialised.
    """

    def __init__(self, initializer, split: Split, index: int, parts: int):
        self.initializer = tf.keras.initializers.get(initializer)
        self.split, self.index, self.parts = split, index, parts

    def __call__(self, shape, dtype=None, **kwargs):
        full_shape = list(shape)
        full_shape[self.split.axis] *= self.parts
        full = self.initializer(full_shape, dtype=dtype, **kwargs)
        return shard_tensor(tf.convert_to_tensor(full), self.split, self.index, self.parts)

    def get_config(self):
        return dict(initializer=tf.keras.initializers.serialize(self.initializer),
                    axis=self.split.axis, halves=self.split.halves, index=self.index,
                    parts=self.parts)


# -------------------------------------------------------------------------------------------
# The vocabulary split.

@dataclasses.dataclass(frozen=True)
class VocabShard:
    """Rows [start, start + rows) of the vocabulary, held by this rank of `group`."""

    group: object
    start: int
    rows: int

    @classmethod
    def of(cls, group, vocab_size: int) -> "VocabShard":
        rows = vocab_size // group.size
        return cls(group, group.rank * rows, rows)

    def initializer(self, initializer) -> tf.keras.initializers.Initializer:
        if self.group.size == 1:
            return initializer
        return ShardInitializer(initializer, Split(0), self.group.rank, self.group.size)

    def lookup(self, table: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        """table: [rows, D], this rank's rows; ids: int32 [B, S] over the whole vocabulary.
        Returns [B, S, D], the same on every rank."""
        if self.group.size == 1:
            return tf.gather(table, ids)
        local = ids - self.start
        inside = tf.logical_and(local >= 0, local < self.rows)  # (B, S)
        rows = tf.gather(table, tf.where(inside, local, 0))  # (B, S, D)
        rows *= tf.cast(inside, rows.dtype)[..., tf.newaxis]  # ids of other ranks add zeros
        return reduce_from_region(rows, self.group)

    def cross_entropy(self, logits: tf.Tensor, labels: tf.Tensor):
        """Softmax cross-entropy and whether the argmax is right, from vocabulary-split logits.

        Args:
          logits: float32 [B, P, rows], this rank's columns of the logits (computed from
            `copy_to_region`'d activations); labels: int32 [B, P] over the whole vocabulary.
        Returns: (loss float32 [B, P], correct float32 [B, P]), the same on every rank. The
          argmax is the lowest vocabulary index among equal maxima, as tf.argmax takes it.
        """
        if self.group.size == 1:
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
            return loss, tf.cast(correct, tf.float32)
        group = self.group
        # The max only keeps exp() in range; it cancels out of the loss, so no gradient.
        local_max = tf.reduce_max(logits, axis=-1)  # (B, P)
        global_max = tf.stop_gradient(group.max_activations(tf.stop_gradient(local_max)))
        shifted = logits - global_max[..., tf.newaxis]  # (B, P, rows)
        local = labels - self.start
        inside = tf.logical_and(local >= 0, local < self.rows)  # (B, P)
        target = tf.gather(shifted, tf.where(inside, local, 0), batch_dims=2)  # (B, P)
        target = tf.where(inside, target, 0.0)
        # One all-reduce for both sums: the sum of exponentials and the target's logit (found
        # on one rank, zero elsewhere). Its identity backward gives each rank exactly the
        # gradient of its own columns: softmax - one_hot.
        sums = reduce_from_region(
            tf.stack([tf.reduce_sum(tf.exp(shifted), axis=-1), target], axis=-1), group)
        loss = tf.math.log(sums[..., 0]) - sums[..., 1]  # (B, P)
        # The argmax: the lowest index whose logit equals the global max.
        local_argmax = tf.argmax(logits, -1, output_type=tf.int32) + self.start
        candidate = tf.where(tf.equal(local_max, global_max), local_argmax,
                             tf.int32.max)  # (B, P)
        argmax = group.min_activations(tf.stop_gradient(candidate))
        return loss, tf.cast(tf.equal(argmax, labels), tf.float32)


# -------------------------------------------------------------------------------------------
# Whole arrays <-> a rank's parts.

def part_of_whole(name: str, whole: np.ndarray, group, gated_ffn: bool) -> np.ndarray:
    """This rank's part of the whole value of the variable (or slot) `name`."""
    split = split_of(name, gated_ffn) if group.size > 1 else None
    return whole if split is None else shard_array(whole, split, group.rank, group.size)
