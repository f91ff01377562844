"""Trains a small model under tensor parallelism (with data parallelism and ZeRO) and, on rank 0,
the same model in one process, one setup after the other in one Horovod job. Used by
test_tensor_parallel.py:

    horovodrun -np 4 -H localhost:4 --gloo python tests/tp_worker.py OUT_DIR ref tp2_fused ...

Every setup trains 3 LAMB steps on the examples of tests/distributed_worker.py with a global
batch of 8: a "ref*" setup in one process (one rank alone, no Horovod in its step; the "ref*"
setups run first, side by side on different ranks), the others with
--tensor_parallel_size=T over the 4 ranks (4/T data-parallel replicas), or over 2 ranks: each
pair of ranks then runs the setup as a 2-rank job of its own, side by side. Setups with the same
model start from the same weights: a tensor-parallel rank initialises its part as the slice of
the whole tensor one process draws.

Writes OUT_DIR/<tag>-rank<r>.npz (the rank's weights: its parts under tensor parallelism, plus
"eval/<metric>", the losses of a fixed batch after training, and "rng/attention", the state of
the attention-dropout generator) and, on the job's first rank, OUT_DIR/<tag>.json (summary).
The tag is the setup's name, with ".pair<p>" for a 2-rank setup (r is then the rank in the
pair). A name ending in "@resumed" trains 2 steps, then resumes in a new trainer for the third.
"vocab_ce" runs the vocabulary-parallel cross-entropy on each pair.
"""

import dataclasses
import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import odd_model_config, run_config, synthetic_batch  # noqa: E402
from distributed_worker import rank_dataset  # noqa: E402
from tfbert import config as cfg  # noqa: E402
from tfbert.distributed import (HorovodGroup, ProcessGroups, SingleProcess,  # noqa: E402
                                create_process_groups)
from tfbert.training.trainer import Pretrainer  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
# Divisible by 2 and 4 (heads, FFN features, vocabulary), otherwise odd.
MODEL = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=36)
FUSED = cfg.FusedOpsConfig(ln_ytf_impl=True, attn_softmax_ytf_impl=True, ytf_gelu=True,
                           ytf_dropout=True, fused_bias_dropout_add=True,
                           fused_qkv=True, fused_qkv_split=True)
# GELU's saved derivative in the column-parallel FFN projection (GELU only: not for GeGLU).
FUSED_SAVED = dataclasses.replace(FUSED, gelu_save_derivative=True)
# name: (ranks (1: rank 0 alone; 2: each pair of ranks, a job of its own), tensor_parallel_size,
# accumulation, model overrides, settings).
SETUPS = {
    "ref": (1, 1, 1, {}, {}),
    "ref_geglu": (1, 1, 1, dict(hidden_act="geglu"), {}),
    "tp2_fused": (2, 2, 1, {}, dict(ops=FUSED_SAVED, optimizer="fused_lamb")),
    "tp2_dp2_z2_fused_accum2": (4, 2, 2, {}, dict(ops=FUSED, zero_stage=2,
                                                  optimizer="fused_lamb",
                                                  state_split_strategy="flat")),
    "tp4_geglu_fused": (4, 4, 1, dict(hidden_act="geglu"), dict(ops=FUSED)),
    "tp2_dp2_z1_fp16_compressed": (4, 2, 1, {}, dict(precision="fp16",
                                                     hvd_fp16_compression=True, zero_stage=1)),
    "tp2_dropout": (2, 2, 1, dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                    dict(ops=FUSED)),
}


def eval_batch():
    """A fixed batch with unequal numbers of real predictions per row."""
    batch = synthetic_batch(6, seq=16, predictions=3, vocab=MODEL["vocab_size"], seed=11)
    batch["masked_lm_weights"] = tf.constant([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1],
                                              [1, 1, 1], [1, 0, 1]], tf.float32)
    return batch


def setup_config(out_dir, world, name: str) -> cfg.Config:
    ranks, tensor_parallel_size, accumulation, model, settings = SETUPS[name.split("@")[0]]
    settings = dict(settings)
    ops = settings.pop("ops", cfg.FusedOpsConfig())
    precision = settings.pop("precision", "fp32")
    optimizer = settings.pop("optimizer", "lamb")
    batch = GLOBAL_BATCH * tensor_parallel_size // (ranks * accumulation)
    model_config = odd_model_config(**dict(dict(hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0), **MODEL,
                                           **model))
    base = run_config(out_dir, model_config, num_train_steps=STEPS, precision=precision,
                      train_batch_size=batch, initial_loss_scale=2.0 ** 10,
                      first_step_timeout_secs=600, step_timeout_secs=300,
                      optimizer=cfg.OptimizerConfig(learning_rate=1e-3, optimizer=optimizer))
    return cfg.Config(
        model=base.model, data=base.data, optimizer=base.optimizer, runtime=base.runtime,
        ops=ops, distribution=cfg.DistributionConfig(
            num_processes=ranks, rank=world.rank, tensor_parallel_size=tensor_parallel_size,
            num_accumulation_steps=accumulation, **settings))


def train(groups: ProcessGroups, out_dir: str, name: str, tag: str,
          stop_after: int | None = None) -> None:
    config = setup_config(os.path.join(out_dir, tag), groups.world, name)
    distribution = config.distribution
    data = groups.data
    if data.uses_horovod:
        data.compression = (data._hvd.Compression.fp16 if distribution.hvd_fp16_compression
                            else data._hvd.Compression.none)
    start = 2 if stop_after is None and name.endswith("@resumed") else 0
    dataset = rank_dataset(data, config.data.train_batch_size,
                           distribution.num_accumulation_steps, STEPS, start)
    trainer = Pretrainer(config, dataset, groups)
    summary = trainer.train(max_steps=stop_after)
    save(trainer, out_dir, tag, groups.world.rank)
    if groups.world.is_chief:
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    tf.keras.backend.clear_session()


def save(trainer, out_dir: str, tag: str, rank: int) -> None:
    arrays = {n: v.numpy() for n, v in trainer.model.variables_by_name().items()}
    losses = trainer.model.compute_losses(eval_batch(), training=False)
    arrays.update({f"eval/{k}": v.numpy() for k, v in losses.items()})
    rng = trainer.attention_rng or trainer.rng
    arrays["rng/attention"] = rng.generator.state.numpy()
    np.savez(os.path.join(out_dir, f"{tag}-rank{rank}.npz"), **arrays)


def check_vocab_cross_entropy(group, out_dir: str) -> None:
    """The vocabulary-parallel cross-entropy and argmax, and their gradient, on each pair: saved
    for the test to compare with the full softmax of the whole logits (OUT_DIR/vocab_ce-rank<r>,
    r the global rank). Also the sum of bfloat16 activations over the pair and its gradient
    (Gloo has no bfloat16 sums: they travel as float32)."""
    from tfbert.modeling.tensor_parallel import VocabShard, copy_to_region, reduce_from_region

    activations = tf.cast(tf.range(6, dtype=tf.float32) * (group.rank + 1) / 8, tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        summed = reduce_from_region(activations, group)
        bf16_total = tf.reduce_sum(tf.cast(summed, tf.float32) * tf.range(6, dtype=tf.float32))
    bf16_grad = tape.gradient(bf16_total, activations)

    vocab = 10
    rng = np.random.RandomState(3)
    logits = rng.normal(size=[3, 4, vocab]).astype(np.float32)
    logits[0, 0, [2, 7]] = 9.0  # a tie across the two ranks' rows: the lower index wins
    labels = rng.randint(0, vocab, size=[3, 4]).astype(np.int32)
    labels[0, 0] = 7
    labels[1, :] = logits[1].argmax(-1)  # some right predictions
    weights = rng.uniform(size=[3, 4]).astype(np.float32)
    shard = VocabShard.of(group, vocab)
    whole = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(whole)
        part = copy_to_region(whole, group)[..., shard.start:shard.start + shard.rows]
        loss, correct = shard.cross_entropy(part, tf.constant(labels))
        total = tf.reduce_sum(loss * weights)
    np.savez(os.path.join(out_dir, f"vocab_ce-rank{group.global_ranks[group.rank]}.npz"),
             logits=logits,
             labels=labels, weights=weights, loss=loss.numpy(), correct=correct.numpy(),
             grad=tape.gradient(total, whole).numpy(),
             bf16_sum=tf.cast(summed, tf.float32).numpy(), bf16_dtype=str(summed.dtype.name),
             bf16_grad=tf.cast(bf16_grad, tf.float32).numpy())


def main(out_dir: str, names: list[str]):
    groups = create_process_groups(2)  # pairs of ranks (tensor groups) and data groups
    world = groups.world
    assert world.size == 4, "run with horovodrun -np 4"
    pair = groups.tensor
    single = SingleProcess(global_rank=world.rank)
    # 2 ranks: a pair alone is its own world and tensor group. 4 ranks, T=4: the world is one
    # tensor group (no process set needed), each rank its own data-parallel group.
    by_ranks = {
        (2, 2): ProcessGroups(world=pair, data=single, tensor=pair),
        (4, 2): groups,
        (4, 4): ProcessGroups(world=world, data=single,
                              tensor=HorovodGroup(hvd=world._hvd, name="tensor"))}
    # The one-process setups first, each on a rank of its own: side by side, not one after the
    # other while the other ranks wait. (Each trainer seeds itself: a rank draws the same
    # weights as any other.)
    alone = [n for n in names if n != "vocab_ce" and SETUPS[n.split("@")[0]][0] == 1]
    for name in alone[world.rank::world.size]:
        one = SingleProcess()
        train(ProcessGroups(world=one, data=one, tensor=one), out_dir, name, name)
    world.barrier()
    for name in names:
        if name == "vocab_ce":
            check_vocab_cross_entropy(pair, out_dir)
            continue
        ranks, size = SETUPS[name.split("@")[0]][:2]
        if ranks == 1:
            continue  # done above
        tag = name if ranks == 4 else f"{name}.pair{world.rank // 2}"
        if name.endswith("@resumed"):
            train(by_ranks[ranks, size], out_dir, name, tag, stop_after=2)
        train(by_ranks[ranks, size], out_dir, name, tag)
        world.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
