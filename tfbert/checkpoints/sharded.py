"""Sharded checkpoints (ZeRO's optimizer-state shards, tensor parallelism's model parts), and
gathering them into one ordinary checkpoint.

A ZeRO run (`tfbert.training.gradient_sync.ShardedOptimizer`) writes

    <run>/ckpt-<step>                      weights, counters, optimizer/iterations (rank 0), and
                                           markers: zero/num_ranks, zero/stage,
                                           zero/state_split_strategy
    <run>/zero_state/rank-<r>/ckpt-<step>  rank r's flat m and v, and the layout they follow
                                           (`plan`: JSON with the segments [name, start, end]
                                           of each variable's flattened elements it owns)

A tensor-parallel run (`--tensor_parallel_size=T`) writes one such directory per part of the
model, each holding that part's weights (the documented names, with the part's shapes), its
optimizer state (ZeRO shards included) and counters, and markers tensor_parallel/{size,rank,
gated_ffn}:

    <run>/tensor_parallel/tp-<k>/ckpt-<step>
    <run>/tensor_parallel/tp-<k>/zero_state/rank-<r>/ckpt-<step>   (with ZeRO)

Resuming with the same ranks and strategy restores each rank's own shard and part. `gather`
writes a checkpoint in the native format with whole tensors and whole moments (`<name>/adam_m`,
`/adam_v`), which resumes on any number of ranks, with or without ZeRO or tensor parallelism,
and which `--init_checkpoint` reads.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.native import latest_checkpoint, open_reader, write_index, write_tensors
from tfbert.checkpoints.weights import WEIGHT_PREFIXES

STATE_DIR = "zero_state"
MARKER_PREFIX = "zero/"
TENSOR_PARALLEL_DIR = "tensor_parallel"
TENSOR_PARALLEL_PREFIX = "tensor_parallel/"
SLOTS = ("adam_m", "adam_v")
GATHER_TOOL = "python -m tfbert.tools.gather_checkpoint"
# Keys of an object-based bundle written by tf.train.Checkpoint(m=..., v=..., plan=...).
_SHARD_KEYS = {"adam_m": "m/.ATTRIBUTES/VARIABLE_VALUE", "adam_v": "v/.ATTRIBUTES/VARIABLE_VALUE",
               "plan": "plan/.ATTRIBUTES/VARIABLE_VALUE"}


def shard_prefix(run_dir: str, rank: int, step: int) -> str:
    return os.path.join(run_dir, STATE_DIR, f"rank-{rank}", f"ckpt-{step}")


def is_sharded(reader) -> bool:
    return reader.has_tensor(MARKER_PREFIX + "num_ranks")


def part_dir(run_dir: str, tensor_parallel_rank: int) -> str:
    """Where part `tensor_parallel_rank` of a tensor-parallel run keeps its checkpoints."""
    return os.path.join(run_dir, TENSOR_PARALLEL_DIR, f"tp-{tensor_parallel_rank}")


def tensor_parallel_markers(rank: int, size: int, gated_ffn: bool) -> dict:
    """Markers of a part's checkpoint: which part it is, and how the FFN is split."""
    return {TENSOR_PARALLEL_PREFIX + "rank": np.int64(rank),
            TENSOR_PARALLEL_PREFIX + "size": np.int64(size),
            TENSOR_PARALLEL_PREFIX + "gated_ffn": np.bool_(gated_ffn)}


def _parts(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, TENSOR_PARALLEL_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(e for e in os.listdir(root) if e.startswith("tp-")
                  and latest_checkpoint(os.path.join(root, e)))


def check_no_tensor_parallel_parts(run_dir: str) -> None:
    """A run without tensor parallelism must not start over a tensor-parallel run's parts."""
    parts = _parts(run_dir)
    if parts:
        raise CheckpointError(
            f"{run_dir} holds the checkpoints of a tensor-parallel run ({len(parts)} parts in "
            f"{TENSOR_PARALLEL_DIR}/): resume it with that --tensor_parallel_size, or gather it "
            f"first: {GATHER_TOOL} --run_dir={run_dir} --output_dir=<new dir>")


def check_not_whole(run_dir: str) -> None:
    """A tensor-parallel run must not start over a run whose checkpoints hold whole tensors."""
    if latest_checkpoint(run_dir):
        raise CheckpointError(
            f"{run_dir} holds checkpoints of whole tensors (a run without tensor parallelism), "
            f"which a tensor-parallel run does not resume: start a new --output_dir with "
            f"--init_checkpoint={run_dir} (weights only), or resume without "
            f"--tensor_parallel_size")


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
    """Writes `output_dir/ckpt-<step>` with whole tensors and whole moments from a ZeRO or a
    tensor-parallel run's parts, plus the run's other files (config, tokenizer); returns the
    new checkpoint's prefix.

    Args:
      run_dir: the run's output directory.
      output_dir: a new directory (created; must not hold checkpoints already).
      step: which checkpoint; the newest when None (under tensor parallelism, the newest step
        every part has).
    Raises:
      CheckpointError: no such checkpoint, not a sharded checkpoint, a missing or corrupt
        shard or part, or shards that do not cover every element exactly once.
    """
    parts = _parts(run_dir)
    if parts:
        tensors, step = _gather_tensor_parallel(run_dir, parts, step)
    else:
        if step is None:
            prefix = latest_checkpoint(run_dir)
            if prefix is None:
                raise CheckpointError(f"{run_dir} holds no checkpoint")
        else:
            prefix = os.path.join(run_dir, f"ckpt-{step}")
        if not is_sharded(open_reader(prefix, "checkpoint")):
            raise CheckpointError(
                f"checkpoint {prefix} is not sharded (it was written without "
                f"--custom_memory_optimization and --tensor_parallel_size): it resumes anywhere "
                f"as it is")
        tensors = _gather_zero(run_dir, prefix)
        step = int(os.path.basename(prefix).rsplit("-", 1)[1])

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


def _gather_tensor_parallel(run_dir: str, parts: list[str], step: int | None):
    """{name: whole array} from every part of a tensor-parallel run (each part's ZeRO shards
    gathered first), and the step."""
    from tfbert.modeling.tensor_parallel import split_of, unshard_arrays

    directories = [os.path.join(run_dir, TENSOR_PARALLEL_DIR, p) for p in parts]
    first = open_reader(latest_checkpoint(directories[0]), "checkpoint")
    size = int(first.get_tensor(TENSOR_PARALLEL_PREFIX + "size"))
    gated = bool(first.get_tensor(TENSOR_PARALLEL_PREFIX + "gated_ffn"))
    if parts != [f"tp-{k}" for k in range(size)]:
        raise CheckpointError(f"{run_dir}/{TENSOR_PARALLEL_DIR} holds parts {parts}; a run of "
                              f"--tensor_parallel_size={size} has tp-0 .. tp-{size - 1}")
    if step is None:
        step = min(int(os.path.basename(latest_checkpoint(d)).rsplit("-", 1)[1])
                   for d in directories)
    pieces: dict[str, list] = {}
    for k, directory in enumerate(directories):
        prefix = os.path.join(directory, f"ckpt-{step}")
        reader = open_reader(prefix, f"tensor-parallel part {k}'s checkpoint")
        if int(reader.get_tensor(TENSOR_PARALLEL_PREFIX + "rank")) != k:
            raise CheckpointError(f"{prefix} is not part {k} of the run")
        tensors = _gather_zero(directory, prefix) if is_sharded(reader) else {
            name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith((MARKER_PREFIX, TENSOR_PARALLEL_PREFIX))}
        for name, value in tensors.items():
            weight = tensors.get(name.rsplit("/", 1)[0]) if name.endswith(SLOTS) else None
            if weight is not None and value.shape != weight.shape:
                value = value.reshape(weight.shape)  # moments kept flat (LambWithSummedNorms)
            pieces.setdefault(name, []).append(value)
    whole = {}
    for name, values in pieces.items():
        if len(values) != size:
            raise CheckpointError(f"{name} is in {len(values)} of the {size} parts")
        split = split_of(name, gated)
        whole[name] = values[0] if split is None else unshard_arrays(values, split)
    return whole, step


def _gather_zero(run_dir: str, prefix: str) -> dict:
    """{name: array} of the checkpoint at `prefix` with the moments of its ZeRO shards (in
    `run_dir`/zero_state) made whole; markers left out."""
    reader = open_reader(prefix, "checkpoint")
    step = int(os.path.basename(prefix).rsplit("-", 1)[1])
    num_ranks = int(reader.get_tensor(MARKER_PREFIX + "num_ranks"))
    shapes = reader.get_variable_to_shape_map()
    tensors = {name: reader.get_tensor(name) for name in shapes
               if not name.startswith((MARKER_PREFIX, TENSOR_PARALLEL_PREFIX))}
    weight_names = [name for name in tensors if name.startswith(WEIGHT_PREFIXES)]
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
    return tensors
