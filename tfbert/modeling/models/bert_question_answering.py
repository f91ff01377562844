"""BERT for extractive question answering (SQuAD): start and end logits on every token."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_classifier import ClassifierHead
from tfbert.modeling.models.bert_task_model import BertTaskModel


class BertQuestionAnswering(BertTaskModel):
    """The encoder and a span head: two logits per token, for the answer's start and end.

    Args:
      config: model shape.
      dropout: dropout on the encoder outputs before the head.
      The rest: those of `BertTaskModel`.

    Features: input_ids, input_mask, segment_ids int32 [B, S]; start_position, end_position
    int32 [B] (0, the [CLS] token: no answer in this window).

    Variables: the encoder's and qa/{output_weights [2, D], output_bias [2]} (row 0 start,
    row 1 end).
    """

    head_prefixes = ("qa/",)
    metric_names = ("loss", "start_accuracy", "end_accuracy")

    def __init__(self, config: ModelConfig, dropout: float = 0.1, rng: DropoutRng | None = None,
                 **kwargs):
        super().__init__(config, rng=rng, **kwargs)
        self.span_head = ClassifierHead(2, config.hidden_size, config.initializer_range, dropout,
                                        rng, name="qa")

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False):
        """Returns (start_logits, end_logits): float32 [B, S], padding at -10000."""
        encoded = self.bert(features, training=training)
        logits = self.span_head(encoded["sequence_output"], training=training)  # (B, S, 2)
        # Padding is never an answer.
        padding = (1.0 - tf.cast(features["input_mask"], tf.float32)) * -10000.0
        return logits[..., 0] + padding, logits[..., 1] + padding

    def predict(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        start, end = self(features, training=False)
        return dict(start_logits=start, end_logits=end)

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """loss: the mean of the start and end cross-entropies; how often each is right."""
        start, end = self(features, training=training)
        figures = {}
        means = []
        for name, logits in (("start", start), ("end", end)):
            positions = tf.cast(tf.reshape(features[f"{name}_position"], [-1]), tf.int32)
            per_example, predicted = losses.softmax_cross_entropy(logits, positions,
                                                                  fused=self._ops.fused_xent)
            means.append(tf.reduce_mean(per_example))
            correct = tf.equal(predicted, positions)
            figures[f"{name}_accuracy"] = tf.reduce_mean(tf.cast(correct, tf.float32))
        return dict(loss=(means[0] + means[1]) / 2, **figures)
