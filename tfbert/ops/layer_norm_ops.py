"""Fused LayerNorm: the custom op (custom_ops/cc/ops/layer_norm_ops.cc) and its TF reference.

y = (x - mean) / sqrt(var + epsilon) * gamma + beta over the last axis. The statistics are
float32 whatever x's dtype: a float16 variance overflows (x^2 > 65504 once |x| > 256) or
underflows, so both paths compute in float32 and cast y back to x's dtype.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops import loader


def fused_layer_norm(x, gamma, beta, epsilon: float = 1e-12) -> tf.Tensor:
    """LayerNorm over the last axis with the fused op (C++ on CPU, CUDA when built).

    Args:
      x: float32, float16 or bfloat16 Tensor of shape [..., H].
      gamma: float32 Tensor of shape [H], the scale (cast to float32 if given in another dtype).
      beta: float32 Tensor of shape [H], the shift.
      epsilon: added to the variance.

    Returns:
      A Tensor of x's shape and dtype.

    Raises:
      loader.OpsNotBuiltError: the op library is not built; use `layer_norm_reference` instead.
    """
    ops = loader.load_ops()
    x = tf.convert_to_tensor(x)
    # Under mixed precision the variables stay float32; an autocast read may hand us float16.
    gamma = tf.cast(gamma, tf.float32)
    beta = tf.cast(beta, tf.float32)
    y, _, _ = ops.tf_bert_fused_layer_norm(x, gamma, beta, epsilon=epsilon)
    return y


@tf.RegisterGradient("TfBert>FusedLayerNorm")
def _fused_layer_norm_grad(op, dy, unused_dmean, unused_drstd):
    """dx, dgamma, dbeta from the backward op; the mean and rstd outputs carry no gradient.

    They are saved statistics for the backward pass, not results for callers to differentiate.
    """
    x, gamma, _ = op.inputs
    _, mean, rstd = op.outputs
    dx, dgamma, dbeta = loader.load_ops().tf_bert_fused_layer_norm_grad(dy, x, mean, rstd, gamma)
    return [dx, dgamma, dbeta]


def layer_norm_reference(x, gamma, beta, epsilon: float = 1e-12) -> tf.Tensor:
    """The same computation in plain TensorFlow: the fallback and the test oracle.

    Args:
      x: floating Tensor of shape [..., H].
      gamma: Tensor of shape [H], the scale.
      beta: Tensor of shape [H], the shift.
      epsilon: added to the variance.

    Returns:
      A Tensor of x's shape and dtype; statistics and arithmetic in float32 (at least).
    """
    x = tf.convert_to_tensor(x)
    compute_dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    x_wide = tf.cast(x, compute_dtype)
    mean, variance = tf.nn.moments(x_wide, axes=[-1], keepdims=True)  # [..., 1] each
    y = ((x_wide - mean) * tf.math.rsqrt(variance + epsilon) * tf.cast(gamma, compute_dtype)
         + tf.cast(beta, compute_dtype))
    return tf.cast(y, x.dtype)
