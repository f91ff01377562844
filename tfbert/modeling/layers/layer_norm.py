"""Layer normalization with statistics in a chosen dtype."""

from __future__ import annotations

import tensorflow as tf


class LayerNorm(tf.keras.layers.Layer):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis.

    Args:
      epsilon: added to the variance.
      stats_dtype: dtype in which mean and variance are computed. float32 by default: a float16
        variance of activations in the hundreds overflows, and of small ones underflows.
      fused: use the fused LayerNorm op (tfbert.ops.layer_norm_ops; statistics in float32).
    Inputs: float Tensor [..., hidden]. Output: same shape, in the layer's compute dtype.

    Variables are named `gamma` and `beta`, as in google-research/bert checkpoints.
    """

    def __init__(self, epsilon: float = 1e-12, stats_dtype: str = "float32", fused: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if fused and tf.as_dtype(stats_dtype) != tf.float32:
            raise ValueError(f"{self.name}: the fused LayerNorm keeps its statistics in float32, "
                             f"not {stats_dtype}")
        self.epsilon = epsilon
        self.stats_dtype = tf.as_dtype(stats_dtype)
        self.fused = fused

    def build(self, input_shape):
        hidden = int(input_shape[-1])
        # Kept in their variable dtype (no autocast): they are used in the statistics dtype.
        self.gamma = self.add_weight("gamma", shape=[hidden], initializer="ones",
                                     experimental_autocast=False)
        self.beta = self.add_weight("beta", shape=[hidden], initializer="zeros",
                                    experimental_autocast=False)
        super().build(input_shape)

    def call(self, inputs):
        if self.fused:
            from tfbert.ops.layer_norm_ops import fused_layer_norm

            return fused_layer_norm(tf.cast(inputs, self.compute_dtype), self.gamma, self.beta,
                                    self.epsilon)
        x = tf.cast(inputs, self.stats_dtype)
        # Not tf.nn.moments: it silently computes float16 statistics in float32.
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=-1, keepdims=True)
        normed = (x - mean) * tf.math.rsqrt(variance + tf.cast(self.epsilon, self.stats_dtype))
        outputs = normed * tf.cast(self.gamma, self.stats_dtype) + tf.cast(self.beta, self.stats_dtype)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon, stats_dtype=self.stats_dtype.name, fused=self.fused)
        return config
