"""One post-LayerNorm transformer block, as in BERT."""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import FusedOpsConfig
from tfbert.modeling.layers.activations import GATED_ACTIVATIONS, get_activation
from tfbert.modeling.layers.attention import SelfAttention
from tfbert.modeling.layers.dense import DenseFactory
from tfbert.modeling.layers.dropout import Dropout, DropoutRng
from tfbert.modeling.layers.layer_norm import LayerNorm
from tfbert.modeling.layers.recompute import recomputable


class TransformerBlock(tf.keras.layers.Layer):
    """attention -> dropout -> add & LayerNorm -> FFN -> dropout -> add & LayerNorm (each
    output projection's bias, dropout and residual add one fused op with
    `ops.fused_bias_dropout_add`).

    Args:
      num_heads, head_size: attention shape (hidden = num_heads * head_size).
      intermediate_size: FFN width.
      hidden_act: FFN activation name ("gelu", "gelu_tanh", "relu", "geglu"). For "geglu" the
        first FFN projection is twice as wide and holds [gate, value].
      hidden_dropout, attention_dropout: dropout rates.
      use_bias_in_keys, layer_norm_eps: see SelfAttention / LayerNorm.
      dense_factory: builds every projection.
      rng: DropoutRng of the masks on replicated activations (the hidden dropouts).
      attention_rng: DropoutRng of the attention-probability masks (this rank's heads); None
        uses `rng`. Under tensor parallelism the two differ: masks of a rank's own heads differ
        across the group, masks of replicated activations must not.
      ops: which computations use the fused custom ops (FusedOpsConfig).

    Variables (google-research/bert names): attention/self/{query,key,value},
    attention/output/{dense,LayerNorm}, intermediate/dense, output/{dense,LayerNorm}.
    """

    def __init__(self, num_heads: int, head_size: int, intermediate_size: int, hidden_act: str,
                 dense_factory: DenseFactory, hidden_dropout: float = 0.0,
                 attention_dropout: float = 0.0, use_bias_in_keys: bool = True,
                 layer_norm_eps: float = 1e-12, rng: DropoutRng | None = None,
                 attention_rng: DropoutRng | None = None,
                 ops: FusedOpsConfig = FusedOpsConfig(), **kwargs):
        super().__init__(**kwargs)
        hidden = num_heads * head_size
        # With --ytf_gelu the activation (and the bias) is applied by the fused op inside the
        # intermediate projection.
        fused_activation = hidden_act if ops.ytf_gelu else None
        # With --fused_bias_dropout_add the two output projections leave their bias to the op
        # that also drops out and adds the residual before each LayerNorm.
        self.fused_bias_dropout_add = ops.fused_bias_dropout_add
        self.activation = (lambda x: x) if fused_activation else get_activation(hidden_act)
        self._config = dict(num_heads=num_heads, head_size=head_size,
                            intermediate_size=intermediate_size, hidden_act=hidden_act,
                            hidden_dropout=hidden_dropout, attention_dropout=attention_dropout,
                            use_bias_in_keys=use_bias_in_keys, layer_norm_eps=layer_norm_eps)
        policy = self.dtype_policy
        self.attention = SelfAttention(num_heads, head_size, dense_factory,
                                       attention_dropout=attention_dropout,
                                       use_bias_in_keys=use_bias_in_keys,
                                       rng=attention_rng or rng,
                                       fused_softmax=ops.attn_softmax_ytf_impl,
                                       fused_qkv=ops.fused_qkv,
                                       fused_split=ops.fused_qkv_split,
                                       name="attention", dtype=policy)
        self.attention_dropout = Dropout(hidden_dropout, rng, fused=ops.ytf_dropout,
                                         name="dropout", dtype=policy)
        self.attention_layer_norm = LayerNorm(layer_norm_eps, stats_dtype=ops.ln_dtype,
                                              fused=ops.ln_ytf_impl, name="LayerNorm",
                                              dtype=policy)
        gated = hidden_act in GATED_ACTIVATIONS
        ffn_width = intermediate_size * (2 if gated else 1)
        self._factory = dense_factory
        self.intermediate = dense_factory.column_parallel(
            ffn_width, name="dense", fused_activation=fused_activation, gated=gated,
            save_activation_derivative=ops.gelu_save_derivative)
        self.ffn_output = dense_factory.row_parallel(hidden, name="dense")
        self.ffn_dropout = Dropout(hidden_dropout, rng, fused=ops.ytf_dropout, name="dropout",
                                   dtype=policy)
        self.ffn_layer_norm = LayerNorm(layer_norm_eps, stats_dtype=ops.ln_dtype,
                                        fused=ops.ln_ytf_impl, name="LayerNorm", dtype=policy)

    def call(self, hidden_states, mask_bias, training=False, return_attention=False):
        """hidden_states: [B, S, D]; mask_bias: [B, 1, 1, S]. Returns [B, S, D]; with
        `return_attention`, (that, the attention probabilities [B, n, S, S] before dropout)."""
        fused = self.fused_bias_dropout_add
        attention_output = self.attention(hidden_states, mask_bias, training=training,
                                          return_probs=return_attention,
                                          add_output_bias=not fused)
        if return_attention:
            attention_output, attention_probs = attention_output
        with tf.name_scope("attention/output"):
            if fused:
                attention_output = self.attention_dropout.bias_dropout_add(
                    attention_output, self.attention.output_dense.bias, hidden_states,
                    training=training)
            else:
                attention_output = self.attention_dropout(attention_output, training=training)
                attention_output = attention_output + hidden_states
            attention_output = self.attention_layer_norm(attention_output)
        with tf.name_scope("intermediate"):
            # The activation's ops may be recomputed in backward (--memory_optimization=manual).
            # (B, S, I / T): this rank's slice of the FFN under tensor parallelism.
            intermediate = recomputable(self.activation, self.intermediate(
                self._factory.enter_parallel(attention_output)))
        with tf.name_scope("output"):
            output = self.ffn_output(intermediate, add_bias=not fused)
            if fused:
                output = self.ffn_dropout.bias_dropout_add(output, self.ffn_output.bias,
                                                           attention_output, training=training)
            else:
                output = self.ffn_dropout(output, training=training) + attention_output
            output = self.ffn_layer_norm(output)  # (B, S, D)
        return (output, attention_probs) if return_attention else output

    def get_config(self):
        config = super().get_config()
        config.update(self._config)
        return config
