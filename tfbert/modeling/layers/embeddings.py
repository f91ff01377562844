"""Word, position and token-type embeddings, summed and normalised."""

from __future__ import annotations

import tensorflow as tf

from tfbert.modeling.layers.dropout import Dropout, DropoutRng
from tfbert.modeling.layers.layer_norm import LayerNorm


class Embeddings(tf.keras.layers.Layer):
    """Args:
      vocab_size, hidden_size, max_position_embeddings, type_vocab_size: table sizes.
      initializer_range: stddev of the truncated-normal initializer.
      dropout: dropout rate after the LayerNorm.
      layer_norm_eps: LayerNorm epsilon.
      layer_norm_dtype: dtype of the LayerNorm statistics.
      fused_layer_norm: use the fused LayerNorm op.
      rng: DropoutRng.
      one_hot_token_types: look the token-type table up with a one-hot matmul, as
        google-research/bert does. Its gradient is then a dense [T, D] table, which crosses
        ranks in the gradients' all-reduce. A gather's gradient is sparse: one row of D per
        token (B*S rows, 64 MiB at batch 32 x 512 x 1024 in float32), which Horovod all-gathers
        from every rank unless it is densified (--sparse_as_dense).
      vocab_shard: the rows of the word table this rank holds (`tensor_parallel.VocabShard`);
        None holds them all.

    Variables (google-research/bert names): word_embeddings [V, D], token_type_embeddings [T, D],
    position_embeddings [P, D], LayerNorm/{gamma,beta}.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int,
                 type_vocab_size: int, initializer_range: float, dropout: float = 0.0,
                 layer_norm_eps: float = 1e-12, rng: DropoutRng | None = None,
                 fused_layer_norm: bool = False, layer_norm_dtype: str = "float32",
                 fused_dropout: bool = False,
                 one_hot_token_types: bool = True, vocab_shard=None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_shard = vocab_shard
        self.one_hot_token_types = one_hot_token_types
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.dropout_rate = dropout
        self.layer_norm = LayerNorm(layer_norm_eps, stats_dtype=layer_norm_dtype,
                                    fused=fused_layer_norm, name="LayerNorm",
                                    dtype=self.dtype_policy)
        self.dropout = Dropout(dropout, rng, fused=fused_dropout, name="dropout",
                               dtype=self.dtype_policy)

    def build(self, input_shape):
        def table(name, rows, shard=None):
            initializer = tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range)
            # No autocast: a gather from an autocast table would first cast the whole table.
            return self.add_weight(
                name, shape=[rows, self.hidden_size], experimental_autocast=False,
                initializer=shard.initializer(initializer) if shard else initializer)

        shard = self.vocab_shard
        self.word_embeddings = table("word_embeddings", shard.rows if shard else self.vocab_size,
                                     shard)
        self.token_type_embeddings = table("token_type_embeddings", self.type_vocab_size)
        self.position_embeddings = table("position_embeddings", self.max_position_embeddings)
        super().build(input_shape)

    def call(self, input_ids, segment_ids, training=False):
        """input_ids, segment_ids: int32 [B, S]. Returns [B, S, D] in the compute dtype."""
        seq_length = tf.shape(input_ids)[1]
        if self.vocab_shard is not None:
            # The rows of every rank's part of the table, summed: the same on every rank.
            embeddings = self.vocab_shard.lookup(self.word_embeddings, input_ids)  # (B, S, D)
        else:
            embeddings = tf.gather(self.word_embeddings, input_ids)  # (B, S, D)
        if self.one_hot_token_types:
            one_hot = tf.one_hot(segment_ids, self.type_vocab_size, dtype=embeddings.dtype)
            embeddings += tf.einsum("bst,td->bsd", one_hot, self.token_type_embeddings)  # (B, S, D)
        else:
            embeddings += tf.gather(self.token_type_embeddings, segment_ids)  # (B, S, D)
        embeddings += self.position_embeddings[tf.newaxis, :seq_length]  # (1, S, D)
        embeddings = tf.cast(embeddings, self.compute_dtype)
        return self.dropout(self.layer_norm(embeddings), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      max_position_embeddings=self.max_position_embeddings,
                      type_vocab_size=self.type_vocab_size,
                      initializer_range=self.initializer_range, dropout=self.dropout_rate,
                      one_hot_token_types=self.one_hot_token_types)
        return config
