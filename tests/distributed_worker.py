"""Trains the odd-sized test model on deterministic synthetic data, alone or under horovodrun,
and saves the final weights of this rank. Used by test_distributed.py.

    python tests/distributed_worker.py OUT_DIR --batch=4 --steps=3 [--accumulation=2 ...]
    horovodrun -np 2 -H localhost:2 --gloo python tests/distributed_worker.py OUT_DIR ...

Every rank builds the same pool of examples. Global batch i is examples
[i*G, (i+1)*G) with G = batch * accumulation * ranks; rank r's micro-batch j of that step is the
slice [(r*accumulation + j) * batch, ... + batch). So 2 ranks x batch b, 1 rank x batch 2b and
1 rank x 2 micro-batches of b all see the same examples per optimizer step.
"""

import argparse
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import odd_model_config, run_config, synthetic_batch  # noqa: E402
from tfbert import config as cfg  # noqa: E402
from tfbert.distributed import create_group  # noqa: E402
from tfbert.training.trainer import Pretrainer  # noqa: E402


def rank_dataset(group, batch: int, accumulation: int, steps: int, start_step: int = 0):
    """This rank's micro-batches of optimizer steps [start_step, steps) (module doc)."""
    global_batch = batch * accumulation * group.size
    pool = {k: v.numpy() for k, v in synthetic_batch(global_batch * steps, seq=16,
                                                     predictions=3, seed=7).items()}
    # This rank's examples, in the order its micro-batches consume them.
    index = np.concatenate([
        np.arange(batch) + step * global_batch + (group.rank * accumulation + micro) * batch
        for step in range(start_step, steps) for micro in range(accumulation)])
    dataset = tf.data.Dataset.from_tensor_slices({k: v[index] for k, v in pool.items()})
    return dataset.batch(batch, drop_remainder=True).repeat()


def worker_config(out_dir, group, batch: int, steps: int, precision: str = "fp32",
                  optimizer: str = "lamb", teacher: str = "", **distribution) -> cfg.Config:
    # run_config's defaults (10 steps, no checkpoint until the end) with `steps` steps.
    """The odd model without dropout, LAMB (lr 1e-3, clipping at 1.0) over `group`; with a
    `teacher`, distilled from it."""
    model = odd_model_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = run_config(out_dir, model, num_train_steps=steps, precision=precision,
                        train_batch_size=batch, initial_loss_scale=2.0 ** 10,
                        # A hang (a collective one rank never joins) fails with a traceback;
                        # generous: under a loaded CI machine rank 0 traces the step's graphs for
                        # its start-up log while the other ranks already wait in the first step.
                        first_step_timeout_secs=600, step_timeout_secs=300,
                        optimizer=cfg.OptimizerConfig(learning_rate=1e-3, optimizer=optimizer))
    return cfg.Config(
        model=config.model, data=config.data, optimizer=config.optimizer, runtime=config.runtime,
        distribution=cfg.DistributionConfig(num_processes=group.size, rank=group.rank,
                                            **distribution),
        task=cfg.TaskConfig(task="distillation", teacher=teacher) if teacher else cfg.TaskConfig())


def save_weights(trainer, path: str) -> None:
    np.savez(path, **{name: v.numpy() for name, v in trainer.model.variables_by_name().items()})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--accum_dtype", default="float32")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fp16_compression", action="store_true")
    parser.add_argument("--nosparse_as_dense", dest="sparse_as_dense", action="store_false")
    parser.add_argument("--teacher", default="", help="distil from this checkpoint")
    args = parser.parse_args()

    group = create_group(args.fp16_compression, args.sparse_as_dense)
    dataset = rank_dataset(group, args.batch, args.accumulation, args.steps)
    config = worker_config(args.out_dir, group, args.batch, args.steps, args.precision,
                           teacher=args.teacher,
                           hvd_fp16_compression=args.fp16_compression,
                           sparse_as_dense=args.sparse_as_dense,
                           num_accumulation_steps=args.accumulation,
                           grad_accum_dtype=args.accum_dtype)
    trainer = Pretrainer(config, dataset, group)
    summary = trainer.train()
    save_weights(trainer, os.path.join(args.out_dir, f"weights-rank{group.rank}.npz"))
    if group.is_chief:
        print("CHECKSUMS", summary["per_rank"]["weights_checksum"], "SKIPPED",
              summary["skipped_steps"], flush=True)


if __name__ == "__main__":
    main()
