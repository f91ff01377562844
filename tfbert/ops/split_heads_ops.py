"""Fused bias + split heads: the attention's fused Q/K/V projection (--fused_qkv) plus its bias,
cut into query, key and value in the [B, n, S, H] layout by one op.

    query, key, value = (x + bias) reshaped to [B, S, 3, n, H], transposed to [3, B, n, S, H]

`fused_bias_split_heads` is TfBert>FusedBiasSplitHeads (C++ on the CPU, CUDA when built); its
gradient gathers the three gradients back into x's layout and sums dbias in float32 in the same
pass. `bias_split_heads_reference` is TensorFlow's composite (the test oracle, and the path
without --fused_qkv_split).
Legend: B batch, S sequence, n heads, H head size, D = n * H.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops.loader import load_ops


def fused_bias_split_heads(x: tf.Tensor, bias: tf.Tensor, heads: int):
    """(query, key, value), each [B, n, S, H], from x [B, S, 3D] and bias [3D] (cast to x's
    dtype) with the fused op."""
    x = tf.convert_to_tensor(x)
    return tuple(load_ops().tf_bert_fused_bias_split_heads(x, tf.cast(bias, x.dtype),
                                                           heads=int(heads)))


@tf.RegisterGradient("TfBert>FusedBiasSplitHeads")
def _fused_bias_split_heads_grad(op, dquery, dkey, dvalue):
    """dx and dbias from the gradient op (a part nothing depends on gets zeros)."""
    parts = [d if d is not None else tf.zeros_like(out)
             for d, out in zip((dquery, dkey, dvalue), op.outputs)]
    dx, dbias = load_ops().tf_bert_fused_bias_split_heads_grad(*parts)
    return dx, dbias


def bias_split_heads_reference(x: tf.Tensor, bias: tf.Tensor, heads: int):
    """The same in plain TensorFlow: the bias add in x's dtype, then the reshape, transpose and
    unstack of SelfAttention's --fused_qkv path."""
    x = tf.convert_to_tensor(x)
    x = x + tf.cast(bias, x.dtype)
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]
    x = tf.reshape(x, [batch, seq, 3, heads, x.shape[-1] // (3 * heads)])  # (B, S, 3, n, H)
    return tuple(tf.unstack(tf.transpose(x, [2, 0, 3, 1, 4]), axis=0))  # 3 x (B, n, S, H)
