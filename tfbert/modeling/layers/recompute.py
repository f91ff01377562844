"""Marks ops that grappler's memory optimizer may recompute in the backward pass."""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

# The node attribute grappler's memory optimizer reads (memory_optimizer.cc, kRecomputeHint).
RECOMPUTE_HINT = "_recompute_hint"


def recomputable(fn, *args, **kwargs):
    """Calls fn(*args, **kwargs) and marks every op it adds to the graph with _recompute_hint.

    The mark lets `--memory_optimization=manual` (and the heuristic modes, which respect it)
    recompute those ops from their inputs in the backward pass instead of keeping their outputs
    alive between forward and backward. Eagerly there is no graph to mark: fn just runs.
    Use it for cheap elementwise work on large tensors (the feed-forward activation), not for
    matmuls.
    """
    if tf.executing_eagerly():
        return fn(*args, **kwargs)
    graph = tf.compat.v1.get_default_graph()
    first_new = len(graph.get_operations())
    outputs = fn(*args, **kwargs)
    hint = attr_value_pb2.AttrValue(i=1)
    for op in graph.get_operations()[first_new:]:
        op._set_attr(RECOMPUTE_HINT, hint)  # pylint: disable=protected-access
    return outputs
