"""The BERT encoder: embeddings, a stack of transformer blocks and the pooler."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import FusedOpsConfig, ModelConfig
from tfbert.modeling.layers.attention import attention_mask_bias
from tfbert.modeling.layers.dense import DenseFactory
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.layers.embeddings import Embeddings
from tfbert.modeling.layers.transformer_block import TransformerBlock


class BertEncoder(tf.keras.Model):
    """Args:
      config: the model's shape and dropouts.
      rng: DropoutRng seeding every dropout mask (may be None when all dropouts are 0).
      attention_rng: DropoutRng of the attention-probability masks; None uses `rng` (see
        `TransformerBlock`).
      dense_factory: builds every projection and says what a rank holds (heads, FFN features,
        vocabulary rows); defaults to a plain `DenseFactory`.
      dtype: Keras dtype policy ("float32", "mixed_float16", "mixed_bfloat16").
      ops: which computations use the fused custom ops.
      one_hot_token_types: token-type lookup by one-hot matmul (dense gradient) rather than a
        gather (sparse gradient); see `Embeddings`.

    Variables, with the model named "bert" (google-research/bert names):
      bert/embeddings/{word_embeddings,token_type_embeddings,position_embeddings,LayerNorm/*}
      bert/encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
      bert/encoder/layer_{i}/attention/output/{dense/*,LayerNorm/*}
      bert/encoder/layer_{i}/intermediate/dense/*, bert/encoder/layer_{i}/output/{dense/*,LayerNorm/*}
      bert/pooler/dense/{kernel,bias}
    """

    def __init__(self, config: ModelConfig, rng: DropoutRng | None = None,
                 dense_factory: DenseFactory | None = None, dtype="float32", name: str = "bert",
                 ops: FusedOpsConfig = FusedOpsConfig(), one_hot_token_types: bool = True,
                 attention_rng: DropoutRng | None = None):
        super().__init__(name=name, dtype=dtype)
        self.config = config
        policy = self.dtype_policy
        factory = dense_factory or DenseFactory(config.initializer_range, dtype=policy)
        self.embeddings = Embeddings(
            config.vocab_size, config.hidden_size, config.max_position_embeddings,
            config.type_vocab_size, config.initializer_range,
            dropout=config.hidden_dropout_prob, layer_norm_eps=config.layer_norm_eps, rng=rng,
            fused_layer_norm=ops.ln_ytf_impl, layer_norm_dtype=ops.ln_dtype,
            fused_dropout=ops.ytf_dropout, one_hot_token_types=one_hot_token_types,
            vocab_shard=factory.vocab_shard(config.vocab_size) if factory.parts > 1 else None,
            name="embeddings", dtype=policy)
        self.blocks = [
            TransformerBlock(config.num_attention_heads, config.head_size,
                             config.intermediate_size, config.hidden_act, factory,
                             hidden_dropout=config.hidden_dropout_prob,
                             attention_dropout=config.attention_probs_dropout_prob,
                             use_bias_in_keys=config.use_bias_in_keys,
                             layer_norm_eps=config.layer_norm_eps, rng=rng,
                             attention_rng=attention_rng, ops=ops,
                             name=f"layer_{i}", dtype=policy)
            for i in range(config.num_hidden_layers)
        ]
        self.pooler = factory.dense(config.hidden_size, name="dense")

    def call(self, inputs, training=False, output_hidden_states=False, output_attentions=False):
        """
        Args:
          inputs: {"input_ids", "input_mask", "segment_ids"}: int32 Tensors [B, S].
          output_hidden_states: also return every layer's output (distillation).
          output_attentions: also return every layer's attention probabilities (before their
            dropout; differentiable, also with the fused softmax).
        Returns: {"sequence_output": [B, S, D], "pooled_output": [B, D]} in the compute dtype;
          with `output_hidden_states`, "hidden_states": L + 1 Tensors [B, S, D] (the
          embeddings' output, then each layer's); with `output_attentions`, "attention_probs":
          L Tensors [B, n, S, S]. Off by default: a plain call keeps none of them.
        """
        hidden_states = self.embeddings(inputs["input_ids"], inputs["segment_ids"],
                                        training=training)  # (B, S, D)
        mask_bias = attention_mask_bias(inputs["input_mask"], hidden_states.dtype)  # (B, 1, 1, S)
        all_hidden_states, all_attention_probs = [hidden_states], []
        with tf.name_scope("encoder"):
            for block in self.blocks:
                hidden_states = block(hidden_states, mask_bias, training=training,
                                      return_attention=output_attentions)
                if output_attentions:
                    hidden_states, attention_probs = hidden_states
                    all_attention_probs.append(attention_probs)  # (B, n, S, S)
                all_hidden_states.append(hidden_states)  # (B, S, D)
        with tf.name_scope("pooler"):
            # The pooler sees only [CLS]; tanh as in BERT.
            pooled = tf.tanh(self.pooler(hidden_states[:, 0]))  # (B, D)
        outputs = dict(sequence_output=hidden_states, pooled_output=pooled)
        if output_hidden_states:
            outputs["hidden_states"] = all_hidden_states
        if output_attentions:
            outputs["attention_probs"] = all_attention_probs
        return outputs
