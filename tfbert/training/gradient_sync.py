"""How gradients are synchronised across data-parallel ranks and applied: the replaceable part of
the training step.

The trainer computes each micro-batch's gradients and hands them to one `GradientSync`:

    grads = sync.micro_batch_gradients(grads)       # after each micro-batch (accumulated)
    grads = sync.step_gradients(grads)              # once per optimizer step
    (unscale; the clip factor and the skip decision from sync.global_norm(grads))
    sync.apply(grads, frozen, grad_scale, apply_update)  # every rank ends with the same weights

`DataParallel` all-reduces whole gradients and updates every variable on every rank (Horovod's
DistributedOptimizer). `ShardedOptimizer` is ZeRO (Rajbhandari et al., 2020) over Horovod, with
the optimizer state (LAMB/AdamW m and v) split across the ranks by a `tfbert.training.sharding`
plan:

  ZeRO-1  each rank accumulates whole gradients, as in data parallelism; once per step they are
          reduce-scattered (a rank receives the sum of only the elements it owns: half the bytes
          of an all-reduce), the rank updates its elements from its own m and v (1/n of them),
          and the updated elements are all-gathered.
  ZeRO-2  each micro-batch's gradients are reduce-scattered as they are computed, so the
          gradient accumulators shrink to 1/n as well.

Every rank must consume every collective's result: TensorFlow prunes an op whose output nobody
reads, and a Horovod collective one rank prunes is one the others wait for forever. (An
all-reduce of whole gradients of which each rank reads only its own elements is pruned exactly
so.)

A rank's owned elements form one flat float32 buffer (its "shard"): the concatenation, in model
order, of its parts ("segments") of the variables. Every collective of a step is one large
tensor: one reduce-scatter (per micro-batch under ZeRO-2), one all-reduce of [variables, 2] norms (LAMB's trust ratios), one scalar all-reduce (the global
gradient norm) and one all-gather of the updated shards. LAMB's trust ratio of a tensor split
across ranks is computed from the whole tensor's norms (the partial sums of its segments, added
over ranks), so the step equals data parallelism's to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from tfbert.checkpoints import CheckpointError, CheckpointKeeper
from tfbert.checkpoints.native import open_reader
from tfbert.checkpoints.sharded import GATHER_TOOL, MARKER_PREFIX
from tfbert.config import OptimizerConfig
from tfbert.distributed import SingleProcess
from tfbert.ops import lamb_shard_ops
from tfbert.training import sharding
from tfbert.training.optimization import scale_gradients, update_if
from tfbert.training.precision import deduplicate_indexed_slices



def variable_name(variable) -> str:
    """"bert/pooler/dense/kernel:0" -> "bert/pooler/dense/kernel"."""
    return re.sub(r":\d+$", "", variable.name)


class TensorNorms:
    """Norms of tensors that tensor parallelism splits across a group of ranks.

    A rank's sums of squares over its part of a split tensor are added over the group; a
    replicated tensor (the same on every rank of the group) is counted once, from the group's
    first rank. With a group of one this is the identity.

    Args:
      group: the tensor-parallel group.
      split: per variable, whether it is split across the group.
    """

    def __init__(self, group, split: list[bool]):
        self.group = group
        self.split = list(split)
        counted = [s or group.rank == 0 for s in self.split]
        self._counted = tf.constant(counted, tf.float32, shape=[len(counted)])

    @property
    def parts(self) -> int:
        return self.group.size

    def total(self, squares: tf.Tensor) -> tf.Tensor:
        """float32 [V] or [V, k] sums of squares over this rank's parts -> the same over the
        whole tensors, equal on every rank of the group."""
        if self.group.size == 1:
            return squares
        counted = tf.reshape(self._counted, [-1] + [1] * (squares.shape.rank - 1))
        return self.group.sum(squares * counted, name="tensor_parallel_norms")


def _squares(grad) -> tf.Tensor:
    """float32 scalar: the sum of squares of a gradient (0 for None)."""
    if grad is None:
        return tf.constant(0.0)
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return tf.reduce_sum(tf.square(tf.cast(values, tf.float32)))


class DataParallel:
    """Plain data parallelism: whole gradients all-reduced, every rank updates everything.

    Args:
      group: the data-parallel process group (`tfbert.distributed`).
      update: the optimizer update (`KerasOptimizerUpdate` or `FusedLambUpdate`), built here.
      variables: the trainable variables, in model order.
      norms: `TensorNorms` of the variables under tensor parallelism (None: not split).
    """

    zero_stage = 0

    def __init__(self, group, update, variables, norms: TensorNorms | None = None):
        self.group = group
        self.update = update
        self.variables = list(variables)
        self.norms = norms
        update.build(self.variables)
        self.optimizer = update.optimizer

    def accumulator_shapes(self) -> list[tf.TensorShape]:
        return [v.shape for v in self.variables]

    def micro_batch_gradients(self, grads: list) -> list:
        """Nothing crosses ranks per micro-batch: the all-reduce happens once per step."""
        return grads

    def accumulated_gradients(self, accumulators, frozen: list[bool]) -> list:
        return [None if skip else tf.cast(a, tf.float32) for a, skip in zip(accumulators, frozen)]

    def step_gradients(self, grads: list) -> list:
        grads = self.group.allreduce_gradients(grads)
        return [deduplicate_indexed_slices(g) for g in grads]

    def global_norm(self, grads: list) -> tf.Tensor:
        """The same on every rank: the gradients were all-reduced (and under tensor
        parallelism the parts' squares are added over the group, replicated tensors once)."""
        if self.norms is None or self.norms.parts == 1:
            return tf.linalg.global_norm(grads)
        return tf.sqrt(tf.reduce_sum(self.norms.total(tf.stack([_squares(g) for g in grads]))))

    def apply(self, grads: list, frozen: list[bool], grad_scale=None, apply_update=None) -> None:
        """The update's step. grad_scale: float32 scalar multiplying every gradient (the clip
        factor) or None; apply_update: bool scalar, False to skip the step (None: take it).
        Both go to the update, which may fold them into a fused op."""
        del frozen  # the frozen variables' gradients are None already
        self.update.apply(grads, self.variables, grad_scale=grad_scale, apply_update=apply_update)

    def checkpoint_items(self) -> dict:
        return self.update.checkpoint_items()

    def named_state(self) -> dict[str, tf.Variable]:
        return self.update.named_state(self.variables)

    def shared_variables(self) -> list[tf.Variable]:
        """Optimizer state that is equal on every rank (broadcast from rank 0 at start)."""
        return list(self.optimizer.variables())

    def checkpoint_markers(self) -> dict:
        return {}

    def save(self, step: int) -> None:
        """Per-rank state beside the shared checkpoint: none in data parallelism."""

    def restore(self, shared_prefix: str | None, step: int) -> None:
        """Everything came with the shared checkpoint."""

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, optimizer state, and the step's gradients."""
        params = sum(v.shape.num_elements() * v.dtype.size for v in self.variables)
        state = sum(v.shape.num_elements() * v.dtype.size for v in self.optimizer.variables())
        return dict(param_bytes=params, optimizer_state_bytes=state,
                    gradient_bytes=sum(v.shape.num_elements() * 4 for v in self.variables))


@dataclasses.dataclass(frozen=True)
class _Segment:
    variable: int  # index into the variables
    start: int  # elements [start, end) of the variable, flattened
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class ShardedOptimizer:
    """ZeRO-1/2 over Horovod (module doc).

    Args:
      group: the data-parallel group (HorovodGroup; >= 2 ranks).
      variables: the trainable float32 variables, in model order.
      plan: who owns which elements (`sharding.partition_plan` over these variables' shapes).
      zero_stage: 1 (optimizer state sharded) or 2 (gradients and accumulators too).
      config: the optimizer settings: "lamb", "fused_lamb" (the fused shard ops) or "adamw".
      learning_rate: a zero-argument callable returning the current learning rate.
      state_dir: where each rank keeps its shard checkpoints (`<dir>/rank-<r>/ckpt-<step>`).
      keep_checkpoint_max: how many shard checkpoints each rank keeps.
      norms: `TensorNorms` of the variables under tensor parallelism (None: not split).
    """

    def __init__(self, group, variables, plan: sharding.PartitionPlan, zero_stage: int,
                 config: OptimizerConfig, learning_rate, state_dir: str,
                 keep_checkpoint_max: int = 5, norms: TensorNorms | None = None):
        if zero_stage not in sharding.ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {sharding.ZERO_STAGES}, got {zero_stage}")
        if config.optimizer not in ("lamb", "fused_lamb", "adamw"):
            raise ValueError(f"ZeRO implements lamb, fused_lamb and adamw, not {config.optimizer!r}")
        self.group = group
        self.variables = list(variables)
        self.norms = norms or TensorNorms(_SINGLE, [False] * len(self.variables))
        self.zero_stage = zero_stage
        self.config = config
        self.learning_rate = learning_rate
        self.plan = plan
        self.names = [variable_name(v) for v in self.variables]
        for v in self.variables:
            if v.dtype != tf.float32:
                raise ValueError(f"ZeRO shards float32 variables; {v.name} is {v.dtype.name}")
        if dict(plan.variables) != {n: tuple(v.shape) for n, v in zip(self.names, self.variables)}:
            raise ValueError("the sharding plan was made for other variables than the model's")
        if plan.num_ranks != group.size:
            raise ValueError(f"the plan is for {plan.num_ranks} ranks, the group has {group.size}")
        self.use_fused_op = config.optimizer == "fused_lamb"
        if self.use_fused_op:
            from tfbert.ops import loader

            loader.load_ops()  # fail now, with the loader's message

        index = {name: i for i, name in enumerate(self.names)}
        self.segments_by_rank = [
            [_Segment(index[r.name], r.start, r.end) for r in plan.element_ranges(rank)]
            for rank in range(group.size)]
        self.segments = self.segments_by_rank[group.rank]
        self.shard_size = sum(s.size for s in self.segments)
        owned = [sum(s.size for s in segments) for segments in self.segments_by_rank]
        # The reduce-scatter splits its input as Horovod does (first ranks one more element);
        # each rank's part is padded to the largest shard when the plan's shards are uneven
        # (naive, greedy), so that split hands every rank exactly its own elements.
        padded = sum(owned) if owned == sharding.horovod_split_sizes(sum(owned), group.size) \
            else max(owned) * group.size
        self.padded_sizes = sharding.horovod_split_sizes(padded, group.size)
        self.owned_sizes = owned

        exclude = [re.compile(p) for p in config.exclude_from_weight_decay]
        # Per variable: decayed and layer-adapted unless excluded (tfa's LAMB uses the same
        # patterns for both, as build_optimizer configures it).
        self._adapted = np.array([not any(p.search(v.name) for p in exclude)
                                  for v in self.variables])
        ends = np.cumsum([s.size for s in self.segments], dtype=np.int64)
        self._segment_ends = tf.constant(ends, tf.int64, shape=[len(self.segments)])
        self._segment_variable = tf.constant([s.variable for s in self.segments], tf.int32,
                                             shape=[len(self.segments)])
        self._segment_decayed = tf.constant([bool(self._adapted[s.variable])
                                             for s in self.segments], tf.bool,
                                            shape=[len(self.segments)])

        self.optimizer = _ShardState(self.shard_size, plan_fingerprint(plan, group.rank))
        self.state_dir = state_dir
        self._shard_checkpoints = CheckpointKeeper(
            os.path.join(state_dir, f"rank-{group.rank}"), keep_checkpoint_max + 1,
            m=self.optimizer.m, v=self.optimizer.v, plan=self.optimizer.plan)

    # ---------------------------------------------------------------------------------------
    # Moving between whole variables and this rank's flat shard.

    def _flat(self, tensors: list) -> list[tf.Tensor]:
        """float32 [elements] per variable; None (a frozen variable) becomes zeros."""
        flat = []
        for tensor, variable in zip(tensors, self.variables):
            if tensor is None:
                flat.append(tf.zeros([variable.shape.num_elements()], tf.float32))
            else:
                flat.append(tf.reshape(tf.cast(tf.convert_to_tensor(tensor), tf.float32), [-1]))
        return flat

    def _pieces(self, flat: list[tf.Tensor], segments: list[_Segment]) -> list[tf.Tensor]:
        return [flat[s.variable][s.start:s.end] for s in segments]

    def _shard_of(self, flat: list[tf.Tensor]) -> tf.Tensor:
        """This rank's elements of per-variable flat tensors: float32 [shard_size]."""
        return tf.concat(self._pieces(flat, self.segments) + [tf.zeros([0], tf.float32)], 0)

    def _scatter_layout(self, flat: list[tf.Tensor]) -> tf.Tensor:
        """Every rank's elements, rank after rank, each padded to its reduce-scatter part."""
        parts = []
        for rank, segments in enumerate(self.segments_by_rank):
            parts += self._pieces(flat, segments)
            padding = self.padded_sizes[rank] - self.owned_sizes[rank]
            if padding:
                parts.append(tf.zeros([padding], tf.float32))
        return tf.concat(parts, 0)

    def _assign_gathered(self, gathered: tf.Tensor, frozen: list[bool]) -> None:
        """Writes the all-gathered shards (rank after rank, unpadded) into the variables."""
        pieces: list[list[tuple[int, tf.Tensor]]] = [[] for _ in self.variables]
        offset = 0
        for segments in self.segments_by_rank:
            for s in segments:
                pieces[s.variable].append((s.start, gathered[offset:offset + s.size]))
                offset += s.size
        for i, variable in enumerate(self.variables):
            if frozen[i]:
                continue
            ordered = [piece for _, piece in sorted(pieces[i], key=lambda p: p[0])]
            value = ordered[0] if len(ordered) == 1 else tf.concat(ordered, 0)
            variable.assign(tf.reshape(value, variable.shape))

    # ---------------------------------------------------------------------------------------
    # The GradientSync interface.

    def accumulator_shapes(self) -> list[tf.TensorShape]:
        if self.zero_stage == 2:
            return [tf.TensorShape([self.shard_size])]
        return [v.shape for v in self.variables]

    def _reduce_scatter(self, grads: list) -> list:
        """[float32 [shard_size]]: this rank's elements of the gradients averaged over ranks
        (one reduce-scatter; each rank's part is divided by n before the sum: Horovod's
        prescale_factor keeps float16 sums in range)."""
        shard = self.group.reducescatter_average(self._scatter_layout(self._flat(grads)))
        return [shard[:self.shard_size]]

    def micro_batch_gradients(self, grads: list) -> list:
        """ZeRO-2: reduced now, to this rank's elements. ZeRO-1: unchanged (reduced per step)."""
        return self._reduce_scatter(grads) if self.zero_stage == 2 else grads

    def accumulated_gradients(self, accumulators, frozen: list[bool]) -> list:
        if self.zero_stage == 2:
            return [tf.cast(accumulators[0], tf.float32)]
        return [None if skip else tf.cast(a, tf.float32) for a, skip in zip(accumulators, frozen)]

    def step_gradients(self, grads: list) -> list:
        """[float32 [shard_size]]: this rank's elements of the gradients averaged over ranks."""
        return grads if self.zero_stage == 2 else self._reduce_scatter(grads)

    def global_norm(self, grads: list) -> tf.Tensor:
        """The norm of the whole averaged gradient: each rank's squared sum, added over ranks.
        The same on every rank, so every rank takes the same skip decision."""
        (shard,) = grads
        if self.norms.parts == 1:
            return tf.sqrt(self.group.sum(tf.reduce_sum(tf.square(shard)), name="zero_grad_norm"))
        # Per variable, so that tensor parallelism counts a replicated tensor once.
        ids = tf.gather(self._segment_variable,
                        lamb_shard_ops.segment_ids(self._segment_ends, self.shard_size))
        per_variable = tf.math.unsorted_segment_sum(tf.square(shard), ids,
                                                    len(self.variables))  # (V,)
        per_variable = self.group.sum(per_variable, name="zero_grad_norm")
        return tf.sqrt(tf.reduce_sum(self.norms.total(per_variable)))

    def apply(self, grads: list, frozen: list[bool], grad_scale=None, apply_update=None) -> None:
        """Updates this rank's elements, then all-gathers them into every rank's variables;
        grad_scale and apply_update as in `DataParallel.apply` (the decision is the same on
        every rank, so either all of them gather or none)."""
        (grad,) = scale_gradients(grads, grad_scale)
        update_if(apply_update, lambda: self._apply_shard(grad, frozen))

    def _apply_shard(self, grad, frozen: list[bool]) -> None:
        state = self.optimizer
        active = tf.constant([not frozen[s.variable] for s in self.segments], tf.bool,
                             shape=[len(self.segments)])
        param = self._shard_of(self._flat([tf.convert_to_tensor(v) for v in self.variables]))
        lr = tf.cast(self.learning_rate(), tf.float32)
        step = tf.cast(state.iterations + 1, tf.float32)
        if self.config.optimizer == "adamw":
            new_param = self._adamw(param, grad, active, lr, step)
        else:
            new_param = self._lamb(param, grad, active, lr, step)
        state.iterations.assign_add(1)
        self._assign_gathered(self.group.allgather(new_param), frozen)

    def _lamb(self, param, grad, active, lr, step) -> tf.Tensor:
        c, state = self.config, self.optimizer
        hyper = (c.beta_1, c.beta_2, c.epsilon, c.weight_decay_rate, step)
        if self.use_fused_op:
            moments = functools.partial(lamb_shard_ops.lamb_shard_moments, use_fused_op=True)
            apply = functools.partial(lamb_shard_ops.lamb_shard_apply, use_fused_op=True)
        else:
            moments = lamb_shard_ops.lamb_shard_moments_reference
            apply = lamb_shard_ops.lamb_shard_apply_reference
        sums = moments(state.m, state.v, grad, param, self._segment_ends, self._segment_decayed,
                       active, *hyper)  # (S, 2)
        # Whole-tensor squared norms: the segments of each variable, added over ranks.
        per_variable = tf.math.unsorted_segment_sum(sums, self._segment_variable,
                                                    len(self.variables))  # (V, 2)
        per_variable = self.norms.total(self.group.sum(per_variable, name="zero_lamb_norms"))
        var_norm, update_norm = tf.sqrt(per_variable[:, 0]), tf.sqrt(per_variable[:, 1])
        ratio = tf.where(var_norm > 0, tf.where(update_norm > 0,
                                                var_norm / tf.maximum(update_norm, 1e-38), 1.0),
                         1.0)
        ratio = tf.where(tf.constant(self._adapted), ratio, 1.0)
        # tfa multiplies the scalars first: var - (ratio * lr) * update.
        scale = tf.gather(ratio, self._segment_variable) * lr
        return apply(param, state.m, state.v, self._segment_ends, self._segment_decayed, active,
                     scale, *hyper)

    def _adamw(self, param, grad, active, lr, step) -> tf.Tensor:
        """tfa's AdamW (build_optimizer): decoupled decay lr * weight_decay_rate * var first,
        then Keras' Adam step with lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""
        c, state = self.config, self.optimizer
        ids = lamb_shard_ops.segment_ids(self._segment_ends, self.shard_size)
        is_active = tf.gather(active, ids)
        decayed = tf.logical_and(tf.gather(self._segment_decayed, ids), is_active)
        decayed_param = param - tf.where(decayed, c.weight_decay_rate * lr * param, 0.0)
        m = state.m * c.beta_1 + grad * (1.0 - c.beta_1)
        v = state.v * c.beta_2 + tf.square(grad) * (1.0 - c.beta_2)
        state.m.assign(tf.where(is_active, m, state.m))
        state.v.assign(tf.where(is_active, v, state.v))
        lr_t = lr * tf.sqrt(1.0 - tf.pow(c.beta_2, step)) / (1.0 - tf.pow(c.beta_1, step))
        return tf.where(is_active, decayed_param - lr_t * m / (tf.sqrt(v) + c.epsilon), param)

    # ---------------------------------------------------------------------------------------
    # State, checkpoints and accounting.

    def checkpoint_items(self) -> dict:
        return {}

    def named_state(self) -> dict[str, tf.Variable]:
        """In the shared checkpoint: the step counter only; m and v are in the shards."""
        return {"optimizer/iterations": self.optimizer.iterations}

    def shared_variables(self) -> list[tf.Variable]:
        return [self.optimizer.iterations]

    def checkpoint_markers(self) -> dict:
        """Written into the shared checkpoint: its moments are in per-rank shards."""
        return {MARKER_PREFIX + "num_ranks": np.int64(self.group.size),
                MARKER_PREFIX + "stage": np.int64(self.zero_stage),
                MARKER_PREFIX + "state_split_strategy": np.bytes_(self.plan.strategy.encode())}

    def save(self, step: int) -> None:
        """Each rank writes its own m and v (before rank 0 commits the shared checkpoint)."""
        self._shard_checkpoints.save(step)

    def restore(self, shared_prefix: str | None, step: int) -> None:
        """This rank's m and v at `step`: from its own shard when the run had the same ranks
        and plan, else sliced from a checkpoint with whole moments (a gathered or unsharded
        one); anything else is an error that says how to go on."""
        if shared_prefix is None:
            return
        reader = open_reader(shared_prefix, "checkpoint")
        slot_names = [f"{name}/{suffix}" for name in self.names
                      for suffix in ("adam_m", "adam_v")]
        if all(reader.has_tensor(name) for name in slot_names):
            self._slice_from(reader)
            logging.info("ZeRO: rank %d took its part of m and v from %s", self.group.rank,
                         shared_prefix)
            return
        restored = self._shard_checkpoints.restore_step(step)
        expected = plan_fingerprint(self.plan, self.group.rank)
        found = self.optimizer.plan.numpy().decode()
        if restored is None or found != expected:
            saved = ("no shard of this rank" if restored is None else
                     f"a shard of another layout ({json.loads(found)['describe']})")
            raise CheckpointError(
                f"checkpoint {shared_prefix} keeps the optimizer state in per-rank shards and "
                f"{self.state_dir} has {saved} at step {step}; this run shards it as "
                f"{json.loads(expected)['describe']}. Resume with the ranks and "
                f"--state_split_strategy it was written with, or gather it first: "
                f"{GATHER_TOOL} --run_dir=<that run> --output_dir=<new dir>, then resume from "
                f"the new directory")

    def _slice_from(self, reader) -> None:
        for slot, variable in (("adam_m", self.optimizer.m), ("adam_v", self.optimizer.v)):
            pieces = [reader.get_tensor(f"{self.names[s.variable]}/{slot}").reshape(-1)[
                s.start:s.end] for s in self.segments]
            variable.assign(np.concatenate(pieces + [np.zeros([0], np.float32)]).astype(
                np.float32))

    def state_bytes(self) -> dict[str, int]:
        params = sum(v.shape.num_elements() * v.dtype.size for v in self.variables)
        full = sum(v.shape.num_elements() for v in self.variables)
        return dict(param_bytes=params, optimizer_state_bytes=2 * 4 * self.shard_size,
                    gradient_bytes=4 * (self.shard_size if self.zero_stage == 2 else full))


_SINGLE = SingleProcess()


class _ShardState(tf.Module):
    """A rank's optimizer state under ZeRO: the step counter and the flat m and v of its
    shard, plus the description of the layout they were written for (checked on restore)."""

    def __init__(self, shard_size: int, fingerprint: str):
        super().__init__(name="zero_state")
        with tf.init_scope():
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
            self.m = tf.Variable(tf.zeros([shard_size], tf.float32), trainable=False, name="m")
            self.v = tf.Variable(tf.zeros([shard_size], tf.float32), trainable=False, name="v")
            self.plan = tf.Variable(fingerprint, dtype=tf.string, trainable=False, name="plan")

    def variables(self):  # as Keras optimizers (a method): what the state holds
        return [self.iterations, self.m, self.v]


def plan_fingerprint(plan: sharding.PartitionPlan, rank: int) -> str:
    """JSON: the layout of one rank's shard (strategy, ranks, its segments): what a shard
    checkpoint must match to be restored, and what the gather tool reads."""
    return json.dumps(dict(
        describe=f"--state_split_strategy={plan.strategy} over {plan.num_ranks} ranks",
        strategy=plan.strategy, num_ranks=plan.num_ranks, rank=rank,
        segments=[[r.name, r.start, r.end] for r in plan.element_ranges(rank)]))


def build_gradient_sync(group, variables, optimizer_config: OptimizerConfig, learning_rate,
                        zero_stage: int, state_split_strategy: str, state_dir: str,
                        keep_checkpoint_max: int, norms: TensorNorms | None = None):
    """DataParallel (zero_stage 0) or ShardedOptimizer (1, 2) over `variables`, synchronised
    over the data-parallel `group`; `norms` adds the parts of tensor-parallel tensors."""
    split = norms is not None and norms.parts > 1
    if zero_stage == 0:
        from tfbert.training.optimization import KerasOptimizerUpdate, build_optimizer

        if optimizer_config.optimizer in ("lamb", "fused_lamb") and split:
            from tfbert.ops.lamb_ops import LambWithSummedNorms

            update = LambWithSummedNorms(optimizer_config, learning_rate, norms.total,
                                         use_fused_op=optimizer_config.optimizer == "fused_lamb")
        elif optimizer_config.optimizer == "fused_lamb":
            from tfbert.ops.lamb_ops import FusedLambUpdate

            update = FusedLambUpdate(optimizer_config, learning_rate, use_fused_op=True)
        else:
            update = KerasOptimizerUpdate(build_optimizer(optimizer_config, learning_rate))
        return DataParallel(group, update, variables, norms)
    shapes = [(variable_name(v), tuple(v.shape)) for v in variables]
    plan = sharding.partition_plan(shapes, group.size, state_split_strategy)
    return ShardedOptimizer(group, variables, plan, zero_stage, optimizer_config, learning_rate,
                            state_dir, keep_checkpoint_max, norms)
