"""Fused softmax cross-entropy: the masked-LM head's bias add, loss and argmax in one op.

    z = float32(logits) + bias
    loss = -log softmax(z)[label],  predicted = argmax(z)   (the lowest index among ties)

`fused_softmax_cross_entropy` reads the logits in their own dtype (bfloat16 or float16 under
mixed precision: no float32 copy of the [rows, classes] logits), computes in float32, and keeps
one float per row for the backward pass (log sum exp z) instead of TensorFlow's [rows, classes]
float32 probabilities. The gradient op recomputes the softmax from the logits, writes dlogits
in the logits' dtype (rounded once) and dbias as the float32 sum over the rows.
`softmax_cross_entropy_reference` is the same computation in plain TensorFlow (the test oracle
and the path without --fused_xent).
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops.loader import load_ops


def fused_softmax_cross_entropy(logits: tf.Tensor, bias: tf.Tensor | None, labels: tf.Tensor):
    """Per-row cross-entropy and argmax of logits + bias with the fused op.

    Args:
      logits: [..., C] float32, float16 or bfloat16 Tensor, before the bias.
      bias: float32 [C] Tensor, or None for no bias.
      labels: integer Tensor of logits' leading shape [...], each in [0, C).
    Returns: (loss float32 [...], predicted int32 [...]).
    """
    logits = tf.convert_to_tensor(logits)
    classes = tf.shape(logits)[-1]
    if bias is None:
        bias = tf.zeros([classes], tf.float32)
    leading = tf.shape(logits)[:-1]
    loss, _, predicted = load_ops().tf_bert_fused_softmax_cross_entropy(
        tf.reshape(logits, [-1, classes]), tf.cast(bias, tf.float32),
        tf.reshape(tf.cast(labels, tf.int32), [-1]))
    return tf.reshape(loss, leading), tf.reshape(predicted, leading)


@tf.RegisterGradient("TfBert>FusedSoftmaxCrossEntropy")
def _fused_softmax_cross_entropy_grad(op, dloss, unused_dlog_sum_exp, unused_dpredicted):
    """dlogits and dbias from the gradient op; none for the labels. log_sum_exp is kept for
    this op only, so its gradient is ignored."""
    logits, bias, labels = op.inputs
    dlogits, dbias = load_ops().tf_bert_fused_softmax_cross_entropy_grad(
        dloss, logits, bias, labels, op.outputs[1])
    return dlogits, dbias, None


def softmax_cross_entropy_reference(logits: tf.Tensor, bias: tf.Tensor | None,
                                    labels: tf.Tensor):
    """The same in plain TensorFlow: the logits cast to float32 plus the bias, then
    tf.nn.sparse_softmax_cross_entropy_with_logits and tf.argmax. Returns (loss, predicted)."""
    logits = tf.cast(logits, tf.float32)
    if bias is not None:
        logits += bias
    labels = tf.cast(labels, tf.int32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return loss, tf.argmax(logits, -1, output_type=tf.int32)
