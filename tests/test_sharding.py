"""ZeRO's partition plan and start-up byte table (tfbert.training.sharding), from shapes alone."""

import math

import numpy as np
import pytest

from conftest import ODD, odd_model_config
from tfbert.config import MODEL_PRESETS, ModelConfig
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer
from tfbert.training import sharding
from tfbert.training.sharding import (FlatPlan, RowPlan, Shard, byte_table, format_byte_table,
                                      horovod_split_sizes, model_variable_shapes, partition_plan)

STRATEGIES = ("naive", "greedy:1", "greedy:3", "greedy:16", "flat")
# Odd sizes plus what breaks naive code: a scalar, a 1-element vector, a variable with fewer rows
# (3) than greedy wants pieces, and one whose single row is larger than any piece bound.
AWKWARD = [("a/scalar", ()), ("b/one", (1,)), ("c/matrix", (13, 7)), ("d/few_rows", (3, 50)),
           ("e/vector", (37,)), ("f/wide_row", (1, 90)), ("g/cube", (5, 3, 2))]


def odd_shapes(**overrides):
    return model_variable_shapes(odd_model_config(**overrides))


@pytest.mark.parametrize("overrides", [{}, {"use_bias_in_keys": False}, {"hidden_act": "geglu"}],
                         ids=["default", "no_key_bias", "geglu"])
def test_shapes_from_the_config_match_the_built_model(overrides):
    model = BertPretrainer(odd_model_config(**overrides), DropoutRng(0))
    model.build(ODD["seq"], ODD["predictions"])
    built = {name: tuple(v.shape) for name, v in model.variables_by_name().items()}
    computed = odd_shapes(**overrides)
    assert set(computed) == set(built)
    assert computed == built
    assert all(v.trainable for v in model.variables)
    # Same order as the model's variables: the order `flat` concatenates in.
    assert list(computed) == [v.name.split(":")[0] for v in model.variables]
    if not overrides.get("use_bias_in_keys", True):
        assert not any(name.endswith("key/bias") for name in computed)
    if overrides.get("hidden_act") == "geglu":
        assert computed["bert/encoder/layer_0/intermediate/dense/kernel"] == (32, 74)


def test_48x3072_parameter_count_without_allocating():
    shapes = model_variable_shapes(ModelConfig(vocab_size=103_000, **MODEL_PRESETS["48x3072"]))
    assert shapes["bert/embeddings/word_embeddings"] == (103_000, 3072)  # the notes' 316M matrix
    assert math.prod(shapes["bert/embeddings/word_embeddings"]) == pytest.approx(316e6, rel=0.01)
    layer_0 = sum(math.prod(s) for n, s in shapes.items() if n.startswith("bert/encoder/layer_0/"))
    assert layer_0 == pytest.approx(113e6, rel=0.01)
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(5.75e9, rel=0.01)


def owned_counts(plan):
    """{name: int array counting, per element, the ranks that own it}, checked against owners."""
    counts = {name: np.zeros(math.prod(shape), np.int64) for name, shape in plan.variables}
    ranks_of = {name: set() for name in counts}
    for rank in range(plan.num_ranks):
        ranges = plan.element_ranges(rank)
        assert plan.owned_elements(rank) == sum(r.size for r in ranges)
        for r in ranges:
            assert 0 <= r.start < r.end <= counts[r.name].size
            counts[r.name][r.start:r.end] += 1
            ranks_of[r.name].add(rank)
    for name in counts:
        assert plan.owners(name) == tuple(sorted(ranks_of[name]))
    return counts


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("shapes", ["odd", "odd_geglu_no_key_bias", "awkward"])
def test_every_element_is_owned_by_exactly_one_rank(strategy, n, shapes):
    variables = {"odd": odd_shapes(),
                 "odd_geglu_no_key_bias": odd_shapes(hidden_act="geglu", use_bias_in_keys=False),
                 "awkward": AWKWARD}[shapes]
    plan = partition_plan(variables, n, strategy)
    assert isinstance(plan, FlatPlan if strategy == "flat" else RowPlan)
    counts = owned_counts(plan)
    for name, count in counts.items():
        assert (count == 1).all(), f"{name}: elements owned {set(count.tolist())} times"
    assert sum(plan.owned_elements_per_rank()) == plan.total_elements


def test_naive_keeps_variables_whole_and_assigns_by_layer():
    shapes = odd_shapes(num_hidden_layers=5)
    plan = partition_plan(shapes, 3, "naive")
    for name, shape in shapes.items():
        (rank,) = plan.owners(name)
        assert Shard(name, 0, shape[0]) in plan.shards[rank]
        if name.startswith("bert/encoder/layer_"):
            assert rank == int(name.split("/")[2].split("_")[1]) % 3
        elif name.startswith("bert/embeddings/"):
            assert rank == 2  # layer -1
        else:
            assert rank == 5 % 3  # pooler and heads: the layer after the last
    # Scalars and vectors stay whole too.
    awkward = partition_plan(AWKWARD, 2, "naive")
    assert all(len(awkward.owners(name)) == 1 for name, _ in AWKWARD)


@pytest.mark.parametrize("pieces", [1, 2, 5, 16])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_greedy_pieces_respect_the_bound(pieces, n):
    for variables in (odd_shapes(), AWKWARD):
        shapes = dict(variables)
        plan = partition_plan(shapes, n, f"greedy:{pieces}")
        total = sum(math.prod(s) for s in shapes.values())
        bound = total / n / pieces
        by_variable = {}
        for rank_shards in plan.shards:
            for shard in rank_shards:
                by_variable.setdefault(shard.name, []).append(shard)
        for name, shape in shapes.items():
            rows = shape[0] if shape else 1
            row_size = math.prod(shape[1:])
            shards = sorted(by_variable[name], key=lambda s: s.start_row)
            if math.prod(shape) <= bound:
                assert shards == [Shard(name, 0, rows)]  # small variables stay whole
                continue
            # Pieces tile the rows, are at most the bound unless one row is already larger,
            # and are even (never split further than the rows allow).
            assert [s.start_row for s in shards] == [0] + [s.end_row for s in shards[:-1]]
            assert shards[-1].end_row == rows
            assert len(shards) <= rows
            for s in shards:
                assert s.num_rows * row_size <= bound or s.num_rows == 1
            assert max(s.num_rows for s in shards) - min(s.num_rows for s in shards) <= 1


def test_greedy_splits_a_variable_with_few_rows_into_single_rows():
    # 3 rows of 50 against a bound of 176 / 2 / 4 = 22 elements: one row per piece, no further.
    plan = partition_plan([("x", (3, 50)), ("y", (26,))], 2, "greedy:4")
    pieces = sorted((s for shards in plan.shards for s in shards if s.name == "x"),
                    key=lambda s: s.start_row)
    assert pieces == [Shard("x", 0, 1), Shard("x", 1, 2), Shard("x", 2, 3)]


@pytest.mark.parametrize("total,n,sizes", [(10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]),
                                           (3, 5, [1, 1, 1, 0, 0]), (7, 2, [4, 3])])
def test_flat_splits_as_horovod_reducescatter_does(total, n, sizes):
    assert horovod_split_sizes(total, n) == sizes
    plan = partition_plan([("v", (total,))], n, "flat")
    assert [hi - lo for lo, hi in plan.ranges] == sizes


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_flat_ranges_are_contiguous_in_model_order(n):
    shapes = odd_shapes()
    plan = partition_plan(shapes, n, "flat")
    total = plan.total_elements
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(plan.ranges[:-1], plan.ranges[1:]))
    assert plan.owned_elements_per_rank() == horovod_split_sizes(total, n)
    # The first element of rank r's range is where its first ElementRange points.
    offsets = plan.offsets()
    for rank, (lo, _) in enumerate(plan.ranges):
        first = plan.element_ranges(rank)[0]
        assert offsets[first.name] + first.start == lo


@pytest.mark.parametrize("bad", ["", "greedy", "greedy:", "greedy:0", "greedy:x", "greedy:-1",
                                 "greedy:1.5", "Greedy:8", "flat:2", "zero"])
def test_unknown_strategies_name_the_flag_and_the_value(bad):
    with pytest.raises(ValueError, match="--state_split_strategy") as error:
        partition_plan(odd_shapes(), 2, bad)
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("strategy", ["naive", "greedy:8", "flat"])
@pytest.mark.parametrize("n", [0, 1])
def test_sharding_needs_two_ranks(strategy, n):
    with pytest.raises(ValueError, match=f"--state_split_strategy={strategy}.*got {n}"):
        partition_plan(odd_shapes(), n, strategy)


def test_a_byte_table_needs_stage_1_or_2():
    with pytest.raises(ValueError, match="--zero_stage=3"):
        byte_table(odd_shapes(), 2, "flat", 3)


def notes_shapes():
    return model_variable_shapes(ModelConfig(vocab_size=103_000, **MODEL_PRESETS["48x3072"]))


def test_the_notes_lesson_at_48x3072_on_8_ranks():
    shapes = notes_shapes()
    total = sum(math.prod(s) for s in shapes.values())
    naive = partition_plan(shapes, 8, "naive")
    assert naive.owners("bert/embeddings/word_embeddings") == (7,)
    assert naive.imbalance() == pytest.approx(1.382, abs=0.001)
    owned = naive.owned_elements_per_rank()
    assert owned.index(max(owned)) == 7
    for strategy in ("greedy:8", "greedy:16"):
        plan = partition_plan(shapes, 8, strategy)
        assert len(plan.owners("bert/embeddings/word_embeddings")) > 1
        assert plan.imbalance() < 1.01
    flat = partition_plan(shapes, 8, "flat")
    owned = flat.owned_elements_per_rank()
    assert max(owned) - min(owned) <= 1
    assert 1.0 <= flat.imbalance() <= 1.0 + 8 / total
    # At 48 ranks (one layer each) the embedding's rank holds over 3.5x the mean.
    assert partition_plan(shapes, 48, "naive").imbalance() > 3.5
    assert partition_plan(shapes, 48, "greedy:16").imbalance() < 1.05


@pytest.mark.parametrize("strategy", ["naive", "greedy:8", "flat"])
def test_byte_table_columns(strategy):
    shapes = odd_shapes()
    total = sum(math.prod(s) for s in shapes.values())
    stage1 = byte_table(shapes, 3, strategy, 1)
    stage2 = byte_table(shapes, 3, strategy, 2, bytes_per_param=2, optimizer_slots=1, grad_bytes=2)
    assert list(stage1.index) == [0, 1, 2]
    assert (stage1["param_bytes"] == 4 * total).all()
    assert stage1["opt_state_bytes"].sum() == 2 * 4 * total  # m and v, float32, split once
    assert (stage1["grad_bytes"] == 4 * total).all()  # stage 1 keeps every gradient
    assert (stage2["param_bytes"] == 2 * total).all()
    assert stage2["opt_state_bytes"].sum() == 1 * 4 * total
    assert stage2["grad_bytes"].sum() == 2 * total  # stage 2: each rank its own share
    assert list(stage2["grad_bytes"]) == [2 * e for e in stage2["owned_elements"]]
    for df in (stage1, stage2):
        assert (df["total_bytes"] == df["param_bytes"] + df["opt_state_bytes"]
                + df["grad_bytes"]).all()
        opt = df["opt_state_bytes"]
        assert df.attrs["opt_state_imbalance"] == pytest.approx(opt.max() / opt.mean())
    assert stage1.attrs["unsharded_bytes"] == (4 + 8 + 4) * total


def test_format_byte_table_prints_gb_and_the_imbalance():
    df = byte_table(notes_shapes(), 8, "naive", 2)
    text = format_byte_table(df, "### 48x3072, vocab_size=103000")
    lines = text.splitlines()
    assert lines[0] == "### 48x3072, vocab_size=103000"
    assert "| 7 | 21.51 | 7.43 |" in text  # the embedding's rank, GB with 2 decimals
    assert "optimizer state max/mean = 1.382 (rank 7" in text
    assert sum(line.startswith("| ") for line in lines) == 1 + 8 + 3  # header, ranks, min/mean/max
    # Many ranks: the first, the last, the heaviest and the lightest, and the rest counted.
    many = format_byte_table(byte_table(notes_shapes(), 48, "naive", 1), "t")
    assert "| (44 more) |" in many and "| 47 |" in many and "max/mean = 3.585" in many


def test_main_prints_every_table(capsys):
    sharding.main()
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("### ")]
    assert len(titles) == 2 * 2 * 4 * 2  # presets x rank counts x strategies x stages
    assert sum("48x3072, vocab_size=103000" in t for t in titles) == 16
    assert sum("xlarge, vocab_size=100000" in t for t in titles) == 16
    assert out.count("max/mean") == 32
