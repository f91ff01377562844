"""The process group a run belongs to.

The trainer talks to the group only through this interface: which rank it is, how gradients are
averaged, how variables are made equal at start and how per-rank figures are combined.
`SingleProcess` is the group of one; `HorovodGroup` is data parallelism over Horovod, used when
the job was started by `horovodrun` (or mpirun).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

# Set by horovodrun (Gloo) or by MPI launchers for every process they start.
_LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_by_horovod() -> bool:
    return any(name in os.environ for name in _LAUNCHER_RANK_VARIABLES)


class SingleProcess:
    """A group of one process: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    uses_horovod = False  # whether gradients pass through Horovod's all-reduce (even at size 1)

    @property
    def is_chief(self) -> bool:
        """Whether this rank writes checkpoints, summaries and the console log."""
        return self.rank == 0

    def allreduce_gradients(self, grads: list) -> list:
        """Averages gradients over the group."""
        return grads

    def broadcast_variables(self, variables) -> None:
        """Makes every rank's variables equal to rank 0's."""
        del variables

    def allgather_values(self, values: list[float]) -> np.ndarray:
        """Every rank's `values`, as a [size, len(values)] float64 array (same on all ranks)."""
        return np.asarray([values], dtype=np.float64)


class HorovodGroup(SingleProcess):
    """Data parallelism over Horovod.

    Args:
      fp16_compression: all-reduce gradients as float16 (half the bytes on the wire).
      sparse_as_dense: densify sparse (IndexedSlices) gradients, i.e. the word-embedding
        gradient, before the all-reduce. Without it they are all-gathered as slices.
      fusion_threshold_mb, cycle_time_ms: Horovod's tensor-fusion buffer size and cycle time;
        None keeps Horovod's defaults (64 MB, 1 ms) or the HOROVOD_* environment.
    """

    def __init__(self, fp16_compression: bool = False, sparse_as_dense: bool = False,
                 fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None):
        # Read by Horovod's background thread at init.
        if fusion_threshold_mb is not None:
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion_threshold_mb * 1024 * 1024))
        if cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms)
        import horovod.tensorflow as hvd

        hvd.init()
        self._hvd = hvd
        self.uses_horovod = True
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
        self.sparse_as_dense = sparse_as_dense
        # One GPU per process, chosen by the local rank.
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[self.local_rank % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")

    def allreduce_gradients(self, grads: list) -> list:
        reduced = []
        for grad in grads:
            if isinstance(grad, tf.IndexedSlices) and self.sparse_as_dense:
                grad = tf.convert_to_tensor(grad)
            reduced.append(self._hvd.allreduce(grad, op=self._hvd.Average,
                                               compression=self.compression))
        return reduced

    def broadcast_variables(self, variables) -> None:
        self._hvd.broadcast_variables(list(variables), root_rank=0)

    def allgather_values(self, values: list[float]) -> np.ndarray:
        gathered = self._hvd.allgather(tf.constant([values], tf.float64))
        return gathered.numpy()


def create_group(fp16_compression: bool = False, sparse_as_dense: bool = False,
                 fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None):
    """HorovodGroup when started by a Horovod/MPI launcher, else SingleProcess."""
    if not launched_by_horovod():
        return SingleProcess()
    return HorovodGroup(fp16_compression, sparse_as_dense, fusion_threshold_mb, cycle_time_ms)
