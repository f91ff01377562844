"""Trains the odd-sized test model under several "synchronise and update" setups, one after the
other in the same Horovod job, and saves each setup's final weights and summary. Used by
test_zero.py:

    horovodrun -np 2 -H localhost:2 --gloo python tests/zero_worker.py OUT_DIR dp z1_naive ...

Each setup trains 3 LAMB steps (dropout off) on the examples of tests/distributed_worker.py, with
a global batch of 8 at any number of ranks, so every setup sees the same examples per optimizer
step. A name ending in "@resumed" trains 2 steps, then resumes in a new trainer for the third;
"@gathered" resumes, without ZeRO, the gathered checkpoint the test put in its directory;
"reducescatter" checks a large reduce-scatter against an all-reduce. Writes
OUT_DIR/<setup>-rank<r>.npz (weights) and, on rank 0, OUT_DIR/<setup>.json (summary).
"""

import json
import os
import sys

import tensorflow as tf
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_worker import rank_dataset, save_weights, worker_config  # noqa: E402
from tfbert.checkpoints import checkpoint_step  # noqa: E402
from tfbert.distributed import create_group  # noqa: E402
from tfbert.training.trainer import Pretrainer  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
# name: (accumulation, settings); each rank's batch is GLOBAL_BATCH / (ranks x accumulation).
SETUPS = {
    "dp": (1, {}),
    "z1_naive": (1, dict(zero_stage=1, state_split_strategy="naive")),
    "z1_greedy2": (1, dict(zero_stage=1, state_split_strategy="greedy:2")),
    "z1_greedy2_fused": (1, dict(zero_stage=1, state_split_strategy="greedy:2",
                                 optimizer="fused_lamb")),
    "z1_flat": (1, dict(zero_stage=1, state_split_strategy="flat")),
    "z2_flat": (1, dict(zero_stage=2, state_split_strategy="flat")),
    "z2_greedy2": (1, dict(zero_stage=2, state_split_strategy="greedy:2")),
    "z2_greedy4_accum2": (2, dict(zero_stage=2, state_split_strategy="greedy:4")),
    "z2_greedy2_fused": (1, dict(zero_stage=2, state_split_strategy="greedy:2",
                                 optimizer="fused_lamb")),
    "dp_fp16": (1, dict(precision="fp16")),
    "dp_accum2_fp16": (2, dict(precision="fp16", grad_accum_dtype="float16")),
    "z2_naive_accum2_fp16_compressed": (2, dict(
        zero_stage=2, state_split_strategy="naive", precision="fp16",
        grad_accum_dtype="float16", hvd_fp16_compression=True)),
    "z1_flat_fp16_compressed": (1, dict(zero_stage=1, state_split_strategy="flat",
                                        precision="fp16", hvd_fp16_compression=True)),
    "dp_adamw": (1, dict(optimizer="adamw")),
    "z1_naive_adamw": (1, dict(zero_stage=1, state_split_strategy="naive", optimizer="adamw")),
    "dp_bf16": (1, dict(precision="bf16")),
    "z2_flat_bf16": (1, dict(zero_stage=2, state_split_strategy="flat", precision="bf16")),
}


def check_reducescatter(group, out_dir: str) -> None:
    """A reduce-scatter of 6 MiB (above the 4 MiB chunks where Gloo's reduce-scatter was
    reported to corrupt buffers), of an odd length, against the slice of an all-reduce."""
    import numpy as np

    group.compression = group._hvd.Compression.none
    size = 3 * 2 ** 19 + 7  # float32: 6 MiB and 28 bytes
    values = tf.sin(tf.range(size, dtype=tf.float32) * 0.001 * (group.rank + 1))
    shard = group.reducescatter_average(values)
    total = group._hvd.allreduce(values, op=group._hvd.Average, name="check_allreduce")
    sizes = [size // group.size + (1 if r < size % group.size else 0) for r in range(group.size)]
    start = sum(sizes[:group.rank])
    np.save(os.path.join(out_dir, f"reducescatter-rank{group.rank}.npy"),
            np.stack([shard.numpy(), total.numpy()[start:start + sizes[group.rank]]]))


def train(group, out_dir: str, name: str, stop_after: int | None = None) -> dict:
    """Trains setup `name` in OUT_DIR/<name> (resuming what is there) for `stop_after` more
    steps, or to step 3."""
    accumulation, settings = SETUPS[name.split("@")[0]]
    batch = GLOBAL_BATCH // (group.size * accumulation)
    if group.uses_horovod:
        compressed = settings.get("hvd_fp16_compression", False)
        group.compression = (group._hvd.Compression.fp16 if compressed
                             else group._hvd.Compression.none)
    run_dir = os.path.join(out_dir, name)
    start_step = 0
    if name.endswith("@gathered"):
        # A gathered checkpoint (put there by the test) resumed without ZeRO, from its step.
        settings = {k: v for k, v in settings.items()
                    if k not in ("zero_stage", "state_split_strategy")}
        start_step = checkpoint_step(tf.train.latest_checkpoint(run_dir))
    config = worker_config(run_dir, group, batch, STEPS, num_accumulation_steps=accumulation,
                           **settings)
    dataset = rank_dataset(group, batch, accumulation, STEPS, start_step)
    trainer = Pretrainer(config, dataset, group)
    summary = trainer.train(max_steps=stop_after)
    save_weights(trainer, os.path.join(out_dir, f"{name}-rank{group.rank}.npz"))
    if group.is_chief:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    tf.keras.backend.clear_session()
    return summary


def main(out_dir: str, names: list[str]):
    logging.set_verbosity(logging.INFO)  # rank 0's start-up table is an INFO line
    group = create_group()
    for name in names:
        if name == "reducescatter":
            check_reducescatter(group, out_dir)
            continue
        if name.endswith("@resumed"):
            # Two steps, then a new trainer in the same directory resumes for the third.
            train(group, out_dir, name, stop_after=2)
        train(group, out_dir, name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
