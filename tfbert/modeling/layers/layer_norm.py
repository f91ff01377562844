"""Layer normalization with statistics in a chosen dtype."""

from __future__ import annotations

import tensorflow as tf

# The least epsilon of float16 statistics: 2**-24, float16's smallest (subnormal) value.
_MIN_EPSILON = {tf.float16: 2.0 ** -24}


class LayerNorm(tf.keras.layers.Layer):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis.

    Args:
      epsilon: added to the variance (at least 2**-24 with float16 statistics).
      stats_dtype: dtype of the [..., hidden] arithmetic: centring, scaling, gamma and beta.
        float32 by default. float16 or bfloat16 avoid float32 copies of the input, but the mean
        and variance are still summed in float32 (`_layer_norm_low_precision`).
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
        if self.stats_dtype != tf.float32:
            # Read here: a custom gradient must not read variables itself.
            outputs = _layer_norm_low_precision(x, tf.convert_to_tensor(self.gamma),
                                                tf.convert_to_tensor(self.beta), self.epsilon)
            return tf.cast(outputs, self.compute_dtype)
        # The reference path, all in float32, differentiated by TensorFlow.
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


def _row_mean(values: tf.Tensor) -> tf.Tensor:
    """float32 mean over the last axis of a float16/bfloat16 Tensor [..., D]; returns [..., 1].

    The sum is accumulated in float32: TensorFlow's CPU kernels would accumulate a float16 or
    bfloat16 mean in that dtype, where a row of large values overflows (float16: 64 values of
    1024 pass 65504) and a long bfloat16 sum stops growing (8 bits: 256 + 1 == 256). The
    float32 copy is only the reduction's input: not kept for the backward pass, fused into the
    reduction by XLA.
    """
    return tf.reduce_mean(tf.cast(values, tf.float32), axis=-1, keepdims=True)


def _layer_norm_low_precision(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor,
                              epsilon: float) -> tf.Tensor:
    """LayerNorm over the last axis with the [..., D] arithmetic in x's dtype (float16/bfloat16).

    Only the statistics of each row ([..., 1]) and the sums over rows are float32:
      - mean and variance accumulate in float32 (`_row_mean`): the square of a centred float16
        value above 256 overflows (256**2 > 65504);
      - epsilon is added in float32 (1e-12 is 0 in float16, and a constant row would divide 0 by
        0), and for float16 raised to 2**-24 (6e-8): rstd = 1/sqrt(variance + epsilon) then stays
        at most 4096, where 1e-12 gives a constant row 1e6, past float16's 65504. The normed values
        of a row change by less than float16's precision (2**-11) while its variance is above
        2**-13 (std 0.01); below that its float16 inputs hold few digits anyway.
    rstd is applied as one factor: Grappler (MinimizeBroadcasts) and XLA reorder chains of
    multiplications, so a rescaling split over two factors gets multiplied back into one.
    The gradient is written out, as the fused op's: TensorFlow's would keep float32 squares for
    the backward pass, subtract inf from inf on a constant row (whose true gradient can be 0),
    and sum the gamma and beta gradients over all rows in float16, where they overflow.

    Args:
      x: float16 or bfloat16 Tensor of shape [..., D].
      gamma: float32 Tensor [D], the scale.
      beta: float32 Tensor [D], the shift.
      epsilon: added to the variance (in float32; at least 2**-24 for float16).
    Returns:
      Tensor of x's dtype and shape [..., D].
    """
    dtype = x.dtype
    eps = max(epsilon, _MIN_EPSILON.get(dtype, 0.0))

    @tf.custom_gradient
    def layer_norm(x, gamma, beta):
        mean = _row_mean(x)                                                   # [..., 1] float32
        # Subtracted as two terms of x's dtype: the mean rounded to bfloat16 alone would shift a
        # row of 100 +- 5 by up to 0.25, 5% of its spread.
        mean_head = tf.cast(mean, dtype)
        mean_tail = tf.cast(mean - tf.cast(mean_head, tf.float32), dtype)
        centred = x - mean_head - mean_tail                                   # [..., D]
        variance = _row_mean(tf.square(tf.cast(centred, tf.float32)))        # [..., 1] float32
        rstd = tf.cast(tf.math.rsqrt(variance + eps), dtype)                 # [..., 1]
        normed = centred * rstd                                               # [..., D]
        outputs = normed * tf.cast(gamma, dtype) + tf.cast(beta, dtype)

        def grad(dy):
            rows = list(range(dy.shape.rank - 1))  # every axis but the last
            dy_wide = tf.cast(dy, tf.float32)  # only ever reduced
            d_gamma = tf.reduce_sum(dy_wide * tf.cast(normed, tf.float32), axis=rows)  # [D]
            d_beta = tf.reduce_sum(dy_wide, axis=rows)                                   # [D]
            # d outputs / dx applied to dy, with g = dy * gamma:
            # rstd * (g - mean(g) - normed * mean(g * normed)).
            g = dy * tf.cast(gamma, dtype)                                    # [..., D]
            mean_g = tf.cast(_row_mean(g), dtype)                             # [..., 1]
            mean_g_normed = tf.cast(_row_mean(tf.cast(g, tf.float32)
                                              * tf.cast(normed, tf.float32)), dtype)
            inner = g - mean_g - normed * mean_g_normed                       # [..., D]
            return inner * rstd, d_gamma, d_beta

        return outputs, grad

    return layer_norm(x, gamma, beta)
