"""Pretraining losses and metrics, all in float32."""

from __future__ import annotations

import tensorflow as tf


def _weighted_mean(values: tf.Tensor, label_weights: tf.Tensor) -> tf.Tensor:
    weights = tf.cast(label_weights, tf.float32)
    # The epsilon keeps a batch with no predictions finite, as google-research/bert does.
    return tf.reduce_sum(values * weights) / (tf.reduce_sum(weights) + 1e-5)


def masked_lm_loss(logits: tf.Tensor, label_ids: tf.Tensor, label_weights: tf.Tensor) -> tf.Tensor:
    """Weighted mean cross-entropy over the real (weight 1) predictions.

    Args:
      logits: float32 [B, P, V]. label_ids: int32 [B, P]. label_weights: float32 [B, P].
    """
    per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=label_ids, logits=logits)
    return _weighted_mean(per_token, label_weights)


def masked_lm_accuracy(logits, label_ids, label_weights) -> tf.Tensor:
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), label_ids), tf.float32)
    return _weighted_mean(correct, label_weights)


def next_sentence_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """logits: float32 [B, 2]; labels: int32 [B, 1] or [B]."""
    labels = tf.reshape(labels, [-1])
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def pretraining_losses(mlm_logits, nsp_logits, features,
                       vocab_shard=None) -> dict[str, tf.Tensor]:
    """The losses and accuracies of a pretraining batch.

    Args:
      mlm_logits: float32 [B, P, V], or this rank's columns [B, P, V / T] of them when
        `vocab_shard` (`tensor_parallel.VocabShard`) splits the vocabulary.
      nsp_logits: float32 [B, 2].
    """
    if vocab_shard is not None and vocab_shard.group.size > 1:
        per_token, correct = vocab_shard.cross_entropy(mlm_logits, features["masked_lm_ids"])
        mlm = _weighted_mean(per_token, features["masked_lm_weights"])
        mlm_accuracy = _weighted_mean(correct, features["masked_lm_weights"])
    else:
        mlm = masked_lm_loss(mlm_logits, features["masked_lm_ids"],
                             features["masked_lm_weights"])
        mlm_accuracy = masked_lm_accuracy(mlm_logits, features["masked_lm_ids"],
                                          features["masked_lm_weights"])
    nsp = next_sentence_loss(nsp_logits, features["next_sentence_labels"])
    nsp_labels = tf.reshape(features["next_sentence_labels"], [-1])
    nsp_acc = tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(nsp_logits, -1, output_type=tf.int32), nsp_labels), tf.float32))
    return dict(loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp,
                mlm_accuracy=mlm_accuracy, nsp_accuracy=nsp_acc)


def sequence_classification_losses(logits: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
    """Multi-task pretraining's sequence classification: cls_loss (mean cross-entropy) and
    cls_accuracy. logits: float32 [B, C]; labels: int32 [B, 1] or [B]."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                         logits=logits))
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
    return dict(cls_loss=loss, cls_accuracy=tf.reduce_mean(tf.cast(correct, tf.float32)))


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
