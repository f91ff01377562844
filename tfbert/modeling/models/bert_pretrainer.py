"""BERT with its pretraining heads: masked LM (tied to the word embeddings) and next sentence."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.activations import get_activation
from tfbert.modeling.layers.dense import DenseFactory
from tfbert.modeling.layers.layer_norm import LayerNorm
from tfbert.modeling.models.bert_task_model import BertTaskModel


def gather_positions(sequence: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """sequence: [B, S, D]; positions: int32 [B, P]. Returns [B, P, D]."""
    return tf.gather(sequence, positions, batch_dims=1)


class PretrainingHeads(tf.keras.layers.Layer):
    """The masked-LM and next-sentence heads, named "cls" as in google-research/bert.

    The MLM output projection is the transposed word-embedding table (tied weights) plus a bias.
    Gathering the masked positions before the head means the vocabulary-sized logits are
    computed for P predictions per sequence, not all S positions. Under tensor parallelism the
    table and the bias hold this rank's rows of the vocabulary (`vocab_shard`), and so do the
    logits: the losses are computed from the split logits (`VocabShard.cross_entropy`).

    Variables: cls/predictions/transform/{dense,LayerNorm}/*, cls/predictions/output_bias [V],
    cls/seq_relationship/output_weights [2, D], cls/seq_relationship/output_bias [2] (the last
    two only with `next_sentence`).
    """

    def __init__(self, config: ModelConfig, word_embeddings: tf.Variable,
                 dense_factory: DenseFactory, fused_layer_norm: bool = False,
                 layer_norm_dtype: str = "float32", next_sentence: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.next_sentence = next_sentence
        self._word_embeddings = word_embeddings
        self._factory = dense_factory
        self.vocab_shard = dense_factory.vocab_shard(config.vocab_size)
        # The transform's activation is the plain (non-gated) one for a gated FFN activation.
        act = "gelu" if config.hidden_act == "geglu" else config.hidden_act
        self.transform_activation = get_activation(act)
        self.transform = dense_factory.dense(config.hidden_size, name="dense")
        self.transform_layer_norm = LayerNorm(config.layer_norm_eps, stats_dtype=layer_norm_dtype,
                                              fused=fused_layer_norm, name="LayerNorm",
                                              dtype=self.dtype_policy)

    def build(self, input_shape):
        with tf.name_scope("predictions"):
            self.mlm_bias = self.add_weight("output_bias", shape=[self.vocab_shard.rows],
                                            initializer="zeros", experimental_autocast=False)
        if not self.next_sentence:
            super().build(input_shape)
            return
        with tf.name_scope("seq_relationship"):
            self.nsp_weights = self.add_weight(
                "output_weights", shape=[2, self.config.hidden_size], experimental_autocast=False,
                initializer=tf.keras.initializers.TruncatedNormal(
                    stddev=self.config.initializer_range))
            self.nsp_bias = self.add_weight("output_bias", shape=[2], initializer="zeros",
                                            experimental_autocast=False)
        super().build(input_shape)

    def call(self, masked_sequence, pooled, add_mlm_bias: bool = True):
        """
        Args:
          masked_sequence: [B, P, D] encoder outputs at the masked positions.
          pooled: [B, D] pooled [CLS] output.
          add_mlm_bias: False leaves the MLM logits before `mlm_bias`, in the compute dtype,
            for a loss that adds the bias itself (--fused_xent).
        Returns: (mlm_logits float32 [B, P, V / T], this rank's vocabulary columns,
          nsp_logits float32 [B, 2], or None without `next_sentence`).
        """
        with tf.name_scope("predictions/transform"):
            x = self.transform_layer_norm(self.transform_activation(self.transform(masked_sequence)))
        x = self._factory.enter_parallel(x)  # (B, P, D)
        table = tf.cast(self._word_embeddings, x.dtype)  # (V / T, D)
        # A 2-D matmul, not an einsum: see SelfAttention (bfloat16 Einsum is slow on CPUs).
        batch, predictions = tf.shape(x)[0], tf.shape(x)[1]
        mlm_logits = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), table,
                               transpose_b=True)  # (B * P, V / T)
        mlm_logits = tf.reshape(mlm_logits, [batch, predictions, table.shape[0]])  # (B, P, V / T)
        if add_mlm_bias:
            # Logits and the losses in float32: a float16 log-softmax over a large vocabulary is
            # lossy.
            mlm_logits = tf.cast(mlm_logits, tf.float32) + self.mlm_bias
        if not self.next_sentence:
            return mlm_logits, None
        nsp_logits = tf.einsum("bd,cd->bc", tf.cast(pooled, tf.float32), self.nsp_weights)
        return mlm_logits, nsp_logits + self.nsp_bias


class SequenceHeads(tf.keras.layers.Layer):
    """Multi-task pretraining's extra heads on the pooled output, in float32: a sequence
    classifier and a regression to a teacher's score.

    Variables: cls/sequence_classification/{output_weights [C, D], output_bias [C]} and
    cls/teacher_score/{output_weights [1, D], output_bias [1]}, each only when asked for.
    """

    def __init__(self, hidden_size: int, initializer_range: float, num_cls_labels: int = 0,
                 teacher_score: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.num_cls_labels = num_cls_labels
        self.teacher_score = teacher_score

    def _head(self, scope: str, outputs: int):
        with tf.name_scope(scope):
            weights = self.add_weight(
                "output_weights", shape=[outputs, self.hidden_size], experimental_autocast=False,
                initializer=tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range))
            bias = self.add_weight("output_bias", shape=[outputs], initializer="zeros",
                                   experimental_autocast=False)
        return weights, bias

    def build(self, input_shape):
        if self.num_cls_labels:
            self.cls_weights, self.cls_bias = self._head("sequence_classification",
                                                         self.num_cls_labels)
        if self.teacher_score:
            self.score_weights, self.score_bias = self._head("teacher_score", 1)
        super().build(input_shape)

    def call(self, pooled):
        """pooled: [B, D]. Returns {"cls_logits": [B, C], "teacher_score": [B]} (those asked
        for), float32."""
        pooled = tf.cast(pooled, tf.float32)
        outputs = {}
        if self.num_cls_labels:
            outputs["cls_logits"] = tf.einsum("bd,cd->bc", pooled, self.cls_weights) + self.cls_bias
        if self.teacher_score:
            outputs["teacher_score"] = (tf.einsum("bd,cd->bc", pooled, self.score_weights)
                                        + self.score_bias)[:, 0]
        return outputs


class BertPretrainer(BertTaskModel):
    """The encoder ("bert/...") and the pretraining heads ("cls/...").

    Args:
      config: model shape.
      cls_loss_weight, num_cls_labels: multi-task pretraining: the weight of a sequence
        classification loss over `num_cls_labels` classes of the feature "cls_label" (0: none).
      distil_loss_weight: the weight of the mean squared error to the feature "teacher_score"
        (0: none).
      The rest: those of `BertTaskModel`.
    """

    head_prefixes = ("cls/",)
    masked_token_metrics = ("mlm_loss", "mlm_accuracy")

    def __init__(self, config: ModelConfig, *args, cls_loss_weight: float = 0.0,
                 num_cls_labels: int = 2, distil_loss_weight: float = 0.0, **kwargs):
        super().__init__(config, *args, **kwargs)
        # What each figure adds to the loss.
        self.loss_weights = dict(mlm_loss=1.0, nsp_loss=1.0)
        self.metric_names = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
        if cls_loss_weight:
            self.loss_weights["cls_loss"] = cls_loss_weight
            self.metric_names += ("cls_loss", "cls_accuracy")
        if distil_loss_weight:
            self.loss_weights["distil_mse"] = distil_loss_weight
            self.metric_names += ("distil_mse",)
        self._num_cls_labels = num_cls_labels if cls_loss_weight else 0
        self._teacher_score = bool(distil_loss_weight)

    def build(self, seq_length: int = 8, num_predictions: int = 2) -> None:
        """Creates every variable eagerly (so names and shapes exist before any tf.function)."""
        if self._built:
            return
        ids = tf.zeros([1, seq_length], tf.int32)
        self.bert(dict(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=ids))
        self.cls = PretrainingHeads(self.config, self.bert.embeddings.word_embeddings,
                                    self._factory, fused_layer_norm=self._ops.ln_ytf_impl,
                                    layer_norm_dtype=self._ops.ln_dtype, name="cls",
                                    dtype=self._policy)
        self.sequence_heads = None
        if self._num_cls_labels or self._teacher_score:
            # Named "cls" too: its weights are cls/sequence_classification/... .
            self.sequence_heads = SequenceHeads(
                self.config.hidden_size, self.config.initializer_range, self._num_cls_labels,
                self._teacher_score, name="cls")
        self(dict(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=ids,
                  masked_lm_positions=tf.zeros([1, num_predictions], tf.int32)))
        self._built = True

    def build_from_example(self, features: dict[str, tf.Tensor]) -> None:
        self.build(int(features["input_ids"].shape[1]),
                   int(features["masked_lm_positions"].shape[1]))

    def flops_per_example(self, seq_length: int, num_predictions: int = 0) -> int:
        from tfbert.training.flops import model_flops_per_example

        return model_flops_per_example(self.config, seq_length, num_predictions)

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False):
        """
        Args:
          features: input_ids, input_mask, segment_ids int32 [B, S]; masked_lm_positions int32 [B, P].
        Returns: (mlm_logits float32 [B, P, V / T] (this rank's vocabulary columns under tensor
          parallelism), nsp_logits float32 [B, 2]).
        """
        return self._outputs(features, training)[:2]

    def _outputs(self, features, training, add_mlm_bias=True):
        """(mlm_logits, nsp_logits, the sequence heads' outputs)."""
        encoded = self.bert(features, training=training)
        masked = gather_positions(encoded["sequence_output"],
                                  features["masked_lm_positions"])  # (B, P, D)
        mlm_logits, nsp_logits = self.cls(masked, encoded["pooled_output"],
                                          add_mlm_bias=add_mlm_bias)
        extra = (self.sequence_heads(encoded["pooled_output"])
                 if self.sequence_heads is not None else {})
        return mlm_logits, nsp_logits, extra

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """Returns a dict of float32 scalars: mlm_loss, nsp_loss, mlm_accuracy, nsp_accuracy
        (and cls_loss, cls_accuracy, distil_mse in multi-task pretraining) and loss, their
        weighted sum (`loss_weights`)."""
        # --fused_xent: the MLM bias is added inside the loss op, to the logits in the compute
        # dtype, instead of to a float32 copy of them.
        fused = self._ops.fused_xent
        mlm_logits, nsp_logits, extra = self._outputs(features, training, add_mlm_bias=not fused)
        figures = losses.pretraining_losses(mlm_logits, nsp_logits, features,
                                            vocab_shard=self.cls.vocab_shard,
                                            mlm_bias=self.cls.mlm_bias if fused else None,
                                            fused_xent=fused)
        if "cls_logits" in extra:
            figures.update(losses.sequence_classification_losses(
                extra["cls_logits"], features["cls_label"], fused_xent=fused))
        if "teacher_score" in extra:
            error = extra["teacher_score"] - tf.reshape(features["teacher_score"], [-1])
            figures["distil_mse"] = tf.reduce_mean(tf.square(error))
        figures["loss"] = tf.add_n([weight * figures[name]
                                    for name, weight in self.loss_weights.items()])
        return figures
