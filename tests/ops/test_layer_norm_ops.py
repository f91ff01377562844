"""The fused LayerNorm op against its pure-TF reference: forward, gradients, dtypes, odd shapes.

Every case runs both paths on the same inputs; tolerances are per dtype (float32 ~1e-5,
float16 ~1e-3, bfloat16 ~1e-2, looser on gradients, which are sums over a row or over rows).
"""

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops import loader

if not loader.ops_available():
    pytest.skip(f"the op library is not built ({loader.LIBRARY_PATH}); run `make ops`",
                allow_module_level=True)

from tfbert.ops.layer_norm_ops import fused_layer_norm, layer_norm_reference  # noqa: E402

# Odd sizes: H = 37, H = 1 (zero variance), a single row, a size-1 middle dimension.
SHAPES = [(13, 7, 37), (5, 1), (1, 33), (3, 1, 64)]
# Relative tolerance of y and of the gradients per dtype; the absolute tolerance is the same
# times the largest expected magnitude (so sums over rows are held to the same relative bar).
TOLERANCES = {
    tf.float32: dict(y=1e-5, grad=1e-5),
    tf.float16: dict(y=1e-3, grad=1e-2),
    tf.bfloat16: dict(y=1e-2, grad=5e-2),
}
EPSILON = 1e-12


def make_inputs(shape, dtype, offset=0.0, seed=0):
    """x and dy: [..., H] in dtype; gamma, beta: float32 [H]."""
    rng = np.random.default_rng(seed)
    hidden = shape[-1]
    x = (2.0 * rng.standard_normal(shape) + offset).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = (1.0 + 0.3 * rng.standard_normal(hidden)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(hidden)).astype(np.float32)
    return (tf.cast(x, dtype), tf.constant(gamma), tf.constant(beta), tf.cast(dy, dtype))


def forward_and_grads(layer_norm, x, gamma, beta, dy):
    """y and the gradients of sum(y * dy) with respect to x, gamma and beta."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = layer_norm(x, gamma, beta, EPSILON)
    return y, tape.gradient(y, [x, gamma, beta], output_gradients=dy)


def assert_close(actual, expected, tol, name):
    actual = tf.cast(actual, tf.float64).numpy()
    expected = tf.cast(expected, tf.float64).numpy()
    assert actual.shape == expected.shape, name
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def float64_layer_norm(x, gamma, beta):
    """Ground truth in numpy float64 from the (already rounded) inputs: y, mean, rstd."""
    x = tf.cast(x, tf.float64).numpy()
    mean = x.mean(axis=-1)
    rstd = 1.0 / np.sqrt(x.var(axis=-1) + EPSILON)
    y = (x - mean[..., None]) * rstd[..., None] * gamma.numpy() + beta.numpy()
    return y, mean.reshape(-1), rstd.reshape(-1)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_reference(shape, dtype):
    inputs = make_inputs(shape, dtype)
    y, (dx, dgamma, dbeta) = forward_and_grads(fused_layer_norm, *inputs)
    y_ref, (dx_ref, dgamma_ref, dbeta_ref) = forward_and_grads(layer_norm_reference, *inputs)
    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert dgamma.dtype == tf.float32 and dbeta.dtype == tf.float32
    assert dgamma.shape == (shape[-1],) and dbeta.shape == (shape[-1],)
    assert_close(y, y_ref, tol["y"], "y")
    assert_close(dx, dx_ref, tol["grad"], "dx")
    assert_close(dgamma, dgamma_ref, tol["grad"], "dgamma")
    assert_close(dbeta, dbeta_ref, tol["grad"], "dbeta")


def test_statistics_outputs_are_float32_per_row():
    x, gamma, beta, _ = make_inputs((13, 7, 37), tf.bfloat16)
    y, mean, rstd = loader.load_ops().tf_bert_fused_layer_norm(x, gamma, beta, epsilon=EPSILON)
    assert y.dtype == tf.bfloat16 and y.shape == (13, 7, 37)
    assert mean.dtype == tf.float32 and rstd.dtype == tf.float32
    assert mean.shape == (13 * 7,) and rstd.shape == (13 * 7,)
    _, mean64, rstd64 = float64_layer_norm(x, gamma, beta)
    np.testing.assert_allclose(mean.numpy(), mean64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd.numpy(), rstd64, rtol=1e-5)


def test_large_mean_float32_keeps_precision():
    # x + 1000: E[x^2] - mean^2 would cancel (x^2 ~ 1e6 has a float32 spacing of 0.06 next to a
    # variance of 4); the op's shifted mean and centred variance keep ~1e-5.
    x, gamma, beta, dy = make_inputs((13, 7, 37), tf.float32, offset=1000.0)
    y, mean, rstd = loader.load_ops().tf_bert_fused_layer_norm(x, gamma, beta, epsilon=EPSILON)
    y64, mean64, rstd64 = float64_layer_norm(x, gamma, beta)
    np.testing.assert_allclose(mean.numpy(), mean64, rtol=0, atol=1e-4)
    np.testing.assert_allclose(rstd.numpy(), rstd64, rtol=1e-5)
    np.testing.assert_allclose(y.numpy(), y64, rtol=0, atol=1e-4)
    # The test can fail: the one-pass float32 formula is visibly wrong on these rows.
    x32 = x.numpy()
    naive_var = (x32 * x32).mean(axis=-1, dtype=np.float32) - x32.mean(axis=-1) ** 2
    naive_rstd = 1.0 / np.sqrt(np.maximum(naive_var, 0.0) + EPSILON)
    assert np.max(np.abs(naive_rstd.reshape(-1) / rstd64 - 1.0)) > 1e-3

    # The gradients agree with the reference's too.
    _, grads = forward_and_grads(fused_layer_norm, x, gamma, beta, dy)
    _, grads_ref = forward_and_grads(layer_norm_reference, x, gamma, beta, dy)
    for name, grad, grad_ref in zip(["dx", "dgamma", "dbeta"], grads, grads_ref):
        assert_close(grad, grad_ref, 1e-3, name)


def test_large_mean_float16_uses_float32_statistics():
    # x + 300 in float16: x^2 > 65504 overflows a float16 variance; float32 statistics don't.
    x, gamma, beta, dy = make_inputs((13, 7, 37), tf.float16, offset=300.0)
    y = fused_layer_norm(x, gamma, beta, EPSILON)
    y64, _, _ = float64_layer_norm(x, gamma, beta)
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(tf.cast(y, tf.float64).numpy(), y64, rtol=2e-3, atol=2e-3)
    assert_close(y, layer_norm_reference(x, gamma, beta, EPSILON), 1e-3, "y")
    _, grads = forward_and_grads(fused_layer_norm, x, gamma, beta, dy)
    assert all(np.all(np.isfinite(tf.cast(g, tf.float32).numpy())) for g in grads)


def test_theoretical_and_numerical_jacobians_agree():
    x, gamma, beta, _ = make_inputs((3, 5), tf.float32)
    # A larger epsilon than BERT's keeps the numerical differences well conditioned.
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, gamma, beta: fused_layer_norm(x, gamma, beta, 1e-3), [x, gamma, beta],
        delta=1e-2)
    for name, t, n in zip(["x", "gamma", "beta"], theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=0, atol=2e-3, err_msg=name)
    # And the fused Jacobians are the reference's.
    reference, _ = tf.test.compute_gradient(
        lambda x, gamma, beta: layer_norm_reference(x, gamma, beta, 1e-3), [x, gamma, beta],
        delta=1e-2)
    for name, t, r in zip(["x", "gamma", "beta"], theoretical, reference):
        np.testing.assert_allclose(t, r, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("function_kwargs", [{}, {"jit_compile": False}],
                         ids=["tf_function", "jit_compile_false"])
def test_gradient_inside_tf_function(function_kwargs):
    inputs = make_inputs((13, 7, 37), tf.float32)

    @tf.function(**function_kwargs)
    def step(x, gamma, beta, dy):
        return forward_and_grads(fused_layer_norm, x, gamma, beta, dy)

    y, grads = step(*inputs)
    y_ref, grads_ref = forward_and_grads(layer_norm_reference, *inputs)
    assert_close(y, y_ref, 1e-5, "y")
    for name, grad, grad_ref in zip(["dx", "dgamma", "dbeta"], grads, grads_ref):
        assert_close(grad, grad_ref, 1e-5, name)


def test_shape_inference_with_unknown_leading_dimensions():
    ops = loader.load_ops()

    @tf.function(input_signature=[tf.TensorSpec([None, 7, 37], tf.float16),
                                  tf.TensorSpec([37], tf.float32),
                                  tf.TensorSpec([37], tf.float32)])
    def shapes(x, gamma, beta):
        y, mean, rstd = ops.tf_bert_fused_layer_norm(x, gamma, beta)
        dx, dgamma, dbeta = ops.tf_bert_fused_layer_norm_grad(y, x, mean, rstd, gamma)
        for t, expected in [(y, [None, 7, 37]), (mean, [None]), (rstd, [None]),
                            (dx, [None, 7, 37]), (dgamma, [37]), (dbeta, [37])]:
            assert t.shape.as_list() == expected, (t.name, t.shape)
        return mean

    assert shapes.get_concrete_function().structured_outputs.shape.as_list() == [None]
    known = ops.tf_bert_fused_layer_norm(*make_inputs((13, 7, 37), tf.float32)[:3])
    assert known[1].shape == (91,)


def test_wrong_gamma_size_fails_with_a_message_naming_it():
    x, gamma, beta, _ = make_inputs((4, 6), tf.float32)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="gamma"):
        fused_layer_norm(x, gamma[:5], beta)


def test_no_rows_gives_empty_output_and_zero_parameter_gradients():
    x, gamma, beta, dy = make_inputs((0, 8), tf.float32)
    y, (dx, dgamma, dbeta) = forward_and_grads(fused_layer_norm, x, gamma, beta, dy)
    assert y.shape == (0, 8) and dx.shape == (0, 8)
    np.testing.assert_array_equal(dgamma.numpy(), np.zeros(8, np.float32))
    np.testing.assert_array_equal(dbeta.numpy(), np.zeros(8, np.float32))


def test_backward_is_deterministic():
    # Enough rows (3584) for every thread and all 128 row blocks of the dgamma reduction.
    inputs = make_inputs((512, 7, 64), tf.float32, seed=3)
    _, (dx1, dgamma1, dbeta1) = forward_and_grads(fused_layer_norm, *inputs)
    _, (dx2, dgamma2, dbeta2) = forward_and_grads(fused_layer_norm, *inputs)
    assert dgamma1.numpy().tobytes() == dgamma2.numpy().tobytes()
    assert dbeta1.numpy().tobytes() == dbeta2.numpy().tobytes()
    assert dx1.numpy().tobytes() == dx2.numpy().tobytes()
