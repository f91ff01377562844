"""Learning-rate schedule, optimizers and the replaceable update step."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_addons as tfa

from tfbert.config import OptimizerConfig
from tfbert.training.precision import scale_gradient


class WarmupPolynomialDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """google-research/bert's schedule: polynomial decay from `peak` to `end` over
    `num_train_steps`, with the first `num_warmup_steps` replaced by a linear ramp from 0.

    Args:
      step: int or int Tensor, the number of optimizer steps taken so far.
    Returns: float32 scalar.
    """

    def __init__(self, peak: float, num_train_steps: int, num_warmup_steps: int = 0,
                 end: float = 0.0, power: float = 1.0):
        self.peak = peak
        self.num_train_steps = num_train_steps
        self.num_warmup_steps = num_warmup_steps
        self.end = end
        self.power = power
        self._decay = tf.keras.optimizers.schedules.PolynomialDecay(
            peak, decay_steps=num_train_steps, end_learning_rate=end, power=power)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decayed = self._decay(step)
        if self.num_warmup_steps == 0:
            return decayed
        warmup = self.peak * step / float(self.num_warmup_steps)
        return tf.where(step < self.num_warmup_steps, warmup, decayed)

    def get_config(self):
        return dict(peak=self.peak, num_train_steps=self.num_train_steps,
                    num_warmup_steps=self.num_warmup_steps, end=self.end, power=self.power)


def build_optimizer(config: OptimizerConfig, learning_rate):
    """The Keras optimizer named by `config.optimizer`.

    Args:
      config: optimizer settings.
      learning_rate: a zero-argument callable returning the current learning rate (the trainer
        evaluates the schedule at its own step counter, so skipped float16 steps and resumed runs
        see the same schedule).
    """
    exclude = list(config.exclude_from_weight_decay)
    if config.optimizer == "lamb":
        # LAMB's decay is inside the trust-ratio update, so it is already scaled by the rate.
        return tfa.optimizers.LAMB(
            learning_rate=learning_rate, beta_1=config.beta_1, beta_2=config.beta_2,
            epsilon=config.epsilon, weight_decay=config.weight_decay_rate,
            exclude_from_weight_decay=exclude, exclude_from_layer_adaptation=exclude)
    if config.optimizer == "adamw":
        # Addons' AdamW subtracts weight_decay * var unscaled; google's AdamWeightDecay scales the
        # decay by the learning rate, so the decay follows the same schedule here.
        return tfa.optimizers.AdamW(
            weight_decay=lambda: config.weight_decay_rate * learning_rate(),
            learning_rate=learning_rate, beta_1=config.beta_1, beta_2=config.beta_2,
            epsilon=config.epsilon, exclude_from_weight_decay=exclude)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def clip_scale(grad_norm: tf.Tensor, clip_norm: float) -> tf.Tensor:
    """The factor tf.clip_by_global_norm multiplies every gradient by, computed as it does:
    clip_norm / max(grad_norm, clip_norm), a float32 scalar (meaningless for a non-finite norm,
    whose step is skipped)."""
    return clip_norm * tf.minimum(1.0 / grad_norm, tf.constant(1.0, grad_norm.dtype) / clip_norm)


def scale_gradients(grads: list, grad_scale) -> list:
    """Every gradient (Tensor, IndexedSlices or None) times the scalar `grad_scale`, as
    tf.clip_by_global_norm multiplies them; None as a scale leaves them as they are."""
    if grad_scale is None:
        return list(grads)
    return [scale_gradient(g, grad_scale) for g in grads]


def update_if(apply_update, update) -> None:
    """Calls `update()` (which builds the step's ops) under a tf.cond on the bool scalar
    `apply_update`; None runs it unconditionally. Every rank must pass the same decision: the
    collectives inside an update run only where it is taken."""
    if apply_update is None:
        update()
        return

    def taken():
        update()
        return tf.constant(True)

    tf.cond(apply_update, taken, lambda: tf.constant(False))


class KerasOptimizerUpdate:
    """The update step: applies the final (averaged, unscaled) gradients to the variables.

    The trainer only calls `build` once and `apply` per step, so a different update (a fused
    LAMB op, an update over a shard of the optimizer state) replaces this class whole. `apply`
    also takes the two results of the step's global gradient norm, which a fused update folds
    into its own op: `grad_scale` (the clipping factor every gradient is multiplied by, or None)
    and `apply_update` (a bool scalar, False to skip the step; None to always take it).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def build(self, variables) -> None:
        """Creates the optimizer's slots eagerly, before any checkpoint restore and before the
        step is traced (a slot created inside a tf.cond branch would be created in a graph)."""
        # Private but stable in the pinned Keras 2.15; LossScaleOptimizer relies on it too.
        self.optimizer._create_all_weights(variables)

    def apply(self, grads, variables, grad_scale=None, apply_update=None) -> None:
        grads = scale_gradients(grads, grad_scale)
        update_if(apply_update,
                  lambda: self.optimizer.apply_gradients(zip(grads, variables)))

    def checkpoint_items(self) -> dict:
        return {"optimizer": self.optimizer}

    def named_state(self, variables) -> dict[str, tf.Variable]:
        return named_optimizer_state(self.optimizer, variables)


# Checkpoint names of the Adam/LAMB moments, as google-research/bert's optimizers name them.
SLOT_NAMES = {"m": "adam_m", "v": "adam_v"}


def named_optimizer_state(optimizer, variables) -> dict[str, tf.Variable]:
    """{checkpoint name: variable} of an optimizer's state over `variables`: each variable's
    moments as "<its name>/adam_m" and "/adam_v", and "optimizer/iterations".

    Args:
      optimizer: anything with Keras' `get_slot(variable, "m")` and an `iterations` variable.
    """
    state = {"optimizer/iterations": optimizer.iterations}
    for variable in variables:
        name = variable.name.split(":")[0]
        for slot, suffix in SLOT_NAMES.items():
            state[f"{name}/{suffix}"] = optimizer.get_slot(variable, slot)
    return state
