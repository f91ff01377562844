"""Loads tfbert's custom-op library, built by `make ops` (custom_ops/Makefile)."""

from __future__ import annotations

import functools
import os

# TFBERT_OPS_LIBRARY points at another build of the library (e.g. while developing one op).
LIBRARY_PATH = os.environ.get("TFBERT_OPS_LIBRARY") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "lib", "libtfbert_ops.so")


class OpsNotBuiltError(RuntimeError):
    """A fused op was asked for but the op library is missing or cannot be loaded."""


@functools.lru_cache(maxsize=None)
def load_ops():
    """The loaded op library module (`tf.load_op_library`), loaded once per process."""
    import tensorflow as tf

    if not os.path.exists(LIBRARY_PATH):
        raise OpsNotBuiltError(
            f"the fused ops are not built ({LIBRARY_PATH} is missing): run `make ops` "
            f"(add WITH_CUDA=1 for the GPU kernels)")
    try:
        return tf.load_op_library(LIBRARY_PATH)
    except (tf.errors.NotFoundError, OSError) as e:
        raise OpsNotBuiltError(f"{LIBRARY_PATH} does not load ({e}); rebuild it with "
                               f"`make ops` against this TensorFlow") from None


def ops_available() -> bool:
    try:
        load_ops()
        return True
    except OpsNotBuiltError:
        return False


def gpu_kernels_built() -> bool:
    """Whether the library was built with its CUDA kernels (WITH_CUDA=1)."""
    return bool(load_ops().tf_bert_built_with_cuda().numpy())
