"""TfBert>FusedBiasSplitHeads (tfbert.ops.split_heads_ops, --fused_qkv_split) against the bias
add, reshape, transpose and unstack it replaces: forward bit for bit, gradients, errors."""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops.loader import load_ops, ops_available

pytestmark = pytest.mark.skipif(
    not (ops_available() and hasattr(load_ops(), "tf_bert_fused_bias_split_heads")),
    reason="tfbert op library not built")

from tfbert.ops.split_heads_ops import (  # noqa: E402
    bias_split_heads_reference, fused_bias_split_heads)

# (B, S, n, H): odd sizes, one head, a head size of 1, BERT-like heads of 64.
SHAPES = [(3, 7, 5, 3), (2, 5, 1, 8), (4, 3, 2, 1), (2, 9, 4, 64)]
DTYPES = [tf.float32, tf.float16, tf.bfloat16]


def bits(t):
    array = t.numpy()
    return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def parts_and_grads(fn, x, bias, heads, upstream):
    with tf.GradientTape() as tape:
        tape.watch([x, bias])
        parts = fn(x, bias, heads)
        total = tf.add_n([tf.reduce_sum(tf.cast(p, tf.float32) * u)
                          for p, u in zip(parts, upstream)])
    return parts, tape.gradient(total, [x, bias])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_parts_and_gradients_equal_the_composites(shape, dtype):
    batch, seq, heads, head_size = shape
    cols = 3 * heads * head_size
    x = tf.cast(tf.random.stateless_normal([batch, seq, cols], [1, 2]) * 3.0, dtype)
    bias = tf.cast(tf.random.stateless_normal([cols], [3, 4]), dtype)
    # Different upstream gradients per part: a part routed to the wrong place would show.
    upstream = [tf.random.stateless_normal([batch, heads, seq, head_size], [5, p])
                for p in range(3)]
    parts, (dx, dbias) = parts_and_grads(fused_bias_split_heads, x, bias, heads, upstream)
    want, (want_dx, want_dbias) = parts_and_grads(bias_split_heads_reference, x, bias, heads,
                                                  upstream)
    for got, expected in zip(parts, want):
        assert got.shape == (batch, heads, seq, head_size) and got.dtype == dtype
        np.testing.assert_array_equal(bits(got), bits(expected))  # one rounded add, moved
    np.testing.assert_array_equal(bits(dx), bits(want_dx))  # the gradients moved back
    # dbias: the float32 sum of dx over B and S, in another order than TensorFlow's Sum.
    tol = {tf.float32: 1e-5, tf.float16: 2e-3, tf.bfloat16: 1e-2}[dtype]
    scale = float(np.abs(tf.cast(want_dbias, tf.float32).numpy()).max())
    np.testing.assert_allclose(tf.cast(dbias, tf.float32).numpy(),
                               tf.cast(want_dbias, tf.float32).numpy(), rtol=tol,
                               atol=tol * scale)


def test_a_part_without_gradient_and_no_rows():
    x = tf.random.stateless_normal([2, 3, 12], [1, 1])
    bias = tf.random.stateless_normal([12], [1, 2])
    with tf.GradientTape() as tape:
        tape.watch([x, bias])
        query, _, value = fused_bias_split_heads(x, bias, 2)
        total = tf.reduce_sum(query) + 2.0 * tf.reduce_sum(value)
    dx, dbias = tape.gradient(total, [x, bias])
    expected = np.concatenate([np.ones(4), np.zeros(4), 2.0 * np.ones(4)])
    np.testing.assert_array_equal(dx.numpy(), np.broadcast_to(expected, [2, 3, 12]))
    np.testing.assert_array_equal(dbias.numpy(), 6.0 * expected)
    empty = tf.zeros([0, 3, 12])
    with tf.GradientTape() as tape:
        tape.watch(bias)
        parts = fused_bias_split_heads(empty, bias, 2)
        total = tf.add_n([tf.reduce_sum(p) for p in parts])
    np.testing.assert_array_equal(tape.gradient(total, bias).numpy(), np.zeros(12))


def test_a_width_that_does_not_split_into_heads_is_refused():
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="3 \\* heads"):
        fused_bias_split_heads(tf.zeros([2, 3, 10]), tf.zeros([10]), 2)
