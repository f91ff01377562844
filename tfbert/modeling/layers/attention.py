"""Multi-head self-attention.

Shape legend: B batch, S sequence length, N heads, H head size, D = N * H hidden size; under
tensor parallelism (T ranks) a rank computes n = N / T of the heads.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.modeling.layers.dense import (DenseFactory, build_sublayer, fused_bias,
                                          fused_projection)
from tfbert.modeling.layers.dropout import Dropout, DropoutRng


def attention_mask_bias(input_mask: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Additive mask: 0 where a key may be attended to, a large negative number where not.

    Args:
      input_mask: int32 Tensor [B, S], 1 for real tokens and 0 for padding.
    Returns: Tensor [B, 1, 1, S] of `dtype`, broadcast over heads and queries.
    """
    # -10000 rather than the dtype's minimum: it survives float16 and the softmax still gives
    # padded keys a weight of exactly zero after exp() underflows.
    bias = (1.0 - tf.cast(input_mask, dtype)) * tf.cast(-10000.0, dtype)  # (B, S)
    return bias[:, tf.newaxis, tf.newaxis, :]  # (B, 1, 1, S)


def masked_softmax(scores: tf.Tensor, mask_bias: tf.Tensor) -> tf.Tensor:
    """softmax(scores + mask_bias) over the last axis, computed in float32.

    The reference for the fused attention-softmax op. float32 because a float16 exp() of
    unnormalised scores overflows; the result is cast back to the scores' dtype.
    """
    probs = tf.nn.softmax(tf.cast(scores, tf.float32) + tf.cast(mask_bias, tf.float32), axis=-1)
    return tf.cast(probs, scores.dtype)


class SelfAttention(tf.keras.layers.Layer):
    """Multi-head self-attention with its output projection, residual and LayerNorm excluded.

    Args:
      num_heads: N, over the whole model (the factory says how many this rank computes).
      head_size: H.
      dense_factory: builds the Q/K/V (column-parallel) and output (row-parallel) projections.
      attention_dropout: dropout rate on the attention probabilities.
      use_bias_in_keys: whether the key projection has a bias. A key bias adds the same amount
        to every score of a query, which softmax cancels, so it can be dropped to save memory.
      rng: DropoutRng for the attention dropout (masks of this rank's heads: under tensor
        parallelism its own generator, different on every rank of the group).
      fused_softmax: compute scale, mask, softmax and dropout in one fused op
        (tfbert.ops.attention_softmax_ops), which regenerates the dropout mask from its seed in
        the backward pass instead of storing it.
      fused_qkv: project Q, K and V with one matmul of the three kernels side by side
        (`fused_projection`); the variables stay the three layers'.
      fused_split: with fused_qkv, add the projection's bias and split it into Q, K and V
        heads with one fused op (tfbert.ops.split_heads_ops, --fused_qkv_split).

    Variables (google-research/bert names): self/query, self/key, self/value, output/dense.
    """

    def __init__(self, num_heads: int, head_size: int, dense_factory: DenseFactory,
                 attention_dropout: float = 0.0, use_bias_in_keys: bool = True,
                 rng: DropoutRng | None = None, fused_softmax: bool = False,
                 fused_qkv: bool = False, fused_split: bool = False, **kwargs):
        super().__init__(**kwargs)
        if fused_split and not fused_qkv:
            raise ValueError("fused_split splits the fused Q/K/V projection: it needs fused_qkv")
        self.fused_softmax = fused_softmax
        self.fused_qkv = fused_qkv
        self.fused_split = fused_split
        self._rng = rng
        self.num_heads = num_heads
        self.local_heads = dense_factory.local(num_heads)
        self.head_size = head_size
        self.attention_dropout = attention_dropout
        self.use_bias_in_keys = use_bias_in_keys
        self._factory = dense_factory
        hidden = num_heads * head_size
        self.query = dense_factory.column_parallel(hidden, name="query")
        self.key = dense_factory.column_parallel(hidden, name="key", use_bias=use_bias_in_keys)
        self.value = dense_factory.column_parallel(hidden, name="value")
        self.output_dense = dense_factory.row_parallel(hidden, name="dense")
        self.dropout = Dropout(attention_dropout, rng, name="attention_dropout", dtype=self.dtype_policy)

    def build(self, input_shape):
        if self.fused_qkv:
            # The fused path reads the Q/K/V variables without calling their layers.
            for layer in (self.query, self.key, self.value):
                build_sublayer(layer, input_shape, scope="self")
        super().build(input_shape)

    def _project_qkv(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Q, K, V, each (B, n, S, H), from inputs (B, S, D)."""
        if not self.fused_qkv:
            return (self._split_heads(self.query(inputs)), self._split_heads(self.key(inputs)),
                    self._split_heads(self.value(inputs)))
        layers = [self.query, self.key, self.value]
        if self.fused_split:
            from tfbert.ops.split_heads_ops import fused_bias_split_heads

            qkv = fused_projection(layers, inputs, add_bias=False)  # (B, S, 3nH)
            return fused_bias_split_heads(qkv, fused_bias(layers, qkv.dtype),
                                          self.local_heads)  # (B, n, S, H) each
        qkv = fused_projection(layers, inputs)  # (B, S, 3nH)
        batch, seq = tf.shape(qkv)[0], tf.shape(qkv)[1]
        qkv = tf.reshape(qkv, [batch, seq, 3, self.local_heads, self.head_size])  # (B, S, 3, n, H)
        qkv = tf.transpose(qkv, [2, 0, 3, 1, 4])  # (3, B, n, S, H)
        # Slices along the first axis share qkv's buffer; their gradient is one Pack.
        query, key, value = tf.unstack(qkv, axis=0)  # (B, n, S, H) each
        return query, key, value

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        batch, seq = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, [batch, seq, self.local_heads, self.head_size])  # (B, S, n, H)
        return tf.transpose(x, [0, 2, 1, 3])  # (B, n, S, H)

    def call(self, hidden_states, mask_bias, training=False, return_probs=False,
             add_output_bias=True):
        """
        Args:
          hidden_states: Tensor [B, S, D] in the compute dtype.
          mask_bias: Tensor [B, 1, 1, S] from `attention_mask_bias`.
          return_probs: also return the attention probabilities (before their dropout), and
            let gradients flow back through them (distillation's attention loss).
          add_output_bias: False leaves the output projection's bias (`output_dense.bias`) to
            the caller's fused op (--fused_bias_dropout_add).
        Returns: Tensor [B, S, D], the attention output after its dense projection; with
          `return_probs`, (that, probabilities [B, n, S, S] in the compute dtype).
        """
        with tf.name_scope("self"):
            inputs = self._factory.enter_parallel(hidden_states)  # (B, S, D)
            query, key, value = self._project_qkv(inputs)  # (B, n, S, H) each

        scale = self.head_size ** -0.5
        if not self.fused_softmax:
            # Scale the query rather than the scores: fewer elements ([B,n,S,H] vs [B,n,S,S]).
            # The fused softmax scales the scores as it reads them, for free.
            query = query * tf.cast(scale, query.dtype)
        # Batched matmuls rather than einsums: the same contraction, but on CPUs without
        # bfloat16 matrix instructions TensorFlow's bfloat16 Einsum takes a generic path about
        # 15x slower than its BatchMatMul (benchmarks/profile_step.py).
        scores = tf.matmul(query, key, transpose_b=True)  # (B, n, S, S)
        if self.fused_softmax:
            from tfbert.ops.attention_softmax_ops import (fused_attention_softmax,
                                                          fused_attention_softmax_and_softmax)

            rate = self.attention_dropout if training else 0.0
            seed = self._rng.next_seed() if rate > 0 else tf.zeros([2], tf.int64)
            mask_bias = tf.cast(mask_bias, scores.dtype)
            if return_probs and rate > 0:
                # The op's second output is the softmax before dropout.
                probs, softmax = fused_attention_softmax_and_softmax(
                    scores, mask_bias, seed, scale=scale, dropout_rate=rate)  # (B, n, S, S) x2
            else:
                probs = fused_attention_softmax(scores, mask_bias, seed, scale=scale,
                                                dropout_rate=rate)  # (B, n, S, S)
                softmax = probs
        else:
            softmax = masked_softmax(scores, mask_bias)  # (B, n, S, S)
            probs = self.dropout(softmax, training=training)
        context = tf.matmul(probs, value)  # (B, n, S, H)
        context = tf.transpose(context, [0, 2, 1, 3])  # (B, S, n, H)
        batch, seq = tf.shape(context)[0], tf.shape(context)[1]
        context = tf.reshape(context, [batch, seq, self.local_heads * self.head_size])  # (B, S, nH)

        with tf.name_scope("output"):
            # Row-parallel: the heads' partial projections summed over the group.
            output = self.output_dense(context, add_bias=add_output_bias)  # (B, S, D)
        return (output, softmax) if return_probs else output

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_size=self.head_size,
                      attention_dropout=self.attention_dropout,
                      use_bias_in_keys=self.use_bias_in_keys, fused_softmax=self.fused_softmax,
                      fused_qkv=self.fused_qkv, fused_split=self.fused_split)
        return config
