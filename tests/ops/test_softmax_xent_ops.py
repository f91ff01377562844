"""TfBert>FusedSoftmaxCrossEntropy (tfbert.ops.softmax_xent_ops) against TensorFlow's
cross-entropy and argmax: losses, predictions, gradients, errors."""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops.loader import load_ops, ops_available

pytestmark = pytest.mark.skipif(
    not (ops_available() and hasattr(load_ops(), "tf_bert_fused_softmax_cross_entropy")),
    reason="tfbert op library not built")

from tfbert.ops.softmax_xent_ops import (  # noqa: E402
    fused_softmax_cross_entropy, softmax_cross_entropy_reference)

# (rows, classes): fewer classes than the kernels' 16 lanes, a partial last group of lanes, a
# vocabulary-sized row, one class.
SHAPES = [(7, 5), (33, 1003), (4, 30522), (3, 1)]
DTYPES = [tf.float32, tf.float16, tf.bfloat16]


def inputs(rows, classes, dtype, seed=0):
    logits = tf.cast(tf.random.stateless_normal([rows, classes], [seed, 1]) * 4.0, dtype)
    bias = tf.random.stateless_normal([classes], [seed, 2])
    labels = tf.random.stateless_uniform([rows], [seed, 3], 0, classes, tf.int32)
    # Unequal per-row gradients, some rows weightless (padded predictions).
    dloss = tf.random.stateless_uniform([rows], [seed, 4]) * tf.cast(tf.range(rows) % 3 > 0,
                                                                     tf.float32)
    return logits, bias, labels, dloss


def loss_and_grads(fn, logits, bias, labels, dloss):
    with tf.GradientTape() as tape:
        tape.watch([logits, bias])
        loss, predicted = fn(logits, bias, labels)
        total = tf.reduce_sum(loss * dloss)
    dlogits, dbias = tape.gradient(total, [logits, bias])
    return loss, predicted, dlogits, dbias


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_loss_argmax_and_gradients_equal_tensorflows(shape, dtype):
    args = inputs(*shape, dtype)
    loss, predicted, dlogits, dbias = loss_and_grads(fused_softmax_cross_entropy, *args)
    want_loss, want_predicted, want_dlogits, want_dbias = loss_and_grads(
        softmax_cross_entropy_reference, *args)
    assert dlogits.dtype == dtype and dbias.dtype == tf.float32
    # float32 arithmetic on the same float32 z = logits + bias: only exp/log's last bits differ.
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(predicted.numpy(), want_predicted.numpy())
    # The reference rounds its float32 gradient to the logits' dtype as the fused op does; its
    # softmax is exp(z - max) / sum where the op's is exp(z - log_sum_exp): a few float32 ulps.
    tolerance = {tf.float32: 1e-5, tf.float16: 1e-3, tf.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(tf.cast(dlogits, tf.float32).numpy(),
                               tf.cast(want_dlogits, tf.float32).numpy(),
                               rtol=tolerance, atol=1e-6)
    np.testing.assert_allclose(dbias.numpy(), want_dbias.numpy(), rtol=1e-5, atol=1e-6)


def test_ties_take_the_lowest_index_and_nan_never_wins():
    # Integer logits tie often (as rounded bfloat16 logits do); the maximum sits in different
    # lanes of the kernel's 16 and in the tail.
    logits = tf.constant([[1.0, 3.0, 3.0, 0.0] * 9 + [3.0],
                          [0.0] * 20 + [2.0] * 17,
                          [float("nan"), 1.0] + [0.0] * 35,
                          [0.0] * 36 + [5.0]], tf.bfloat16)
    labels = tf.constant([1, 2, 3, 36])
    _, predicted = fused_softmax_cross_entropy(logits, None, labels)
    np.testing.assert_array_equal(predicted.numpy(), [1, 20, 1, 36])
    np.testing.assert_array_equal(
        predicted[:2].numpy(), softmax_cross_entropy_reference(logits[:2], None, labels[:2])[1])


def test_leading_dimensions_and_no_bias():
    logits = tf.random.stateless_normal([2, 3, 11], [5, 5])
    labels = tf.random.stateless_uniform([2, 3], [5, 6], 0, 11, tf.int32)
    loss, predicted = fused_softmax_cross_entropy(logits, None, labels)
    want_loss, want_predicted = softmax_cross_entropy_reference(logits, None, labels)
    assert loss.shape == (2, 3) and predicted.shape == (2, 3)
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=2e-6)
    np.testing.assert_array_equal(predicted.numpy(), want_predicted.numpy())


def test_the_gradient_is_deterministic():
    args = inputs(517, 4099, tf.bfloat16, seed=7)
    first = loss_and_grads(fused_softmax_cross_entropy, *args)
    second = loss_and_grads(fused_softmax_cross_entropy, *args)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(tf.cast(a, tf.float32).numpy(),
                                      tf.cast(b, tf.float32).numpy())


@pytest.mark.parametrize("label", [-1, 9])
def test_a_label_outside_the_classes_is_an_error(label):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels\[1\] = .* \[0, 9\)"):
        fused_softmax_cross_entropy(tf.zeros([2, 9]), None, tf.constant([0, label]))


def test_mismatched_shapes_are_refused():
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="bias"):
        load_ops().tf_bert_fused_softmax_cross_entropy(tf.zeros([2, 9]), tf.zeros([8]),
                                                       tf.constant([0, 1]))
