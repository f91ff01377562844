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

    def sum_over_ranks(self, tensor: tf.Tensor) -> tf.Tensor:
        """The element-wise sum of a small float32 Tensor over the group (inside a step: it
        travels in the same Horovod cycle as the gradients)."""
        return tensor

    def sum(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        """The element-wise float32 sum of `tensor` over the group (exact: no compression)."""
        del name
        return tensor

    def reducescatter_average(self, tensor: tf.Tensor) -> tf.Tensor:
        """The average over ranks of a 1-D float32 Tensor, of which this rank receives its part:
        dim 0 split as Horovod splits it (size // n each, one more for the first size % n)."""
        return tensor

    def allgather(self, tensor: tf.Tensor) -> tf.Tensor:
        """Every rank's `tensor` (dim 0 may differ between ranks), concatenated in rank order."""
        return tensor

    def broadcast_variables(self, variables) -> None:
        """Makes every rank's variables equal to rank 0's."""
        del variables

    def broadcast_object(self, value):
        """Rank 0's `value` (any picklable object), on every rank."""
        return value

    def allgather_values(self, values: list[float]) -> np.ndarray:
        """Every rank's `values`, as a [size, len(values)] float64 array (same on all ranks)."""
        return np.asarray([values], dtype=np.float64)

    def barrier(self) -> None:
        """Returns once every rank has reached it."""


class HorovodGroup(SingleProcess):
    """Data parallelism over Horovod.

    Args:
      fp16_compression: all-reduce dense gradients as float16 (half the bytes on the wire).
        Each rank's gradient is divided by the number of ranks before the float16 sum
        (Horovod's prescale_factor): summing first, as `op=Average` does, would overflow float16
        N times sooner at N ranks and drive the dynamic loss scale N times lower.
      sparse_as_dense: densify any sparse (IndexedSlices) gradient before the all-reduce.
        Without it such a gradient is all-gathered as slices: its rows from every rank reach
        every rank, so the bytes grow with the batch and with the number of ranks.
      fusion_threshold_mb, cycle_time_ms: Horovod's tensor-fusion buffer size and cycle time;
        None keeps Horovod's defaults (64 MB, 1 ms) or the HOROVOD_* environment.
      stall_check_secs: after this long with some ranks waiting in a collective that others
        have not joined, Horovod names the missing ranks in a warning (0 turns the check off).
      stall_shutdown_secs: after this long, Horovod shuts down and the waiting ranks fail, so a
        hung rank ends the job instead of holding every GPU forever (0: wait forever).
    """

    def __init__(self, fp16_compression: bool = False, sparse_as_dense: bool = True,
                 fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None,
                 stall_check_secs: int | None = None, stall_shutdown_secs: int | None = None):
        # Read by Horovod's background thread at init.
        if fusion_threshold_mb is not None:
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion_threshold_mb * 1024 * 1024))
        if cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms)
        if stall_check_secs is not None:
            if stall_check_secs == 0:
                os.environ["HOROVOD_STALL_CHECK_DISABLE"] = "1"
            else:
                os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(int(stall_check_secs))
        if stall_shutdown_secs is not None:
            os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(int(stall_shutdown_secs))
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
        hvd = self._hvd
        reduced = []
        for grad in grads:
            if grad is None:  # a frozen variable: nothing to send
                reduced.append(None)
                continue
            if isinstance(grad, tf.IndexedSlices) and self.sparse_as_dense:
                grad = tf.convert_to_tensor(grad)
            if isinstance(grad, tf.IndexedSlices):
                # All-gathered (values and indices of every rank), then divided: no sum here.
                reduced.append(hvd.allreduce(grad, op=hvd.Average))
            else:
                # Divide, then sum: the float16 sum stays in the range of one rank's gradient.
                reduced.append(hvd.allreduce(grad, op=hvd.Sum, prescale_factor=1.0 / self.size,
                                             compression=self.compression))
        return reduced

    def sum_over_ranks(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(tensor, op=self._hvd.Sum, name="sum_over_ranks")

    def sum(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        return self._hvd.allreduce(tensor, op=self._hvd.Sum, name=name)

    def reducescatter_average(self, tensor: tf.Tensor) -> tf.Tensor:
        # Divide, then sum (prescale_factor), as the all-reduce does: a float16 sum stays in
        # the range of one rank's values. The registered gradient of a reduce-scatter is never
        # used: the training step calls it on gradients, outside any tape.
        return self._hvd.reducescatter(tensor, op=self._hvd.Sum, prescale_factor=1.0 / self.size,
                                       compression=self.compression, name="zero_reducescatter")

    def allgather(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._hvd.allgather(tensor, name="zero_allgather")

    def broadcast_variables(self, variables) -> None:
        self._hvd.broadcast_variables(list(variables), root_rank=0)

    def broadcast_object(self, value):
        return self._hvd.broadcast_object(value, root_rank=0)

    def allgather_values(self, values: list[float]) -> np.ndarray:
        gathered = self._hvd.allgather(tf.constant([values], tf.float64))
        return gathered.numpy()

    def barrier(self) -> None:
        # A tiny all-reduce rather than hvd.barrier(): elastic Horovod treats a failed
        # all-reduce (not a failed barrier) as a worker failure.
        self._hvd.allreduce(tf.zeros([1]), op=self._hvd.Sum, name="barrier").numpy()


def create_group(fp16_compression: bool = False, sparse_as_dense: bool = True,
                 fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None,
                 stall_check_secs: int | None = None, stall_shutdown_secs: int | None = None):
    """HorovodGroup when started by a Horovod/MPI launcher, else SingleProcess."""
    if not launched_by_horovod():
        return SingleProcess()
    return HorovodGroup(fp16_compression, sparse_as_dense, fusion_threshold_mb, cycle_time_ms,
                        stall_check_secs, stall_shutdown_secs)
