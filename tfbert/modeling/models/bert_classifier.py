"""BERT for sequence classification and regression: a linear head on the pooled [CLS] output."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.dropout import Dropout, DropoutRng
from tfbert.modeling.models.bert_task_model import BertTaskModel

# The pretraining NSP head has the classifier's layout ([2, D] weights, [2] bias): --reuse_head
# starts a 2-class classifier from it.
NSP_HEAD = {"classifier/output_weights": "cls/seq_relationship/output_weights",
            "classifier/output_bias": "cls/seq_relationship/output_bias"}


class ClassifierHead(tf.keras.layers.Layer):
    """Dropout, then logits = hidden @ output_weights^T + output_bias, in float32.

    Variables (google-research/bert's `run_classifier.py` layout, under "classifier/"):
      classifier/output_weights [C, D], classifier/output_bias [C].
    """

    def __init__(self, num_outputs: int, hidden_size: int, initializer_range: float,
                 dropout: float, rng: DropoutRng | None, **kwargs):
        super().__init__(**kwargs)
        self.num_outputs = num_outputs
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.dropout = Dropout(dropout, rng, name="dropout")

    def build(self, input_shape):
        self.output_weights = self.add_weight(
            "output_weights", shape=[self.num_outputs, self.hidden_size],
            initializer=tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range),
            experimental_autocast=False)
        self.output_bias = self.add_weight("output_bias", shape=[self.num_outputs],
                                           initializer="zeros", experimental_autocast=False)
        super().build(input_shape)

    def call(self, hidden, training=False):
        """hidden: [B, D] (pooled) or [B, S, D] (every token) in the compute dtype. Returns
        float32 [B, C] or [B, S, C]."""
        hidden = self.dropout(tf.cast(hidden, tf.float32), training=training)
        return tf.einsum("...d,cd->...c", hidden, self.output_weights) + self.output_bias

    def get_config(self):
        config = super().get_config()
        config.update(num_outputs=self.num_outputs, hidden_size=self.hidden_size,
                      initializer_range=self.initializer_range, dropout=self.dropout.rate)
        return config


class BertClassifier(BertTaskModel):
    """The encoder and a classification (or regression) head on its pooled output.

    Args:
      config: model shape.
      num_labels: classes; 1 makes it a regression on a float label (mean squared error).
      pooler_dropout: dropout on the pooled output before the head.
      reuse_head: `--init_checkpoint` initialises the head from the pretraining next-sentence
        head (2 classes only).
      The rest: those of `BertTaskModel`.

    Features: input_ids, input_mask, segment_ids int32 [B, S]; label int32 [B] (class id) or
    float32 [B] (regression target).
    """

    head_prefixes = ("classifier/",)

    def __init__(self, config: ModelConfig, num_labels: int, pooler_dropout: float = 0.1,
                 reuse_head: bool = False, rng: DropoutRng | None = None, **kwargs):
        super().__init__(config, rng=rng, **kwargs)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if reuse_head and num_labels != 2:
            raise ValueError(f"reuse_head: the next-sentence head has 2 classes, not {num_labels}")
        self.init_sources = dict(NSP_HEAD) if reuse_head else {}
        self.num_labels = num_labels
        self.is_regression = num_labels == 1
        self.metric_names = ("loss",) if self.is_regression else ("loss", "accuracy")
        self.classifier = ClassifierHead(num_labels, config.hidden_size, config.initializer_range,
                                         pooler_dropout, rng, name="classifier")

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Returns float32 logits [B, C] (regression: [B, 1])."""
        encoded = self.bert(features, training=training)
        return self.classifier(encoded["pooled_output"], training=training)

    def predict(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Inference outputs per example: "logits" float32 [B, C], or "score" float32 [B]."""
        logits = self(features, training=False)
        if self.is_regression:
            return dict(score=logits[:, 0])
        return dict(logits=logits)

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """Classification: loss (mean cross-entropy) and accuracy; regression: loss (mean
        squared error). Float32 scalars."""
        logits = self(features, training=training)
        if self.is_regression:
            error = logits[:, 0] - tf.cast(features["label"], tf.float32)
            return dict(loss=tf.reduce_mean(tf.square(error)))
        labels = tf.cast(features["label"], tf.int32)
        per_example, predicted = losses.softmax_cross_entropy(logits, labels,
                                                              fused=self._ops.fused_xent)
        loss = tf.reduce_mean(per_example)
        correct = tf.equal(predicted, labels)
        return dict(loss=loss, accuracy=tf.reduce_mean(tf.cast(correct, tf.float32)))
