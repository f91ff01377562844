"""BERT for token classification (NER): a linear head on every token's encoder output."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_classifier import ClassifierHead
from tfbert.modeling.models.bert_task_model import BertTaskModel


class BertTokenClassifier(BertTaskModel):
    """The encoder and a tag classifier on each token.

    Args:
      config: model shape.
      num_labels: tags.
      dropout: dropout on the encoder outputs before the head.
      The rest: those of `BertTaskModel`.

    Features: input_ids, input_mask, segment_ids int32 [B, S]; label int32 [B, S], the tag of
    each word's first sub-token and -1 where there is none (other sub-tokens, [CLS], [SEP],
    padding), which the loss skips.

    Variables: the encoder's and classifier/{output_weights [C, D], output_bias [C]}.
    """

    head_prefixes = ("classifier/",)
    metric_names = ("loss", "accuracy")

    def __init__(self, config: ModelConfig, num_labels: int, dropout: float = 0.1,
                 rng: DropoutRng | None = None, **kwargs):
        super().__init__(config, rng=rng, **kwargs)
        self.num_labels = num_labels
        self.classifier = ClassifierHead(num_labels, config.hidden_size, config.initializer_range,
                                         dropout, rng, name="classifier")

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Returns float32 logits [B, S, C]."""
        encoded = self.bert(features, training=training)
        return self.classifier(encoded["sequence_output"], training=training)

    def predict(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return dict(logits=self(features, training=False))

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """loss: mean cross-entropy over the labelled tokens; accuracy over them."""
        logits = self(features, training=training)  # (B, S, C)
        labels = tf.cast(features["label"], tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)
        per_token, predicted = losses.softmax_cross_entropy(
            logits, tf.maximum(labels, 0), fused=self._ops.fused_xent)  # (B, S) each
        count = tf.maximum(tf.reduce_sum(labelled), 1.0)
        correct = tf.cast(tf.equal(predicted, labels), tf.float32)
        return dict(loss=tf.reduce_sum(per_token * labelled) / count,
                    accuracy=tf.reduce_sum(correct * labelled) / count)
