"""Mixed precision: the dtype policy per precision and dynamic loss scaling for float16."""

from __future__ import annotations

import tensorflow as tf


def scale_gradient(grad, factor: tf.Tensor):
    """grad * factor for a dense Tensor or an IndexedSlices (sparse embedding gradient)."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * tf.cast(factor, grad.values.dtype), grad.indices,
                                grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


def deduplicate_indexed_slices(grad):
    """Sums the rows of an IndexedSlices that share an index; other gradients pass through.

    A gather's gradient holds one row per looked-up token, repeated tokens included (and an
    all-gather across ranks repeats them again). Its global norm and clipping must see the summed
    rows, as the dense gradient would, not the rows one by one.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return grad
    unique_indices, positions = tf.unique(grad.indices)
    summed = tf.math.unsorted_segment_sum(grad.values, positions, tf.shape(unique_indices)[0])
    return tf.IndexedSlices(summed, unique_indices, grad.dense_shape)


class DynamicLossScale(tf.Module):
    """Dynamic loss scaling for float16 training.

    The loss is multiplied by `scale` before differentiation so that small float16 gradients do
    not flush to zero; gradients are divided by it before the update. When any gradient is
    non-finite the step is skipped and the scale halved; after `growth_interval` finite steps in
    a row the scale doubles. Both variables are checkpointed so a resumed run continues with the
    same scale.
    """

    def __init__(self, initial_scale: float = 2.0 ** 15, growth_interval: int = 2000,
                 factor: float = 2.0):
        super().__init__(name="loss_scale")
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.growth_interval = growth_interval
        self.factor = factor

    def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
        return loss * tf.cast(self.scale, loss.dtype)

    def unscale(self, grads):
        inverse = 1.0 / self.scale
        return [scale_gradient(g, inverse) for g in grads]

    def update(self, grads_are_finite: tf.Tensor) -> None:
        """Adjusts the scale after a step; `grads_are_finite` is a bool scalar Tensor."""

        def on_finite():
            grow = self.good_steps + 1 >= self.growth_interval
            self.scale.assign(tf.where(grow, self.scale * self.factor, self.scale))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps + 1))

        def on_overflow():
            # Never below 1: a scale under 1 would make underflow worse, not better.
            self.scale.assign(tf.maximum(self.scale / self.factor, 1.0))
            self.good_steps.assign(0)

        tf.cond(grads_are_finite, on_finite, on_overflow)
