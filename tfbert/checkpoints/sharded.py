"""ZeRO checkpoints: the shared checkpoint plus one optimizer-state shard per rank, and gathering
them into one ordinary checkpoint.

A ZeRO run (`tfbert.training.gradient_sync.ShardedOptimizer`) writes

    <run>/ckpt-<step>                      weights, counters, optimizer/iterations (rank 0), and
                                           markers: zero/num_ranks, zero/stage,
                                           zero/state_split_strategy
    <run>/zero_state/rank-<r>/ckpt-<step>  rank r's flat m and v, and the layout they follow
                                           (`plan`: JSON with the segments [name, start, end]
                                           of each variable's flattened elements it owns)

Resuming with the same ranks and strategy restores each rank's own shard. `gather` writes a
checkpoint in the native format with whole moments (`<name>/adam_m`, `/adam_v`), which resumes
on any number of ranks, with or without ZeRO, and which `--init_checkpoint` reads.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.native import latest_checkpoint, open_reader, write_index, write_tensors

STATE_DIR = "zero_state"
MARKER_PREFIX = "zero/"
SLOTS = ("adam_m", "adam_v")
GATHER_TOOL = "python -m tfbert.tools.gather_checkpoint"
# Keys of an object-based bundle written by tf.train.Checkpoint(m=..., v=..., plan=...).
_SHARD_KEYS = {"adam_m": "m/.ATTRIBUTES/VARIABLE_VALUE", "adam_v": "v/.ATTRIBUTES/VARIABLE_VALUE",
               "plan": "plan/.ATTRIBUTES/VARIABLE_VALUE"}


def shard_prefix(run_dir: str, rank: int, step: int) -> str:
    return os.path.join(run_dir, STATE_DIR, f"rank-{rank}", f"ckpt-{step}")


def is_sharded(reader) -> bool:
    return reader.has_tensor(MARKER_PREFIX + "num_ranks")


def check_not_sharded(prefix: str) -> None:
    """Raises a CheckpointError, saying how to gather it, when the checkpoint at `prefix` keeps
    its moments in ZeRO shards (a run without ZeRO cannot resume it as it is)."""
    reader = open_reader(prefix, "checkpoint")
    if is_sharded(reader):
        raise CheckpointError(
            f"checkpoint {prefix} was written by a ZeRO run (its optimizer moments are split "
            f"over {int(reader.get_tensor(MARKER_PREFIX + 'num_ranks'))} ranks): resume it with "
            f"the same --zero_stage, --state_split_strategy and ranks, or gather it first: "
            f"{GATHER_TOOL} --run_dir={os.path.dirname(prefix)} --output_dir=<new dir>")


def gather(run_dir: str, output_dir: str, step: int | None = None) -> str:
    """Writes `output_dir/ckpt-<step>` with whole moments from a ZeRO run's shards, plus the
    run's other files (config, tokenizer); returns the new checkpoint's prefix.

    Args:
      run_dir: the ZeRO run's output directory.
      output_dir: a new directory (created; must not hold checkpoints already).
      step: which checkpoint; the newest when None.
    Raises:
      CheckpointError: no such checkpoint, not a ZeRO checkpoint, a missing or corrupt shard,
        or shards that do not cover every element exactly once.
    """
    if step is None:
        prefix = latest_checkpoint(run_dir)
        if prefix is None:
            raise CheckpointError(f"{run_dir} holds no checkpoint")
    else:
        prefix = os.path.join(run_dir, f"ckpt-{step}")
    reader = open_reader(prefix, "checkpoint")
    if not is_sharded(reader):
        raise CheckpointError(f"checkpoint {prefix} is not sharded (it was not written with "
                              f"--custom_memory_optimization): it resumes anywhere as it is")
    step = int(os.path.basename(prefix).rsplit("-", 1)[1])
    num_ranks = int(reader.get_tensor(MARKER_PREFIX + "num_ranks"))
    shapes = reader.get_variable_to_shape_map()
    tensors = {name: reader.get_tensor(name) for name in shapes
               if not name.startswith(MARKER_PREFIX)}
    weight_names = [name for name in tensors if name.startswith(("bert/", "cls/"))]
    moments = {f"{name}/{slot}": np.zeros(int(np.prod(shapes[name])), np.float32)
               for name in weight_names for slot in SLOTS}
    covered = {name: np.zeros(int(np.prod(shapes[name])), np.int32) for name in weight_names}
    for rank in range(num_ranks):
        shard = shard_prefix(run_dir, rank, step)
        shard_reader = open_reader(shard, f"rank {rank}'s optimizer-state shard")
        plan = json.loads(shard_reader.get_tensor(_SHARD_KEYS["plan"]).decode())
        if plan["num_ranks"] != num_ranks or plan["rank"] != rank:
            raise CheckpointError(f"{shard} belongs to rank {plan['rank']} of {plan['num_ranks']}, "
                                  f"not rank {rank} of {num_ranks}")
        values = {slot: shard_reader.get_tensor(_SHARD_KEYS[slot]) for slot in SLOTS}
        offset = 0
        for name, start, end in plan["segments"]:
            if name not in covered:
                raise CheckpointError(f"{shard} holds moments of {name}, which {prefix} lacks")
            for slot in SLOTS:
                moments[f"{name}/{slot}"][start:end] = values[slot][offset:offset + end - start]
            covered[name][start:end] += 1
            offset += end - start
        if offset != values["adam_m"].size:
            raise CheckpointError(f"{shard}: its segments cover {offset} elements, its moments "
                                  f"hold {values['adam_m'].size}")
    wrong = [name for name, count in covered.items() if not np.all(count == 1)]
    if wrong:
        raise CheckpointError(f"the shards of {prefix} do not cover every element of "
                              f"{wrong[:4]} exactly once")
    for name in weight_names:
        for slot in SLOTS:
            tensors[f"{name}/{slot}"] = moments[f"{name}/{slot}"].reshape(shapes[name])

    if latest_checkpoint(output_dir) if os.path.isdir(output_dir) else False:
        raise CheckpointError(f"{output_dir} holds checkpoints already; gather into a new "
                              f"directory")
    os.makedirs(output_dir, exist_ok=True)
    # The run's own files (config, tokenizer), not its checkpoints, shards or logs.
    for entry in sorted(os.listdir(run_dir)):
        source = os.path.join(run_dir, entry)
        if os.path.isfile(source) and not entry.startswith(("ckpt-", "checkpoint", "events.")) \
                and entry not in ("log.jsonl", "summary.json"):
            shutil.copy2(source, os.path.join(output_dir, entry))
    name = f"ckpt-{step}"
    write_tensors(os.path.join(output_dir, name), tensors)
    write_index(output_dir, name, [name])
    return os.path.join(output_dir, name)
