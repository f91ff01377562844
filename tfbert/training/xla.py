"""The three XLA modes of the training step.

- "off": plain TensorFlow graph execution.
- "auto": auto-clustering. TensorFlow compiles the parts of the step graph it can and runs the
  rest (custom ops included) as usual. This is the mode for XLA together with custom ops.
- "jit": `tf.function(jit_compile=True)`: the whole step must compile, so it cannot hold a
  custom op; asking for both is a start-up error in the entry point.
"""

from __future__ import annotations

import os

_CPU_JIT_FLAG = "--tf_xla_cpu_global_jit"


def request_cpu_autoclustering() -> None:
    """Lets auto-clustering compile for the CPU too (it skips the CPU unless told).

    TF_XLA_FLAGS must be in the environment before TensorFlow and the op libraries loaded with
    it (tensorflow-addons, tensorflow-text) initialise XLA's flags, so entry points call this
    before importing TensorFlow.
    """
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if _CPU_JIT_FLAG not in flags.split():
        os.environ["TF_XLA_FLAGS"] = f"{flags} {_CPU_JIT_FLAG}".strip()


def configure_xla(mode: str) -> bool:
    """Sets the process-wide auto-clustering switch for `mode`; returns the step's jit_compile."""
    import tensorflow as tf

    if mode == "auto":
        request_cpu_autoclustering()
        tf.config.optimizer.set_jit("autoclustering")
    else:
        tf.config.optimizer.set_jit(False)
    return mode == "jit"
