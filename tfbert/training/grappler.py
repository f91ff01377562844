"""Grappler settings of the training step: --memory_optimization and --suppress_grappler.

A TF2 `tf.function` is optimised by grappler when it is first called, with the `ConfigProto`
that the call carries in its `config_proto` attribute. That proto comes from the eager
context's function call options (the same place `tf.config.optimizer.set_jit` and
`set_experimental_options` write to). `StepGrapplerOptions` builds the step's proto once and
installs it around each call of the step, so the settings apply to the training step's graph
and to nothing else in the process.

Two details make grappler's memory optimizer work on a TF2 step at all:
- Its recomputation passes rewrite only the inputs of gradient nodes, which they recognise by a
  name scope, "gradients/" by default: the TF1 `tf.gradients` scope. `tf.GradientTape` builds
  its gradient ops under "gradient_tape/", so with the default scope recomputation silently
  finds nothing. The step's proto names "gradient_tape/".
- MANUAL mode recomputes only nodes carrying the `_recompute_hint` attribute; tfbert marks the
  feed-forward activation of every transformer block (see
  `tfbert.modeling.layers.recompute`), so "manual" recomputes exactly those in the backward pass.
"""

from __future__ import annotations

import contextlib

from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

_RewriterConfig = rewriter_config_pb2.RewriterConfig

# --memory_optimization values -> grappler's RewriterConfig.MemOptType.
MEMORY_OPTIMIZATIONS = {
    "default": _RewriterConfig.DEFAULT_MEM_OPT,  # grappler's own default (scheduling + swapping)
    "no": _RewriterConfig.NO_MEM_OPT,
    "manual": _RewriterConfig.MANUAL,  # only nodes marked with _recompute_hint / _swap_to_host
    "heuristic": _RewriterConfig.HEURISTICS,  # recomputation + swapping + scheduling
    "recomputation": _RewriterConfig.RECOMPUTATION_HEURISTICS,
    "scheduling": _RewriterConfig.SCHEDULING_HEURISTICS,  # splits large AddNs near the memory limit
    "swapping": _RewriterConfig.SWAPPING_HEURISTICS,  # GPU -> host copies of long-lived tensors
}

# The name scope of tf.GradientTape's gradient ops.
TAPE_GRADIENT_SCOPE = "gradient_tape/"

# Memory optimizations that must keep grappler running under --suppress_grappler.
_EXPLICIT_MEMORY_PASSES = ("manual", "heuristic", "recomputation", "scheduling", "swapping")


def step_config_proto(base: config_pb2.ConfigProto, memory_optimization: str,
                      suppress_grappler: bool) -> config_pb2.ConfigProto:
    """The ConfigProto grappler gets for the training step.

    Args:
      base: the process's current config (it carries XLA auto-clustering and device settings);
        copied, not modified.
      memory_optimization: a key of MEMORY_OPTIMIZATIONS.
      suppress_grappler: turn grappler off for the step. A memory optimization asked for
        explicitly (anything but "default"/"no") still runs, alone: every other pass is off.
        That is the notes' "recomputations + suppress_grappler" setup.
    """
    if memory_optimization not in MEMORY_OPTIMIZATIONS:
        raise ValueError(f"memory_optimization={memory_optimization!r} is not one of "
                         f"{sorted(MEMORY_OPTIMIZATIONS)}")
    config = config_pb2.ConfigProto()
    config.CopyFrom(base)
    rewrite = config.graph_options.rewrite_options
    rewrite.memory_optimization = MEMORY_OPTIMIZATIONS[memory_optimization]
    rewrite.memory_optimizer_target_node_name_scope = TAPE_GRADIENT_SCOPE
    if suppress_grappler:
        if memory_optimization in _EXPLICIT_MEMORY_PASSES:
            for field in rewrite.DESCRIPTOR.fields:
                if field.enum_type is not None and field.enum_type.name == "Toggle":
                    setattr(rewrite, field.name, _RewriterConfig.OFF)
            rewrite.disable_model_pruning = True
        else:
            rewrite.disable_meta_optimizer = True
    return config


class StepGrapplerOptions:
    """Installs the step's grappler config around calls of the step functions.

    Build it after the process-wide settings it inherits (XLA auto-clustering) are in place.
    """

    def __init__(self, memory_optimization: str = "default", suppress_grappler: bool = False):
        ctx = context.context()
        base = config_pb2.ConfigProto()
        base.ParseFromString(ctx.function_call_options.config_proto_serialized)
        self.config = step_config_proto(base, memory_optimization, suppress_grappler)
        self._options = context.FunctionCallOptions(
            executor_type=ctx.function_call_options.executor_type, config_proto=self.config)

    @contextlib.contextmanager
    def scope(self):
        """Calls of tf.functions inside this scope carry the step's config."""
        ctx = context.context()
        previous = ctx.function_call_options
        ctx.function_call_options = self._options
        try:
            yield
        finally:
            ctx.function_call_options = previous

    def wrap(self, step_fn):
        """step_fn (a tf.function) called inside `scope()`."""

        def call(*args, **kwargs):
            with self.scope():
                return step_fn(*args, **kwargs)

        call.python_function = step_fn
        return call
