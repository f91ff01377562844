"""Fused attention softmax: scale, additive mask, softmax and dropout in one op.

Shape legend: B batch, N heads, Sq queries, Sk keys.

    softmax = softmax(scores * scale + mask_bias)     over the keys, in float32
    probs   = softmax * keep / (1 - dropout_rate)     inverted dropout

The dropout mask is never stored: whether element i is kept is a pure function of the seed and
i (SplitMix64, custom_ops/cuda/dropout_rng.h, the same function on CPU and GPU), and the
backward op regenerates it. The backward op needs the pre-dropout softmax p (dscores =
scale * p * (d - sum(d * p)) with d = dprobs * keep / (1 - rate); p is lost in probs wherever
an element was dropped), so the forward op also outputs p, which only the gradient keeps; without
dropout p and probs are one buffer.

`attention_softmax_reference` is the same computation in plain TensorFlow: the fallback and the
test oracle.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops.loader import load_ops


def fused_attention_softmax(scores: tf.Tensor, mask_bias: tf.Tensor, seed: tf.Tensor,
                            scale: float = 1.0, dropout_rate: float = 0.0) -> tf.Tensor:
    """dropout(softmax(scores * scale + mask_bias)) with the fused op.

    Args:
      scores: Tensor [B, N, Sq, Sk] of float32, float16 or bfloat16.
      mask_bias: Tensor [B, 1, 1, Sk] (or [B, 1, Sq, Sk]) of the scores' dtype, 0 for keys that
        may be attended to and -10000 for padding.
      seed: int64 Tensor [2], the dropout seed (e.g. `DropoutRng.next_seed()`).
      scale: multiplies the scores before the mask is added.
      dropout_rate: probability of dropping an attention probability, in [0, 1).
    Returns: Tensor [B, N, Sq, Sk] of the scores' dtype, the (dropped) attention probabilities.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    probs, _ = load_ops().tf_bert_fused_attention_softmax(
        scores, mask_bias, tf.cast(seed, tf.int64), scale=float(scale),
        dropout_rate=float(dropout_rate))
    return probs


def fused_attention_softmax_and_softmax(scores: tf.Tensor, mask_bias: tf.Tensor, seed: tf.Tensor,
                                        scale: float = 1.0, dropout_rate: float = 0.0):
    """`fused_attention_softmax` that also returns the softmax before dropout, with gradients
    through both: distillation's attention loss reads the softmax while the dropped
    probabilities go on to the values.

    Returns: (probs, softmax), Tensors [B, N, Sq, Sk] of the scores' dtype.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    library = load_ops()
    seed = tf.cast(seed, tf.int64)

    @tf.custom_gradient
    def forward(scores):
        probs, softmax = library.tf_bert_fused_attention_softmax(
            scores, mask_bias, seed, scale=float(scale), dropout_rate=float(dropout_rate))

        def backward(dprobs, dsoftmax):
            # The gradient is linear in the upstream gradient: that of the dropped
            # probabilities, plus that of the softmax itself (the same op without dropout).
            dscores = library.tf_bert_fused_attention_softmax_grad(
                dprobs, softmax, seed, scale=float(scale), dropout_rate=float(dropout_rate))
            return dscores + library.tf_bert_fused_attention_softmax_grad(
                dsoftmax, softmax, seed, scale=float(scale), dropout_rate=0.0)

        return (probs, softmax), backward

    return forward(scores)


@tf.RegisterGradient("TfBert>FusedAttentionSoftmax")
def _fused_attention_softmax_grad(op, dprobs, unused_dsoftmax):
    """Gradient of probs for the scores; none for mask_bias (a constant of the input mask) or
    the seed. The softmax output exists only for this function, so its gradient is ignored
    (as for FusedBatchNorm's reserve_space outputs)."""
    dscores = load_ops().tf_bert_fused_attention_softmax_grad(
        dprobs, op.outputs[1], op.inputs[2], scale=op.get_attr("scale"),
        dropout_rate=op.get_attr("dropout_rate"))
    return dscores, None, None


def dropout_keep_mask(shape, seed: tf.Tensor, rate: float) -> tf.Tensor:
    """The keep mask the fused op applies to a tensor of `shape` for `seed` and `rate`.

    Args:
      shape: the tensor's shape (list or int32 Tensor), e.g. [B, N, Sq, Sk].
      seed: int64 Tensor [2].
      rate: the dropout rate, in [0, 1).
    Returns: bool Tensor of `shape`, True where an element is kept.
    """
    return load_ops().tf_bert_dropout_keep_mask(tf.cast(shape, tf.int32),
                                                tf.cast(seed, tf.int64), rate=float(rate))


def attention_softmax_reference(scores: tf.Tensor, mask_bias: tf.Tensor, scale: float = 1.0,
                                dropout_rate: float = 0.0,
                                keep_mask: tf.Tensor | None = None) -> tf.Tensor:
    """The fused op's computation in plain TensorFlow (softmax in float32, cast back).

    Args:
      scores: Tensor [B, N, Sq, Sk]; mask_bias: Tensor [B, 1, 1, Sk] or [B, 1, Sq, Sk].
      scale: multiplies the scores before the mask is added.
      dropout_rate: the dropout rate; needs `keep_mask` when > 0.
      keep_mask: bool Tensor [B, N, Sq, Sk] (e.g. from `dropout_keep_mask`), True where kept.
    Returns: Tensor [B, N, Sq, Sk] of the scores' dtype.
    """
    logits = tf.cast(scores, tf.float32) * scale + tf.cast(mask_bias, tf.float32)  # (B, N, Sq, Sk)
    probs = tf.nn.softmax(logits, axis=-1)  # (B, N, Sq, Sk)
    if dropout_rate > 0:
        if keep_mask is None:
            raise ValueError("attention_softmax_reference: dropout_rate > 0 needs a keep_mask")
        probs = probs * tf.cast(keep_mask, tf.float32) / (1.0 - dropout_rate)
    return tf.cast(probs, scores.dtype)
