"""How tfbert's steps become graphs: `tf.function` without AutoGraph."""

from __future__ import annotations

import tensorflow as tf


def graph_function(fn, **kwargs):
    """`tf.function(fn, autograph=False, **kwargs)`.

    tfbert's steps, models and losses hold no Python control flow on tensors: where they branch
    or loop on a tensor they call `tf.cond` or `tf.while_loop` themselves, and their Python loops
    (layers, accumulation steps) are meant to unroll. AutoGraph's rewriting of the source of
    every function a step calls (Keras layers included) then changes nothing in the graph and
    costs about half of tracing a step: 5 to 7 of 12 to 14 seconds for the tiny model on a
    2-core CPU, paid by every process at start-up and again for every new input signature. A
    Python `if` on a tensor in a step fails when it is traced ("using a `tf.Tensor` as a Python
    `bool` is not allowed"), so nothing changes silently.
    """
    return tf.function(fn, autograph=False, **kwargs)
