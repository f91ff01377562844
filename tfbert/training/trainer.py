"""The pretraining loop: a custom loop over one `tf.function` training step."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Iterator

import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config

from tfbert.config import Config, atomic_write_text
from tfbert.distributed import SingleProcess
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer
from tfbert.training.checkpointing import (CheckpointKeeper, checkpoint_step,
                                           init_from_checkpoint)
from tfbert.training.grappler import StepGrapplerOptions
from tfbert.training.memory import PeakMemory, peak_rss_bytes
from tfbert.training.optimization import (KerasOptimizerUpdate, WarmupPolynomialDecay,
                                          build_optimizer)
from tfbert.training.precision import DynamicLossScale, deduplicate_indexed_slices
from tfbert.training.xla import configure_xla

METRIC_NAMES = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "grad_norm")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint is written from such weights."""


class Pretrainer:
    """Owns the model, optimizer, step counter and checkpoints of one pretraining run.

    Args:
      config: the frozen run configuration.
      dataset: tf.data.Dataset of feature dicts (see `tfbert.data.pretraining_dataset`), already
        sharded for this rank. Its iterator is checkpointed, so a resumed run reads on where
        the interrupted one stopped.
      group: the process group (`tfbert.distributed`).
    """

    def __init__(self, config: Config, dataset: tf.data.Dataset, group=None):
        self.config = config
        self.group = group or SingleProcess()
        runtime = config.runtime
        self.jit_compile = configure_xla(runtime.xla)
        # After configure_xla: the step's grappler config starts from the process's config,
        # which carries the auto-clustering setting.
        self.grappler = StepGrapplerOptions(runtime.memory_optimization, runtime.suppress_grappler)
        if runtime.deterministic:
            tf.config.experimental.enable_op_determinism()
        # Same initial weights on every rank; per-rank dropout masks.
        tf.keras.utils.set_random_seed(runtime.seed)
        self.rng = DropoutRng(runtime.seed + 1_000_003 * self.group.rank)

        self.model = BertPretrainer(config.model, self.rng, precision=runtime.precision,
                                    ops=config.ops)
        self.model.build(config.data.max_seq_length, config.data.max_predictions_per_seq)
        self.variables = self.model.trainable_variables

        # Counts training steps, including float16 steps skipped for overflow.
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
        distribution = config.distribution
        peak_learning_rate = config.optimizer.learning_rate * (
            self.group.size if distribution.scale_learning_rate else 1)
        self.schedule = WarmupPolynomialDecay(
            peak_learning_rate, runtime.num_train_steps,
            config.optimizer.num_warmup_steps, config.optimizer.end_learning_rate,
            config.optimizer.decay_power)
        learning_rate = lambda: self.schedule(self.global_step)  # noqa: E731
        if config.optimizer.optimizer == "fused_lamb":
            from tfbert.ops.lamb_ops import FusedLambUpdate

            self.update = FusedLambUpdate(config.optimizer, learning_rate, use_fused_op=True)
        else:
            self.update = KerasOptimizerUpdate(build_optimizer(config.optimizer, learning_rate))
        self.update.build(self.variables)
        self.loss_scale = (DynamicLossScale(runtime.initial_loss_scale,
                                            runtime.loss_scale_growth_interval)
                           if runtime.precision == "fp16" else None)

        self.iterator: Iterator = iter(dataset)
        self.metrics = {name: tf.keras.metrics.Mean(name) for name in METRIC_NAMES}
        # The state every rank shares (written by rank 0) ...
        shared = dict(model=self.model, global_step=self.global_step,
                      skipped_steps=self.skipped_steps, **self.update.checkpoint_items())
        if self.loss_scale is not None:
            shared["loss_scale"] = self.loss_scale
        self.checkpoints = CheckpointKeeper(runtime.output_dir, runtime.keep_checkpoint_max,
                                            **shared)
        # ... and the state of each rank: its position in its data shard and its dropout RNG.
        rank_dir = os.path.join(runtime.output_dir, "rank_state", f"rank-{self.group.rank}")
        os.makedirs(rank_dir, exist_ok=True)
        self.rank_checkpoints = CheckpointKeeper(
            rank_dir,
            runtime.keep_checkpoint_max, dropout_rng=self.rng.generator,
            data_iterator=self.iterator)

        self.accumulation_steps = distribution.num_accumulation_steps
        if distribution.uses_accumulation:
            dtype = tf.as_dtype(distribution.grad_accum_dtype)
            self.accumulators = [
                tf.Variable(tf.zeros(v.shape, dtype), trainable=False,
                            name="accumulated/" + v.name.split(":")[0]) for v in self.variables]
            self.accumulate_step = tf.function(self._accumulate, jit_compile=self.jit_compile)
            self.apply_accumulated_step = tf.function(self._apply_accumulated,
                                                      jit_compile=self.jit_compile)
        else:
            self.train_step = tf.function(self._train_step, jit_compile=self.jit_compile)

    # ----------------------------------------------------------------------------------------
    def restore_or_initialize(self) -> int:
        """Resumes from the newest checkpoint in output_dir, else loads --init_checkpoint's
        weights, else keeps the fresh initialisation. Returns the step training starts at."""
        restored = self.checkpoints.restore_latest()
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
            prefix = init_from_checkpoint(self.model, self.config.runtime.init_checkpoint)
            logging.info("Initialised weights from %s", prefix)
        # Every rank starts from rank 0's weights, optimizer state and counters (also when only
        # rank 0 can read the checkpoint). Slots exist already, so no first step is needed.
        self.group.broadcast_variables(self.shared_variables())
        return int(self.global_step)

    def shared_variables(self) -> list[tf.Variable]:
        """Everything that must be equal on all ranks."""
        variables = list(self.model.variables) + list(self.update.optimizer.variables())
        variables += [self.global_step, self.skipped_steps]
        if self.loss_scale is not None:
            variables += [self.loss_scale.scale, self.loss_scale.good_steps]
        return variables

    def _apply(self, grads):
        self.update.apply(grads, self.variables)
        return tf.constant(True)

    def _compute_gradients(self, batch: dict[str, tf.Tensor]):
        """Losses (float32 scalars) and the gradients of the (loss-scaled) loss."""
        with tf.GradientTape() as tape:
            outputs = self.model.compute_losses(batch, training=True)
            loss = outputs["loss"]
            if self.loss_scale is not None:
                loss = self.loss_scale.scale_loss(loss)
        return outputs, tape.gradient(loss, self.variables)

    def _update_loss_metrics(self, outputs):
        for name, metric in self.metrics.items():
            if name in outputs:
                metric.update_state(outputs[name])

    def _finish_step(self, grads) -> dict[str, tf.Tensor]:
        """Averages over ranks, unscales, clips and applies (or, on fp16 overflow, skips) one
        optimizer step. Returns grad_norm and learning_rate."""
        grads = self.group.allreduce_gradients(grads)
        grads = [deduplicate_indexed_slices(g) for g in grads]
        if self.loss_scale is not None:
            grads = self.loss_scale.unscale(grads)
        grad_norm = tf.linalg.global_norm(grads)
        grads_are_finite = tf.math.is_finite(grad_norm)
        clip_norm = self.config.optimizer.clip_norm
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=grad_norm)
        learning_rate = self.schedule(self.global_step)
        if self.loss_scale is not None:
            # float16: an overflowed step is skipped and the scale lowered, not applied.
            tf.cond(grads_are_finite, lambda: self._apply(grads), lambda: tf.constant(False))
            self.loss_scale.update(grads_are_finite)
            self.skipped_steps.assign_add(tf.cast(tf.logical_not(grads_are_finite), tf.int64))
        else:
            self._apply(grads)
        self.global_step.assign_add(1)
        self.metrics["grad_norm"].update_state(grad_norm)
        return dict(grad_norm=grad_norm, learning_rate=learning_rate)

    def _train_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One optimizer step on one batch."""
        outputs, grads = self._compute_gradients(batch)
        self._update_loss_metrics(outputs)
        return dict(outputs, **self._finish_step(grads))

    def _accumulate(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Adds one micro-batch's gradients, divided by the number of micro-batches, to the
        accumulators. Nothing crosses ranks here: the all-reduce happens once per step."""
        outputs, grads = self._compute_gradients(batch)
        for accumulator, grad in zip(self.accumulators, grads):
            # Divided before the cast: the sum stays the size of one big batch's gradient. In
            # float16 an overflow becomes inf, which the step then detects and skips.
            grad = tf.convert_to_tensor(grad) / self.accumulation_steps
            accumulator.assign_add(tf.cast(grad, accumulator.dtype))
        self._update_loss_metrics(outputs)
        return outputs

    def _apply_accumulated(self) -> dict[str, tf.Tensor]:
        """The optimizer step over the accumulated gradients; then clears the accumulators."""
        grads = [tf.cast(a, tf.float32) for a in self.accumulators]
        result = self._finish_step(grads)
        for accumulator in self.accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return result

    def run_step(self) -> dict[str, tf.Tensor]:
        """One optimizer step: one batch, or `num_accumulation_steps` micro-batches."""
        if self.accumulation_steps == 1:
            batch = self._next_batch()
            with self.grappler.scope():
                return self.train_step(batch)
        for _ in range(self.accumulation_steps):
            batch = self._next_batch()
            with self.grappler.scope():
                self.accumulate_step(batch)
        with self.grappler.scope():
            return self.apply_accumulated_step()

    # ----------------------------------------------------------------------------------------
    def _next_batch(self):
        try:
            return next(self.iterator)
        except tf.errors.DataLossError as e:
            from tfbert.data.pretraining_dataset import DataError, describe_data_error

            raise DataError(describe_data_error(e, list(self.config.data.input_files))) from None

    def train(self, max_steps: int | None = None) -> dict:
        """Trains to --num_train_steps (or `max_steps` more steps, to stop early as a preempted
        job would). Writes checkpoints, logs and `summary.json`; returns the summary."""
        runtime, data = self.config.runtime, self.config.data
        is_chief = self.group.is_chief
        start_step = self.restore_or_initialize()
        end_step = runtime.num_train_steps
        if max_steps is not None:
            end_step = min(end_step, start_step + max_steps)
        examples_per_step = data.train_batch_size * self.accumulation_steps  # per rank
        tokens_per_step = examples_per_step * data.max_seq_length

        writer = (tf.summary.create_file_writer(os.path.join(runtime.output_dir, "train"))
                  if is_chief else tf.summary.create_noop_writer())
        log_path = os.path.join(runtime.output_dir, "log.jsonl") if is_chief else None
        memory = PeakMemory()
        first = None
        window = dict(start_time=time.perf_counter(), start_step=start_step)
        timed = dict(start_time=None, steps=0)
        last_record = None
        step = start_step

        for metric in self.metrics.values():
            metric.reset_state()
        while step < end_step:
            outputs = self.run_step()
            step += 1
            if runtime.debug_fail_at_step == step and runtime.debug_fail_rank == self.group.rank:
                raise RuntimeError(f"injected failure on rank {self.group.rank} at step {step} "
                                   f"(--debug_fail_at_step)")
            if first is None:
                # The first step traces and compiles: it is excluded from the throughput.
                first = {name: float(metric.result()) for name, metric in self.metrics.items()}
                timed["start_time"] = time.perf_counter()
                if not math.isfinite(first["loss"]):
                    raise TrainingDiverged(f"loss is {first['loss']} at step {step}")
            else:
                timed["steps"] += 1
            checkpoint_now = step % runtime.save_checkpoints_steps == 0 or step == end_step
            if step % runtime.log_every_n_steps == 0 or checkpoint_now:
                last_record = self._log(step, outputs, window, memory, examples_per_step,
                                        tokens_per_step, writer, log_path)
            if step == end_step:
                # Logging above synchronised; the final checkpoint is not part of the steps' time.
                timed["end_time"] = time.perf_counter()
            if checkpoint_now:
                self.rank_checkpoints.save(step)
                if is_chief:
                    logging.info("Saved checkpoint %s", self.checkpoints.save(step))

        elapsed = (timed.get("end_time") or time.perf_counter()) - (
            timed["start_time"] or time.perf_counter())
        steps_timed = timed["steps"]
        examples_per_sec = examples_per_step * steps_timed / elapsed if steps_timed else 0.0
        # Per-rank figures, gathered on every rank (all ranks must take part).
        per_rank = self.group.allgather_values(
            [examples_per_sec, memory.run_peak_bytes, peak_rss_bytes(), self.weights_checksum()])
        summary = dict(
            steps=int(self.global_step), steps_this_run=step - start_step,
            first_loss=first["loss"] if first else None,
            first_mlm_loss=first["mlm_loss"] if first else None,
            final_loss=last_record["loss"] if last_record else None,
            final_mlm_loss=last_record["mlm_loss"] if last_record else None,
            final_mlm_accuracy=last_record["mlm_accuracy"] if last_record else None,
            # Per rank (this one), then over all ranks.
            examples_per_sec=examples_per_sec,
            tokens_per_sec=examples_per_sec * data.max_seq_length,
            peak_memory_bytes=memory.run_peak_bytes, peak_rss_bytes=peak_rss_bytes(),
            examples_per_sec_total=float(per_rank[:, 0].sum()),
            tokens_per_sec_total=float(per_rank[:, 0].sum()) * data.max_seq_length,
            peak_memory_bytes_max=int(per_rank[:, 1].max()),
            peak_memory_bytes_total=int(per_rank[:, 1].sum()),
            per_rank=dict(examples_per_sec=per_rank[:, 0].tolist(),
                          peak_memory_bytes=per_rank[:, 1].astype(int).tolist(),
                          peak_rss_bytes=per_rank[:, 2].astype(int).tolist(),
                          weights_checksum=per_rank[:, 3].astype(int).tolist()),
            memory_device=memory.device, skipped_steps=int(self.skipped_steps),
            loss_scale=float(self.loss_scale.scale) if self.loss_scale is not None else None,
            checkpoint=self.checkpoints.latest, num_processes=self.group.size,
            train_batch_size=data.train_batch_size,
            num_accumulation_steps=self.accumulation_steps,
            global_batch_size=examples_per_step * self.group.size,
            max_seq_length=data.max_seq_length, precision=runtime.precision, xla=runtime.xla,
            memory_optimization=runtime.memory_optimization,
            # As TensorFlow reports it (--deterministic turns it on for the whole process).
            op_determinism=tf_config.is_op_determinism_enabled())
        if is_chief:
            atomic_write_text(os.path.join(runtime.output_dir, "summary.json"),
                              json.dumps(summary, indent=2) + "\n")
        return summary

    def weights_checksum(self) -> int:
        """A 48-bit hash of the model weights' bytes: equal on two ranks iff bit-identical."""
        digest = hashlib.sha256()
        for variable in self.model.variables:
            digest.update(variable.numpy().tobytes())
        return int(digest.hexdigest()[:12], 16)  # 48 bits: exact in a float64

    def _log(self, step, outputs, window, memory, examples_per_step, tokens_per_step, writer,
             log_path):
        """Reads and resets the window's metrics, logs them and writes TensorBoard scalars."""
        record = {name: float(metric.result()) for name, metric in self.metrics.items()}
        for metric in self.metrics.values():
            metric.reset_state()
        now = time.perf_counter()
        steps = step - window["start_step"]
        seconds = max(now - window["start_time"], 1e-9)
        window.update(start_time=now, start_step=step)
        record.update(step=step, learning_rate=float(outputs["learning_rate"]),
                      examples_per_sec=examples_per_step * steps / seconds,
                      tokens_per_sec=tokens_per_step * steps / seconds,
                      peak_memory_bytes=memory.window_peak(), peak_rss_bytes=peak_rss_bytes(),
                      skipped_steps=int(self.skipped_steps))
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale.scale)
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(
                f"loss is {record['loss']} in the window ending at step {step}; the last "
                f"checkpoint ({self.checkpoints.latest}) is from before it")
        logging.info(
            "step %d/%d | loss %.4f | mlm %.4f | nsp %.4f | mlm_acc %.3f | lr %.3g | "
            "%.1f ex/s | %.0f tok/s | peak %.3f GB | rss %.2f GB%s",
            step, self.config.runtime.num_train_steps, record["loss"], record["mlm_loss"],
            record["nsp_loss"], record["mlm_accuracy"], record["learning_rate"],
            record["examples_per_sec"], record["tokens_per_sec"],
            record["peak_memory_bytes"] / 2**30, record["peak_rss_bytes"] / 2**30,
            f" | loss scale {record['loss_scale']:.0f}" if self.loss_scale is not None else "")
        with writer.as_default(step=step):
            for name, value in record.items():
                if name != "step":
                    tf.summary.scalar(name, value)
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record
