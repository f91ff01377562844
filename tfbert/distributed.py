"""The process group a run belongs to.

The trainer talks to the group only through this interface: which rank it is, how gradients are
averaged and how variables are made equal at start. `SingleProcess` is the group of one; a
Horovod-backed group implements the same methods.
"""

from __future__ import annotations

import tensorflow as tf


class SingleProcess:
    """A group of one process: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0

    @property
    def is_chief(self) -> bool:
        """Whether this rank writes checkpoints, summaries and the console log."""
        return self.rank == 0

    def allreduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Averages gradients over the group."""
        return grads

    def broadcast_variables(self, variables) -> None:
        """Makes every rank's variables equal to rank 0's."""
        del variables
