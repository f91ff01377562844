"""Fused dropout: inverted dropout whose mask is never stored.

    y = x * keep / (1 - rate)

Whether element i (row-major) is kept is a pure function of the seed and i (SplitMix64,
custom_ops/cuda/dropout_rng.h, the same function on CPU and GPU and the mask of
`dropout_keep_mask`). The gradient is the same op on the upstream gradient with the same seed,
so the backward pass regenerates the mask: no mask, and no random uniforms, are kept alive
between the passes, and the forward pass is one read and one write of x instead of
TensorFlow's random uniforms, comparison, select and multiply.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops.loader import load_ops


def fused_dropout(x: tf.Tensor, seed: tf.Tensor, rate: float) -> tf.Tensor:
    """x * keep / (1 - rate) with the fused op.

    Args:
      x: Tensor of any shape, float32, float16 or bfloat16.
      seed: int64 Tensor [2] (e.g. `DropoutRng.next_seed()`).
      rate: probability of dropping an element, in [0, 1).
    Returns: Tensor of x's shape and dtype.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    return load_ops().tf_bert_fused_dropout(x, tf.cast(seed, tf.int64), rate=float(rate))


@tf.RegisterGradient("TfBert>FusedDropout")
def _fused_dropout_grad(op, dy):
    """dx = dy * keep / (1 - rate): the same op on dy with the forward's seed; none for the
    seed."""
    return load_ops().tf_bert_fused_dropout(dy, op.inputs[1], rate=op.get_attr("rate")), None


def dropout_reference(x: tf.Tensor, keep_mask: tf.Tensor, rate: float) -> tf.Tensor:
    """The fused op's computation in plain TensorFlow, for a given mask (the test oracle).

    Args:
      x: Tensor; keep_mask: bool Tensor of x's shape (e.g. from `dropout_keep_mask`).
      rate: the dropout rate, in [0, 1).
    Returns: Tensor of x's shape and dtype; the product is taken in float32 and rounded once.
    """
    keep_scale = tf.constant(1.0, tf.float32) / (1.0 - tf.constant(rate, tf.float32))
    dropped = tf.where(keep_mask, tf.cast(x, tf.float32) * keep_scale, 0.0)
    return tf.cast(dropped, x.dtype)
