"""One LAMB step over a whole model's parameters, five ways, side by side in one process:

- `multi`: the fused multi-tensor op (TfBert>FusedLambMultiUpdate), one op for every tensor,
  which also reads the gradients through the clip factor and skips by itself: what
  `--optimizer=fused_lamb` runs;
- `multi_cond`: the same op, but after one multiply per gradient for the clipping and inside a
  tf.cond on the skip decision (what the clip and the skip cost outside the op);
- `per_tensor`: the fused single-tensor op (TfBert>FusedLambUpdate), one op per tensor;
- `reference`: the same numerics in plain TensorFlow ops (`lamb_update_reference`);
- `tfa`: tensorflow_addons' LAMB (`--optimizer=lamb`).

    python benchmarks/optimizer_bench.py                           # mini and base, vocab 30522
    python benchmarks/optimizer_bench.py --models=large --repeats=5

The parameters are those of `BertPretrainer` at each preset (names and shapes from
`tfbert.training.sharding.model_variable_shapes`, so the LayerNorm and bias exclusions apply as in
training), with random values and fixed random gradients. Each way is a `tf.function` of one
step as the trainer ends it: the global gradient norm, the clip factor (clip_norm 1) and the
finite check, then the update; a repeat runs every way for --steps steps, in an order that alternates between repeats,
and the table gives the median milliseconds per step over the repeats and the ratio to
`per_tensor`. Writes a CSV and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import pandas as pd
import tensorflow as tf

from tfbert.config import ModelConfig, MODEL_PRESETS, OptimizerConfig
from tfbert.ops import lamb_ops
from tfbert.training.optimization import (KerasOptimizerUpdate, build_optimizer, clip_scale,
                                          scale_gradients, update_if)
from tfbert.training.sharding import model_variable_shapes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAYS = ("multi", "multi_cond", "per_tensor", "reference", "tfa")


class PerTensorLamb(lamb_ops.FusedLambUpdate):
    """FusedLambUpdate with one TfBert>FusedLambUpdate op per tensor (what the multi-tensor op
    replaced), for comparison."""

    def apply(self, grads, variables, grad_scale=None, apply_update=None) -> None:
        update_if(apply_update,
                  lambda: self._per_tensor(scale_gradients(grads, grad_scale), variables))

    def _per_tensor(self, grads, variables) -> None:
        state, c = self.optimizer, self.config
        step = tf.cast(state.iterations + 1, tf.float32)
        lr = tf.cast(self.learning_rate(), tf.float32)
        for grad, var, key, adapted in zip(grads, variables, self._keys, self._flags):
            lamb_ops.fused_lamb_update(var, state.m[key], state.v[key], grad, lr, c.beta_1,
                                       c.beta_2, c.epsilon, c.weight_decay_rate, step,
                                       use_layer_adaptation=adapted, apply_weight_decay=adapted)
        state.iterations.assign_add(1)


def build_update(way: str, config: OptimizerConfig):
    learning_rate = lambda: config.learning_rate  # noqa: E731
    if way in ("multi", "multi_cond"):
        return lamb_ops.FusedLambUpdate(config, learning_rate, use_fused_op=True)
    if way == "per_tensor":
        return PerTensorLamb(config, learning_rate, use_fused_op=True)
    if way == "reference":
        return lamb_ops.FusedLambUpdate(config, learning_rate, use_fused_op=False)
    return KerasOptimizerUpdate(build_optimizer(config, learning_rate))


def training_step_end(update, grads, variables, clip_norm: float, outside: bool) -> None:
    """The end of a training step: the global norm, the clip factor and the skip decision, then
    the update, which takes them (`outside`: the clipping as one multiply per gradient and the
    update inside a tf.cond, as an update that cannot take them runs)."""
    norm = tf.linalg.global_norm(grads)
    finite = tf.math.is_finite(norm)
    scale = clip_scale(norm, clip_norm)
    if outside:
        clipped = scale_gradients(grads, scale)
        update_if(finite, lambda: update.apply(clipped, variables))
    else:
        update.apply(grads, variables, grad_scale=scale, apply_update=finite)


def model_parameters(preset: str, vocab_size: int, seed: int):
    """(variables, gradients) of BertPretrainer at `preset`, random (std 0.02 and 1e-3)."""
    shapes = model_variable_shapes(ModelConfig(vocab_size=vocab_size, **MODEL_PRESETS[preset]))
    rng = tf.random.Generator.from_seed(seed)
    variables = [tf.Variable(rng.normal(shape) * 0.02, name=name)
                 for name, shape in shapes.items()]
    grads = [rng.normal(shape) * 1e-3 for shape in shapes.values()]
    return variables, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mini,base", help="presets (tfbert.config)")
    parser.add_argument("--vocab_size", type=int, default=30522)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {WAYS}")
    parser.add_argument("--steps", type=int, default=5, help="steps per way and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench",
                                                      "optimizer.csv"))
    args = parser.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"--ways: unknown {unknown}; choose from {WAYS}")

    config = OptimizerConfig(optimizer="lamb")
    rows = []
    for preset in args.models.split(","):
        steps = {}
        for way in ways:
            # Each way steps its own copy, so the ways do not see each other's updates.
            variables, grads = model_parameters(preset, args.vocab_size, seed=0)
            update = build_update(way, config)
            update.build(variables)
            step = tf.function(functools.partial(training_step_end, update, grads, variables,
                                                 config.clip_norm, way == "multi_cond"))
            step()  # trace and warm up
            steps[way] = step
        parameters = sum(v.shape.num_elements() for v in variables)
        times = {way: [] for way in ways}
        for repeat in range(args.repeats):
            for way in (ways if repeat % 2 == 0 else ways[::-1]):
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[way]()
                times[way].append((time.perf_counter() - start) / args.steps)
        baseline = statistics.median(times["per_tensor"]) if "per_tensor" in times else None
        for way in ways:
            ms = statistics.median(times[way]) * 1e3
            rows.append(dict(model=preset, tensors=len(variables), parameters=parameters,
                             way=way, ms_per_step=ms,
                             vs_per_tensor=ms / (baseline * 1e3) if baseline else None,
                             repeats=args.repeats, steps=args.steps))
        print(f"done: {preset}", flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
