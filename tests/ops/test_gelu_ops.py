"""The fused bias + GELU / GeGLU ops against their pure-TF references: forward, gradients
(dx, dbias), dtypes, both GELU forms, odd shapes, numerical Jacobians, tf.function, determinism.

Tolerances are per dtype (float32 ~1e-5, float16 ~1e-3, bfloat16 ~1e-2): both paths compute in
float32 and round once to the storage type, so they differ by at most about one rounding step.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfbert.ops import loader

if not loader.ops_available():
    pytest.skip(f"the op library is not built ({loader.LIBRARY_PATH}); run `make ops`",
                allow_module_level=True)

from tfbert.ops.gelu_ops import (  # noqa: E402
    bias_geglu_reference, bias_gelu_reference, fused_bias_geglu, fused_bias_gelu)

# Odd sizes: N = 37, N = 1, a single row, a size-1 middle dimension. GeGLU needs an even N.
GELU_SHAPES = [(13, 7, 37), (5, 1), (1, 33), (3, 1, 64)]
GEGLU_SHAPES = [(13, 7, 74), (5, 2)]
TOLERANCES = {
    tf.float32: dict(y=1e-5, grad=1e-5),
    tf.float16: dict(y=1e-3, grad=2e-3),
    tf.bfloat16: dict(y=1e-2, grad=1e-2),
}
OPS = {
    "gelu": (fused_bias_gelu, bias_gelu_reference),
    "geglu": (fused_bias_geglu, bias_geglu_reference),
}
CASES = ([("gelu", shape) for shape in GELU_SHAPES] +
         [("geglu", shape) for shape in GEGLU_SHAPES])


def output_shape(kind, shape):
    return shape if kind == "gelu" else shape[:-1] + (shape[-1] // 2,)


def make_inputs(kind, shape, dtype, seed=0):
    """x [..., N] and bias [N] in dtype; dy in y's shape and dtype."""
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
    dy = rng.standard_normal(output_shape(kind, shape)).astype(np.float32)
    return tf.cast(x, dtype), tf.cast(bias, dtype), tf.cast(dy, dtype)


def forward_and_grads(fn, x, bias, dy, approximate):
    """y and the gradients of sum(y * dy) with respect to x and bias."""
    with tf.GradientTape() as tape:
        tape.watch([x, bias])
        y = fn(x, bias, approximate=approximate)
    return y, tape.gradient(y, [x, bias], output_gradients=dy)


def assert_close(actual, expected, tol, name):
    actual = tf.cast(actual, tf.float64).numpy()
    expected = tf.cast(expected, tf.float64).numpy()
    assert actual.shape == expected.shape, name
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("kind,shape", CASES,
                         ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
def test_forward_and_gradients_match_reference(kind, shape, dtype, approximate):
    fused, reference = OPS[kind]
    x, bias, dy = make_inputs(kind, shape, dtype)
    y, (dx, dbias) = forward_and_grads(fused, x, bias, dy, approximate)
    y_ref, (dx_ref, dbias_ref) = forward_and_grads(reference, x, bias, dy, approximate)
    tol = TOLERANCES[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dbias.dtype == dtype
    assert y.shape == output_shape(kind, shape)
    assert dx.shape == shape and dbias.shape == (shape[-1],)
    assert_close(y, y_ref, tol["y"], "y")
    assert_close(dx, dx_ref, tol["grad"], "dx")
    assert_close(dbias, dbias_ref, tol["grad"], "dbias")


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_matches_float64_formula(approximate):
    """Known values: the float32 op against the GELU formulas evaluated in float64."""
    # -2.5 .. -1.9: both sides of the CPU kernel's switch from 1 + erf to erfc in the tail.
    u = np.array([-12.0, -6.0, -3.0, -2.5, -2.0, -1.9, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0, 6.0],
                 np.float64)
    if approximate:
        expected = 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
    else:
        expected = 0.5 * u * np.array([math.erfc(-v / math.sqrt(2.0)) for v in u])
    bias = np.full(u.shape, 0.5, np.float32)
    y = fused_bias_gelu(tf.constant((u - 0.5).astype(np.float32)[None]), bias, approximate)
    np.testing.assert_allclose(y.numpy()[0], expected, rtol=1e-5, atol=1e-7)
    # gelu(1) = Phi(1) = 0.8413447...; the erf form's deep negative tail stays finite, not 0/NaN.
    if not approximate:
        assert abs(y.numpy()[0][list(u).index(1.0)] - 0.8413447460685429) < 1e-6
        assert y.numpy()[0][0] < 0.0


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
@pytest.mark.parametrize("kind,shape", [("gelu", (3, 5)), ("geglu", (3, 6))],
                         ids=["gelu", "geglu"])
def test_numerical_jacobians(kind, shape, approximate):
    fused, _ = OPS[kind]
    x, bias, _ = make_inputs(kind, shape, tf.float32, seed=1)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, bias: fused(x, bias, approximate=approximate), [x, bias], delta=1e-2)
    for name, t, n in zip(["x", "bias"], theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-3, atol=2e-3, err_msg=name)


@pytest.mark.parametrize("kind", ["gelu", "geglu"])
def test_inside_tf_function_with_unknown_rows(kind):
    fused, reference = OPS[kind]
    shape = (13, 7, 74)
    x, bias, dy = make_inputs(kind, shape, tf.float32, seed=2)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 74], tf.float32),
                                  tf.TensorSpec([74], tf.float32),
                                  tf.TensorSpec(None, tf.float32)])
    def run(x, bias, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, bias])
            y = fused(x, bias)
        # Static shapes from the ops' shape functions.
        assert y.shape.as_list() == [None, None, 74 if kind == "gelu" else 37]
        dx, dbias = tape.gradient(y, [x, bias], output_gradients=dy)
        assert dx.shape.as_list() == [None, None, 74] and dbias.shape.as_list() == [74]
        return y, dx, dbias

    y, dx, dbias = run(x, bias, dy)
    y_ref, (dx_ref, dbias_ref) = forward_and_grads(reference, x, bias, dy, False)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(dx, dx_ref, 1e-5, "dx")
    assert_close(dbias, dbias_ref, 1e-5, "dbias")


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["gelu", "geglu"])
def test_dbias_is_deterministic(kind, dtype):
    """More rows than the kernel's 128 row blocks, so the partial sums of several threads meet."""
    fused, _ = OPS[kind]
    x, bias, dy = make_inputs(kind, (1000, 38), dtype, seed=3)
    runs = [forward_and_grads(fused, x, bias, dy, False)[1][1].numpy() for _ in range(3)]
    for other in runs[1:]:
        assert runs[0].tobytes() == other.tobytes()


def test_float32_bias_with_float16_x_is_cast():
    x, _, dy = make_inputs("gelu", (4, 8), tf.float16, seed=4)
    bias = tf.constant(np.linspace(-1.0, 1.0, 8, dtype=np.float32))
    y, (dx, dbias) = forward_and_grads(fused_bias_gelu, x, bias, dy, False)
    y_ref, (dx_ref, dbias_ref) = forward_and_grads(bias_gelu_reference, x, bias, dy, False)
    assert y.dtype == tf.float16 and dbias.dtype == tf.float32
    assert_close(y, y_ref, 1e-3, "y")
    assert_close(dbias, dbias_ref, 2e-3, "dbias")


@pytest.mark.parametrize("kind", ["gelu", "geglu"])
def test_no_rows_gives_zero_dbias(kind):
    fused, _ = OPS[kind]
    x, bias, dy = make_inputs(kind, (0, 6), tf.float32)
    y, (dx, dbias) = forward_and_grads(fused, x, bias, dy, False)
    assert y.shape == output_shape(kind, (0, 6)) and dx.shape == (0, 6)
    np.testing.assert_array_equal(dbias.numpy(), np.zeros(6, np.float32))


def test_bad_shapes_fail_with_named_errors():
    with pytest.raises(ValueError, match="must be even"):
        fused_bias_geglu(tf.zeros([2, 5]), tf.zeros([5]))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="bias"):
        fused_bias_gelu(tf.zeros([2, 5]), tf.zeros([4]))


def fused_gelu_saved(x, bias, approximate=False):
    return fused_bias_gelu(x, bias, approximate=approximate, save_derivative=True)


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_saved_derivative_gives_the_recomputing_ops_results(shape, dtype, approximate):
    # --gelu_save_derivative: y is the same op output; the gradients multiply dy by the saved
    # derivative, which in float32 is exactly the float32 value the recomputing gradient forms
    # (bit-identical), and in 16 bits that value rounded once more.
    x, bias, dy = make_inputs("gelu", shape, dtype, seed=3)
    y, (dx, dbias) = forward_and_grads(fused_gelu_saved, x, bias, dy, approximate)
    y_old, (dx_old, dbias_old) = forward_and_grads(fused_bias_gelu, x, bias, dy, approximate)
    np.testing.assert_array_equal(y.numpy(), y_old.numpy())
    assert dx.dtype == dtype and dbias.dtype == dtype and dbias.shape == (shape[-1],)
    if dtype == tf.float32:
        np.testing.assert_array_equal(dx.numpy(), dx_old.numpy())
        np.testing.assert_allclose(dbias.numpy(), dbias_old.numpy(), rtol=1e-6, atol=1e-6)
    else:
        tol = TOLERANCES[dtype]["grad"]
        assert_close(dx, dx_old, tol, "dx")
        assert_close(dbias, dbias_old, tol, "dbias")
    y_ref, (dx_ref, _) = forward_and_grads(bias_gelu_reference, x, bias, dy, approximate)
    assert_close(dx, dx_ref, TOLERANCES[dtype]["grad"], "dx against the TF reference")


def test_saved_derivative_gradient_does_not_keep_x():
    # The backward op reads dy and the derivative only: x (the matmul output) can be freed
    # after the forward pass, so the derivative takes its memory rather than adding to it.
    x, bias, dy = make_inputs("gelu", (4, 37), tf.bfloat16)

    def step(x, bias):
        with tf.GradientTape() as tape:
            tape.watch([x, bias])
            y = fused_gelu_saved(x, bias)
        return tape.gradient(y, [x, bias], output_gradients=dy)

    graph = tf.function(step).get_concrete_function(x, bias).graph
    grads = [op for op in graph.get_operations()
             if op.type == "TfBert>FusedBiasGeluGradFromDerivative"]
    assert len(grads) == 1
    forward = [op for op in graph.get_operations() if op.type == "TfBert>FusedBiasGeluSave"][0]
    assert [t.name for t in grads[0].inputs][1] == forward.outputs[1].name
    assert forward.inputs[0].name not in [t.name for t in grads[0].inputs]
    assert "TfBert>FusedBiasGeluGrad" not in [op.type for op in graph.get_operations()]


def test_saved_derivative_with_no_rows_gives_zero_dbias():
    x = tf.zeros([0, 5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        bias = tf.ones([5])
        tape.watch(bias)
        y = fused_gelu_saved(x, bias)
    np.testing.assert_array_equal(tape.gradient(y, bias).numpy(), np.zeros(5))
