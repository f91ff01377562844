"""Fused bias + GELU and bias + GeGLU: the custom ops (custom_ops/cc/ops/gelu_ops.cc) and their
TF references.

    fused_bias_gelu:  y = gelu(x + bias)                                 x [..., N] -> y [..., N]
    fused_bias_geglu: y = gelu(gate + bias_g) * (value + bias_v)         x [..., 2M] -> y [..., M]
                      with [gate | value] = x and [bias_g | bias_v] = bias along the last axis.

Both paths compute in float32 and cast y back to x's dtype. The fused gradient recomputes
x + bias from x and bias instead of keeping the pre-activation alive from the forward pass (the
memory the fusion saves), and sums dbias over the rows in float32, deterministically.
`approximate=True` is the tanh form of GELU, as in `tf.nn.gelu`.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops import loader


def _bias_in_dtype(bias, dtype) -> tf.Tensor:
    # Under Keras mixed precision the bias variable is autocast to the compute dtype before the
    # layer uses it; a float32 bias handed in directly is cast here (its gradient is then cast
    # back to float32 by tf.cast's own gradient).
    return tf.cast(bias, dtype)


def fused_bias_gelu(x, bias, approximate: bool = False, save_derivative: bool = False) -> tf.Tensor:
    """gelu(x + bias) with the fused op (C++ on CPU, CUDA when built).

    Args:
      x: float32, float16 or bfloat16 Tensor of shape [..., N].
      bias: Tensor of shape [N] (cast to x's dtype).
      approximate: use the tanh approximation of GELU instead of the exact erf form.
      save_derivative: the forward op also writes gelu'(x + bias) in x's dtype, kept for the
        backward pass instead of x, which then multiplies instead of recomputing erf and exp
        (TfBert>FusedBiasGeluSave). The same memory, one more write forward, far less
        arithmetic backward; in float32 the gradients are bit-identical to the recomputing op's.

    Returns:
      A Tensor of x's shape and dtype.

    Raises:
      loader.OpsNotBuiltError: the op library is not built; use `bias_gelu_reference` instead.
    """
    ops = loader.load_ops()
    x = tf.convert_to_tensor(x)
    if save_derivative:
        y, _ = ops.tf_bert_fused_bias_gelu_save(x, _bias_in_dtype(bias, x.dtype),
                                                approximate=bool(approximate))
        return y
    return ops.tf_bert_fused_bias_gelu(x, _bias_in_dtype(bias, x.dtype),
                                       approximate=bool(approximate))


def fused_bias_geglu(x, bias, approximate: bool = False) -> tf.Tensor:
    """gelu(gate + bias_gate) * (value + bias_value) with the fused op.

    Args:
      x: float32, float16 or bfloat16 Tensor of shape [..., 2M]: the gate in [..., :M], the value
        in [..., M:].
      bias: Tensor of shape [2M] (cast to x's dtype), split the same way.
      approximate: use the tanh approximation of GELU instead of the exact erf form.

    Returns:
      A Tensor of shape [..., M] in x's dtype.

    Raises:
      ValueError: x's last dimension is known and odd.
      loader.OpsNotBuiltError: the op library is not built; use `bias_geglu_reference` instead.
    """
    ops = loader.load_ops()
    x = tf.convert_to_tensor(x)
    last = x.shape[-1] if x.shape.rank else None
    if last is not None and last % 2:
        raise ValueError(f"fused_bias_geglu: x's last dimension holds [gate, value] halves and "
                         f"must be even, got shape {x.shape}")
    return ops.tf_bert_fused_bias_geglu(x, _bias_in_dtype(bias, x.dtype),
                                        approximate=bool(approximate))


@tf.RegisterGradient("TfBert>FusedBiasGelu")
def _fused_bias_gelu_grad(op, dy):
    """dx and dbias from the backward op, which recomputes x + bias from the op's inputs."""
    x, bias = op.inputs
    dx, dbias = loader.load_ops().tf_bert_fused_bias_gelu_grad(
        dy, x, bias, approximate=op.get_attr("approximate"))
    return [dx, dbias]


@tf.RegisterGradient("TfBert>FusedBiasGeluSave")
def _fused_bias_gelu_save_grad(op, dy, unused_dderivative):
    """dx = dy * the saved derivative and dbias, its column sum; x is not needed (nor kept)."""
    dx, dbias = loader.load_ops().tf_bert_fused_bias_gelu_grad_from_derivative(dy, op.outputs[1])
    return [dx, dbias]


@tf.RegisterGradient("TfBert>FusedBiasGeglu")
def _fused_bias_geglu_grad(op, dy):
    """dx [..., 2M] and dbias [2M] from the backward op."""
    x, bias = op.inputs
    dx, dbias = loader.load_ops().tf_bert_fused_bias_geglu_grad(
        dy, x, bias, approximate=op.get_attr("approximate"))
    return [dx, dbias]


def bias_gelu_reference(x, bias, approximate: bool = False) -> tf.Tensor:
    """gelu(x + bias) in plain TensorFlow (float32, cast back): the fallback and the test oracle.

    Args:
      x: floating Tensor of shape [..., N].
      bias: Tensor of shape [N].
      approximate: use the tanh approximation of GELU.

    Returns:
      A Tensor of x's shape and dtype.
    """
    x = tf.convert_to_tensor(x)
    # float32 math whatever x's dtype, as in the fused op (and its float32 dbias sum).
    pre_activation = tf.cast(x, tf.float32) + tf.cast(bias, tf.float32)  # [..., N]
    return tf.cast(tf.nn.gelu(pre_activation, approximate=approximate), x.dtype)


def bias_geglu_reference(x, bias, approximate: bool = False) -> tf.Tensor:
    """GeGLU with its bias in plain TensorFlow: the fallback and the test oracle.

    Args:
      x: floating Tensor of shape [..., 2M], [gate | value] along the last axis.
      bias: Tensor of shape [2M].
      approximate: use the tanh approximation of GELU.

    Returns:
      A Tensor of shape [..., M] in x's dtype.
    """
    x = tf.convert_to_tensor(x)
    pre_activation = tf.cast(x, tf.float32) + tf.cast(bias, tf.float32)  # [..., 2M]
    gate, value = tf.split(pre_activation, 2, axis=-1)  # [..., M] each
    return tf.cast(tf.nn.gelu(gate, approximate=approximate) * value, x.dtype)
