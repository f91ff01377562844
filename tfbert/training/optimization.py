"""Learning-rate schedule, optimizers and the replaceable update step."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_addons as tfa

from tfbert.config import OptimizerConfig


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


class KerasOptimizerUpdate:
    """The update step: applies final (averaged, unscaled, clipped) gradients to the variables.

    The trainer only calls `build` once and `apply` per step, so a different update (a fused
    LAMB op, an update over a shard of the optimizer state) replaces this class whole.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def build(self, variables) -> None:
        """Creates the optimizer's slots eagerly, before any checkpoint restore and before the
        step is traced (a slot created inside a tf.cond branch would be created in a graph)."""
        # Private but stable in the pinned Keras 2.15; LossScaleOptimizer relies on it too.
        self.optimizer._create_all_weights(variables)

    def apply(self, grads, variables) -> None:
        self.optimizer.apply_gradients(zip(grads, variables))

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
