"""TfBert>FusedDropout (tfbert.ops.dropout_ops) against its reference with the mask of
TfBert>DropoutKeepMask, its gradient, and the Dropout layer that uses it (--ytf_dropout)."""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops.loader import ops_available

pytestmark = pytest.mark.skipif(not ops_available(), reason="tfbert op library not built")

from tfbert.modeling.layers.dropout import Dropout, DropoutRng  # noqa: E402
from tfbert.ops.attention_softmax_ops import dropout_keep_mask  # noqa: E402
from tfbert.ops.dropout_ops import dropout_reference, fused_dropout  # noqa: E402

SEED = tf.constant([-77, 2**40 + 3], tf.int64)
# (3, 5, 7) is smaller than the kernel's block of elements; (3, 70001) spans several blocks
# with a partial last one, so a block offset that were off would move the mask.
SHAPES = [(3, 5, 7), (3, 70001), (1,)]


def bits(t: tf.Tensor) -> np.ndarray:
    """The tensor's raw bits, so that float16/bfloat16 compare exactly (and -0.0 != 0.0)."""
    array = t.numpy()
    return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_forward_is_the_reference_with_the_keep_mask(shape, dtype, rate):
    x = tf.cast(tf.random.stateless_normal(shape, [1, 2]) * 3.0, dtype)
    keep = dropout_keep_mask(shape, SEED, rate)
    np.testing.assert_array_equal(bits(fused_dropout(x, SEED, rate)),
                                  bits(dropout_reference(x, keep, rate)))


def test_rate_zero_is_the_identity_and_the_kept_fraction_is_one_minus_rate():
    x = tf.random.stateless_normal([400, 1000], [3, 4])
    np.testing.assert_array_equal(fused_dropout(x, SEED, 0.0).numpy(), x.numpy())
    kept = np.mean(fused_dropout(tf.ones([400, 1000]), SEED, 0.3).numpy() != 0)
    sigma = np.sqrt(0.3 * 0.7 / 400_000)
    assert abs(kept - 0.7) < 6 * sigma
    # The expectation is preserved: kept elements are scaled by 1 / (1 - rate).
    assert np.mean(fused_dropout(tf.ones([400, 1000]), SEED, 0.3).numpy()) == pytest.approx(
        1.0, abs=6 * sigma / 0.7)


def test_the_mask_depends_on_the_seed_only():
    x = tf.ones([64, 129])
    first = fused_dropout(x, SEED, 0.5).numpy()
    np.testing.assert_array_equal(first, fused_dropout(x * 1.0, SEED, 0.5).numpy())
    other = fused_dropout(x, SEED + [0, 1], 0.5).numpy()
    assert np.mean(first != other) > 0.3  # independent masks differ on about half the elements


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_gradient_regenerates_the_forward_mask(dtype):
    x = tf.cast(tf.random.stateless_normal([37, 301], [5, 6]), dtype)
    upstream = tf.cast(tf.random.stateless_normal([37, 301], [7, 8]), dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fused_dropout(x, SEED, 0.2)
    dx = tape.gradient(y, x, output_gradients=upstream)
    keep = dropout_keep_mask([37, 301], SEED, 0.2)
    np.testing.assert_array_equal(bits(dx), bits(dropout_reference(upstream, keep, 0.2)))
    # And in float64 terms: the theoretical Jacobian is diag(keep / (1 - rate)).
    if dtype == tf.float32:
        theoretical, numerical = tf.test.compute_gradient(
            lambda v: fused_dropout(v, SEED, 0.2), [x[:3, :5]])
        np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-2)


def test_dropout_layer_fused_uses_the_op_with_the_rng_seed():
    x = tf.random.stateless_normal([2, 9, 16], [9, 9])
    layer = Dropout(0.1, DropoutRng(7), fused=True)
    seed = DropoutRng(7).next_seed()  # the same generator state: the layer's first seed
    expected = dropout_reference(x, dropout_keep_mask([2, 9, 16], seed, 0.1), 0.1)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), expected.numpy())
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    # A second call draws a new seed: another mask.
    assert not np.array_equal(layer(x, training=True).numpy(), expected.numpy())


def test_bad_arguments_fail_with_named_messages():
    with pytest.raises(ValueError, match="rate must be in"):
        fused_dropout(tf.ones([3]), SEED, 1.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="seed"):
        fused_dropout(tf.ones([3]), tf.constant([1, 2, 3], tf.int64), 0.1)


# --- TfBert>FusedBiasDropoutAdd ---------------------------------------------------------------


def bias_dropout_add_inputs(shape, dtype):
    x = tf.cast(tf.random.stateless_normal(shape, [11, 12]) * 3.0, dtype)
    bias = tf.random.stateless_normal(shape[-1:], [13, 14])  # float32, as the variable
    residual = tf.cast(tf.random.stateless_normal(shape, [15, 16]), dtype)
    return x, bias, residual


@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 70001), (2, 1)], ids=str)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_bias_dropout_add_is_the_reference_with_the_keep_mask(shape, dtype, rate):
    from tfbert.ops.dropout_ops import bias_dropout_add_reference, fused_bias_dropout_add

    x, bias, residual = bias_dropout_add_inputs(shape, dtype)
    keep = dropout_keep_mask(shape, SEED, rate)
    got = fused_bias_dropout_add(x, bias, residual, SEED, rate)
    np.testing.assert_array_equal(bits(got),
                                  bits(bias_dropout_add_reference(x, bias, residual, keep, rate)))
    if dtype == tf.float32:
        # In float32 the same operations as the ops it replaces, so the same bits.
        composite = fused_dropout(x + bias, SEED, rate) + residual
        np.testing.assert_array_equal(bits(got), bits(composite))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_bias_dropout_add_gradients_are_the_composites(dtype):
    from tfbert.ops.dropout_ops import fused_bias_dropout_add

    x, bias, residual = bias_dropout_add_inputs([4, 9, 33], dtype)
    upstream = tf.cast(tf.random.stateless_normal([4, 9, 33], [17, 18]), dtype)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, bias, residual])
            y = fn(x, tf.cast(bias, dtype), residual)
        return tape.gradient(y, [x, bias, residual], output_gradients=upstream)

    fused = grads(lambda a, b, r: fused_bias_dropout_add(a, b, r, SEED, 0.3))
    composite = grads(lambda a, b, r: fused_dropout(a + b, SEED, 0.3) + r)
    for name, got, want in zip(("dx", "dbias", "dresidual"), fused, composite):
        np.testing.assert_array_equal(bits(tf.convert_to_tensor(got)),
                                      bits(tf.convert_to_tensor(want)), err_msg=name)
    # The mask is in dx: some elements dropped, the others scaled by 1 / (1 - rate).
    dx = tf.cast(fused[0], tf.float32).numpy()
    assert np.mean(dx == 0) > 0.2 and np.mean(dx == 0) < 0.4


def test_bias_dropout_add_rejects_mismatched_shapes():
    from tfbert.ops.dropout_ops import fused_bias_dropout_add

    x = tf.ones([4, 6])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="bias|Dimension"):
        fused_bias_dropout_add(x, tf.ones([5]), x, SEED, 0.1)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="residual|Dimension"):
        fused_bias_dropout_add(x, tf.ones([6]), tf.ones([4, 5]), SEED, 0.1)
    with pytest.raises(ValueError, match="rate"):
        fused_bias_dropout_add(x, tf.ones([6]), x, SEED, 1.0)
