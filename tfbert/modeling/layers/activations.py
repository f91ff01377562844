"""Activations of the feed-forward block, by their `hidden_act` name."""

from __future__ import annotations

import tensorflow as tf


def gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact GELU, x * Phi(x), as in the original BERT."""
    return tf.nn.gelu(x, approximate=False)


def gelu_tanh(x: tf.Tensor) -> tf.Tensor:
    """GELU with the tanh approximation."""
    return tf.nn.gelu(x, approximate=True)


def geglu(x: tf.Tensor) -> tf.Tensor:
    """GeGLU: the last axis holds [gate, value]; returns gelu(gate) * value (half the width)."""
    gate, value = tf.split(x, 2, axis=-1)
    return gelu(gate) * value


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": tf.nn.relu, "geglu": geglu}

# Activations that take a projection twice as wide as the intermediate size.
GATED_ACTIVATIONS = frozenset({"geglu"})


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act={name!r} is not one of {sorted(ACTIVATIONS)}") from None
