"""One factory for every dense projection in the encoder.

Every matrix multiplication with a weight goes through `DenseFactory`, and each call says which
role the projection plays in a transformer block. A tensor-parallel factory can then replace
`column_parallel` (split the output features: Q, K, V, the FFN's first projection) and
`row_parallel` (split the input features and all-reduce: the attention output, the FFN's second
projection) without touching the layers that use them.
"""

from __future__ import annotations

import contextlib

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
      save_activation_derivative: with fused_activation "gelu" or "gelu_tanh", the fused op
        keeps gelu'(x + bias) for the backward pass instead of recomputing it
        (--gelu_save_derivative).
    Inputs: float Tensor of shape [..., in]. Output: [..., units] in the layer's compute dtype.

    Variables are named `kernel` and `bias`, as in google-research/bert checkpoints.
    """

    FUSED_ACTIVATIONS = ("gelu", "gelu_tanh", "geglu")

    def __init__(self, units: int, use_bias: bool = True, kernel_initializer=None,
                 fused_activation: str | None = None, save_activation_derivative: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if fused_activation is not None and (fused_activation not in self.FUSED_ACTIVATIONS
                                             or not use_bias):
            raise ValueError(f"{self.name}: fused_activation={fused_activation!r} needs a bias and "
                             f"one of {self.FUSED_ACTIVATIONS}")
        if save_activation_derivative and fused_activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"{self.name}: save_activation_derivative needs fused_activation "
                             f"'gelu' or 'gelu_tanh', got {fused_activation!r}")
        self.fused_activation = fused_activation
        self.save_activation_derivative = save_activation_derivative
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

    def _matmul(self, inputs):
        # A 2-D matmul: the gradient of an ellipsis einsum ("...i,io->...o") broadcasts the
        # kernel over the batch and was measured 30x slower and 60x larger here.
        flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])  # (B*S, in)
        outputs = tf.matmul(flat, self.kernel)  # (B*S, units)
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))

    def call(self, inputs, add_bias: bool = True):
        """add_bias=False returns the product alone, for a fused op that adds `bias` itself
        (--fused_bias_dropout_add)."""
        outputs = self._matmul(inputs)
        if self.fused_activation is not None:
            from tfbert.ops import gelu_ops

            # The activation (not the matmul) may be recomputed in backward: see recompute.py.
            if self.fused_activation == "geglu":
                return recomputable(gelu_ops.fused_bias_geglu, outputs, self.bias,
                                    approximate=False)
            return recomputable(gelu_ops.fused_bias_gelu, outputs, self.bias,
                                approximate=self.fused_activation == "gelu_tanh",
                                save_derivative=self.save_activation_derivative)
        if self.bias is not None and add_bias:
            outputs = outputs + self.bias
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias,
                      fused_activation=self.fused_activation,
                      save_activation_derivative=self.save_activation_derivative,
                      kernel_initializer=tf.keras.initializers.serialize(self.kernel_initializer))
        return config


def fused_projection(layers: list[Dense], inputs: tf.Tensor, add_bias: bool = True) -> tf.Tensor:
    """The projections of `inputs` by several Dense layers as one matmul: inputs @ [W_1 | W_2
    | ...] + [b_1 | b_2 | ...] (a layer without a bias contributes zeros).

    One [in, sum units] product instead of one per layer: fewer, larger matmuls, one gradient
    with respect to `inputs` instead of a sum of several, and the same variables (each layer
    keeps its kernel and bias). Call it inside the calling layer's `call`, whose compute dtype
    the kernels are read in; the layers must be built (`build_sublayer`). add_bias=False
    leaves `fused_bias(layers, ...)` to the caller's fused op (--fused_qkv_split).

    Inputs: [..., in]. Returns [..., sum of the layers' units].
    """
    kernel = tf.concat([layer.kernel for layer in layers], axis=1)  # (in, U)
    flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])  # (rows, in)
    outputs = tf.matmul(flat, kernel)  # (rows, U)
    units = sum(layer.units for layer in layers)
    outputs = tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [units]], axis=0))
    if add_bias and any(layer.use_bias for layer in layers):
        # Added after the reshape, as Dense does: Grappler would otherwise fuse the matmul and
        # the bias into oneDNN's _FusedMatMul, measured slower on CPUs (profile_step.py).
        outputs = outputs + fused_bias(layers, outputs.dtype)
    return outputs


def fused_bias(layers: list[Dense], dtype) -> tf.Tensor:
    """[b_1 | b_2 | ...] in dtype, zeros for a layer without a bias: `fused_projection`'s bias."""
    return tf.concat([tf.cast(layer.bias, dtype) if layer.use_bias
                      else tf.zeros([layer.units], dtype) for layer in layers], axis=0)


def build_sublayer(layer: tf.keras.layers.Layer, input_shape, scope: str = "") -> None:
    """Builds `layer`'s variables under the names its own call would give them (the calling
    layer's scope, then `scope`, then the layer's name), for a layer whose variables are used
    without calling it (`fused_projection`)."""
    if layer.built:
        return
    with tf.name_scope(scope) if scope else contextlib.nullcontext():
        with tf.name_scope(layer.name):
            layer.build(input_shape)


class RowParallelDense(Dense):
    """A projection whose input features are split across a tensor-parallel group: each rank
    multiplies its slice of the input by its rows of the kernel, the partial products are
    summed over the group, and the bias (replicated) is added once, after the sum.

    Inputs: [..., in / T], this rank's slice. Output: [..., units], the same on every rank.
    """

    def __init__(self, units: int, group, **kwargs):
        super().__init__(units, **kwargs)
        self.group = group

    def call(self, inputs, add_bias: bool = True):
        from tfbert.modeling.tensor_parallel import reduce_from_region

        outputs = reduce_from_region(self._matmul(inputs), self.group)
        return outputs + self.bias if self.bias is not None and add_bias else outputs


class DenseFactory:
    """Builds the encoder's dense layers, and says how many heads, features and vocabulary rows
    a rank holds. `TensorParallelDenseFactory` replaces it to split them across ranks; the
    layers that use a factory do not change.

    Args:
      initializer_range: stddev of the truncated-normal kernel initializer.
      dtype: the Keras dtype policy the layers compute in.
    """

    parts = 1  # ranks of the tensor-parallel group

    def __init__(self, initializer_range: float, dtype=None):
        self.initializer_range = initializer_range
        self.dtype = dtype

    def _initializer(self):
        return tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range)

    def local(self, count: int) -> int:
        """How many of `count` heads or features this rank holds in a parallel region."""
        return count

    def enter_parallel(self, x: tf.Tensor) -> tf.Tensor:
        """Hands a replicated activation to the column-parallel projections that read it (once
        for Q, K and V together: under tensor parallelism their input gradients are summed
        across ranks in one all-reduce)."""
        return x

    def vocab_shard(self, vocab_size: int):
        """The rows of the vocabulary this rank holds (`tensor_parallel.VocabShard`)."""
        from tfbert.modeling.tensor_parallel import VocabShard
        from tfbert.distributed import SingleProcess

        return VocabShard(SingleProcess(), 0, vocab_size)

    def dense(self, units: int, name: str, use_bias: bool = True,
              fused_activation: str | None = None,
              save_activation_derivative: bool = False) -> tf.keras.layers.Layer:
        """A projection replicated on every rank (poolers, heads)."""
        return Dense(units, use_bias=use_bias, kernel_initializer=self._initializer(), name=name,
                     fused_activation=fused_activation,
                     save_activation_derivative=save_activation_derivative, dtype=self.dtype)

    def column_parallel(self, units: int, name: str, use_bias: bool = True,
                        fused_activation: str | None = None, gated: bool = False,
                        save_activation_derivative: bool = False) -> tf.keras.layers.Layer:
        """A projection whose output features a tensor-parallel factory splits across ranks.
        Its input comes through `enter_parallel`. `gated`: the outputs are [gate, value]
        halves (each rank then holds matching slices of both)."""
        del gated
        return self.dense(units, name=name, use_bias=use_bias, fused_activation=fused_activation,
                          save_activation_derivative=save_activation_derivative)

    def row_parallel(self, units: int, name: str, use_bias: bool = True) -> tf.keras.layers.Layer:
        """A projection whose input features a tensor-parallel factory splits across ranks
        (its partial outputs are then summed)."""
        return self.dense(units, name=name, use_bias=use_bias)


class TensorParallelDenseFactory(DenseFactory):
    """Megatron's split of a transformer block over `group` (`tfbert.modeling.tensor_parallel`):
    column-parallel projections hold units / T output features, row-parallel ones in / T input
    features, and the vocabulary V / T rows. Every kernel is initialised as this rank's slice of
    the whole kernel one process would draw.
    """

    def __init__(self, initializer_range: float, dtype=None, group=None):
        super().__init__(initializer_range, dtype)
        self.group = group
        self.parts = group.size

    def local(self, count: int) -> int:
        if count % self.parts:
            raise ValueError(f"{count} heads or features do not split over {self.parts} "
                             f"tensor-parallel ranks")
        return count // self.parts

    def enter_parallel(self, x: tf.Tensor) -> tf.Tensor:
        from tfbert.modeling.tensor_parallel import copy_to_region

        return copy_to_region(x, self.group)

    def vocab_shard(self, vocab_size: int):
        from tfbert.modeling.tensor_parallel import VocabShard

        self.local(vocab_size)  # the error, if it does not split
        return VocabShard.of(self.group, vocab_size)

    def _sliced(self, split):
        from tfbert.modeling.tensor_parallel import ShardInitializer

        return ShardInitializer(self._initializer(), split, self.group.rank, self.parts)

    def column_parallel(self, units: int, name: str, use_bias: bool = True,
                        fused_activation: str | None = None, gated: bool = False,
                        save_activation_derivative: bool = False) -> tf.keras.layers.Layer:
        from tfbert.modeling.tensor_parallel import Split

        return Dense(self.local(units), use_bias=use_bias, name=name, dtype=self.dtype,
                     kernel_initializer=self._sliced(Split(1, halves=gated)),
                     fused_activation=fused_activation,
                     save_activation_derivative=save_activation_derivative)

    def row_parallel(self, units: int, name: str, use_bias: bool = True) -> tf.keras.layers.Layer:
        from tfbert.modeling.tensor_parallel import Split

        return RowParallelDense(units, self.group, use_bias=use_bias, name=name,
                                dtype=self.dtype, kernel_initializer=self._sliced(Split(0)))


def make_dense_factory(initializer_range: float, dtype=None, tensor_group=None) -> DenseFactory:
    """The one place that decides how projections are computed: split over `tensor_group` when
    it has more than one rank, else whole."""
    if tensor_group is not None and tensor_group.size > 1:
        return TensorParallelDenseFactory(initializer_range, dtype, tensor_group)
    return DenseFactory(initializer_range, dtype)
