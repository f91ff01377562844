"""The process groups a run belongs to.

The trainer and the layers talk to a group only through this interface: which rank it is, how
gradients are averaged, how activations are summed, how variables are made equal at start and
how per-rank figures are combined. `SingleProcess` is a group of one; `HorovodGroup` is a group
of Horovod processes: the whole job, or one Horovod process set.

With tensor parallelism (`--tensor_parallel_size=T`) the N ranks form three kinds of group
(`ProcessGroups`): the world; N/T tensor-parallel groups of T consecutive ranks (they hold the
parts of one model replica and read the same batch); and T data-parallel groups of N/T ranks
with the same tensor-parallel rank (ranks t, t+T, t+2T, ...: they average gradients and split
ZeRO's state). Horovod needs its process sets registered at `hvd.init`, in the same order on
every rank, so all of them are created here, once.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

# Set by horovodrun (Gloo) or by MPI launchers for every process they start.
_LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LAUNCHER_SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_by_horovod() -> bool:
    return any(name in os.environ for name in _LAUNCHER_RANK_VARIABLES)


def launcher_size() -> int | None:
    """The number of processes the launcher started (before Horovod is initialised)."""
    for name in _LAUNCHER_SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return None


class SingleProcess:
    """A group of one process: every collective is the identity.

    Args:
      global_rank: this process's rank in the whole job (a group of one inside a larger job).
    """

    rank = 0
    size = 1
    local_rank = 0
    uses_horovod = False  # whether gradients pass through Horovod's all-reduce (even at size 1)

    def __init__(self, global_rank: int = 0):
        self.global_ranks = (global_rank,)

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

    # Collectives on activations, used inside the model by tensor-parallel layers. They have no
    # registered gradient of their own that the layers rely on: `tfbert.modeling.
    # tensor_parallel` wraps them in `tf.custom_gradient`.
    def sum_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        """The element-wise sum over the group of a float Tensor of any float dtype."""
        return tensor

    def max_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        """The element-wise maximum over the group (float32 or int32)."""
        return tensor

    def min_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        """The element-wise minimum over the group (float32 or int32)."""
        return tensor


def init_horovod(process_sets: list[list[int]] = (), fusion_threshold_mb: int | None = None,
                 cycle_time_ms: float | None = None, stall_check_secs: int | None = None,
                 stall_shutdown_secs: int | None = None):
    """Initialises Horovod once, with `process_sets` (lists of global ranks) registered in this
    order (the same on every rank). Returns (hvd, {tuple(ranks): ProcessSet}).

    Args:
      fusion_threshold_mb, cycle_time_ms: Horovod's tensor-fusion buffer size and cycle time;
        None keeps Horovod's defaults (64 MB, 1 ms) or the HOROVOD_* environment.
      stall_check_secs: after this long with some ranks waiting in a collective that others
        have not joined, Horovod names the missing ranks in a warning (0 turns the check off).
      stall_shutdown_secs: after this long, Horovod shuts down and the waiting ranks fail, so a
        hung rank ends the job instead of holding every GPU forever (0: wait forever).
    """
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

    sets = {tuple(ranks): hvd.ProcessSet(list(ranks)) for ranks in process_sets}
    hvd.init(process_sets=list(sets.values()))
    # One GPU per process, chosen by the local rank.
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    return hvd, sets


class HorovodGroup(SingleProcess):
    """A group of Horovod processes: the whole job, or one process set.

    Args:
      fp16_compression: all-reduce dense gradients as float16 (half the bytes on the wire).
        Each rank's gradient is divided by the number of ranks before the float16 sum
        (Horovod's prescale_factor): summing first, as `op=Average` does, would overflow float16
        N times sooner at N ranks and drive the dynamic loss scale N times lower.
      sparse_as_dense: densify any sparse (IndexedSlices) gradient before the all-reduce.
        Without it such a gradient is all-gathered as slices: its rows from every rank reach
        every rank, so the bytes grow with the batch and with the number of ranks.
      hvd, process_set: Horovod (initialised by `init_horovod`) and the process set of this
        group; None initialises Horovod without process sets and makes the group the world.
      name: a short name used in the names of the group's collectives.
      horovod_options: `init_horovod`'s options, when this call initialises Horovod.
    """

    def __init__(self, fp16_compression: bool = False, sparse_as_dense: bool = True,
                 hvd=None, process_set=None, name: str = "world", **horovod_options):
        if hvd is None:
            hvd, _ = init_horovod(**horovod_options)
        self._hvd = hvd
        self._set = process_set if process_set is not None else hvd.global_process_set
        self.name = name
        self.uses_horovod = True
        self.global_ranks = (tuple(self._set.ranks) if process_set is not None
                             else tuple(range(hvd.size())))
        self.rank, self.size = self.global_ranks.index(hvd.rank()), len(self.global_ranks)
        self.local_rank = hvd.local_rank()
        self.compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
        self.sparse_as_dense = sparse_as_dense

    def _name(self, what: str) -> str:
        return what if self.name == "world" else f"{self.name}_{what}"

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
                reduced.append(hvd.allreduce(grad, op=hvd.Average, process_set=self._set))
            else:
                # Divide, then sum: the float16 sum stays in the range of one rank's gradient.
                reduced.append(hvd.allreduce(grad, op=hvd.Sum, prescale_factor=1.0 / self.size,
                                             compression=self.compression,
                                             process_set=self._set))
        return reduced

    def sum_over_ranks(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._hvd.allreduce(tensor, op=self._hvd.Sum, name=self._name("sum_over_ranks"),
                                   process_set=self._set)

    def sum(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        return self._hvd.allreduce(tensor, op=self._hvd.Sum, name=self._name(name),
                                   process_set=self._set)

    def reducescatter_average(self, tensor: tf.Tensor) -> tf.Tensor:
        # Divide, then sum (prescale_factor), as the all-reduce does: a float16 sum stays in
        # the range of one rank's values. The registered gradient of a reduce-scatter is never
        # used: the training step calls it on gradients, outside any tape.
        return self._hvd.reducescatter(tensor, op=self._hvd.Sum, prescale_factor=1.0 / self.size,
                                       compression=self.compression,
                                       name=self._name("zero_reducescatter"),
                                       process_set=self._set)

    def allgather(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._hvd.allgather(tensor, name=self._name("zero_allgather"),
                                   process_set=self._set)

    def broadcast_variables(self, variables) -> None:
        # root_rank is a global rank: the group's first member.
        self._hvd.broadcast_variables(list(variables), root_rank=self.global_ranks[0],
                                      process_set=self._set)

    def broadcast_object(self, value):
        return self._hvd.broadcast_object(value, root_rank=self.global_ranks[0],
                                          process_set=self._set)

    def allgather_values(self, values: list[float]) -> np.ndarray:
        gathered = self._hvd.allgather(tf.constant([values], tf.float64), process_set=self._set)
        return gathered.numpy()

    def barrier(self) -> None:
        # A tiny all-reduce rather than hvd.barrier(): elastic Horovod treats a failed
        # all-reduce (not a failed barrier) as a worker failure.
        self._hvd.allreduce(tf.zeros([1]), op=self._hvd.Sum, name=self._name("barrier"),
                            process_set=self._set).numpy()

    def _reduce_activations(self, tensor: tf.Tensor, op) -> tf.Tensor:
        # Gloo has no bfloat16 reductions: such activations travel as float32.
        if tensor.dtype == tf.bfloat16:
            return tf.cast(self._reduce_activations(tf.cast(tensor, tf.float32), op), tf.bfloat16)
        return self._hvd.allreduce(tensor, op=op, process_set=self._set)

    def sum_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._reduce_activations(tensor, self._hvd.Sum)

    def max_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._reduce_activations(tensor, self._hvd.Max)

    def min_activations(self, tensor: tf.Tensor) -> tf.Tensor:
        return self._reduce_activations(tensor, self._hvd.Min)


def create_group(fp16_compression: bool = False, sparse_as_dense: bool = True,
                 fusion_threshold_mb: int | None = None, cycle_time_ms: float | None = None,
                 stall_check_secs: int | None = None, stall_shutdown_secs: int | None = None):
    """HorovodGroup when started by a Horovod/MPI launcher, else SingleProcess."""
    return create_process_groups(1, fp16_compression, sparse_as_dense, fusion_threshold_mb,
                                 cycle_time_ms, stall_check_secs, stall_shutdown_secs).world


@dataclasses.dataclass(frozen=True)
class ProcessGroups:
    """The world, this rank's data-parallel group and its tensor-parallel group (module doc)."""

    world: SingleProcess
    data: SingleProcess
    tensor: SingleProcess

    @property
    def tensor_parallel_size(self) -> int:
        return self.tensor.size


def tensor_parallel_layout(num_processes: int, tensor_parallel_size: int):
    """(tensor-parallel groups, data-parallel groups), each a list of lists of global ranks."""
    t = tensor_parallel_size
    tensor_groups = [list(range(start, start + t)) for start in range(0, num_processes, t)]
    data_groups = [list(range(offset, num_processes, t)) for offset in range(t)]
    return tensor_groups, data_groups


def create_process_groups(tensor_parallel_size: int = 1, fp16_compression: bool = False,
                          sparse_as_dense: bool = True, fusion_threshold_mb: int | None = None,
                          cycle_time_ms: float | None = None, stall_check_secs: int | None = None,
                          stall_shutdown_secs: int | None = None) -> ProcessGroups:
    """Initialises Horovod (when started by a launcher) with the process sets of
    `tensor_parallel_size` and returns this rank's groups. Raises ConfigError (before Horovod
    starts) when the ranks do not split into tensor-parallel groups."""
    num_processes = launcher_size() if launched_by_horovod() else 1
    if num_processes is None:
        from tfbert.config import ConfigError

        raise ConfigError("the launcher set a rank but no number of processes "
                          f"({', '.join(_LAUNCHER_SIZE_VARIABLES)})")
    from tfbert.config import ConfigError, tensor_parallel_problem

    problem = tensor_parallel_problem(num_processes, tensor_parallel_size)
    if problem:
        raise ConfigError(problem)
    if not launched_by_horovod():
        single = SingleProcess()
        return ProcessGroups(world=single, data=single, tensor=single)
    tensor_groups, data_groups = tensor_parallel_layout(num_processes, tensor_parallel_size)
    # Groups of one need no process set; the rest are registered in this order on every rank.
    registered = ([g for g in tensor_groups if 1 < len(g) < num_processes]
                  + [g for g in data_groups if 1 < len(g) < num_processes])
    hvd, sets = init_horovod(registered, fusion_threshold_mb, cycle_time_ms, stall_check_secs,
                             stall_shutdown_secs)
    world = HorovodGroup(fp16_compression, sparse_as_dense, hvd=hvd)
    rank = world.rank

    def group_of(groups, name):
        (ranks,) = [g for g in groups if rank in g]
        if len(ranks) == num_processes:  # also at one rank: gradients still pass Horovod
            return HorovodGroup(fp16_compression, sparse_as_dense, hvd=hvd, name=name)
        if len(ranks) == 1:
            return SingleProcess(global_rank=rank)
        return HorovodGroup(fp16_compression, sparse_as_dense, hvd=hvd,
                            process_set=sets[tuple(ranks)], name=name)

    return ProcessGroups(world=world, data=group_of(data_groups, "data"),
                         tensor=group_of(tensor_groups, "tensor"))
