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
