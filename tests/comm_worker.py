"""What crosses ranks, checked inside real Horovod processes. Run by test_distributed.py as

    horovodrun -np 4 -H localhost:4 --gloo python tests/comm_worker.py OUT_DIR

and writes OUT_DIR/comm-rank<r>.json with its findings.
"""

import json
import os
import sys
import time

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import odd_model_config, run_config, synthetic_dataset  # noqa: E402
from tfbert import config as cfg  # noqa: E402
from tfbert.distributed import HorovodGroup  # noqa: E402
from tfbert.run import default_output_dir  # noqa: E402
from tfbert.training.trainer import Pretrainer  # noqa: E402
from zero_worker import check_reducescatter, train  # noqa: E402


def fp16_headroom(group) -> dict:
    """Gradients whose sum over 4 ranks overflows float16 (max 65504) but whose mean does not;
    6 MiB as float16, above the 4 MiB chunks where Gloo's reduce-scatter was reported to fail."""
    value = 8000.0 * (group.rank + 1)  # mean over 4 ranks: 20000; sum: 80000
    grad = tf.fill([3 * 2 ** 20], value)
    (reduced,) = group.allreduce_gradients([grad])
    return dict(min=float(tf.reduce_min(reduced)), max=float(tf.reduce_max(reduced)))


def collectives(group, out_dir, **distribution) -> tuple[list[dict], int]:
    """The collectives of one step of the odd model (batch 8 x seq 16, hidden 32), and the
    float32 bytes of its trainable variables."""
    group.sparse_as_dense = distribution.get("sparse_as_dense", True)
    base = run_config(os.path.join(out_dir, f"rank{group.rank}"), odd_model_config())
    config = cfg.Config(model=base.model, data=base.data, optimizer=base.optimizer,
                        runtime=base.runtime, distribution=cfg.DistributionConfig(
                            num_processes=group.size, rank=group.rank, **distribution))
    trainer = Pretrainer(config, synthetic_dataset(), group)
    found = trainer.step_collectives()
    trainable_bytes = int(sum(np.prod(v.shape) * 4 for v in trainer.variables))
    tf.keras.backend.clear_session()
    return found, trainable_bytes


def main(out_dir):
    group = HorovodGroup(fp16_compression=True)
    results = dict(fp16_headroom=fp16_headroom(group))
    # Ranks reach the clock at different seconds; the run directory must still be one.
    time.sleep(1.1 * group.rank)
    results["output_dirs"] = hvd.allgather_object(default_output_dir(group))
    # Tracing only: no collective runs, so each setup needs one rank, and the ranks trace them
    # side by side, rank 0 ZeRO-2's (the test checks rank 0's part of its all-gather).
    setups = dict(zero2_flat=dict(zero_stage=2, state_split_strategy="flat"),
                  sparse_as_dense=dict(sparse_as_dense=True),
                  gather_lookup=dict(sparse_as_dense=False),
                  gather_lookup_accumulation=dict(sparse_as_dense=False,
                                                  num_accumulation_steps=2))
    traced, sparse_as_dense = {}, group.sparse_as_dense
    for name in list(setups)[group.rank::group.size]:
        traced[name] = collectives(group, out_dir, **setups[name])
    group.sparse_as_dense = sparse_as_dense  # as on every rank, for the training below
    traced = {name: t for per_rank in hvd.allgather_object(traced) for name, t in per_rank.items()}
    results["collectives"] = {name: found for name, (found, _) in traced.items()}
    (results["trainable_bytes"],) = {trainable for _, trainable in traced.values()}
    # ZeRO at 4 ranks (test_distributed compares it with data parallelism at 2), and a large
    # reduce-scatter against the all-reduce.
    check_reducescatter(group, out_dir)
    train(group, out_dir, "z2_greedy2")
    with open(os.path.join(out_dir, f"comm-rank{group.rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
