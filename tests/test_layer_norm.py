"""LayerNorm with float16/bfloat16 statistics against the float32 reference path.

Each case is a row the low-precision statistics used to get wrong: a constant row (epsilon 1e-12
is 0 in float16), rows whose centred squares pass float16's 65504 (|x - mean| > 256), rows whose
sum passes it, and bfloat16 rows whose long sums stopped growing. The reference is the same layer
with stats_dtype="float32" and the same gamma and beta, on the same (already rounded) inputs.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.modeling.layers.layer_norm import LayerNorm

POLICY = {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def gamma_beta(hidden, unit_gamma=False):
    """The layers' gamma and beta: float64 arrays [hidden], around 1 and 0 (gamma 1 if asked)."""
    rng = np.random.default_rng(0)
    gamma = 1.0 + 0.1 * rng.standard_normal(hidden)
    beta = 0.1 * rng.standard_normal(hidden)
    return np.ones_like(gamma) if unit_gamma else gamma, beta


def run_layer(stats_dtype, x, upstream, unit_gamma):
    """LayerNorm(stats_dtype) on x; returns (outputs, d/dx, d/dgamma, d/dbeta) as float64 arrays.

    The loss is sum(outputs * upstream); gamma and beta are `gamma_beta`.
    """
    layer = LayerNorm(stats_dtype=stats_dtype)
    layer.build(x.shape)
    gamma, beta = gamma_beta(x.shape[-1], unit_gamma)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x)
        loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [np.asarray(tf.cast(t, tf.float32), np.float64) for t in [outputs, *grads]]


NAMES = ["outputs", "d/dx", "d/dgamma", "d/dbeta"]


def compare(dtype, x, upstream, rtol, unit_gamma=False, skip=()):
    """Runs stats_dtype=dtype and the float32 reference under the mixed policy of dtype.

    x: float Tensor [..., hidden], rounded to dtype here. upstream: float32 [..., hidden] or
    broadcastable. Asserts every result is finite and, except those named in skip, within rtol
    of the reference, relative to the reference's largest magnitude (gradients of wide rows are
    ~1e-4). Returns ours, as run_layer.
    """
    tf.keras.mixed_precision.set_global_policy(POLICY[dtype])
    x = tf.cast(x, dtype)
    upstream = tf.convert_to_tensor(upstream, tf.float32)
    ours = run_layer(dtype, x, upstream, unit_gamma)
    reference = run_layer("float32", x, upstream, unit_gamma)
    for name, a, b in zip(NAMES, ours, reference):
        assert np.isfinite(a).all(), f"{name}: {np.sum(~np.isfinite(a))} values not finite"
        if name in skip:
            continue
        assert np.isfinite(b).all(), f"{name}: the reference is not finite"
        scale = max(np.abs(b).max(), 1e-30)
        error = np.abs(a - b).max() / scale
        assert error <= rtol, f"{name}: max error {error:.2e} of max |reference| {scale:.2e}"
    return ours


def test_float16_constant_rows_give_beta():
    # Constant rows of 0, 1.5, -300 and 30000 (whose sum over 37 values passes 65504).
    values = tf.constant([0.0, 1.5, -300.0, 30000.0])
    x = tf.broadcast_to(values[:, None, None], [4, 7, 37])
    upstream = tf.random.stateless_normal([4, 7, 37], seed=[1, 2])
    # d/dx is that of epsilon 2**-24, float16's least: rstd * (g - mean(g)), g = upstream * gamma,
    # with rstd 2**12; the reference's 1e6 (epsilon 1e-12) would overflow float16.
    outputs, dx, _, _ = compare("float16", x, upstream, rtol=1e-3, skip=["d/dx"])
    gamma, beta = gamma_beta(37)
    # normed is exactly 0: the outputs are beta as float16.
    np.testing.assert_array_equal(outputs[0, 0], beta.astype(np.float16))
    np.testing.assert_array_equal(outputs, np.broadcast_to(outputs[0, 0], outputs.shape))
    g = upstream.numpy().astype(np.float16).astype(np.float64) * gamma
    np.testing.assert_allclose(dx, 2.0 ** 12 * (g - g.mean(axis=-1, keepdims=True)),
                               rtol=2e-3, atol=2.0 ** 12 * 2e-3)


@pytest.mark.parametrize("spread", [1000.0, 20000.0])
def test_float16_wide_rows_match_float32(spread):
    # |x - mean| up to `spread`: the centred squares pass 65504 from 256 on; at 20000 the rows'
    # sums (means up to +-10000 over 37 features) pass it too.
    offset = tf.random.stateless_uniform([13, 7, 1], seed=[3, 4], minval=-1.0, maxval=1.0)
    u = tf.random.stateless_uniform([13, 7, 37], seed=[5, 6], minval=-1.0, maxval=1.0)
    x = spread * (0.5 * offset + u)
    upstream = tf.random.stateless_normal([13, 7, 37], seed=[7, 8])
    compare("float16", x, upstream, rtol=5e-3)


def test_float16_bert_like_rows_with_outlier_features_match_float32():
    # Ordinary activations, N(0, 1) over 768 features, except for a few outlier features of a
    # few hundred, as BERT's residual stream has: one is enough to overflow a float16 square.
    x = tf.random.stateless_normal([4, 16, 768], seed=[9, 10])
    outliers = tf.scatter_nd([[5], [300], [701]], [250.0, -400.0, 180.0], [768])
    x = x + outliers
    upstream = tf.random.stateless_normal([4, 16, 768], seed=[11, 12])
    compare("float16", x, upstream, rtol=3e-3)


def test_bfloat16_long_rows_with_an_offset_match_float32():
    # 1024 features of 100 +- 2: bfloat16 (8 bits) sums of such rows stop growing once the
    # partial sums are large (256 + 1 == 256), and the mean rounded to bfloat16 is off by up to
    # 0.25, 12% of the spread.
    x = 100.0 + 2.0 * tf.random.stateless_normal([4, 16, 1024], seed=[13, 14])
    upstream = tf.random.stateless_normal([4, 16, 1024], seed=[15, 16])
    compare("bfloat16", x, upstream, rtol=1.5e-2)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_float16_hard_rows_under_tf_function_match_eager(jit_compile):
    # Grappler and XLA reorder chains of multiplications (rstd * gamma before the centred
    # values, say): no such product may overflow either. gamma up to 3, rows as above.
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    layer = LayerNorm(stats_dtype="float16")
    layer.build([None, 768])
    layer.gamma.assign(tf.random.stateless_uniform([768], seed=[17, 18], minval=0.5, maxval=3.0))
    layer.beta.assign(tf.random.stateless_normal([768], seed=[19, 20]))
    x = tf.cast(tf.concat([
        tf.random.stateless_normal([4, 768], seed=[21, 22]),
        tf.random.stateless_uniform([4, 768], seed=[23, 24], minval=-30000.0, maxval=30000.0),
        tf.zeros([2, 768]), tf.fill([2, 768], 30000.0)], axis=0)[None], tf.float16)  # [1, 12, 768]
    upstream = tf.random.stateless_normal(x.shape, seed=[25, 26])

    def outputs_and_grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
        return [outputs, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

    def outputs_only(x):
        return [layer(x)]  # no backward pass: Grappler may reorder the forward further

    for fn in [outputs_and_grads, outputs_only]:
        eager = fn(x)
        traced = tf.function(fn, jit_compile=jit_compile)(x)
        for name, a, b in zip(NAMES, traced, eager):
            a, b = np.asarray(tf.cast(a, tf.float32)), np.asarray(tf.cast(b, tf.float32))
            assert np.isfinite(a).all() and np.isfinite(b).all(), f"{fn.__name__}: {name}"
            error = np.abs(a - b).max() / np.abs(b).max()
            assert error <= 2e-3, f"{fn.__name__}: {name}: max error {error:.2e}"
