"""One factory for every dense projection in the encoder.

Every matrix multiplication with a weight goes through `DenseFactory`, and each call says which
role the projection plays in a transformer block. A tensor-parallel factory can then replace
`column_parallel` (split the output features: Q, K, V, the FFN's first projection) and
`row_parallel` (split the input features and all-reduce: the attention output, the FFN's second
projection) without touching the layers that use them.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.modeling.layers.recompute import recomputable


class Dense(tf.keras.layers.Layer):
    """y = x @ kernel + bias over the last axis.

    Args:
      units: output features.
      use_bias: whether to add a bias.
      kernel_initializer: initializer for the [in, units] kernel.
      fused_activation: None, or "gelu" / "gelu_tanh" / "geglu": add the bias and apply the
        activation in one fused op (tfbert.ops.gelu_ops). For "geglu" the output has units / 2
        features.
    Inputs: float Tensor of shape [..., in]. Output: [..., units] in the layer's compute dtype.

    Variables are named `kernel` and `bias`, as in google-research/bert checkpoints.
    """

    FUSED_ACTIVATIONS = ("gelu", "gelu_tanh", "geglu")

    def __init__(self, units: int, use_bias: bool = True, kernel_initializer=None,
                 fused_activation: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if fused_activation is not None and (fused_activation not in self.FUSED_ACTIVATIONS
                                             or not use_bias):
            raise ValueError(f"{self.name}: fused_activation={fused_activation!r} needs a bias and "
                             f"one of {self.FUSED_ACTIVATIONS}")
        self.fused_activation = fused_activation
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer or "glorot_uniform")

    def build(self, input_shape):
        in_features = int(input_shape[-1])
        self.kernel = self.add_weight("kernel", shape=[in_features, self.units],
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight("bias", shape=[self.units], initializer="zeros")
                     if self.use_bias else None)
        super().build(input_shape)

    def call(self, inputs):
        # A 2-D matmul: the gradient of an ellipsis einsum ("...i,io->...o") broadcasts the
        # kernel over the batch and was measured 30x slower and 60x larger here.
        flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])  # (B*S, in)
        outputs = tf.matmul(flat, self.kernel)  # (B*S, units)
        outputs = tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
        if self.fused_activation is not None:
            from tfbert.ops import gelu_ops

            # The activation (not the matmul) may be recomputed in backward: see recompute.py.
            if self.fused_activation == "geglu":
                return recomputable(gelu_ops.fused_bias_geglu, outputs, self.bias,
                                    approximate=False)
            return recomputable(gelu_ops.fused_bias_gelu, outputs, self.bias,
                                approximate=self.fused_activation == "gelu_tanh")
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias,
                      fused_activation=self.fused_activation,
                      kernel_initializer=tf.keras.initializers.serialize(self.kernel_initializer))
        return config


class DenseFactory:
    """Builds the encoder's dense layers. Replace it (e.g. with a tensor-parallel factory) to
    change how every projection is computed.

    Args:
      initializer_range: stddev of the truncated-normal kernel initializer.
      dtype: the Keras dtype policy the layers compute in.
    """

    def __init__(self, initializer_range: float, dtype=None):
        self.initializer_range = initializer_range
        self.dtype = dtype

    def _initializer(self):
        return tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range)

    def dense(self, units: int, name: str, use_bias: bool = True,
              fused_activation: str | None = None) -> tf.keras.layers.Layer:
        """A projection replicated on every rank (poolers, heads)."""
        return Dense(units, use_bias=use_bias, kernel_initializer=self._initializer(), name=name,
                     fused_activation=fused_activation, dtype=self.dtype)

    def column_parallel(self, units: int, name: str, use_bias: bool = True,
                        fused_activation: str | None = None) -> tf.keras.layers.Layer:
        """A projection whose output features a tensor-parallel factory splits across ranks."""
        return self.dense(units, name=name, use_bias=use_bias, fused_activation=fused_activation)

    def row_parallel(self, units: int, name: str, use_bias: bool = True) -> tf.keras.layers.Layer:
        """A projection whose input features a tensor-parallel factory splits across ranks
        (its partial outputs are then summed)."""
        return self.dense(units, name=name, use_bias=use_bias)
