"""Dropout driven by one seeded random generator that the trainer checkpoints.

Keras' own Dropout draws from stateful random ops whose position is lost when a job restarts, so
a resumed run would see other masks than an uninterrupted one. Here every mask comes from a
stateless op whose seed is drawn from a `tf.random.Generator`; the generator's state is a
variable saved with the checkpoint, so a resumed run draws exactly the masks it would have drawn.
The same seed is what a fused kernel needs to regenerate its mask in the backward pass.
"""

from __future__ import annotations

import tensorflow as tf


class DropoutRng:
    """Holds the generator that seeds every dropout mask of one model replica.

    Deliberately not a `tf.Module`: Keras must not track it as a model variable, since each
    data-parallel rank needs its own masks (its state must not be broadcast or averaged with
    the weights). The trainer puts `generator` into the checkpoint itself.
    """

    def __init__(self, seed: int):
        self.generator = tf.random.Generator.from_seed(seed)

    def next_seed(self) -> tf.Tensor:
        """int64 Tensor of shape [2]: a fresh seed for a stateless random op."""
        return self.generator.make_seeds(1)[:, 0]


class Dropout(tf.keras.layers.Layer):
    """Inverted dropout whose masks come from a `DropoutRng`.

    Args:
      rate: probability of zeroing an element; 0 makes the layer an identity (no random op).
      rng: the DropoutRng shared by the model.
      fused: draw the mask inside tfbert's fused op (--ytf_dropout): a counter-based hash of
        (seed, element index), regenerated in the backward pass instead of stored. Another
        mask than TensorFlow's stateless dropout for the same seed, with the same distribution.
    """

    def __init__(self, rate: float, rng: DropoutRng | None, fused: bool = False, **kwargs):
        super().__init__(**kwargs)
        if rate > 0 and rng is None:
            raise ValueError(f"{self.name}: dropout rate {rate} needs a DropoutRng")
        self.rate = rate
        self.fused = fused
        self._rng = rng

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if self.fused:
            from tfbert.ops.dropout_ops import fused_dropout

            return fused_dropout(inputs, self._rng.next_seed(), self.rate)
        return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate,
                                                    seed=self._rng.next_seed())

    def bias_dropout_add(self, inputs, bias, residual, training=False):
        """dropout(inputs + bias) + residual as one fused op (--fused_bias_dropout_add), with
        the mask the fused dropout would draw from the same seed; without training (or at rate
        0) the same op adds without dropping and draws no seed.

        inputs: [..., D], a projection before its bias; bias: [D]; residual: inputs' shape.
        """
        from tfbert.ops.dropout_ops import fused_bias_dropout_add

        active = training and self.rate > 0
        seed = self._rng.next_seed() if active else tf.zeros([2], tf.int64)
        return fused_bias_dropout_add(inputs, bias, residual, seed, self.rate if active else 0.0)

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, fused=self.fused)
        return config
