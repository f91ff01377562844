"""Pretraining losses and metrics, all in float32."""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops import softmax_xent_ops


def _weighted_mean(values: tf.Tensor, label_weights: tf.Tensor) -> tf.Tensor:
    weights = tf.cast(label_weights, tf.float32)
    # The epsilon keeps a batch with no predictions finite, as google-research/bert does.
    return tf.reduce_sum(values * weights) / (tf.reduce_sum(weights) + 1e-5)


def softmax_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, bias: tf.Tensor | None = None,
                          fused: bool = False):
    """Per-example softmax cross-entropy of logits (+ bias) against integer labels, and the
    argmax (what the accuracies compare with the labels).

    Args:
      logits: [..., C]: float32, or the compute dtype when a float32 `bias` [C] follows (the
        sum is then taken in float32). labels: integer [...].
      fused: one TfBert>FusedSoftmaxCrossEntropy op (--fused_xent) instead of TensorFlow's
        cross-entropy and argmax, each reading the float32 logits.
    Returns: (loss float32 [...], predicted int32 [...]).
    """
    if fused:
        return softmax_xent_ops.fused_softmax_cross_entropy(logits, bias, labels)
    return softmax_xent_ops.softmax_cross_entropy_reference(logits, bias, labels)


def masked_lm_figures(logits: tf.Tensor, label_ids: tf.Tensor, label_weights: tf.Tensor,
                      bias: tf.Tensor | None = None, fused: bool = False):
    """(mlm_loss, mlm_accuracy): the weighted mean cross-entropy and accuracy over the real
    (weight 1) predictions.

    Args:
      logits: float32 [B, P, V], or the compute dtype before a float32 `bias` [V].
      label_ids: int32 [B, P]. label_weights: float32 [B, P].
      fused: see `softmax_cross_entropy`.
    """
    per_token, predicted = softmax_cross_entropy(logits, label_ids, bias, fused)
    correct = tf.cast(tf.equal(predicted, label_ids), tf.float32)
    return _weighted_mean(per_token, label_weights), _weighted_mean(correct, label_weights)


def masked_lm_accuracy(logits, label_ids, label_weights) -> tf.Tensor:
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), label_ids), tf.float32)
    return _weighted_mean(correct, label_weights)


def _mean_loss_and_accuracy(logits, labels, fused: bool):
    """The mean cross-entropy and accuracy of [B, C] logits against labels [B] or [B, 1]."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    per_example, predicted = softmax_cross_entropy(logits, labels, fused=fused)
    correct = tf.cast(tf.equal(predicted, labels), tf.float32)
    return tf.reduce_mean(per_example), tf.reduce_mean(correct)


def pretraining_losses(mlm_logits, nsp_logits, features, vocab_shard=None, mlm_bias=None,
                       fused_xent: bool = False) -> dict[str, tf.Tensor]:
    """The losses and accuracies of a pretraining batch.

    Args:
      mlm_logits: float32 [B, P, V], or this rank's columns [B, P, V / T] of them when
        `vocab_shard` (`tensor_parallel.VocabShard`) splits the vocabulary; or, with
        `mlm_bias` (float32 [V]), the logits before that bias in the compute dtype.
      nsp_logits: float32 [B, 2].
      fused_xent: see `softmax_cross_entropy`.
    """
    if vocab_shard is not None and vocab_shard.group.size > 1:
        per_token, correct = vocab_shard.cross_entropy(mlm_logits, features["masked_lm_ids"])
        mlm = _weighted_mean(per_token, features["masked_lm_weights"])
        mlm_accuracy = _weighted_mean(correct, features["masked_lm_weights"])
    else:
        mlm, mlm_accuracy = masked_lm_figures(mlm_logits, features["masked_lm_ids"],
                                              features["masked_lm_weights"], mlm_bias, fused_xent)
    nsp, nsp_accuracy = _mean_loss_and_accuracy(nsp_logits, features["next_sentence_labels"],
                                                fused_xent)
    return dict(loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp,
                mlm_accuracy=mlm_accuracy, nsp_accuracy=nsp_accuracy)


def sequence_classification_losses(logits: tf.Tensor, labels: tf.Tensor,
                                   fused_xent: bool = False) -> dict[str, tf.Tensor]:
    """Multi-task pretraining's sequence classification: cls_loss (mean cross-entropy) and
    cls_accuracy. logits: float32 [B, C]; labels: int32 [B, 1] or [B]."""
    loss, accuracy = _mean_loss_and_accuracy(logits, labels, fused_xent)
    return dict(cls_loss=loss, cls_accuracy=accuracy)


# Distillation (tfbert.modeling.models.bert_distiller). Shape legend: B batch, S sequence, P
# predictions, V vocabulary, D hidden size, N heads.

def distillation_kl_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                         label_weights: tf.Tensor, temperature: float) -> tf.Tensor:
    """KL(teacher || student) of the MLM distributions softened by `temperature`, times T^2
    (so that its gradients keep their size as T changes, as in Hinton et al. and DistilBERT),
    averaged over the real predictions.

    Args:
      teacher_logits, student_logits: float32 [B, P, V].
      label_weights: float32 [B, P], 1 for real predictions and 0 for padding.
    """
    teacher_log_probs = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)  # (B, P, V)
    student_log_probs = tf.nn.log_softmax(student_logits / temperature, axis=-1)  # (B, P, V)
    per_token = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs),
                              axis=-1)  # (B, P)
    return temperature ** 2 * _weighted_mean(per_token, label_weights)


def hidden_cosine_loss(student_states, teacher_states, input_mask: tf.Tensor) -> tf.Tensor:
    """1 - cos(student, teacher) per token, averaged over the real tokens and the layers.

    Args:
      student_states, teacher_states: equally long lists of float32 [B, S, D] (the student's
        already projected to the teacher's width).
      input_mask: int32 [B, S], 1 for real tokens.
    """
    losses = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        cosine = tf.reduce_sum(tf.math.l2_normalize(student, -1)
                               * tf.math.l2_normalize(teacher, -1), axis=-1)  # (B, S)
        losses.append(_weighted_mean(1.0 - cosine, input_mask))
    return tf.add_n(losses) / len(losses)


def attention_mse(student_probs, teacher_probs, input_mask: tf.Tensor,
                  average_heads: bool = False) -> tf.Tensor:
    """The mean squared error between attention maps over the real (query, key) pairs and the
    heads, averaged over the layers. Padded queries and keys are left out: their rows and
    columns say nothing the student should learn.

    Args:
      student_probs, teacher_probs: equally long lists of float32 [B, N, S, S]; with
        `average_heads` each side's heads are averaged first (their counts may then differ).
      input_mask: int32 [B, S].
    """
    mask = tf.cast(input_mask, tf.float32)
    pairs = mask[:, tf.newaxis, :, tf.newaxis] * mask[:, tf.newaxis, tf.newaxis, :]  # (B, 1, S, S)
    losses = []
    for student, teacher in zip(student_probs, teacher_probs, strict=True):
        if average_heads:
            student = tf.reduce_mean(student, axis=1, keepdims=True)  # (B, 1, S, S)
            teacher = tf.reduce_mean(teacher, axis=1, keepdims=True)  # (B, 1, S, S)
        heads = tf.cast(tf.shape(student)[1], tf.float32)
        squared = tf.square(student - teacher) * pairs  # (B, N, S, S)
        losses.append(tf.reduce_sum(squared) / (heads * tf.reduce_sum(pairs) + 1e-5))
    return tf.add_n(losses) / len(losses)
