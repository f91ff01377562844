"""TfBert>FusedAttentionSoftmax against its pure-TF reference (tfbert.ops.attention_softmax_ops).

Shape legend: B batch, N heads, Sq queries, Sk keys. Odd shapes, padding masks with a fully
masked row, dtype-aware tolerances (float16 ~1e-3, bfloat16 ~1e-2).
"""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops.loader import ops_available

pytestmark = pytest.mark.skipif(not ops_available(), reason="tfbert op library not built")

from tfbert.ops.attention_softmax_ops import (  # noqa: E402
    attention_softmax_reference, dropout_keep_mask, fused_attention_softmax)

SHAPES = [(2, 3, 7, 7), (1, 1, 1, 1), (3, 2, 5, 9)]  # (B, N, Sq, Sk)
TOLERANCE = {tf.float32: 1e-6, tf.float16: 1e-3, tf.bfloat16: 1e-2}
SCALE = 0.37
SEED = tf.constant([1234, 5678], tf.int64)


def padding_mask_bias(batch, keys, dtype):
    """[B, 1, 1, Sk]: row b attends to its first keys - b keys; the last row (when B > 1) attends
    to none (every bias -10000, as for an all-padding example)."""
    lengths = np.maximum(keys - np.arange(batch), 1)
    if batch > 1:
        lengths[-1] = 0
    mask = (np.arange(keys)[None, :] < lengths[:, None]).astype(np.float32)  # (B, Sk)
    return tf.cast((1.0 - mask) * -10000.0, dtype)[:, None, None, :]  # (B, 1, 1, Sk)


def inputs(shape, dtype, seed=0):
    scores = tf.cast(tf.random.stateless_normal(shape, [seed, 1]) * 3.0, dtype)  # (B, N, Sq, Sk)
    return scores, padding_mask_bias(shape[0], shape[3], dtype)


def value_and_grad(fn, scores, upstream):
    with tf.GradientTape() as tape:
        tape.watch(scores)
        probs = fn(scores)
        loss = tf.reduce_sum(tf.cast(probs, tf.float32) * upstream)
    return probs, tape.gradient(loss, scores)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(tf.cast(actual, tf.float32).numpy(),
                               tf.cast(expected, tf.float32).numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_no_dropout_matches_reference(shape, dtype):
    scores, mask = inputs(shape, dtype)
    upstream = tf.random.stateless_normal(shape, [7, 7])
    probs, grad = value_and_grad(lambda s: fused_attention_softmax(s, mask, SEED, SCALE),
                                 scores, upstream)
    ref_probs, ref_grad = value_and_grad(lambda s: attention_softmax_reference(s, mask, SCALE),
                                         scores, upstream)
    assert probs.shape == shape and probs.dtype == dtype
    assert grad.shape == shape and grad.dtype == dtype
    assert_close(probs, ref_probs, dtype)
    assert_close(grad, ref_grad, dtype)
    p = tf.cast(probs, tf.float32).numpy()
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=10 * TOLERANCE[dtype])


def test_fully_masked_row_is_finite_and_like_reference():
    # Equal -10000 biases cancel: a fully padded example gets softmax(scores), never NaN.
    scores = tf.random.stateless_normal([2, 2, 3, 5], [3, 3])
    mask = tf.constant([0.0, -10000.0])[:, None, None, None] * tf.ones([2, 1, 1, 5])
    probs = fused_attention_softmax(scores, mask, SEED).numpy()
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs[1], tf.nn.softmax(scores[1]).numpy(), atol=1e-3)
    np.testing.assert_allclose(probs, attention_softmax_reference(scores, mask).numpy(), atol=1e-6)


def test_minus_infinity_mask_gives_uniform_row():
    # A -inf mask on every key (where the reference gives NaN) falls back to a uniform row.
    scores = tf.random.stateless_normal([1, 2, 3, 6], [4, 4])
    mask = tf.fill([1, 1, 1, 6], -np.inf)
    probs = fused_attention_softmax(scores, mask, SEED).numpy()
    np.testing.assert_allclose(probs, 1.0 / 6.0, rtol=1e-6)


def test_per_query_mask():
    # A [B, 1, Sq, Sk] mask (e.g. causal) is applied per query.
    scores = tf.random.stateless_normal([2, 3, 4, 4], [5, 5])
    causal = np.triu(np.full([4, 4], -10000.0, np.float32), k=1)
    mask = tf.constant(np.broadcast_to(causal, [2, 1, 4, 4]))
    upstream = tf.random.stateless_normal([2, 3, 4, 4], [6, 6])
    probs, grad = value_and_grad(lambda s: fused_attention_softmax(s, mask, SEED, SCALE),
                                 scores, upstream)
    ref_probs, ref_grad = value_and_grad(lambda s: attention_softmax_reference(s, mask, SCALE),
                                         scores, upstream)
    assert_close(probs, ref_probs, tf.float32)
    assert_close(grad, ref_grad, tf.float32)


def test_kept_fraction_and_expectation():
    rate, shape = 0.1, [4, 4, 128, 512]  # 1M elements
    keep = dropout_keep_mask(shape, SEED, rate).numpy()
    n = keep.size
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) < 3 * sigma
    # Inverted dropout preserves the expectation: each row of probs sums to 1 on average.
    scores = tf.random.stateless_normal(shape, [8, 8])
    mask = tf.zeros([4, 1, 1, 512])
    probs = fused_attention_softmax(scores, mask, SEED, dropout_rate=rate).numpy()
    assert abs(probs.sum(-1).mean() - 1.0) < 5e-3
    np.testing.assert_array_equal(probs > 0, keep)


def test_mask_depends_only_on_seed():
    shape, rate = [2, 3, 7, 9], 0.4
    a = dropout_keep_mask(shape, SEED, rate).numpy()
    np.testing.assert_array_equal(a, dropout_keep_mask(shape, SEED, rate).numpy())
    b = dropout_keep_mask(shape, tf.constant([1234, 5679], tf.int64), rate).numpy()
    c = dropout_keep_mask(shape, tf.constant([1235, 5678], tf.int64), rate).numpy()
    assert (a != b).mean() > 0.2 and (a != c).mean() > 0.2
    # The op draws the same mask: the kept probabilities are exactly the nonzero ones.
    scores, mask = inputs(shape, tf.float32)
    probs = fused_attention_softmax(scores, tf.zeros([2, 1, 1, 9]), SEED, dropout_rate=rate)
    np.testing.assert_array_equal(probs.numpy() > 0, a)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_dropout_forward_and_backward_use_the_same_mask(dtype):
    shape, rate = (3, 2, 5, 9), 0.3
    scores, mask = inputs(shape, dtype)
    keep = dropout_keep_mask(shape, SEED, rate)
    upstream = tf.random.stateless_normal(shape, [9, 9])
    probs, grad = value_and_grad(
        lambda s: fused_attention_softmax(s, mask, SEED, SCALE, dropout_rate=rate),
        scores, upstream)
    ref_probs, ref_grad = value_and_grad(
        lambda s: attention_softmax_reference(s, mask, SCALE, rate, keep_mask=keep),
        scores, upstream)
    assert_close(probs, ref_probs, dtype)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_compute_gradient(rate):
    scores, mask = inputs((2, 2, 3, 5), tf.float32)
    # A mild bias instead of -10000: float32 finite differences of (s - 10000) lose 1e-3 to
    # rounding.
    mask = tf.constant([0.0, -3.0])[:, None, None, None] * tf.ones([1, 1, 1, 5])

    def fn(s):
        return fused_attention_softmax(s, mask, SEED, SCALE, dropout_rate=rate)

    theoretical, numerical = tf.test.compute_gradient(fn, [scores * 0.3], delta=1e-3)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)


def test_in_tf_function():
    scores, mask = inputs((2, 3, 7, 7), tf.float32)
    rate = 0.2

    @tf.function
    def step(s, seed):
        with tf.GradientTape() as tape:
            tape.watch(s)
            probs = fused_attention_softmax(s, mask, seed, SCALE, dropout_rate=rate)
            loss = tf.reduce_sum(probs * probs)
        return probs, tape.gradient(loss, s)

    probs, grad = step(scores, SEED)
    keep = dropout_keep_mask([2, 3, 7, 7], SEED, rate)
    ref_probs, ref_grad = value_and_grad(
        lambda s: attention_softmax_reference(s, mask, SCALE, rate, keep_mask=keep),
        scores, 2.0 * attention_softmax_reference(scores, mask, SCALE, rate, keep_mask=keep))
    assert_close(probs, ref_probs, tf.float32)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), atol=1e-5)


def test_bad_arguments_fail_with_named_messages():
    scores = tf.zeros([2, 3, 4, 5])
    with pytest.raises(ValueError, match="dropout_rate"):
        fused_attention_softmax(scores, tf.zeros([2, 1, 1, 5]), SEED, dropout_rate=1.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="mask_bias|must be"):
        fused_attention_softmax(scores, tf.zeros([2, 1, 1, 4]), SEED)
