"""BERT with its pretraining heads: masked LM (tied to the word embeddings) and next sentence."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import FusedOpsConfig, ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.activations import get_activation
from tfbert.modeling.layers.dense import DenseFactory, make_dense_factory
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.layers.layer_norm import LayerNorm
from tfbert.modeling.networks.bert_encoder import BertEncoder


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
    cls/seq_relationship/output_weights [2, D], cls/seq_relationship/output_bias [2].
    """

    def __init__(self, config: ModelConfig, word_embeddings: tf.Variable,
                 dense_factory: DenseFactory, fused_layer_norm: bool = False,
                 layer_norm_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.config = config
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
        with tf.name_scope("seq_relationship"):
            self.nsp_weights = self.add_weight(
                "output_weights", shape=[2, self.config.hidden_size], experimental_autocast=False,
                initializer=tf.keras.initializers.TruncatedNormal(
                    stddev=self.config.initializer_range))
            self.nsp_bias = self.add_weight("output_bias", shape=[2], initializer="zeros",
                                            experimental_autocast=False)
        super().build(input_shape)

    def call(self, masked_sequence, pooled):
        """
        Args:
          masked_sequence: [B, P, D] encoder outputs at the masked positions.
          pooled: [B, D] pooled [CLS] output.
        Returns: (mlm_logits float32 [B, P, V / T], this rank's vocabulary columns,
          nsp_logits float32 [B, 2]).
        """
        with tf.name_scope("predictions/transform"):
            x = self.transform_layer_norm(self.transform_activation(self.transform(masked_sequence)))
        x = self._factory.enter_parallel(x)  # (B, P, D)
        table = tf.cast(self._word_embeddings, x.dtype)  # (V / T, D)
        mlm_logits = tf.einsum("bpd,vd->bpv", x, table)  # (B, P, V / T)
        # Logits and the losses in float32: a float16 log-softmax over a large vocabulary is lossy.
        mlm_logits = tf.cast(mlm_logits, tf.float32) + self.mlm_bias
        nsp_logits = tf.einsum("bd,cd->bc", tf.cast(pooled, tf.float32), self.nsp_weights)
        return mlm_logits, nsp_logits + self.nsp_bias


class BertPretrainer(tf.Module):
    """The encoder ("bert/...") and the pretraining heads ("cls/...").

    A `tf.Module` rather than a Keras model so that its variables keep google-research/bert's
    names with no extra prefix: every name is documented in `BertEncoder` and `PretrainingHeads`
    and is stable across versions (checkpoint import/export relies on it).

    Args:
      config: model shape.
      rng: DropoutRng (None when all dropouts are 0).
      precision: "fp32", "fp16" or "bf16" (mixed precision: float32 variables).
      dense_factory_cls: the factory class for every projection; None lets `make_dense_factory`
        choose (split over `tensor_group` when it has more than one rank).
      ops: which computations use the fused custom ops.
      one_hot_token_types: token-type lookup by one-hot matmul, whose gradient is dense (see
        `Embeddings`); False looks it up with a gather, whose gradient is sparse.
      tensor_group: the tensor-parallel process group (None: the model is whole on this rank).
      attention_rng: DropoutRng of the attention-probability masks; None uses `rng`.
    """

    POLICIES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}

    def __init__(self, config: ModelConfig, rng: DropoutRng | None = None, precision: str = "fp32",
                 dense_factory_cls=None, ops: FusedOpsConfig = FusedOpsConfig(),
                 one_hot_token_types: bool = True, tensor_group=None,
                 attention_rng: DropoutRng | None = None):
        super().__init__(name=None)
        self.config = config
        policy = tf.keras.mixed_precision.Policy(self.POLICIES[precision])
        if dense_factory_cls is None:
            factory = make_dense_factory(config.initializer_range, policy, tensor_group)
        else:
            factory = dense_factory_cls(config.initializer_range, dtype=policy)
        self.bert = BertEncoder(config, rng=rng, dense_factory=factory, dtype=policy, name="bert",
                                ops=ops, one_hot_token_types=one_hot_token_types,
                                attention_rng=attention_rng)
        self._ops = ops
        self.tensor_group = tensor_group
        self._built = False
        self._factory = factory
        self._policy = policy

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
        self(dict(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=ids,
                  masked_lm_positions=tf.zeros([1, num_predictions], tf.int32)))
        self._built = True

    @property
    def word_embeddings(self) -> tf.Variable:
        return self.bert.embeddings.word_embeddings

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False):
        """
        Args:
          features: input_ids, input_mask, segment_ids int32 [B, S]; masked_lm_positions int32 [B, P].
        Returns: (mlm_logits float32 [B, P, V / T] (this rank's vocabulary columns under tensor
          parallelism), nsp_logits float32 [B, 2]).
        """
        encoded = self.bert(features, training=training)
        masked = gather_positions(encoded["sequence_output"],
                                  features["masked_lm_positions"])  # (B, P, D)
        return self.cls(masked, encoded["pooled_output"])

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """Returns a dict of float32 scalars: loss (= mlm_loss + nsp_loss), mlm_loss, nsp_loss,
        mlm_accuracy, nsp_accuracy."""
        mlm_logits, nsp_logits = self(features, training=training)
        return losses.pretraining_losses(mlm_logits, nsp_logits, features,
                                         vocab_shard=self.cls.vocab_shard)

    def part_of_whole(self, name: str, whole):
        """This rank's part of the whole value (numpy) of variable `name`: the value itself
        unless tensor parallelism splits that variable."""
        from tfbert.modeling.tensor_parallel import part_of_whole

        if self.tensor_group is None or self.tensor_group.size == 1:
            return whole
        return part_of_whole(name, whole, self.tensor_group, self.config.hidden_act == "geglu")

    def whole_shapes(self) -> dict[str, tuple]:
        """{documented name: the shape of the whole variable} (under tensor parallelism, the
        shape before the split)."""
        from tfbert.modeling.tensor_parallel import split_of

        shapes = {}
        parts = 1 if self.tensor_group is None else self.tensor_group.size
        for name, variable in self.variables_by_name().items():
            shape = list(variable.shape)
            split = split_of(name, self.config.hidden_act == "geglu") if parts > 1 else None
            if split is not None:
                shape[split.axis] *= parts
            shapes[name] = tuple(shape)
        return shapes

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """{"bert/embeddings/word_embeddings": variable, ...}: the documented names."""
        names = {v.name.split(":")[0]: v for v in self.variables}
        if len(names) != len(self.variables):
            raise ValueError("two model variables share a name; checkpoints key them by name")
        return names
