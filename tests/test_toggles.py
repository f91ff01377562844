"""The runtime and model switches of the notes' checklist change what they claim to change."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context
from tensorflow.python.grappler import tf_optimizer

from conftest import odd_model_config, run_config, run_tfbert, synthetic_batch, synthetic_dataset
from tfbert import config as cfg
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer
from tfbert.training import grappler
from tfbert.training.trainer import Pretrainer

RewriterConfig = rewriter_config_pb2.RewriterConfig
BATCH = dict(batch=8, seq=16, predictions=3)


def step_call_configs(trainer: Pretrainer) -> list[config_pb2.ConfigProto]:
    """The ConfigProto on each call op of the training step, traced as the trainer calls it."""
    batch = synthetic_batch(**BATCH)

    @tf.function
    def outer(batch):
        return trainer.train_step(batch, tf.zeros([2]))

    with trainer.grappler.scope():
        graph = outer.get_concrete_function(batch).graph
    configs = []
    for op in graph.get_operations():
        if op.type in ("StatefulPartitionedCall", "PartitionedCall"):
            proto = config_pb2.ConfigProto()
            proto.ParseFromString(op.get_attr("config_proto"))
            configs.append(proto)
    return configs


@pytest.mark.parametrize("mode", sorted(grappler.MEMORY_OPTIMIZATIONS))
def test_the_step_call_carries_the_memory_optimization(tmp_path, mode):
    trainer = Pretrainer(run_config(tmp_path, memory_optimization=mode), synthetic_dataset())
    configs = step_call_configs(trainer)
    assert configs, "the training step was not called through a call op"
    for proto in configs:
        rewrite = proto.graph_options.rewrite_options
        assert rewrite.memory_optimization == grappler.MEMORY_OPTIMIZATIONS[mode]
        assert rewrite.memory_optimizer_target_node_name_scope == "gradient_tape/"
        assert not rewrite.disable_meta_optimizer


def test_suppress_grappler_turns_the_meta_optimizer_off_for_the_step_only(tmp_path):
    trainer = Pretrainer(run_config(tmp_path, suppress_grappler=True), synthetic_dataset())
    for proto in step_call_configs(trainer):
        assert proto.graph_options.rewrite_options.disable_meta_optimizer
    # Outside the step's scope the process keeps its own settings.
    outside = config_pb2.ConfigProto()
    outside.ParseFromString(context.context().function_call_options.config_proto_serialized)
    assert not outside.graph_options.rewrite_options.disable_meta_optimizer


def test_suppress_grappler_keeps_an_explicit_memory_optimization_alone():
    config = grappler.step_config_proto(config_pb2.ConfigProto(), "recomputation",
                                        suppress_grappler=True)
    rewrite = config.graph_options.rewrite_options
    assert not rewrite.disable_meta_optimizer
    assert rewrite.memory_optimization == RewriterConfig.RECOMPUTATION_HEURISTICS
    assert rewrite.arithmetic_optimization == RewriterConfig.OFF
    assert rewrite.constant_folding == RewriterConfig.OFF
    assert rewrite.remapping == RewriterConfig.OFF


def recomputed_nodes(trainer: Pretrainer, target_scope: str | None = None) -> list[str]:
    """Runs grappler with the step's config over the step's graph; names of recomputed nodes."""
    graph = trainer.train_step.get_concrete_function(synthetic_batch(**BATCH),
                                                     tf.zeros([2])).graph
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    meta.collection_def["train_op"].node_list.value.extend(
        [t.op.name for t in graph.outputs])
    config = config_pb2.ConfigProto()
    config.CopyFrom(trainer.grappler.config)
    if target_scope is not None:
        config.graph_options.rewrite_options.memory_optimizer_target_node_name_scope = target_scope
    optimized = tf_optimizer.OptimizeGraph(config, meta, verbose=False)
    return [node.name for node in optimized.node if node.name.startswith("Recomputed/")]


def test_memory_optimization_modes_rewrite_the_step_graph(tmp_path):
    counts = {}
    for mode in ("no", "manual", "recomputation"):
        trainer = Pretrainer(run_config(tmp_path / mode, memory_optimization=mode),
                             synthetic_dataset())
        names = recomputed_nodes(trainer)
        counts[mode] = len(names)
        if mode == "manual":
            # Only what the model marks: the feed-forward activations of each block.
            assert names and all("/intermediate/" in name for name in names), names
        if mode == "recomputation":
            # With grappler's TF1 default scope nothing in a GradientTape step is a target.
            assert recomputed_nodes(trainer, target_scope="gradients/") == []
        tf.keras.backend.clear_session()
    assert counts["no"] == 0
    assert counts["recomputation"] > counts["manual"] > 0, counts


def test_recomputation_is_applied_at_run_time_and_keeps_the_math(tmp_path, tfbert_cache):
    env = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "memory_optimizer=1"}
    common = ["--num_train_steps=2", "--train_batch_size=4", "--max_seq_length=32",
              "--log_every_n_steps=1", "--hidden_dropout_prob=0",
              "--attention_probs_dropout_prob=0"]
    losses = {}
    for mode in ("no", "recomputation"):
        result = run_tfbert(f"--output_dir={tmp_path / mode}", f"--memory_optimization={mode}",
                            *common, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("Recomputing a" in result.stderr) == (mode == "recomputation")
        losses[mode] = (tmp_path / mode / "log.jsonl").read_text().splitlines()
    # The rewritten graph computes the same numbers.
    for a, b in zip(*losses.values()):
        a, b = json.loads(a), json.loads(b)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_only_resource_variables_exist_and_asking_otherwise_fails(tmp_path):
    trainer = Pretrainer(run_config(tmp_path), synthetic_dataset())
    variables = list(trainer.model.variables) + list(trainer.update.optimizer.variables())
    assert variables and all(v.handle.dtype == tf.resource for v in variables)
    with pytest.raises(cfg.ConfigError, match="enable_resource_variables"):
        run_config(tmp_path, enable_resource_variables=False)


def layer_norm_arithmetic_dtypes(precision: str, ln_dtype: str) -> set:
    """dtypes of the multiplications inside the LayerNorms of the traced forward pass (the
    [..., hidden] arithmetic; the mean and variance are summed in float32 whatever the dtype)."""
    ops_config = cfg.FusedOpsConfig(ln_dtype=ln_dtype)
    model = BertPretrainer(odd_model_config(), DropoutRng(0), precision=precision, ops=ops_config)
    model.build(BATCH["seq"], BATCH["predictions"])
    graph = tf.function(model.compute_losses).get_concrete_function(
        synthetic_batch(**BATCH)).graph
    return {op.get_attr("T") for op in graph.get_operations()
            if op.type == "Mul" and "LayerNorm" in op.name}


@pytest.mark.parametrize("precision,ln_dtype,expected", [
    ("fp16", "float32", tf.float32), ("fp16", "float16", tf.float16),
    ("bf16", "bfloat16", tf.bfloat16), ("fp32", "float32", tf.float32)])
def test_ln_dtype_sets_the_dtype_of_the_layer_norm_arithmetic(precision, ln_dtype, expected):
    assert layer_norm_arithmetic_dtypes(precision, ln_dtype) == {expected}


def test_ln_dtype_combinations_that_cannot_work_fail_at_start(tmp_path):
    with pytest.raises(cfg.ConfigError, match="--ln_dtype=float16.*--precision=fp16"):
        config = run_config(tmp_path)
        dataclasses.replace(config, ops=cfg.FusedOpsConfig(ln_dtype="float16"))
    with pytest.raises(cfg.ConfigError, match="--ln_ytf_impl.*float32"):
        cfg.FusedOpsConfig(ln_ytf_impl=True, ln_dtype="bfloat16")


def random_op_count(hidden_dropout: float, attention_dropout: float) -> int:
    model = BertPretrainer(odd_model_config(hidden_dropout_prob=hidden_dropout,
                                            attention_probs_dropout_prob=attention_dropout),
                           DropoutRng(0))
    model.build(BATCH["seq"], BATCH["predictions"])
    graph = tf.function(lambda b: model.compute_losses(b, training=True)).get_concrete_function(
        synthetic_batch(**BATCH)).graph
    # One uniform draw per dropout mask.
    return sum(op.type == "StatelessRandomUniformV2" for op in graph.get_operations())


def test_each_dropout_adds_its_random_ops_and_zero_removes_them():
    layers = odd_model_config().num_hidden_layers
    none = random_op_count(0.0, 0.0)
    hidden = random_op_count(0.1, 0.0) - none
    attention = random_op_count(0.0, 0.1) - none
    assert none == 0
    # Hidden dropout: after the embeddings and twice per block; attention dropout: once per block.
    assert hidden == 1 + 2 * layers
    assert attention == layers


def test_tensor_parallelism_on_one_process_fails_with_a_message_that_names_it():
    with pytest.raises(cfg.ConfigError, match="--tensor_parallel_size=2 splits each model.*has 1"):
        cfg.DistributionConfig(num_processes=1, tensor_parallel_size=2)
    assert cfg.DistributionConfig(num_processes=4, tensor_parallel_size=2).data_parallel_size == 2
