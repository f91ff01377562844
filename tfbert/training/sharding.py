"""Which data-parallel rank owns which part of the optimizer state (ZeRO-1/2), and what it costs.

The first piece of ZeRO (issue 11): a plan, computed from variable shapes alone, of the parts of
each variable whose optimizer state (LAMB/AdamW m and v) and, under ZeRO-2, whose gradient and
accumulator each rank owns; and the start-up table of bytes per rank that rank 0 prints.
Nothing here allocates a tensor, so the 5.75B-parameter preset is planned in milliseconds.

Strategies (`--state_split_strategy`):

  naive     whole variables to ranks by layer: `bert/encoder/layer_<k>/...` goes to rank k mod n;
            `bert/embeddings/...` counts as layer -1 (rank n - 1) and everything after the
            encoder (`bert/pooler`, `cls/...`) as layer L, the one after the last (rank L mod n).
            The notes' first attempt: the whole embedding matrix (316M parameters at 48x3072
            with a 103k vocabulary) lands on one rank, which then holds the most.
  greedy:N  balance bytes: a variable larger than 1/N of a rank's fair share (total / n) is first
            split along its first axis into pieces of at most that size; then every variable or
            piece, largest first, goes to the rank that holds the least so far.
  flat      the concatenation of all variables, flattened in model order, split into n contiguous
            ranges as Horovod 0.28.1's reducescatter splits dim 0 (the first `total % n` ranks
            get one more element), as DeepSpeed's ZeRO does: balanced to one element.

`naive` and `greedy:N` give each rank whole rows of variables (`Shard`s): a rank updates its rows
with the ordinary per-variable code. `flat` gives element ranges that may start or end inside a
row. Both answer the same questions through `PartitionPlan`: `element_ranges(rank)`,
`owned_elements(rank)`, `owners(name)`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from typing import Iterable, Mapping, Sequence, Union

import pandas as pd

from tfbert.config import MODEL_PRESETS, ModelConfig

STRATEGY_FLAG = "--state_split_strategy"
ZERO_STAGES = (1, 2)
# Optimizer slots (m, v) are float32 in every precision: the variables they follow are float32
# (mixed precision keeps float32 variables) and a float16 second moment underflows.
OPTIMIZER_SLOT_BYTES = 4
GB = 2 ** 30  # as everywhere in tfbert's logs and benchmarks

Shape = tuple[int, ...]
VariableShapes = Union[Mapping[str, Sequence[int]], Iterable[tuple[str, Sequence[int]]]]


# ---------------------------------------------------------------------------------------------
# Shapes of the model's variables, from the config alone.

def model_variable_shapes(config: ModelConfig) -> dict[str, Shape]:
    """{documented name: shape} of every trainable variable of `BertPretrainer(config)`.

    In the model's own variable order (`BertPretrainer.variables`), which is the order the `flat`
    strategy concatenates in. Computed without creating a variable: the 48x3072 preset has 5.75B
    parameters. With `use_bias_in_keys=False` there is no `key/bias`; with `hidden_act="geglu"`
    the intermediate projection holds gate and value: kernel [D, 2 * I], bias [2 * I].
    """
    d, i = config.hidden_size, config.intermediate_size
    ffn_width = 2 * i if config.hidden_act == "geglu" else i
    shapes: dict[str, Shape] = {
        "bert/embeddings/word_embeddings": (config.vocab_size, d),
        "bert/embeddings/token_type_embeddings": (config.type_vocab_size, d),
        "bert/embeddings/position_embeddings": (config.max_position_embeddings, d),
        "bert/embeddings/LayerNorm/gamma": (d,),
        "bert/embeddings/LayerNorm/beta": (d,),
    }
    for k in range(config.num_hidden_layers):
        layer = f"bert/encoder/layer_{k}"
        for projection in ("query", "key", "value"):
            shapes[f"{layer}/attention/self/{projection}/kernel"] = (d, d)
            if projection != "key" or config.use_bias_in_keys:
                shapes[f"{layer}/attention/self/{projection}/bias"] = (d,)
        shapes[f"{layer}/attention/output/dense/kernel"] = (d, d)
        shapes[f"{layer}/attention/output/dense/bias"] = (d,)
        shapes[f"{layer}/attention/output/LayerNorm/gamma"] = (d,)
        shapes[f"{layer}/attention/output/LayerNorm/beta"] = (d,)
        shapes[f"{layer}/intermediate/dense/kernel"] = (d, ffn_width)
        shapes[f"{layer}/intermediate/dense/bias"] = (ffn_width,)
        # GeGLU's output projection reads the gated half: I inputs, not 2 * I.
        shapes[f"{layer}/output/dense/kernel"] = (i, d)
        shapes[f"{layer}/output/dense/bias"] = (d,)
        shapes[f"{layer}/output/LayerNorm/gamma"] = (d,)
        shapes[f"{layer}/output/LayerNorm/beta"] = (d,)
    shapes.update({
        "bert/pooler/dense/kernel": (d, d),
        "bert/pooler/dense/bias": (d,),
        # The MLM output projection is the word-embedding table itself (tied): only its bias here.
        "cls/predictions/output_bias": (config.vocab_size,),
        "cls/seq_relationship/output_weights": (2, d),
        "cls/seq_relationship/output_bias": (2,),
        "cls/predictions/transform/dense/kernel": (d, d),
        "cls/predictions/transform/dense/bias": (d,),
        "cls/predictions/transform/LayerNorm/gamma": (d,),
        "cls/predictions/transform/LayerNorm/beta": (d,),
    })
    return shapes


def _as_items(shapes: VariableShapes) -> tuple[tuple[str, Shape], ...]:
    items = shapes.items() if isinstance(shapes, Mapping) else shapes
    result = tuple((str(name), tuple(int(s) for s in shape)) for name, shape in items)
    names = [name for name, _ in result]
    if len(set(names)) != len(names):
        raise ValueError("two variables share a name; the plan keys them by name")
    for name, shape in result:
        if any(s < 0 for s in shape):
            raise ValueError(f"variable {name} has a negative dimension: {shape}")
    return result


def _rows(shape: Shape) -> int:
    """Rows along the first axis; a scalar is one row of one element."""
    return shape[0] if shape else 1


def _row_size(shape: Shape) -> int:
    return math.prod(shape[1:])


def _numel(shape: Shape) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# Strategies.

def parse_split_strategy(strategy: str) -> tuple[str, int | None]:
    """"naive" -> ("naive", None); "greedy:8" -> ("greedy", 8); "flat" -> ("flat", None).

    Raises ValueError naming --state_split_strategy for anything else (greedy:0, greedy:x, ...).
    """
    if strategy in ("naive", "flat"):
        return strategy, None
    match = re.fullmatch(r"greedy:([0-9]+)", strategy)
    if match and int(match.group(1)) > 0:
        return "greedy", int(match.group(1))
    raise ValueError(f"{STRATEGY_FLAG}={strategy!r} is not 'naive', 'flat' or 'greedy:N' with N a "
                     f"positive integer (the number of pieces of a rank's share a variable may "
                     f"be split into)")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows [start_row, end_row) of variable `name` along its first axis (a scalar has one row)."""

    name: str
    start_row: int
    end_row: int

    @property
    def num_rows(self) -> int:
        return self.end_row - self.start_row


@dataclasses.dataclass(frozen=True)
class ElementRange:
    """Elements [start, end) of variable `name` flattened in row-major order."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class PartitionPlan:
    """Which rank owns which elements of which variable. Subclasses: RowPlan, FlatPlan.

    variables: (name, shape) in model order; every element of every variable is owned by exactly
    one rank.
    """

    strategy: str
    num_ranks: int
    variables: tuple[tuple[str, Shape], ...]

    @property
    def shapes(self) -> dict[str, Shape]:
        return dict(self.variables)

    @property
    def total_elements(self) -> int:
        return sum(_numel(shape) for _, shape in self.variables)

    def element_ranges(self, rank: int) -> tuple[ElementRange, ...]:
        """The parts of variables rank `rank` owns, in model order."""
        raise NotImplementedError

    def owned_elements(self, rank: int) -> int:
        return sum(r.size for r in self.element_ranges(rank))

    def owned_elements_per_rank(self) -> list[int]:
        return [self.owned_elements(r) for r in range(self.num_ranks)]

    def owners(self, name: str) -> tuple[int, ...]:
        """The ranks that own a non-empty part of variable `name`, ascending."""
        raise NotImplementedError

    def imbalance(self) -> float:
        """max / mean of the elements owned per rank (1.0 is perfect balance)."""
        owned = self.owned_elements_per_rank()
        mean = sum(owned) / len(owned)
        return max(owned) / mean if mean else 1.0

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is outside a plan for {self.num_ranks} ranks")


@dataclasses.dataclass(frozen=True)
class RowPlan(PartitionPlan):
    """`naive` and `greedy:N`: each rank owns whole rows of variables.

    shards[r]: rank r's Shards in model order (a whole variable is rows [0, shape[0])).
    """

    shards: tuple[tuple[Shard, ...], ...] = ()

    def element_ranges(self, rank: int) -> tuple[ElementRange, ...]:
        self._check_rank(rank)
        shapes = self.shapes
        return tuple(ElementRange(s.name, s.start_row * _row_size(shapes[s.name]),
                                  s.end_row * _row_size(shapes[s.name]))
                     for s in self.shards[rank])

    def owners(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise KeyError(f"no variable {name} in the plan")
        return tuple(r for r, shards in enumerate(self.shards)
                     if any(s.name == name and s.num_rows > 0 for s in shards))


@dataclasses.dataclass(frozen=True)
class FlatPlan(PartitionPlan):
    """`flat`: rank r owns elements ranges[r] = [flat_start, flat_end) of the concatenation of
    all variables, flattened, in model order."""

    ranges: tuple[tuple[int, int], ...] = ()

    def offsets(self) -> dict[str, int]:
        """Where each variable starts in the concatenation."""
        result, offset = {}, 0
        for name, shape in self.variables:
            result[name] = offset
            offset += _numel(shape)
        return result

    def element_ranges(self, rank: int) -> tuple[ElementRange, ...]:
        self._check_rank(rank)
        lo, hi = self.ranges[rank]
        result, offset = [], 0
        for name, shape in self.variables:
            size = _numel(shape)
            start, end = max(lo, offset), min(hi, offset + size)
            if start < end:
                result.append(ElementRange(name, start - offset, end - offset))
            offset += size
            if offset >= hi:
                break
        return tuple(result)

    def owned_elements(self, rank: int) -> int:
        self._check_rank(rank)
        lo, hi = self.ranges[rank]
        return hi - lo

    def owners(self, name: str) -> tuple[int, ...]:
        offsets = self.offsets()
        if name not in offsets:
            raise KeyError(f"no variable {name} in the plan")
        start, end = offsets[name], offsets[name] + _numel(self.shapes[name])
        return tuple(r for r, (lo, hi) in enumerate(self.ranges) if max(lo, start) < min(hi, end))


def horovod_split_sizes(total: int, num_ranks: int) -> list[int]:
    """The sizes Horovod 0.28.1's reducescatter gives each rank when splitting dim 0 of size
    `total`: total // n each, and one more for the first total % n ranks."""
    base, extra = divmod(total, num_ranks)
    return [base + (1 if r < extra else 0) for r in range(num_ranks)]


_LAYER = re.compile(r"bert/encoder/layer_(\d+)/")


def _naive_layer(name: str, after_last: int) -> int:
    match = _LAYER.match(name)
    if match:
        return int(match.group(1))
    if name.startswith("bert/embeddings/"):
        return -1
    return after_last  # pooler and pretraining heads come after the encoder


def _naive_plan(variables, n: int) -> list[list[Shard]]:
    layers = [int(m.group(1)) for m in (_LAYER.match(name) for name, _ in variables) if m]
    after_last = max(layers) + 1 if layers else 0
    shards: list[list[Shard]] = [[] for _ in range(n)]
    for name, shape in variables:
        # Python's modulo: layer -1 (the embeddings) goes to rank n - 1.
        shards[_naive_layer(name, after_last) % n].append(Shard(name, 0, _rows(shape)))
    return shards


def _split_rows(name: str, shape: Shape, max_elements: float) -> list[Shard]:
    """Pieces of at most `max_elements` along the first axis, as even as possible; never smaller
    than one row (so a row larger than the bound stays one piece, and a variable is never split
    into more pieces than it has rows)."""
    rows = _rows(shape)
    if _numel(shape) <= max_elements or rows <= 1:
        return [Shard(name, 0, rows)]
    rows_per_piece = max(1, int(max_elements // _row_size(shape)))
    pieces = math.ceil(rows / rows_per_piece)
    # An even split into `pieces` has at most ceil(rows / pieces) <= rows_per_piece rows each.
    bounds = [rows * p // pieces for p in range(pieces + 1)]
    return [Shard(name, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _greedy_plan(variables, n: int, pieces_per_share: int) -> list[list[Shard]]:
    total = sum(_numel(shape) for _, shape in variables)
    max_piece = total / n / pieces_per_share
    shapes = dict(variables)
    order = {name: i for i, (name, _) in enumerate(variables)}
    items = [piece for name, shape in variables for piece in _split_rows(name, shape, max_piece)]

    def size(s: Shard) -> int:
        return s.num_rows * _row_size(shapes[s.name])

    # Largest first (ties in model order), each to the rank holding least (ties: lowest rank).
    items.sort(key=lambda s: (-size(s), order[s.name], s.start_row))
    heap = [(0, r) for r in range(n)]
    shards: list[list[Shard]] = [[] for _ in range(n)]
    for item in items:
        load, rank = heapq.heappop(heap)
        shards[rank].append(item)
        heapq.heappush(heap, (load + size(item), rank))
    for rank_shards in shards:
        rank_shards.sort(key=lambda s: (order[s.name], s.start_row))
    return shards


def partition_plan(variables: VariableShapes, num_ranks: int, strategy: str) -> PartitionPlan:
    """The plan of `strategy` ("naive", "greedy:N" or "flat", as --state_split_strategy gives it)
    over `num_ranks` data-parallel ranks.

    Args:
      variables: {name: shape} or [(name, shape), ...] in model order (`model_variable_shapes`,
        or `{v.name: v.shape}` of the model's trainable variables).
      num_ranks: data-parallel ranks, >= 2 (sharding over one rank shards nothing).
    Returns: a RowPlan (naive, greedy:N) or a FlatPlan (flat).
    """
    kind, pieces_per_share = parse_split_strategy(strategy)
    if num_ranks < 2:
        raise ValueError(f"{STRATEGY_FLAG}={strategy} splits the optimizer state across "
                         f"data-parallel ranks; it needs at least 2, got {num_ranks}")
    items = _as_items(variables)
    if kind == "flat":
        sizes = horovod_split_sizes(sum(_numel(shape) for _, shape in items), num_ranks)
        ends = [sum(sizes[:r + 1]) for r in range(num_ranks)]
        ranges = tuple(zip([0] + ends[:-1], ends))
        return FlatPlan(strategy, num_ranks, items, ranges=ranges)
    if kind == "naive":
        shards = _naive_plan(items, num_ranks)
    else:
        shards = _greedy_plan(items, num_ranks, pieces_per_share)
    return RowPlan(strategy, num_ranks, items, shards=tuple(tuple(s) for s in shards))


# ---------------------------------------------------------------------------------------------
# The start-up byte table.

def byte_table(shapes: VariableShapes, n: int, strategy: str, zero_stage: int,
               bytes_per_param: int = 4, optimizer_slots: int = 2,
               grad_bytes: int = 4) -> pd.DataFrame:
    """Bytes each rank holds under ZeRO-`zero_stage` with `strategy` over `n` ranks.

    One row per rank: rank, owned_elements, param_bytes (every rank holds every parameter under
    ZeRO-1/2), opt_state_bytes (optimizer_slots float32 slots of the owned elements),
    grad_bytes (gradients/accumulators: all of them at stage 1, the owned share at stage 2),
    total_bytes. Activations and workspace are not counted.

    `df.attrs` holds strategy, num_ranks, zero_stage, opt_state_imbalance (max / mean of
    opt_state_bytes), max_opt_state_rank, and unsharded_bytes (what one rank holds without
    sharding: parameters, all optimizer state and all gradients).
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"--zero_stage={zero_stage} is not one of {ZERO_STAGES}")
    plan = partition_plan(shapes, n, strategy)
    total = plan.total_elements
    owned = plan.owned_elements_per_rank()
    df = pd.DataFrame({"rank": range(n), "owned_elements": owned})
    df["param_bytes"] = total * bytes_per_param
    df["opt_state_bytes"] = [optimizer_slots * OPTIMIZER_SLOT_BYTES * e for e in owned]
    df["grad_bytes"] = [(total if zero_stage == 1 else e) * grad_bytes for e in owned]
    df["total_bytes"] = df["param_bytes"] + df["opt_state_bytes"] + df["grad_bytes"]
    df = df.set_index("rank")
    df.attrs.update(
        strategy=strategy, num_ranks=n, zero_stage=zero_stage,
        opt_state_imbalance=plan.imbalance(),
        max_opt_state_rank=int(df["opt_state_bytes"].idxmax()),
        unsharded_bytes=total * (bytes_per_param + optimizer_slots * OPTIMIZER_SLOT_BYTES
                                 + grad_bytes))
    return df


def _shown_ranks(df: pd.DataFrame, max_rows: int) -> list[int]:
    """All ranks, or for many: the first three, the last, and the heaviest and lightest."""
    ranks = list(df.index)
    if len(ranks) <= max_rows:
        return ranks
    shown = set(ranks[:3] + ranks[-1:])
    shown.update([int(df["total_bytes"].idxmax()), int(df["total_bytes"].idxmin())])
    return sorted(shown)


def format_byte_table(df: pd.DataFrame, title: str, max_rows: int = 16) -> str:
    """A Markdown table of a `byte_table` in GB (2^30 bytes, 2 decimals) for rank 0 to print:
    one row per rank (for more than `max_rows` ranks: the first, the last, the heaviest and the
    lightest), min/mean/max rows, and the optimizer state's max/mean line."""
    columns = [("param_bytes", "parameters"), ("opt_state_bytes", "optimizer state"),
               ("grad_bytes", "gradients"), ("total_bytes", "total")]
    lines = [title, "", "| rank | " + " | ".join(f"{label} GB" for _, label in columns) + " |",
             "|---:|" + "---:|" * len(columns)]

    def row(label, values) -> str:
        return f"| {label} | " + " | ".join(f"{v / GB:.2f}" for v in values) + " |"

    previous = -1
    for rank in _shown_ranks(df, max_rows):
        if rank != previous + 1:
            lines.append(f"| ({rank - previous - 1} more) |" + " |" * len(columns))
        lines.append(row(rank, [df.at[rank, c] for c, _ in columns]))
        previous = rank
    if previous != len(df) - 1:
        lines.append(f"| ({len(df) - 1 - previous} more) |" + " |" * len(columns))
    for stat in ("min", "mean", "max"):
        lines.append(row(stat, [getattr(df[c], stat)() for c, _ in columns]))
    attrs = df.attrs
    if "opt_state_imbalance" in attrs:
        opt = df["opt_state_bytes"]
        lines += ["", f"optimizer state max/mean = {attrs['opt_state_imbalance']:.3f} "
                      f"(rank {attrs['max_opt_state_rank']} holds {opt.max() / GB:.2f} GB, "
                      f"the mean is {opt.mean() / GB:.2f} GB); without sharding every rank "
                      f"holds {attrs['unsharded_bytes'] / GB:.2f} GB (GB = 2^30 bytes)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The issue note's table: `python -m tfbert.training.sharding`.

# The presets' parameter counts assume a 100k vocabulary (tfbert.config.MODEL_PRESETS); the
# notes' 48x3072 figures imply about 103k (316M embedding parameters / 3072).
DEFAULT_VOCAB_SIZE = 100_000
NOTES_VOCAB_SIZES = {"48x3072": 103_000}


def preset_config(preset: str, vocab_size: int | None = None) -> ModelConfig:
    vocab = vocab_size or NOTES_VOCAB_SIZES.get(preset, DEFAULT_VOCAB_SIZE)
    return ModelConfig(vocab_size=vocab, **MODEL_PRESETS[preset])


def table_title(preset: str, config: ModelConfig, n: int, strategy: str, zero_stage: int) -> str:
    params = sum(_numel(s) for s in model_variable_shapes(config).values())
    return (f"### {preset}, vocab_size={config.vocab_size} ({params / 1e9:.2f}B parameters, "
            f"fp32 variables, 2 float32 optimizer slots, fp32 gradients), {n} ranks, "
            f"{STRATEGY_FLAG}={strategy}, ZeRO-{zero_stage}")


def main() -> None:
    for preset in ("xlarge", "48x3072"):
        config = preset_config(preset)
        shapes = model_variable_shapes(config)
        for n in (8, 48):
            for strategy in ("naive", "greedy:8", "greedy:16", "flat"):
                for stage in ZERO_STAGES:
                    df = byte_table(shapes, n, strategy, stage)
                    print(format_byte_table(df, table_title(preset, config, n, strategy, stage)))
                    print()


if __name__ == "__main__":
    main()
