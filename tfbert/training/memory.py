"""Peak memory: TensorFlow's allocator peak on the training device, and the process' peak RSS.

`tf.config.experimental.get_memory_info` works for 'CPU:0' as well as GPUs in TF 2.15, so the
"max GB" of GPU runs can be measured at small scale on a CPU. One caveat on the CPU: with
oneDNN on (TensorFlow's default), allocations under 256 KiB go to a small-object allocator that
keeps no statistics, so only tensors of 256 KiB and more are counted. At the sizes that matter for
memory (activations of a real batch) that is what dominates; for a toy model the peak can read 0.
Without oneDNN the CPU allocator keeps no statistics at all; `tfbert/__init__.py` therefore turns
oneDNN on for CPUs where TensorFlow would leave it off (those without AVX-512), and where the
statistics are still missing the peak reads 0 and `device` says so.
"""

from __future__ import annotations

import resource
import sys

import tensorflow as tf


def training_device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


class PeakMemory:
    """Allocator peak per window (reset at each `window_peak` call) and the run's maximum."""

    def __init__(self, device: str | None = None):
        self.device = device or training_device()
        self.run_peak_bytes = 0
        try:
            self.reset()
            self.measured = True
        except ValueError:  # "Cannot reset memory stats": this allocator keeps none
            self.measured = False
            self.device += " (no allocator statistics)"

    def reset(self) -> None:
        tf.config.experimental.reset_memory_stats(self.device)

    def window_peak(self) -> int:
        """Allocator peak bytes since the last call; starts a new window."""
        if not self.measured:
            return 0
        peak = int(tf.config.experimental.get_memory_info(self.device)["peak"])
        self.run_peak_bytes = max(self.run_peak_bytes, peak)
        self.reset()
        return peak


def peak_rss_bytes() -> int:
    """The process' peak resident set size (never resets)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
