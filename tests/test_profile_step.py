"""benchmarks/profile_step.py: reading op self times back from the profiler's XSpace, the
categories, and one short profiled run of the tiny model."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def profile_step():
    """benchmarks/profile_step.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "profile_step", os.path.join(REPO_ROOT, "benchmarks", "profile_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_xspace(path, lines):
    """An XSpace file with a /host:CPU plane; lines: {line name: [(event name, start_ps,
    duration_ps, stats)]}, stats a dict of str values."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    metadata, stat_ids = {}, {}

    def stat_id(name):
        if name not in stat_ids:
            stat_ids[name] = len(stat_ids) + 1
            plane.stat_metadata[stat_ids[name]].name = name
        return stat_ids[name]

    for line_id, (line_name, events) in enumerate(lines.items()):
        line = plane.lines.add(id=line_id, name=line_name)
        for name, start, duration, stats in events:
            if name not in metadata:
                metadata[name] = len(metadata) + 1
                plane.event_metadata[metadata[name]].name = name
            event = line.events.add(metadata_id=metadata[name], offset_ps=start,
                                    duration_ps=duration)
            for key, value in stats.items():
                stat = event.stats.add(metadata_id=stat_id(key))
                if isinstance(value, int):
                    stat.int64_value = value
                else:
                    stat.str_value = value
    path.write_bytes(space.SerializeToString())


def test_self_times_subtract_nested_ops_but_keep_a_kernels_own_events(tmp_path, profile_step):
    path = tmp_path / "host.xplane.pb"
    write_xspace(path, {
        "python": [("train", 0, 1000, {"step_num": 0}),
                   ("KernelAndDeviceFunc::Run", 100, 850, {})],
        "tf_Compute/1": [
            # The executor (100 ps of its own) runs a matmul, whose kernel traces a ParallelFor
            # (part of the matmul), and an If op whose branch runs a Mul inline.
            ("ExecutorState::Process", 100, 800, {}),
            ("layer_0/dense/MatMul:MatMul", 150, 400, {"shape": "(float[4,8];float[8,16])"}),
            ("ParallelFor", 200, 300, {}),
            ("cond:If", 600, 250, {}),
            ("cond/LAMB/mul:Mul", 650, 100, {"shape": "(bfloat16[2,3];bfloat16[])"}),
        ],
        "tf_data_iterator_resource/7": [("ParseExample/ParseExampleV2:ParseExampleV2", 0, 50,
                                         {})],
    })
    rows, steps = profile_step.read_host_ops(str(path))
    assert steps == [(0, 1000)]
    self_ps = {(r.op_name, r.thread): r.self_ps for r in rows.itertuples()}
    assert self_ps[("layer_0/dense/MatMul", "compute")] == 400  # the ParallelFor included
    assert ("ParallelFor", "compute") not in self_ps
    assert self_ps[("cond", "compute")] == 150
    assert self_ps[("cond/LAMB/mul", "compute")] == 100
    assert self_ps[("ExecutorState::Process", "compute")] == 800 - 400 - 250
    assert self_ps[("KernelAndDeviceFunc::Run", "python")] == 850
    assert self_ps[("train", "python")] == 150
    bytes_read = {r.op_name: r.input_bytes for r in rows.itertuples()}
    assert bytes_read["layer_0/dense/MatMul"] == 4 * (4 * 8 + 8 * 16)
    assert bytes_read["cond/LAMB/mul"] == 2 * (6 + 1)

    ops, categories = profile_step.summarise(rows, steps=1)
    by_category = categories.set_index("category")["ms_per_step"] * 1e9  # back to ps
    # The Python thread's wait is not counted; its own loop time is framework.
    assert by_category.to_dict() == pytest.approx({
        "matmul": 400, "optimizer": 100, "data pipeline": 50, "framework": 150 + 150,
        "other": 150})
    assert categories["share_%"].sum() == pytest.approx(100)


@pytest.mark.parametrize("op_name, op_type, category", [
    ("gradient_tape/bert/encoder/layer_0/attention/einsum/Einsum_1", "Einsum", "matmul"),
    ("bert/encoder/layer_1/attention/self/query/MatMul", "_MklMatMul", "matmul"),
    ("bert/encoder/layer_1/attention/self/query/add", "AddV2", "bias adds"),
    ("gradient_tape/bert/encoder/layer_0/output/dense/add/Sum", "Sum", "bias adds"),
    ("bert/encoder/layer_1/attention/self/add", "AddV2", "bias adds"),  # --fused_qkv
    ("gradient_tape/bert/encoder/layer_1/attention/self/add/Sum", "Sum", "bias adds"),
    ("bert/encoder/layer_0/attention/Softmax", "_MklSoftmax", "attention softmax"),
    ("gradient_tape/bert/encoder/layer_0/attention/sub", "Sub", "attention softmax"),
    ("bert/encoder/layer_0/attention/TfBert>FusedAttentionSoftmax", "TfBert>FusedAttentionSoftmax",
     "attention softmax"),
    ("bert/encoder/layer_0/attention/output_1/add", "AddV2", "other"),  # the residual
    ("bert/encoder/layer_0/attention/self/transpose", "Transpose", "transposes"),
    # --fused_qkv_split: the heads' split with the Q/K/V bias add, and its gradient.
    ("bert/encoder/layer_0/attention/self/TfBert>FusedBiasSplitHeads",
     "TfBert>FusedBiasSplitHeads", "transposes"),
    ("gradient_tape/bert/encoder/layer_0/attention/self/TfBert>FusedBiasSplitHeadsGrad",
     "TfBert>FusedBiasSplitHeadsGrad", "transposes"),
    ("bert/encoder/layer_0/output/LayerNorm/mul", "Mul", "LayerNorm"),
    ("gradient_tape/bert/encoder/layer_0/output/TfBert>FusedLayerNormGrad",
     "TfBert>FusedLayerNormGrad", "LayerNorm"),
    ("bert/encoder/layer_0/intermediate/Gelu/mul_1", "Mul", "GELU"),
    ("bert/encoder/layer_0/intermediate/dense/TfBert>FusedBiasGelu", "TfBert>FusedBiasGelu",
     "GELU"),
    ("cls/predictions/transform/Gelu/Erf", "Erf", "GELU"),
    ("bert/encoder/layer_0/attention/attention_dropout/stateless_dropout/SelectV2", "SelectV2",
     "dropout"),
    ("bert/embeddings/dropout/stateful_uniform_full_int/RngReadAndSkip", "RngReadAndSkip",
     "dropout"),
    # --fused_bias_dropout_add: the op (bias, dropout and residual) under the sublayer's scope.
    ("bert/encoder/layer_0/attention/output/TfBert>FusedBiasDropoutAdd",
     "TfBert>FusedBiasDropoutAdd", "dropout"),
    ("SparseSoftmaxCrossEntropyWithLogits/SparseSoftmaxCrossEntropyWithLogits",
     "SparseSoftmaxCrossEntropyWithLogits", "heads and loss"),
    ("gradient_tape/cls/add/Sum", "Sum", "heads and loss"),
    # --fused_xent: the loss op and its gradient, at the top level as TensorFlow's own.
    ("TfBert>FusedSoftmaxCrossEntropy", "TfBert>FusedSoftmaxCrossEntropy", "heads and loss"),
    ("gradient_tape/TfBert>FusedSoftmaxCrossEntropyGrad", "TfBert>FusedSoftmaxCrossEntropyGrad",
     "heads and loss"),
    ("cond/then/_0/cond/LAMB/LAMB/update_3/mul", "Mul", "optimizer"),
    ("cond/then/_0/cond/TfBert>FusedLambUpdate_7", "TfBert>FusedLambUpdate", "optimizer"),
    ("global_norm/L2Loss_4", "L2Loss", "optimizer"),
    ("bert/encoder/layer_0/output/dense/Cast", "Cast", "casts"),
    ("cluster_0_1/xla_run", "_XlaRun", "XLA clusters"),
    ("HorovodAllreduce_grads_0", "HorovodAllreduce", "collectives"),
    ("AddN_7", "AddN", "other"),
])
def test_classify(profile_step, op_name, op_type, category):
    assert profile_step.classify(op_name, op_type, "compute") == category


def test_classify_by_thread(profile_step):
    assert profile_step.classify("Cast_2", "Cast", "data") == "data pipeline"
    assert profile_step.classify("Iterator::Root::Prefetch", "", "python") == "data pipeline"
    assert profile_step.classify("KernelAndDeviceFunc::Run", "", "python") == profile_step.WAITING
    assert profile_step.classify("ExecutorState::Process", "", "compute") == "framework"


def test_xla_clusters_are_one_op_unless_their_hlo_is_traced(profile_step):
    rows = pd.DataFrame(dict(
        op_name=["cluster_1_1/xla_run", "MemoryDeallocation", "dot.8", "fusion.3"],
        op_type=["_XlaRun", "", "", ""], thread=["compute", "xla", "xla", "xla"],
        self_ps=[10, 1, 6, 3], calls=[1, 1, 1, 1], input_bytes=[0, 0, 0, 0]))
    # Without XLA_FLAGS=--xla_cpu_enable_xprof_traceme XLA's threads trace only their allocator.
    _, categories = profile_step.summarise(rows.iloc[:2], steps=1)
    assert categories.set_index("category")["ms_per_step"].to_dict() == pytest.approx(
        {"XLA clusters": 11e-9})
    # With it, the cluster's op waits for its HLO instructions: counted once, dots as matmul.
    _, categories = profile_step.summarise(rows, steps=1)
    assert categories.set_index("category")["ms_per_step"].to_dict() == pytest.approx(
        {"matmul": 6e-9, "XLA clusters": 4e-9})


def test_layer_pattern(profile_step):
    assert (profile_step.layer_pattern("gradient_tape/bert/encoder/layer_11/attention/mul")
            == "gradient_tape/bert/encoder/layer_*/attention/mul")
    assert (profile_step.layer_pattern("cond/LAMB/LAMB/update_12/mul")
            == profile_step.layer_pattern("cond/LAMB/LAMB/update/mul")
            == "cond/LAMB/LAMB/update_*/mul")


def test_profiles_three_steps_of_the_tiny_model(tmp_path, tfbert_cache):
    out = tmp_path / "profile"
    result = subprocess.run(
        [sys.executable, "benchmarks/profile_step.py", "--steps=3", "--warmup_steps=1",
         "--timed_steps=0", "--peak_size=256", f"--out={out}", "--",
         "--model=tiny", "--num_hidden_layers=1", "--train_batch_size=4",
         "--max_seq_length=32", "--max_predictions_per_seq=5", "--fused_qkv"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    categories = pd.read_csv(f"{out}_categories.csv").set_index("category")
    assert (categories["ms_per_step"] > 0).all()
    for category in ("matmul", "optimizer", "LayerNorm", "dropout", "framework"):
        assert category in categories.index
    with open(f"{out}_summary.json") as f:
        summary = json.load(f)
    # Thread time: two compute threads share the cores, the data pipeline runs beside them.
    ratio = categories["ms_per_step"].sum() / summary["profiled_step_ms"]
    assert 0.3 < ratio < 4, ratio
    assert math.isfinite(summary["mfu"]) and 0 < summary["mfu"] < 1
    assert summary["setup"].endswith(", --fused_qkv")
    assert os.path.exists(os.path.join(tfbert_cache, "matmul_peak.json"))  # cached there
    ops = pd.read_csv(f"{out}_ops.csv")
    assert (ops.loc[ops["category"] == "matmul", "mb_read_per_step"] > 0).all()
    assert "| matmul" in result.stdout and "MFU" in result.stdout
    assert (tmp_path / "profile.png").stat().st_size > 0
