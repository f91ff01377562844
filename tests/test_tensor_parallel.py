"""Tensor parallelism (tfbert.modeling.tensor_parallel) against one process, with real horovodrun
processes (Gloo): the same losses and weights at TP=2 on 2 ranks, TP=2 x DP=2 and TP=4 on 4
ranks, with every fused op, with ZeRO over the data-parallel groups, in fp16; bfloat16 sums; the
vocabulary-parallel loss; exact resume with dropout; the gathered checkpoint on one process; the
start-up errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, odd_model_config, run_config
from test_distributed import HOROVOD_ENV, assert_close, assert_not_close
from test_zero import HOROVODRUN, needs_horovod
from tfbert import config as cfg
from tfbert.checkpoints import CheckpointError, sharded
from tfbert.modeling import tensor_parallel as tp

WORKER = os.path.join(REPO_ROOT, "tests", "tp_worker.py")

# Float32 sums in another order (partial products summed across ranks, norms added over parts):
# after 3 steps the weights differ by about 1e-7.
TIGHT = dict(rtol=1e-5, atol=1e-6)
SETUPS = ["ref", "ref_geglu", "vocab_ce", "tp2_fused", "tp2_dp2_z2_fused_accum2",
          "tp4_geglu_fused", "tp2_dp2_z1_fp16_compressed", "tp2_dropout",
          "tp2_dropout@resumed"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    if HOROVODRUN is None:
        pytest.skip("horovodrun is not installed")
    out = tmp_path_factory.mktemp("tp")
    command = [HOROVODRUN, "-np", "4", "-H", "localhost:4", "--gloo", sys.executable, WORKER,
               str(out), *SETUPS]
    # A 10 ms Horovod cycle (1 ms by default): four ranks on two cores spend less time polling.
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT, **HOROVOD_ENV))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def load(out, tag, rank) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out, f"{tag}-rank{rank}.npz")) as data:
        return dict(data)


def whole(out, tag, ranks, gated=False) -> dict[str, np.ndarray]:
    """The whole weights from the parts of `ranks` (one replica), and its eval losses."""
    parts = [load(out, tag, r) for r in ranks]
    joined = {}
    for name, value in parts[0].items():
        split = None if name.startswith(("eval/", "rng/")) else tp.split_of(name, gated)
        joined[name] = value if split is None else tp.unshard_arrays([p[name] for p in parts],
                                                                     split)
    joined.pop("rng/attention")
    return joined


def summary(out, tag) -> dict:
    with open(os.path.join(out, f"{tag}.json")) as f:
        return json.load(f)


@needs_horovod
@pytest.mark.parametrize("tag, ranks, reference", [
    ("tp2_fused.pair0", [0, 1], "ref"),  # TP=2 on 2 ranks (each pair a job of its own)
    ("tp2_fused.pair1", [0, 1], "ref"),
    ("tp2_dp2_z2_fused_accum2", [0, 1], "ref"),  # TP=2 x ZeRO-2 over DP=2
    ("tp2_dp2_z2_fused_accum2", [2, 3], "ref"),  # ... the other replica
    ("tp4_geglu_fused", [0, 1, 2, 3], "ref_geglu"),  # GeGLU's halves split four ways
])
def test_tensor_parallelism_reaches_the_weights_and_losses_of_one_process(job, tag, ranks,
                                                                          reference):
    # With every fused op (LayerNorm, attention softmax, bias+GELU/GeGLU; FusedLAMB's shard ops
    # on the tensor-parallel parts, with and without ZeRO) against one process on the reference
    # ops and tensorflow_addons' LAMB.
    got = whole(job, tag, ranks, gated="geglu" in tag)
    expected = load(job, reference, 0)
    expected.pop("rng/attention")
    assert set(got) == set(expected)
    assert_close(got, expected, **TIGHT)


@needs_horovod
def test_the_tolerance_would_see_dropout_and_low_precision(job):
    reference = load(job, "ref", 0)
    reference.pop("rng/attention")
    assert_not_close(whole(job, "tp2_dropout.pair0", [0, 1]), reference, **TIGHT)
    assert_not_close(whole(job, "tp2_dp2_z1_fp16_compressed", [0, 1]), reference, **TIGHT)


@needs_horovod
def test_fp16_tensor_parallelism_stays_close(job):
    # float16 activations summed over the tensor-parallel group, float16 gradients compressed
    # over the data-parallel group, ZeRO-1, the loss scale's skip decision taken on every rank.
    reference = load(job, "ref", 0)
    reference.pop("rng/attention")
    got = whole(job, "tp2_dp2_z1_fp16_compressed", [0, 1])
    assert_close(got, reference, rtol=1e-2, atol=3e-4)
    assert summary(job, "tp2_dp2_z1_fp16_compressed")["skipped_steps"] == 0


@needs_horovod
def test_replicas_agree_and_replicated_tensors_are_the_same_on_every_part(job):
    # The two data-parallel replicas: bit-identical parts (their dropout generators differ).
    for rank in (0, 1):
        first = load(job, "tp2_dp2_z1_fp16_compressed", rank)
        second = load(job, "tp2_dp2_z1_fp16_compressed", rank + 2)
        for name in first:
            if not name.startswith("rng/"):
                np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # With dropout on: a replicated tensor (LayerNorm, biases after a row-parallel sum, position
    # embeddings, heads) stays bit-identical across the tensor-parallel ranks only if its
    # activations' dropout masks are the same on both; the masks of each rank's own attention
    # heads come from generators of their own.
    part0, part1 = load(job, "tp2_dropout.pair0", 0), load(job, "tp2_dropout.pair0", 1)
    replicated = [n for n in part0 if not n.startswith(("eval/", "rng/"))
                  and tp.split_of(n, False) is None]
    assert "bert/encoder/layer_0/attention/output/dense/bias" in replicated
    for name in replicated:
        np.testing.assert_array_equal(part0[name], part1[name], err_msg=name)
    assert not np.array_equal(part0["rng/attention"], part1["rng/attention"])


@needs_horovod
@pytest.mark.parametrize("pair", [0, 1])
def test_a_tensor_parallel_run_with_dropout_resumes_exactly(job, pair):
    for rank in (0, 1):
        uninterrupted = load(job, f"tp2_dropout.pair{pair}", rank)
        resumed = load(job, f"tp2_dropout@resumed.pair{pair}", rank)
        for name in uninterrupted:
            np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


@needs_horovod
def test_vocabulary_parallel_cross_entropy_equals_the_full_softmax(job):
    for rank in range(4):
        with np.load(os.path.join(job, f"vocab_ce-rank{rank}.npz")) as data:
            got = dict(data)
        logits, labels = tf.constant(got["logits"]), tf.constant(got["labels"])
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            total = tf.reduce_sum(loss * got["weights"])
        np.testing.assert_allclose(got["loss"], loss.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["grad"], tape.gradient(total, logits).numpy(), atol=1e-6)
        argmax = tf.argmax(logits, -1, output_type=tf.int32)  # the lower index among ties
        np.testing.assert_array_equal(got["correct"], (argmax == labels).numpy())
        assert got["correct"][0, 0] == 0 and got["correct"][1].all()
        # bfloat16 activations: summed over the pair (ranks r and r^1 hold x * 1 and x * 2),
        # still bfloat16, with the identity gradient.
        x = np.arange(6) / 8
        assert got["bf16_dtype"] == "bfloat16"
        np.testing.assert_allclose(got["bf16_sum"], x * 3, rtol=1e-2)
        np.testing.assert_array_equal(got["bf16_grad"], np.arange(6))


@needs_horovod
def test_each_rank_holds_about_a_part_of_the_split_weights(job):
    per_rank = summary(job, "tp4_geglu_fused")["per_rank"]["param_bytes"]
    whole_bytes = summary(job, "ref_geglu")["per_rank"]["param_bytes"][0]
    assert len(set(per_rank)) == 1
    # The split tensors are 1/4 on each rank; LayerNorms, biases after row-parallel sums,
    # position and token-type tables and the pooler and NSP head stay whole.
    reference = load(job, "ref_geglu", 0)
    split = sum(v.nbytes for n, v in reference.items()
                if not n.startswith(("eval/", "rng/")) and tp.split_of(n, True) is not None)
    assert per_rank[0] == whole_bytes - split + split // 4
    assert per_rank[0] < 0.45 * whole_bytes


@needs_horovod
def test_the_gathered_checkpoint_loads_on_one_process_with_the_same_outputs(job, tmp_path):
    from tfbert.checkpoints import init_from_pretrained
    from tfbert.modeling.layers.dropout import DropoutRng
    from tfbert.modeling.models.bert_pretrainer import BertPretrainer
    from tp_worker import MODEL, eval_batch

    run_dir = os.path.join(job, "tp2_dp2_z2_fused_accum2")
    gathered = sharded.gather(run_dir, str(tmp_path / "gathered"))
    assert os.path.basename(gathered) == "ckpt-3"
    reader = tf.train.load_checkpoint(gathered)
    shapes = reader.get_variable_to_shape_map()
    assert shapes["bert/embeddings/word_embeddings"] == [100, 32]
    assert shapes["bert/embeddings/word_embeddings/adam_m"] == [100, 32]
    assert not any(n.startswith(("zero/", "tensor_parallel/")) for n in shapes)
    np.testing.assert_array_equal(
        reader.get_tensor("bert/encoder/layer_1/intermediate/dense/kernel"),
        whole(job, "tp2_dp2_z2_fused_accum2", [0, 1])[
            "bert/encoder/layer_1/intermediate/dense/kernel"])
    model = BertPretrainer(odd_model_config(**MODEL), DropoutRng(0))
    model.build(16, 3)
    init_from_pretrained(model, str(tmp_path / "gathered"))
    losses = model.compute_losses(eval_batch(), training=False)
    parts = load(job, "tp2_dp2_z2_fused_accum2", 0)
    for name, value in losses.items():
        np.testing.assert_allclose(value.numpy(), parts[f"eval/{name}"], rtol=1e-5, err_msg=name)
    # Without ZeRO the parts keep LAMB's moments flat: gathered, they have the weights' shapes.
    flat = sharded.gather(os.path.join(job, "tp2_fused.pair0"), str(tmp_path / "flat"))
    flat_reader = tf.train.load_checkpoint(flat)
    kernel = "bert/encoder/layer_0/intermediate/dense/kernel"
    assert flat_reader.get_variable_to_shape_map()[f"{kernel}/adam_v"] == [32, 36]
    np.testing.assert_array_equal(flat_reader.get_tensor(kernel),
                                  whole(job, "tp2_fused.pair0", [0, 1])[kernel])
    # A run without tensor parallelism refuses the parts as they are, and says what to do.
    with pytest.raises(CheckpointError, match="gather_checkpoint"):
        sharded.check_no_tensor_parallel_parts(run_dir)
    with pytest.raises(CheckpointError, match="gather_checkpoint"):
        init_from_pretrained(model, run_dir)


def test_split_rules_slice_and_join_every_split_tensor():
    assert tp.split_of("bert/encoder/layer_3/attention/self/query/kernel", False) == tp.Split(1)
    assert tp.split_of("bert/encoder/layer_3/attention/self/key/bias/adam_v", False) == tp.Split(0)
    assert tp.split_of("bert/encoder/layer_3/attention/output/dense/kernel", False) == tp.Split(0)
    assert tp.split_of("bert/encoder/layer_3/attention/output/dense/bias", False) is None
    assert tp.split_of("bert/encoder/layer_3/intermediate/dense/kernel", True) == tp.Split(1, True)
    assert tp.split_of("bert/encoder/layer_3/output/dense/kernel", True) == tp.Split(0)
    assert tp.split_of("bert/encoder/layer_3/output/LayerNorm/gamma", True) is None
    assert tp.split_of("bert/embeddings/word_embeddings", False) == tp.Split(0)
    assert tp.split_of("cls/predictions/output_bias/adam_m", False) == tp.Split(0)
    assert tp.split_of("cls/predictions/transform/dense/kernel", False) is None
    full = np.arange(6 * 8).reshape(6, 8)
    for split in (tp.Split(0), tp.Split(1), tp.Split(1, halves=True)):
        parts = [tp.shard_array(full, split, r, 2) for r in range(2)]
        np.testing.assert_array_equal(tp.unshard_arrays(parts, split), full)
    # GeGLU: each rank holds matching slices of the gate and the value halves.
    np.testing.assert_array_equal(tp.shard_array(full, tp.Split(1, True), 1, 2)[0],
                                  [2, 3, 6, 7])


def tp_config(tmp_path, processes, tensor_parallel_size, **model):
    base = run_config(tmp_path, odd_model_config(**dict(dict(
        vocab_size=100, num_attention_heads=4, intermediate_size=36), **model)))
    return dict(model=base.model, data=base.data, optimizer=base.optimizer, runtime=base.runtime,
                distribution=cfg.DistributionConfig(num_processes=processes,
                                                    tensor_parallel_size=tensor_parallel_size))


@pytest.mark.parametrize("processes, size, model, message", [
    (3, 2, {}, "this job has 3 process"),
    (4, 4, dict(num_attention_heads=2, hidden_size=32), "--num_attention_heads=2 is not divisible"),
    (2, 2, dict(intermediate_size=37), "--intermediate_size=37 is not divisible"),
    (2, 2, dict(vocab_size=99), "pad the vocabulary to 100 tokens"),
])
def test_shapes_and_ranks_that_do_not_split_fail_at_start_up(tmp_path, processes, size, model,
                                                             message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.Config(**tp_config(tmp_path, processes, size, **model))


def test_modes_that_cannot_hold_tensor_parallelism_fail_at_start_up(tmp_path):
    values = tp_config(tmp_path, 2, 2)
    with pytest.raises(cfg.ConfigError, match="--xla=jit .* Horovod all-reduces"):
        cfg.Config(**dict(values, runtime=run_config(tmp_path, xla="jit").runtime))
    with pytest.raises(cfg.ConfigError, match="ZeRO-1.*N >= 4"):
        cfg.Config(**dict(values, distribution=cfg.DistributionConfig(
            num_processes=2, tensor_parallel_size=2, zero_stage=1)))
    with pytest.raises(cfg.ConfigError, match="--fused_xent .* splits the vocabulary"):
        cfg.Config(**dict(values, ops=cfg.FusedOpsConfig(fused_xent=True)))
