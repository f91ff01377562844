"""The training loop of every task: a custom loop over one `tf.function` training step.

A task is a model (`tfbert.modeling.models.BertTaskModel`: pretraining, classification, ...)
that returns its losses and metrics; the loop owns precision, XLA, Horovod, gradient
accumulation, checkpoints, evaluation, logging and resume, and does not know which task it
trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Iterator

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config

from tfbert.config import Config, ConfigError, atomic_write_text, better
from tfbert.distributed import ProcessGroups, SingleProcess
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling import tensor_parallel
from tfbert.modeling.models import create_model
from tfbert.checkpoints import sharded
from tfbert.checkpoints import (CheckpointError, CheckpointKeeper, NamedCheckpointKeeper,
                                checkpoint_step, init_from_pretrained)
from tfbert.training.grappler import StepGrapplerOptions
from tfbert.training.interruption import StepWatchdog, StopRequests
from tfbert.training.memory import PeakMemory, peak_rss_bytes
from tfbert.training import sharding
from tfbert.training.gradient_sync import TensorNorms, build_gradient_sync, variable_name
from tfbert.training.optimization import WarmupPolynomialDecay, clip_scale
from tfbert.training.precision import DynamicLossScale
from tfbert.training.tracing import graph_function
from tfbert.training.xla import configure_xla



def _operations_with_branches(graph: tf.Graph, seen: set | None = None):
    """The operations of a traced graph and of the functions its control flow calls (the
    branches of a tf.cond, the body of a loop), recursively."""
    seen = set() if seen is None else seen
    for op in graph.get_operations():
        yield op
        for attr in ("then_branch", "else_branch", "body", "cond", "f"):
            try:
                name = op.get_attr(attr).name
            except (ValueError, AttributeError):
                continue
            if name in seen:
                continue
            seen.add(name)
            function = graph._get_function(name)  # pylint: disable=protected-access
            if function is not None and hasattr(function, "graph"):
                yield from _operations_with_branches(function.graph, seen)


def format_figure(value: float) -> str:
    """A logged figure: 4 decimals, or 4 significant digits when that would show 0.0000 (an
    attention MSE of 3e-5 is not zero)."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.4g}"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had non-finite gradients. Those steps were skipped, so the
    weights are still finite, but no checkpoint is written after them."""


class Preempted(RuntimeError):
    """A SIGTERM/SIGINT stopped the run after a checkpoint was saved; run the same command
    again to resume.

    Attributes:
      signal_number: the signal that arrived first (on any rank).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class _EvaluationState:
    """Evaluation during training: when it runs, where its figures go, the best checkpoint
    (`<checkpoint dir>/best`, the model's weights with the run's config and tokenizer, so
    `--init_checkpoint` and `--mode=predict` read it) and early stopping.

    Every rank takes part in an evaluation and gets the same figures (the evaluator reduces
    them over ranks), so every rank takes the same early-stopping decision.
    """

    def __init__(self, trainer: "Trainer", log_path: str | None):
        task = trainer.config.task
        self.trainer = trainer
        self.enabled = trainer.evaluator is not None
        self.every = task.eval_every_n_steps
        self.metric = task.best_metric if self.enabled else ""
        self.patience = task.early_stopping_patience
        self.best_dir = os.path.join(trainer.checkpoint_dir, "best")
        self.log_path = log_path
        self.best_value = self.best_step = None
        self.best_metrics: dict[str, float] = {}
        self.since_best = 0  # evaluations since the best one
        self.last: dict[str, float] = {}
        self.last_step = None
        self.should_stop = False
        self.writer = (tf.summary.create_file_writer(
            os.path.join(trainer.config.runtime.output_dir, "eval"))
            if self.enabled and trainer.group.is_chief else tf.summary.create_noop_writer())

    def resume(self, step: int) -> None:
        """Takes up the best evaluation so far of a resumed run (rank 0 reads it, every rank
        gets it: on several machines only rank 0's disk may hold it)."""
        if not self.metric:
            return
        path = os.path.join(self.best_dir, "best.json")
        state = None
        if self.trainer.group.is_chief and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        state = self.trainer.group.broadcast_object(state)
        # A best step past the resumed one was evaluated by a run stopped before its
        # checkpoint: this run evaluates that step again.
        if state and state["metric"] == self.metric and state["step"] <= step:
            self.best_value, self.best_step = state["value"], state["step"]
            self.best_metrics = state["metrics"]
            if self.every:
                self.since_best = step // self.every - self.best_step // self.every

    def due(self, step: int, end_step: int) -> bool:
        return self.enabled and (step == self.trainer.config.runtime.num_train_steps
                                 or bool(self.every) and step % self.every == 0)

    def run(self, step: int) -> float:
        """Evaluates at `step`; returns the seconds it took."""
        start = time.perf_counter()
        metrics = {name: float(value)
                   for name, value in self.trainer.evaluator.evaluate(self.trainer.model).items()}
        seconds = time.perf_counter() - start
        self.last, self.last_step = metrics, step
        logging.info("eval at step %d | %s | %.1f s", step,
                     " | ".join(f"{name} {format_figure(value)}"
                                for name, value in metrics.items()),
                     seconds)
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        if self.log_path:
            record = dict(step=step, eval_seconds=seconds,
                          **{f"eval_{name}": value for name, value in metrics.items()})
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.metric:
            if better(self.metric, metrics[self.metric], self.best_value):
                self.best_value, self.best_step, self.best_metrics = (
                    metrics[self.metric], step, metrics)
                self.since_best = 0
                self._save_best(step)
            else:
                self.since_best += 1
                self.should_stop = bool(self.patience) and self.since_best >= self.patience
        return seconds

    def _save_best(self, step: int) -> None:
        trainer = self.trainer
        if not trainer.data_group.is_chief:  # one writer per tensor-parallel part
            return
        keeper = NamedCheckpointKeeper(self.best_dir, 1, trainer.model.variables_by_name())
        prefix = keeper.save(step)
        if trainer.tensor_group.size == 1:
            # A model directory of its own: --init_checkpoint=<output_dir>/best reads it.
            trainer.config.save(os.path.join(self.best_dir, "config.json"))
            atomic_write_text(os.path.join(self.best_dir, "bert_config.json"),
                              json.dumps(trainer.config.model.to_bert_config(), indent=2) + "\n")
            if trainer.tokenizer is not None:
                trainer.tokenizer.save_pretrained(self.best_dir)
        # Last: best.json names a checkpoint that is complete.
        atomic_write_text(os.path.join(self.best_dir, "best.json"), json.dumps(dict(
            metric=self.metric, value=self.best_value, step=step, metrics=self.best_metrics,
            checkpoint=prefix), indent=2) + "\n")
        logging.info("New best %s %.6g at step %d: %s", self.metric, self.best_value, step, prefix)

    def summary(self) -> dict:
        """The last evaluation's figures (eval_<name>) and the best one's (best_eval_<name>)."""
        figures = {f"eval_{name}": value for name, value in self.last.items()}
        if self.last:
            figures["eval_step"] = self.last_step
        if self.metric:
            figures.update(best_metric=self.metric, best_step=self.best_step,
                           best_checkpoint=(os.path.join(self.best_dir, f"ckpt-{self.best_step}")
                                            if self.best_step is not None else None),
                           stopped_early=self.should_stop,
                           **{f"best_eval_{name}": value
                              for name, value in self.best_metrics.items()})
        return figures


# The stop requests summed over ranks in every step: [signal received, chief's save timer due].
_STOP, _SAVE_DUE = 0, 1


class Trainer:
    """Owns the model, optimizer, step counter and checkpoints of one training run, of any task
    (`config.task`; `tfbert.modeling.models.create_model` builds its model).

    Args:
      config: the frozen run configuration.
      dataset: tf.data.Dataset of the task's feature dicts (pretraining records:
        `tfbert.data.pretraining_dataset`; fine-tuning tables: `tfbert.data.finetuning_dataset`),
        already sharded for this rank. Its iterator is checkpointed, so a resumed run reads on
        where the interrupted one stopped.
      group: the run's `ProcessGroups` (world, data-parallel, tensor-parallel), or one group,
        which is then both the world and the data-parallel group (no tensor parallelism).
      tokenizer: the run's tokenizer; needed by --init_embeddings_from.
      evaluator: evaluates the model on held-out data (`tfbert.training.evaluation`) every
        --eval_every_n_steps and at the end; None: no evaluation.

    Under tensor parallelism each tensor-parallel rank keeps its part of the model and of the
    optimizer state in its own directory, `<output_dir>/tensor_parallel/tp-<k>` (written by
    the first data-parallel rank of that part); `tfbert.tools.gather_checkpoint` joins them.
    """

    def __init__(self, config: Config, dataset: tf.data.Dataset, group=None, tokenizer=None,
                 evaluator=None):
        self.config = config
        group = group or SingleProcess()
        if not isinstance(group, ProcessGroups):
            group = ProcessGroups(world=group, data=group,
                                  tensor=SingleProcess(global_rank=group.rank))
        self.groups = group
        self.group = group.world  # logs, summaries, stop requests, per-rank figures
        self.data_group = group.data  # gradients, ZeRO, the input shard, shared state
        self.tensor_group = group.tensor  # the model's parts
        runtime = config.runtime
        if runtime.init_embeddings_from and tokenizer is None:
            raise ConfigError("--init_embeddings_from maps words to tokens with the run's "
                              "tokenizer; give --vocab_file")
        self.tokenizer = tokenizer
        self.jit_compile = configure_xla(runtime.xla)
        # After configure_xla: the step's grappler config starts from the process's config,
        # which carries the auto-clustering setting.
        self.grappler = StepGrapplerOptions(runtime.memory_optimization, runtime.suppress_grappler)
        if runtime.deterministic:
            tf.config.experimental.enable_op_determinism()
        # Same initial weights on every rank (a tensor-parallel part is its slice of them);
        # dropout masks per data-parallel replica. The masks of replicated activations are the
        # same on the ranks of a tensor-parallel group; those of a rank's own attention heads
        # come from a generator of its own.
        tf.keras.utils.set_random_seed(runtime.seed)
        self.rng = DropoutRng(runtime.seed + 1_000_003 * self.data_group.rank)
        tensor_parallel_size = self.tensor_group.size
        self.attention_rng = (DropoutRng(runtime.seed + 1_000_003 * self.data_group.rank
                                         + 7_919 * (1 + self.tensor_group.rank))
                              if tensor_parallel_size > 1 else None)

        self.model = create_model(config, self.rng, tensor_group=self.tensor_group,
                                  attention_rng=self.attention_rng)
        self.model.build_from_example({
            name: tf.zeros([1] + spec.shape[1:].as_list(), spec.dtype)
            for name, spec in dataset.element_spec.items()})
        self.evaluator = evaluator
        self.variables = self.model.trainable_variables
        # The variables the loss does not reach (`_is_frozen`), found by the first trace.
        self._without_gradient: set = set()
        gated = config.model.hidden_act == "geglu"
        self.tensor_norms = TensorNorms(self.tensor_group, [
            tensor_parallel_size > 1 and tensor_parallel.split_of(variable_name(v), gated)
            is not None for v in self.variables])
        # Where this rank's part of the shared state lives.
        self.checkpoint_dir = runtime.output_dir
        if tensor_parallel_size > 1:
            self.checkpoint_dir = sharded.part_dir(runtime.output_dir, self.tensor_group.rank)

        # Counts training steps, including steps skipped for non-finite gradients.
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        # Skipped steps in a row; --max_consecutive_nonfinite_steps of them stop the run.
        self.nonfinite_streak = tf.Variable(0, dtype=tf.int64, trainable=False,
                                            name="nonfinite_streak")
        distribution = config.distribution
        peak_learning_rate = config.optimizer.learning_rate * (
            self.data_group.size if distribution.scale_learning_rate else 1)
        self.schedule = WarmupPolynomialDecay(
            peak_learning_rate, runtime.num_train_steps,
            config.optimizer.num_warmup_steps, config.optimizer.end_learning_rate,
            config.optimizer.decay_power)
        learning_rate = lambda: self.schedule(self.global_step)  # noqa: E731
        # How gradients cross ranks and update the weights: data parallelism or ZeRO-1/2.
        self.sync = build_gradient_sync(
            self.data_group, self.variables, config.optimizer, learning_rate,
            zero_stage=distribution.zero_stage,
            state_split_strategy=distribution.state_split_strategy,
            state_dir=os.path.join(self.checkpoint_dir, sharded.STATE_DIR),
            keep_checkpoint_max=runtime.keep_checkpoint_max, norms=self.tensor_norms)
        if distribution.zero_stage and self.group.is_chief:
            self.log_sharding()
        self.loss_scale = (DynamicLossScale(runtime.initial_loss_scale,
                                            runtime.loss_scale_growth_interval)
                           if runtime.precision == "fp16" else None)

        self._batch_spec = dataset.element_spec
        self.iterator: Iterator = iter(dataset)
        self.metric_names = tuple(self.model.metric_names) + ("grad_norm",)
        self.metrics = {name: tf.keras.metrics.Mean(name) for name in self.metric_names}
        # The state every rank shares (written by rank 0), under documented names; the
        # objects are those of tfbert 0.1's object-based checkpoints, which still restore.
        legacy = dict(model=self.model, global_step=self.global_step,
                      skipped_steps=self.skipped_steps, nonfinite_streak=self.nonfinite_streak,
                      **self.sync.checkpoint_items())
        if self.loss_scale is not None:
            legacy["loss_scale"] = self.loss_scale
        markers = dict(self.sync.checkpoint_markers())
        if tensor_parallel_size > 1:
            markers.update(sharded.tensor_parallel_markers(
                self.tensor_group.rank, tensor_parallel_size, gated))
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        # A tensor-parallel part keeps one checkpoint more: a job stopped while the parts were
        # being written resumes from the step before, which every part then still has.
        self.checkpoints = NamedCheckpointKeeper(
            self.checkpoint_dir, runtime.keep_checkpoint_max + (tensor_parallel_size > 1),
            self.named_state(), legacy_objects=legacy, markers=markers)
        # ... and the state of each rank: its position in its data shard and its dropout RNG.
        # One more is kept than of the shared state: each rank writes its state before rank 0
        # commits the shared checkpoint, so a job killed in between still finds the rank state
        # that matches the newest shared checkpoint.
        rank_dir = os.path.join(runtime.output_dir, "rank_state", f"rank-{self.group.rank}")
        os.makedirs(rank_dir, exist_ok=True)
        rank_objects = dict(dropout_rng=self.rng.generator, data_iterator=self.iterator)
        if self.attention_rng is not None:
            rank_objects["attention_dropout_rng"] = self.attention_rng.generator
        self.rank_checkpoints = CheckpointKeeper(
            rank_dir, runtime.keep_checkpoint_max + 1, **rank_objects)

        self.accumulation_steps = distribution.num_accumulation_steps
        # XLA cannot compile Horovod's collectives on every device (not at all on a CPU): under
        # Horovod, --xla=jit compiles the forward and backward pass, and the all-reduce and the
        # update run beside the compiled part.
        jit_collectives = self.jit_compile and not self.group.uses_horovod
        if distribution.uses_accumulation:
            dtype = tf.as_dtype(distribution.grad_accum_dtype)
            # Per variable; one flat shard under ZeRO-2.
            self.accumulators = [
                tf.Variable(tf.zeros(shape, dtype), trainable=False, name=f"accumulated/{i}")
                for i, shape in enumerate(self.sync.accumulator_shapes())]
            if self.jit_compile and not jit_collectives and self.sync.zero_stage == 2:
                # ZeRO-2 reduce-scatters each micro-batch: compile the gradients, not that.
                self.micro_gradients_step = graph_function(self._gradients_and_metrics,
                                                           jit_compile=True)
                self.add_micro_step = graph_function(self._add_to_accumulators)
                self.accumulate_step = lambda batch, frozen=False: self.add_micro_step(
                    self.micro_gradients_step(batch, frozen)[1])
            else:
                self.accumulate_step = graph_function(self._accumulate,
                                                      jit_compile=self.jit_compile)
            self.apply_accumulated_step = graph_function(self._apply_accumulated,
                                                         jit_compile=jit_collectives)
        elif self.jit_compile and not jit_collectives:
            self.gradients_step = graph_function(self._gradients_and_metrics, jit_compile=True)
            self.finish_step = graph_function(self._finish_batch_step)
            self.train_step = lambda batch, requests, frozen=False: self._join(
                self.gradients_step(batch, frozen), self.finish_step, requests, frozen)
        else:
            self.train_step = graph_function(self._train_step, jit_compile=self.jit_compile)
        self._start_step = None

    # ----------------------------------------------------------------------------------------
    def restore_or_initialize(self) -> int:
        """Resumes from the newest checkpoint in output_dir, else loads --init_checkpoint's
        weights, else keeps the fresh initialisation. Returns the step training starts at."""
        restored = self.checkpoints.restore(self._agreed_checkpoint())
        if restored and self.sync.zero_stage == 0:
            sharded.check_not_sharded(restored)
        if restored:
            step = checkpoint_step(restored)
            rank_state = self.rank_checkpoints.restore_step(step)
            if rank_state is None:
                logging.warning(
                    "Rank %d has no data position saved at step %d (the number of ranks "
                    "changed?): its input pipeline starts afresh, so this resume is not exact",
                    self.group.rank, step)
            logging.info("Resumed from %s at step %d", restored, int(self.global_step))
        elif self.config.runtime.init_checkpoint:
            source = init_from_pretrained(self.model, self.config.runtime.init_checkpoint,
                                          sources=self.model.init_sources)
            logging.info("Initialised weights from %s", source)
        elif self.config.runtime.init_embeddings_from and self.group.is_chief:
            self._init_embeddings_from_vectors()  # rank 0 reads; the broadcast below shares
        # Every rank starts from its replica's first rank's weights, optimizer state and counters
        # (also when only that rank can read the checkpoint). Slots exist already, so no first
        # step is needed.
        self.data_group.broadcast_variables(self.shared_variables())
        # ZeRO: each rank's own part of the optimizer state (after the broadcast of the step).
        self.sync.restore(restored or None, int(self.global_step))
        self._start_step = int(self.global_step)
        return self._start_step

    def _agreed_checkpoint(self) -> str | None:
        """The checkpoint to resume from: the newest one, or under tensor parallelism the newest
        step every part has (a job stopped while the parts were being written has the newer
        step in some parts only)."""
        latest = self.checkpoints.latest
        if self.tensor_group.size == 1:
            if latest is None:
                sharded.check_no_tensor_parallel_parts(self.config.runtime.output_dir)
            return latest
        sharded.check_not_whole(self.config.runtime.output_dir)
        steps = self.group.allgather_values([checkpoint_step(latest) if latest else -1])[:, 0]
        if steps.max() < 0:
            return None
        if steps.min() < 0:
            raise CheckpointError(
                f"{self.config.runtime.output_dir}: some tensor-parallel parts have checkpoints "
                f"and others none (tensor_parallel/tp-*): was --tensor_parallel_size changed? "
                f"Resume with the value the run was written with")
        step = int(steps.min())
        prefix = os.path.join(self.checkpoint_dir, f"ckpt-{step}")
        if not tf.io.gfile.exists(prefix + ".index"):
            raise CheckpointError(f"{prefix} is missing: the tensor-parallel parts of "
                                  f"{self.config.runtime.output_dir} share no checkpoint step")
        return prefix

    def log_sharding(self) -> None:
        """Rank 0's start-up table of what each rank holds under ZeRO (from shapes)."""
        distribution = self.config.distribution
        shapes = [(variable_name(v), tuple(v.shape)) for v in self.variables]
        grad_bytes = (tf.as_dtype(distribution.grad_accum_dtype).size
                      if distribution.uses_accumulation else 4)
        table = sharding.byte_table(shapes, self.data_group.size,
                                    distribution.state_split_strategy,
                                    distribution.zero_stage, grad_bytes=grad_bytes)
        logging.info("ZeRO-%d: what each rank holds (activations not counted)\n%s",
                     distribution.zero_stage, sharding.format_byte_table(table, (
                         f"vocab_size={self.config.model.vocab_size}, {self.data_group.size} "
                         f"data-parallel ranks, "
                         f"--state_split_strategy={distribution.state_split_strategy}")))

    def _init_embeddings_from_vectors(self) -> None:
        from tfbert.training.embedding_init import embedding_init_from_vectors, format_report

        runtime, model = self.config.runtime, self.config.model
        table, report = embedding_init_from_vectors(
            runtime.init_embeddings_from, self.tokenizer, model.hidden_size,
            initial_table=self.model.word_embeddings.numpy(),
            initializer_range=model.initializer_range,
            max_words=runtime.init_embeddings_max_words or None, seed=runtime.seed)
        self.model.word_embeddings.assign(table)
        logging.info("Word embeddings from %s: %s", runtime.init_embeddings_from,
                     format_report(report))

    def named_state(self) -> dict[str, tf.Variable]:
        """The shared training state by checkpoint name (`tfbert.checkpoints.native`)."""
        state = dict(self.model.variables_by_name())
        state.update(self.sync.named_state())
        state.update({"global_step": self.global_step,
                      "training/skipped_steps": self.skipped_steps,
                      "training/nonfinite_streak": self.nonfinite_streak})
        if self.loss_scale is not None:
            state.update({"training/loss_scale": self.loss_scale.scale,
                          "training/loss_scale_good_steps": self.loss_scale.good_steps})
        return state

    @property
    def update(self):
        """The optimizer update of data parallelism (KerasOptimizerUpdate, FusedLambUpdate)."""
        return self.sync.update

    def shared_variables(self) -> list[tf.Variable]:
        """Everything that must be equal on all ranks."""
        variables = list(self.model.variables) + self.sync.shared_variables()
        variables += [self.global_step, self.skipped_steps, self.nonfinite_streak]
        if self.loss_scale is not None:
            variables += [self.loss_scale.scale, self.loss_scale.good_steps]
        return variables

    def _is_frozen(self, variable, frozen: bool) -> bool:
        """Whether `variable` is left as it is this step: the frozen word embeddings, or a
        variable the task's loss never reaches (a student's pooler in distillation, the pooler
        in token classification). Those must not be updated in any mode: an accumulator or a
        ZeRO shard would otherwise turn their missing gradient into zeros, and the optimizer's
        weight decay would still move them."""
        return ((frozen and variable is self.model.word_embeddings)
                or variable.ref() in self._without_gradient)

    def _compute_gradients(self, batch: dict[str, tf.Tensor], frozen: bool = False):
        """Losses (float32 scalars) and the gradients of the (loss-scaled) loss.

        frozen: the word embeddings are frozen (--freeze_embeddings_steps): their gradient is
        None, neither computed nor sent to other ranks, and the optimizer skips them.
        """
        trained = [v for v in self.variables if not self._is_frozen(v, frozen)]
        with tf.GradientTape() as tape:
            outputs = self.model.compute_losses(batch, training=True)
            loss = outputs["loss"]
            if self.loss_scale is not None:
                loss = self.loss_scale.scale_loss(loss)
        grads = tape.gradient(loss, trained)
        # Known when the step is traced, before the update that reads it is traced.
        self._without_gradient.update(v.ref() for v, g in zip(trained, grads) if g is None)
        by_variable = {v.ref(): g for v, g in zip(trained, grads)}
        return outputs, [by_variable.get(v.ref()) for v in self.variables]

    def _update_loss_metrics(self, outputs):
        """Adds the step's figures to the window's means; a non-finite figure is left out (its
        step is skipped and counted instead)."""
        for name, metric in self.metrics.items():
            if name in outputs:
                finite = tf.math.is_finite(outputs[name])
                metric.update_state(tf.where(finite, outputs[name], 0.0),
                                    sample_weight=tf.cast(finite, tf.float32))

    def _finish_step(self, grads, requests: tf.Tensor, frozen: bool = False
                     ) -> dict[str, tf.Tensor]:
        """Averages over ranks, unscales, clips and applies one optimizer step, or skips it when
        any gradient is not finite (in every precision: such a step would write NaN into the
        weights). Returns grad_norm, learning_rate, nonfinite_streak and the stop requests
        summed over ranks.

        grads: as `self.sync.micro_batch_gradients` returns them (or their accumulation).
        """
        grads = self.sync.step_gradients(grads)
        requests = self.group.sum_over_ranks(requests)
        if self.loss_scale is not None:
            grads = self.loss_scale.unscale(grads)
        # The same on every rank (all-reduced gradients, or a norm summed over ranks), so every
        # rank takes the same skip decision.
        grad_norm = self.sync.global_norm(grads)
        grads_are_finite = tf.math.is_finite(grad_norm)
        clip_norm = self.config.optimizer.clip_norm
        learning_rate = self.schedule(self.global_step)
        # Clipped by the global norm and skipped when it is not finite, both inside the update
        # (a fused LAMB op reads the gradients through the factor and skips by itself).
        self.sync.apply(grads, [self._is_frozen(v, frozen) for v in self.variables],
                        grad_scale=clip_scale(grad_norm, clip_norm) if clip_norm > 0 else None,
                        apply_update=grads_are_finite)
        if self.loss_scale is not None:
            self.loss_scale.update(grads_are_finite)
        skipped = tf.cast(tf.logical_not(grads_are_finite), tf.int64)
        self.skipped_steps.assign_add(skipped)
        self.nonfinite_streak.assign((self.nonfinite_streak + 1) * skipped)
        self.global_step.assign_add(1)
        self._update_loss_metrics(dict(grad_norm=grad_norm))
        return dict(grad_norm=grad_norm, learning_rate=learning_rate, requests=requests,
                    nonfinite_streak=self.nonfinite_streak.read_value())

    def _gradients_and_metrics(self, batch: dict[str, tf.Tensor], frozen: bool = False):
        outputs, grads = self._compute_gradients(batch, frozen)
        self._update_loss_metrics(outputs)
        return outputs, grads

    @staticmethod
    def _join(outputs_and_grads, finish_step, requests, frozen):
        outputs, grads = outputs_and_grads
        return dict(outputs, **finish_step(grads, requests, frozen))

    def _finish_batch_step(self, grads, requests: tf.Tensor, frozen: bool = False):
        """The step after one batch's gradients (no accumulation)."""
        return self._finish_step(self.sync.micro_batch_gradients(grads), requests, frozen)

    def _train_step(self, batch: dict[str, tf.Tensor], requests: tf.Tensor, frozen: bool = False):
        """One optimizer step on one batch."""
        return self._join(self._gradients_and_metrics(batch, frozen), self._finish_batch_step,
                          requests, frozen)

    def _accumulate(self, batch: dict[str, tf.Tensor], frozen: bool = False) -> dict[str, tf.Tensor]:
        """Adds one micro-batch's gradients, divided by the number of micro-batches, to the
        accumulators."""
        outputs, grads = self._gradients_and_metrics(batch, frozen)
        self._add_to_accumulators(grads)
        return outputs

    def _add_to_accumulators(self, grads) -> None:
        """Data parallelism and ZeRO-1: nothing crosses ranks here, the all-reduce happens once
        per step. ZeRO-2: the micro-batch is reduce-scattered now, into 1/n-sized accumulators."""
        grads = self.sync.micro_batch_gradients(grads)
        for accumulator, grad in zip(self.accumulators, grads):
            if grad is None:
                continue
            # Divided before the cast: the sum stays the size of one big batch's gradient. In
            # float16 an overflow becomes inf, which the step then detects and skips. A sparse
            # gradient is summed into its dense accumulator here, so what crosses ranks under
            # accumulation is always the dense accumulator.
            grad = tf.convert_to_tensor(grad) / self.accumulation_steps
            accumulator.assign_add(tf.cast(grad, accumulator.dtype))

    def _apply_accumulated(self, requests: tf.Tensor, frozen: bool = False) -> dict[str, tf.Tensor]:
        """The optimizer step over the accumulated gradients; then clears the accumulators."""
        grads = self.sync.accumulated_gradients(
            self.accumulators, [self._is_frozen(v, frozen) for v in self.variables])
        result = self._finish_step(grads, requests, frozen)
        for accumulator in self.accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return result

    def run_step(self, requests=(0.0, 0.0), frozen: bool = False) -> dict[str, tf.Tensor]:
        """One optimizer step: one batch, or `num_accumulation_steps` micro-batches.

        Args:
          requests: this rank's [stop, save] requests (0 or 1), summed over ranks in the step.
          frozen: keep the word embeddings as they are (a second traced step, without their
            gradient).
        """
        requests = tf.constant(requests, tf.float32)
        if self.accumulation_steps == 1:
            batch = self._next_batch()
            with self.grappler.scope():
                return self.train_step(batch, requests, frozen)
        for _ in range(self.accumulation_steps):
            batch = self._next_batch()
            with self.grappler.scope():
                self.accumulate_step(batch, frozen)
        with self.grappler.scope():
            return self.apply_accumulated_step(requests, frozen)

    def step_graphs(self) -> list[tf.Graph]:
        """The traced graphs of one optimizer step (tracing them now if needed; the training
        loop then reuses these traces)."""
        requests = tf.TensorSpec([2], tf.float32)
        if hasattr(self, "micro_gradients_step"):
            gradients = self.micro_gradients_step.get_concrete_function(self._batch_spec)
            grad_specs = [tf.type_spec_from_value(g) for g in gradients.structured_outputs[1]]
            functions = [gradients, self.add_micro_step.get_concrete_function(grad_specs),
                         self.apply_accumulated_step.get_concrete_function(requests)]
        elif self.accumulation_steps > 1:
            functions = [self.accumulate_step.get_concrete_function(self._batch_spec),
                         self.apply_accumulated_step.get_concrete_function(requests)]
        elif hasattr(self, "finish_step"):
            gradients = self.gradients_step.get_concrete_function(self._batch_spec)
            grad_specs = [tf.type_spec_from_value(g) for g in gradients.structured_outputs[1]]
            functions = [gradients, self.finish_step.get_concrete_function(grad_specs, requests)]
        else:
            functions = [self.train_step.get_concrete_function(self._batch_spec, requests)]
        return [f.graph for f in functions]

    def step_collectives(self) -> list[dict]:
        """What crosses ranks in one optimizer step, read from the step's graphs: one dict per
        collective with its op ("HorovodAllreduce", "HorovodAllgather", ...), dtype, shape and
        the bytes this rank sends."""
        collectives = []
        for graph in self.step_graphs():
            for op in _operations_with_branches(graph):
                if not op.type.startswith("Horovod"):
                    continue
                tensor = op.inputs[0]
                shape = tensor.shape.as_list()
                elements = int(np.prod(shape)) if None not in shape else None
                collectives.append(dict(
                    op=op.type, name=op.name, dtype=tensor.dtype.name, shape=shape,
                    bytes=elements * tensor.dtype.size if elements is not None else None))
        return collectives

    def log_communication(self) -> None:
        """Logs, on rank 0, the collectives of one step and their bytes per rank."""
        if not self.group.uses_horovod:
            return
        by_op = {}
        for collective in self.step_collectives():
            count, size = by_op.get(collective["op"], (0, 0))
            by_op[collective["op"]] = (count + 1, size + (collective["bytes"] or 0))
        logging.info("Each step sends, per rank: %s", "; ".join(
            f"{op} x{count} ({size / 2**20:.2f} MiB)" for op, (count, size) in sorted(by_op.items())))

    # ----------------------------------------------------------------------------------------
    def _next_batch(self):
        try:
            return next(self.iterator)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            from tfbert.data.pretraining_dataset import DataError, describe_data_error

            raise DataError(describe_data_error(e, list(self.config.data.input_files))) from None

    def save_checkpoint(self, step: int) -> None:
        """Every rank writes its own state, then rank 0 writes the shared state and moves the
        index: a job killed at any point resumes from a complete, matching pair."""
        self.rank_checkpoints.save(step)
        self.sync.save(step)  # ZeRO: this rank's part of the optimizer state
        self.group.barrier()
        if self.data_group.is_chief:  # one writer per tensor-parallel part
            prefix = self.checkpoints.save(step)
            if self.group.is_chief:
                logging.info("Saved checkpoint %s", prefix)

    def train(self, max_steps: int | None = None) -> dict:
        """Trains to --num_train_steps (or `max_steps` more steps, to stop early as a preempted
        job would). Writes checkpoints, logs and `summary.json`; returns the summary.

        Raises:
          TrainingDiverged: --max_consecutive_nonfinite_steps steps in a row were skipped.
          Preempted: a SIGTERM/SIGINT arrived; a checkpoint of the last step was saved.
        """
        runtime, data = self.config.runtime, self.config.data
        is_chief = self.group.is_chief
        start_step = self._start_step
        if start_step is None:
            start_step = self.restore_or_initialize()
        end_step = runtime.num_train_steps
        if max_steps is not None:
            end_step = min(end_step, start_step + max_steps)
        if start_step >= end_step:
            logging.info("Nothing to train: the run in %s is at step %d and --num_train_steps=%d",
                         runtime.output_dir, start_step, runtime.num_train_steps)
            return dict(steps=start_step, steps_this_run=0, checkpoint=self.checkpoints.latest)
        examples_per_step = data.train_batch_size * self.accumulation_steps  # per rank
        tokens_per_step = examples_per_step * data.max_seq_length

        writer = (tf.summary.create_file_writer(os.path.join(runtime.output_dir, "train"))
                  if is_chief else tf.summary.create_noop_writer())
        log_path = os.path.join(runtime.output_dir, "log.jsonl") if is_chief else None
        evaluation = _EvaluationState(self, log_path)
        evaluation.resume(start_step)
        memory = PeakMemory()
        first = None
        loop_start = time.perf_counter()
        window = dict(start_time=loop_start, start_step=start_step)
        timed = dict(start_time=None, steps=0)
        last_record = None
        step = start_step
        last_save_time = time.monotonic()
        watchdog = StepWatchdog()

        if is_chief:
            self.log_communication()
        for metric in self.metrics.values():
            metric.reset_state()
        with StopRequests() as stop_requests:
            try:
                while step < end_step:
                    watchdog.arm(runtime.first_step_timeout_secs if first is None
                                 else runtime.step_timeout_secs)
                    save_due = (is_chief and runtime.save_checkpoints_secs > 0 and
                                time.monotonic() - last_save_time >= runtime.save_checkpoints_secs)
                    outputs = self.run_step([float(stop_requests.signal_number > 0),
                                             float(save_due)],
                                            frozen=step < runtime.freeze_embeddings_steps)
                    step += 1
                    if (runtime.debug_fail_at_step == step
                            and runtime.debug_fail_rank == self.group.rank):
                        self._inject_failure(step)
                    streak = int(outputs["nonfinite_streak"])
                    if streak >= runtime.max_consecutive_nonfinite_steps:
                        raise TrainingDiverged(
                            f"{streak} steps in a row (to step {step}) had non-finite gradients "
                            f"(--max_consecutive_nonfinite_steps="
                            f"{runtime.max_consecutive_nonfinite_steps}); they were skipped and "
                            f"no checkpoint was written after them. The last checkpoint is "
                            f"{self.checkpoints.latest}")
                    if first is None:
                        # The first step traces and compiles: excluded from the throughput.
                        first = {name: float(m.result()) for name, m in self.metrics.items()}
                        timed["start_time"] = time.perf_counter()
                        timed["first_step_secs"] = timed["start_time"] - loop_start
                        logging.info("First step (tracing, graph optimisation and compiling "
                                     "included): %.1f s", timed["first_step_secs"])
                    else:
                        timed["steps"] += 1
                    requests = outputs["requests"].numpy()
                    stop = requests[_STOP] > 0
                    checkpoint_now = (step % runtime.save_checkpoints_steps == 0
                                      or step == end_step or requests[_SAVE_DUE] > 0 or stop)
                    if step % runtime.log_every_n_steps == 0 or checkpoint_now:
                        last_record = self._log(step, outputs, window, memory, examples_per_step,
                                                tokens_per_step, writer, log_path)
                    if step == end_step or stop:
                        # Logging synchronised; the final checkpoint is not part of the time.
                        timed["end_time"] = time.perf_counter()
                    if evaluation.due(step, end_step) and not stop:
                        # Before the checkpoint of the same step: a job stopped in between
                        # resumes from the step before and evaluates this step again.
                        seconds = evaluation.run(step)
                        window["start_time"] += seconds  # not part of the throughput
                        if timed["start_time"] is not None:
                            timed["start_time"] += seconds
                        if evaluation.should_stop:
                            checkpoint_now = True
                            logging.info("Early stopping at step %d: --best_metric=%s has not "
                                         "improved on %.6g (step %d) for %d evaluations",
                                         step, evaluation.metric, evaluation.best_value,
                                         evaluation.best_step, evaluation.since_best)
                            timed["end_time"] = time.perf_counter()
                    if checkpoint_now:
                        self.save_checkpoint(step)
                        last_save_time = time.monotonic()
                    watchdog.disarm()
                    if evaluation.should_stop:
                        break
                    if stop:
                        signal_number = stop_requests.signal_number or signal.SIGTERM
                        raise Preempted(
                            f"stopped by {signal.Signals(signal_number).name} after step {step}; "
                            f"checkpoint {self.checkpoints.latest or 'of step %d' % step} holds "
                            f"it: run the same command again to resume", signal_number)
            finally:
                watchdog.disarm()
        summary = self._summary(step, start_step, first, last_record, timed, memory,
                                evaluation.summary())
        return summary

    def _inject_failure(self, step: int) -> None:
        """--debug_fail_at_step: a crash or a hang of one rank, for tests of the job's exit."""
        if self.config.runtime.debug_fail_mode == "hang":
            logging.warning("Rank %d hangs at step %d (--debug_fail_mode=hang)",
                            self.group.rank, step)
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected failure on rank {self.group.rank} at step {step} "
                           f"(--debug_fail_at_step)")

    def _summary(self, step, start_step, first, last_record, timed, memory,
                 evaluation: dict) -> dict:
        runtime, data = self.config.runtime, self.config.data
        examples_per_step = data.train_batch_size * self.accumulation_steps  # per rank
        elapsed = (timed.get("end_time") or time.perf_counter()) - (
            timed["start_time"] or time.perf_counter())
        steps_timed = timed["steps"]
        examples_per_sec = examples_per_step * steps_timed / elapsed if steps_timed else 0.0
        # Per-rank figures, gathered on every rank (all ranks must take part).
        state_bytes = self.state_bytes()
        per_rank = self.group.allgather_values(
            [examples_per_sec, memory.run_peak_bytes, peak_rss_bytes(), self.weights_checksum()]
            + list(state_bytes.values()))
        summary = dict(steps=int(self.global_step), steps_this_run=step - start_step,
                       task=self.config.task.task)
        for name in self.model.metric_names:
            # The first step's figures and those of the last logging window.
            summary[f"first_{name}"] = first[name] if first else None
            summary[f"final_{name}"] = last_record[name] if last_record else None
        summary.update(evaluation)
        # After the all-gather: the other ranks are done when rank 0 measures the matmul peak.
        summary.update(self._utilisation(examples_per_sec))
        summary.update(
            # Per rank (this one), then over all ranks.
            examples_per_sec=examples_per_sec,
            tokens_per_sec=examples_per_sec * data.max_seq_length,
            first_step_secs=timed.get("first_step_secs"),
            peak_memory_bytes=memory.run_peak_bytes, peak_rss_bytes=peak_rss_bytes(),
            # Each replica's examples once (its tensor-parallel ranks read the same batch).
            examples_per_sec_total=float(per_rank[:, 0].sum()) / self.tensor_group.size,
            tokens_per_sec_total=(float(per_rank[:, 0].sum()) / self.tensor_group.size
                                  * data.max_seq_length),
            peak_memory_bytes_min=int(per_rank[:, 1].min()),
            peak_memory_bytes_max=int(per_rank[:, 1].max()),
            peak_memory_bytes_total=int(per_rank[:, 1].sum()),
            per_rank=dict(examples_per_sec=per_rank[:, 0].tolist(),
                          peak_memory_bytes=per_rank[:, 1].astype(int).tolist(),
                          peak_rss_bytes=per_rank[:, 2].astype(int).tolist(),
                          weights_checksum=per_rank[:, 3].astype(int).tolist(),
                          **{name: per_rank[:, 4 + i].astype(int).tolist()
                             for i, name in enumerate(state_bytes)}),
            zero_stage=self.config.distribution.zero_stage,
            state_split_strategy=(self.config.distribution.state_split_strategy
                                  if self.config.distribution.zero_stage else None),
            memory_device=memory.device, skipped_steps=int(self.skipped_steps),
            loss_scale=float(self.loss_scale.scale) if self.loss_scale is not None else None,
            checkpoint=self.checkpoints.latest, num_processes=self.group.size,
            tensor_parallel_size=self.tensor_group.size,
            data_parallel_size=self.data_group.size,
            train_batch_size=data.train_batch_size,
            num_accumulation_steps=self.accumulation_steps,
            global_batch_size=examples_per_step * self.data_group.size,
            max_seq_length=data.max_seq_length, precision=runtime.precision, xla=runtime.xla,
            memory_optimization=runtime.memory_optimization,
            # As TensorFlow reports it (--deterministic turns it on for the whole process).
            op_determinism=tf_config.is_op_determinism_enabled())
        if self.group.is_chief:
            atomic_write_text(os.path.join(runtime.output_dir, "summary.json"),
                              json.dumps(summary, indent=2) + "\n")
        return summary

    def _utilisation(self, examples_per_sec: float) -> dict:
        """This rank's model FLOPs utilisation (MFU): the model FLOPs its examples/s stand for
        (`BertTaskModel.flops_per_example`; a tensor-parallel rank does 1/T of its replica's)
        against the measured matmul peak of this device in the step's compute dtype
        (`tfbert.training.flops.matmul_peak`, measured once per machine and cached). Rank 0
        measures, after training; float16 on a CPU (emulated, very slow) is not measured."""
        from tfbert.training.flops import COMPUTE_DTYPES, device_description, matmul_peak

        data, precision = self.config.data, self.config.runtime.precision
        flops = self.model.flops_per_example(data.max_seq_length, data.max_predictions_per_seq)
        achieved = examples_per_sec * flops / self.tensor_group.size
        figures = dict(model_flops_per_example=flops, model_tflops_per_sec=achieved / 1e12,
                       matmul_peak_tflops=None, matmul_peak_device=None, mfu=None)
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
        if not self.group.is_chief or not achieved or (precision == "fp16" and not on_gpu):
            return figures
        dtype = COMPUTE_DTYPES[precision]
        peak = matmul_peak(dtype)
        figures.update(matmul_peak_tflops=peak / 1e12, matmul_peak_device=device_description(),
                       mfu=achieved / peak)
        logging.info("Model FLOPs utilisation %.1f%%: %.4g TFLOP/s of model FLOPs per rank "
                     "(%.3g GFLOP per example) against a %s matmul peak of %.4g TFLOP/s on %s",
                     100 * achieved / peak, achieved / 1e12, flops / 1e9, dtype, peak / 1e12,
                     figures["matmul_peak_device"])
        return figures

    def state_bytes(self) -> dict[str, int]:
        """What this rank holds between steps, in bytes: param_bytes, optimizer_state_bytes
        (m and v: all of them, or this rank's shard under ZeRO), gradient_bytes (the float32
        gradients a step hands to the update: all, or the shard under ZeRO-2) and
        accumulator_bytes (gradient accumulation)."""
        figures = self.sync.state_bytes()
        figures["accumulator_bytes"] = sum(a.shape.num_elements() * a.dtype.size
                                           for a in getattr(self, "accumulators", []))
        return figures

    def weights_checksum(self) -> int:
        """A 48-bit hash of the model weights' bytes: equal on two ranks iff bit-identical."""
        digest = hashlib.sha256()
        for variable in self.model.variables:
            digest.update(variable.numpy().tobytes())
        return int(digest.hexdigest()[:12], 16)  # 48 bits: exact in a float64

    def _log(self, step, outputs, window, memory, examples_per_step, tokens_per_step, writer,
             log_path):
        """Reads and resets the window's metrics, averages them over ranks (one small
        all-gather, which also brings every rank's peak memory), logs them and writes
        TensorBoard scalars."""
        names = list(self.metrics)
        local = [float(self.metrics[name].result()) for name in names]
        local.append(memory.window_peak())
        for metric in self.metrics.values():
            metric.reset_state()
        per_rank = self.group.allgather_values(local)  # (ranks, metrics + 1)
        record = {name: float(per_rank[:, i].mean()) for i, name in enumerate(names)}
        peaks = per_rank[:, -1]
        now = time.perf_counter()
        steps = step - window["start_step"]
        seconds = max(now - window["start_time"], 1e-9)
        window.update(start_time=now, start_step=step)
        record.update(step=step, learning_rate=float(outputs["learning_rate"]),
                      examples_per_sec=examples_per_step * steps / seconds,
                      examples_per_sec_total=(examples_per_step * steps / seconds
                                              * self.data_group.size),
                      tokens_per_sec=tokens_per_step * steps / seconds,
                      peak_memory_bytes=int(peaks[self.group.rank]),
                      peak_memory_bytes_min=int(peaks.min()),
                      peak_memory_bytes_max=int(peaks.max()), peak_rss_bytes=peak_rss_bytes(),
                      skipped_steps=int(self.skipped_steps))
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale.scale)
        gb = 2 ** 30
        logging.info(
            "step %d/%d | %s | lr %.3g | "
            "%.1f ex/s | %.0f tok/s | peak %.3f GB (ranks %.3f-%.3f) | rss %.2f GB%s%s",
            step, self.config.runtime.num_train_steps,
            " | ".join(f"{name} {format_figure(record[name])}" for name in self.model.metric_names),
            record["learning_rate"], record["examples_per_sec"], record["tokens_per_sec"],
            record["peak_memory_bytes"] / gb, record["peak_memory_bytes_min"] / gb,
            record["peak_memory_bytes_max"] / gb, record["peak_rss_bytes"] / gb,
            f" | loss scale {record['loss_scale']:.0f}" if self.loss_scale is not None else "",
            f" | skipped {record['skipped_steps']}" if record["skipped_steps"] else "")
        with writer.as_default(step=step):
            for name, value in record.items():
                if name != "step":
                    tf.summary.scalar(name, value)
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


# The name of the pretraining loop before it trained every task.
Pretrainer = Trainer
