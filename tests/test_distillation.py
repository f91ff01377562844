"""Distillation on the one training loop: the losses against hand-computed values, a student
that is a copy of its teacher, the layer groups, a teacher that gets no gradient and no
optimizer state, hidden states and attention maps of the encoder by hand (reference and fused
ops), a tiny model distilled into a 1-layer student, errors of settings that cannot work, and
2 ranks with gradient accumulation against one process in a real horovodrun job."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import erf, log_softmax, softmax

from conftest import odd_model_config, run_config, synthetic_batch, synthetic_dataset
from tfbert import config as cfg
from tfbert.checkpoints import huggingface, load_pretrained
from tfbert.checkpoints.pretrained import model_arrays
from tfbert.config import ConfigError
from tfbert.data.sample import prepare_sample_data
from tfbert.distributed import SingleProcess
from tfbert.modeling import losses
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models import BertDistiller, BertPretrainer
from tfbert.modeling.models.bert_distiller import (layer_groups, student_init_layers,
                                                   uniform_layer_groups)
from tfbert.ops.loader import OpsNotBuiltError, load_ops
from tfbert.training.evaluation import PretrainingEvaluator
from tfbert.training.trainer import Trainer
from test_distributed import HOROVODRUN, assert_close, launch, weights
from test_finetuning import train
from test_training import read_log

try:
    load_ops()
    HAVE_OPS = True
except OpsNotBuiltError:
    HAVE_OPS = False
needs_ops = pytest.mark.skipif(not HAVE_OPS, reason="custom ops not built (make ops)")
FUSED = cfg.FusedOpsConfig(ln_ytf_impl=True, attn_softmax_ytf_impl=True, ytf_gelu=True,
                           gelu_save_derivative=True, ytf_dropout=True, fused_bias_dropout_add=True,
                           fused_qkv=True, fused_qkv_split=True, fused_xent=True)


def randomize(model, seed: int) -> None:
    """Non-trivial weights everywhere (biases and LayerNorm offsets are zero at initialisation,
    where a bug in them would hide)."""
    rng = np.random.default_rng(seed)
    for name, variable in model.variables_by_name().items():
        value = rng.normal(0.0, 0.08, variable.shape)
        if name.endswith("gamma"):
            value += 1.0
        variable.assign(value.astype(np.float32))


def write_teacher(directory, config: cfg.ModelConfig, seed: int = 0) -> str:
    """A teacher with random weights, written as a HuggingFace directory."""
    teacher = BertPretrainer(config, DropoutRng(0))
    teacher.build()
    randomize(teacher, seed)
    huggingface.write(str(directory), config, model_arrays(teacher))
    return str(directory)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-layer teacher of the odd model's widths."""
    return write_teacher(tmp_path_factory.mktemp("teacher"), odd_model_config(num_hidden_layers=4))


def distiller(teacher: str, ops=cfg.FusedOpsConfig(), **kwargs) -> BertDistiller:
    config = kwargs.pop("config", None) or odd_model_config(hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)
    model = BertDistiller(config, DropoutRng(1), teacher=teacher, ops=ops, **kwargs)
    model.build(7, 3)
    return model


def batch_with_unequal_lengths():
    """The odd synthetic batch with rows of 5, 4 and 3 real tokens, and unequal masked counts."""
    batch = synthetic_batch()
    lengths = np.array([5, 4, 3] * 5)[:13]
    mask = (np.arange(7)[None, :] < lengths[:, None]).astype(np.int32)
    weights = np.ones([13, 3], np.float32)
    weights[::2, 2] = 0.0
    positions = np.minimum(batch["masked_lm_positions"].numpy(), lengths[:, None] - 1)
    return dict(batch, input_mask=tf.constant(mask), input_ids=batch["input_ids"] * mask,
                masked_lm_weights=tf.constant(weights),
                masked_lm_positions=tf.constant(positions.astype(np.int32)))


# ------------------------------------------------------------------------------------------
def test_each_loss_against_hand_computed_values():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(0, 2, [2, 3, 5]), rng.normal(0, 2, [2, 3, 5])
    label_weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    temperature = 2.0
    p = softmax(teacher / temperature, -1)
    per_token = (p * (log_softmax(teacher / temperature, -1)
                      - log_softmax(student / temperature, -1))).sum(-1)
    expected = temperature ** 2 * (per_token * label_weights).sum() / label_weights.sum()
    got = losses.distillation_kl_loss(tf.constant(teacher, tf.float32),
                                      tf.constant(student, tf.float32),
                                      tf.constant(label_weights), temperature)
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)

    # Cosine: two layers, rows of 4 and 2 real tokens.
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    students = [rng.normal(size=[2, 4, 3]) for _ in range(2)]
    teachers = [rng.normal(size=[2, 4, 3]) for _ in range(2)]
    per_layer = []
    for s, t in zip(students, teachers):
        cosine = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
        per_layer.append(((1 - cosine) * mask).sum() / mask.sum())
    got = losses.hidden_cosine_loss([tf.constant(s, tf.float32) for s in students],
                                    [tf.constant(t, tf.float32) for t in teachers],
                                    tf.constant(mask))
    np.testing.assert_allclose(float(got), np.mean(per_layer), rtol=1e-4)

    # Attention MSE: 2 heads, over the real (query, key) pairs: 16 + 4 of them.
    students = [softmax(rng.normal(size=[2, 2, 4, 4]), -1)]
    teachers = [softmax(rng.normal(size=[2, 2, 4, 4]), -1)]
    pairs = mask[:, None, :, None] * mask[:, None, None, :]
    squared = (students[0] - teachers[0]) ** 2 * pairs
    expected = squared.sum() / (2 * pairs.sum())
    as_tensors = [[tf.constant(a, tf.float32) for a in maps] for maps in (students, teachers)]
    got = losses.attention_mse(*as_tensors, tf.constant(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)
    averaged = ((students[0].mean(1, keepdims=True) - teachers[0].mean(1, keepdims=True)) ** 2
                * pairs).sum() / pairs.sum()
    got = losses.attention_mse(*as_tensors, tf.constant(mask), average_heads=True)
    np.testing.assert_allclose(float(got), averaged, rtol=1e-4)
    assert abs(averaged - expected) > 1e-3  # the two modes differ on these maps


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_ops)])
def test_a_student_that_copies_its_teacher_has_zero_distillation_losses(teacher_dir, fused):
    """4 layers initialised from the first 4 teacher layers: the same model."""
    model = distiller(teacher_dir, ops=FUSED if fused else cfg.FusedOpsConfig(),
                      config=odd_model_config(num_hidden_layers=4), init_from_teacher="first_k")
    figures = model.compute_losses(batch_with_unequal_lengths(), training=False)
    assert float(figures["kl_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(figures["hidden_cosine_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(figures["attention_mse"]) == pytest.approx(0.0, abs=1e-9)
    assert float(figures["mlm_accuracy"]) == pytest.approx(float(figures["teacher_mlm_accuracy"]))
    # Not vacuous: a student of the teacher's last two layers differs from it.
    other = distiller(teacher_dir, init_from_teacher="every_kth")
    figures = other.compute_losses(batch_with_unequal_lengths(), training=False)
    for name in ("kl_loss", "hidden_cosine_loss", "attention_mse"):
        assert float(figures[name]) > 1e-6, name


def test_layer_groups_and_which_teacher_layer_starts_each_student_layer():
    assert uniform_layer_groups(12, 2) == [tuple(range(6)), tuple(range(6, 12))]
    assert [len(g) for g in uniform_layer_groups(12, 5)] == [3, 3, 2, 2, 2]
    assert sum(uniform_layer_groups(12, 5), ()) == tuple(range(12))
    assert layer_groups(("0-5", "11"), 12, 2) == [tuple(range(6)), (11,)]
    assert student_init_layers("every_kth", uniform_layer_groups(12, 2)) == [5, 11]
    assert student_init_layers("every_kth", uniform_layer_groups(12, 4)) == [2, 5, 8, 11]
    assert student_init_layers("first_k", uniform_layer_groups(12, 3)) == [0, 1, 2]
    for specs, message in ((("0-5",), "has 1 groups"), (("0-5", "6-12"), "within the teacher"),
                           (("5-3", "6"), "within the teacher"), (("a", "6"), "not a teacher")):
        with pytest.raises(ConfigError, match=message):
            layer_groups(specs, 12, 2)
    with pytest.raises(ConfigError, match="give --distill_layer_groups"):
        uniform_layer_groups(2, 3)


def test_the_teacher_side_is_the_mean_of_each_group_and_every_kth_copies_the_last(teacher_dir):
    model = distiller(teacher_dir, layer_groups=("1-3", "0"), init_from_teacher="every_kth")
    assert model.groups == [(1, 2, 3), (0,)]
    batch = batch_with_unequal_lengths()
    encoded = model.teacher.bert(batch, output_hidden_states=True, output_attentions=True)
    outputs = model._teacher_outputs(batch)  # pylint: disable=protected-access
    hidden = [h.numpy() for h in encoded["hidden_states"]]
    attention = [a.numpy() for a in encoded["attention_probs"]]
    np.testing.assert_allclose(outputs["hidden_states"][0], np.mean(hidden[2:5], 0), atol=1e-6)
    np.testing.assert_allclose(outputs["hidden_states"][1], hidden[1], atol=1e-6)
    np.testing.assert_allclose(outputs["attention_probs"][0], np.mean(attention[1:4], 0),
                               atol=1e-7)
    np.testing.assert_allclose(outputs["attention_probs"][1], attention[0], atol=1e-7)
    # every_kth: student layer 0 starts as teacher layer 3 (the last of 1-3), layer 1 as 0.
    student, teacher = model.variables_by_name(), model.teacher.variables_by_name()
    for i, j in ((0, 3), (1, 0)):
        name = "attention/self/query/kernel"
        np.testing.assert_array_equal(student[f"bert/encoder/layer_{i}/{name}"],
                                      teacher[f"bert/encoder/layer_{j}/{name}"])
    np.testing.assert_array_equal(student["cls/predictions/output_bias"],
                                  teacher["cls/predictions/output_bias"])


def test_the_teacher_gets_no_gradient_no_optimizer_state_and_is_not_saved(teacher_dir, tmp_path):
    student_config = odd_model_config(hidden_size=48, num_attention_heads=2)
    config = run_config(tmp_path, student_config, num_train_steps=3)
    config = dataclasses.replace(config, task=cfg.TaskConfig(
        task="distillation", teacher=teacher_dir, distill_attention_heads="average"))
    trainer = Trainer(config, synthetic_dataset(seq=16, predictions=3))
    model = trainer.model
    teacher = model.teacher
    before = {name: v.numpy() for name, v in teacher.variables_by_name().items()}
    with tf.GradientTape() as tape:
        loss = model.compute_losses(batch_with_unequal_lengths(), training=True)["loss"]
    grads = tape.gradient(loss, teacher.trainable_variables + model.trainable_variables)
    assert all(g is None for g in grads[:len(teacher.trainable_variables)])
    # The projection to the teacher's width trains with the student.
    assert "distill/hidden_projection/kernel" in model.variables_by_name()
    assert model.variables_by_name()["distill/hidden_projection/kernel"].shape == (48, 32)
    trainer.train()
    teacher_ids = {id(v) for v in teacher.variables}
    assert not teacher_ids & {id(v) for v in trainer.variables}
    assert not teacher_ids & {id(v) for v in trainer.shared_variables()}
    # Slots (m and v) for the student's variables only; nothing of the teacher is saved (it has
    # layers 2 and 3, the student does not).
    state = trainer.named_state()
    slots = [name for name in state if name.endswith(("/adam_m", "/adam_v"))]
    assert len(slots) == 2 * len(trainer.variables)
    assert not [name for name in state if "layer_3" in name or "layer_2" in name]
    for name, variable in teacher.variables_by_name().items():
        np.testing.assert_array_equal(variable.numpy(), before[name], err_msg=name)


def test_a_resumed_distillation_reproduces_the_next_steps_exactly(teacher_dir, tmp_path):
    # Dropout on, the student started from the teacher: the restore must win over that start.
    model = odd_model_config(num_hidden_layers=2)
    task = cfg.TaskConfig(task="distillation", teacher=teacher_dir,
                          init_student_from_teacher="every_kth")

    def config(out):
        return dataclasses.replace(run_config(out, model, num_train_steps=4), task=task)

    straight = Trainer(config(tmp_path / "straight"), synthetic_dataset())
    straight.train()
    first = Trainer(config(tmp_path / "interrupted"), synthetic_dataset()).train(max_steps=2)
    assert first["steps"] == 2
    tf.keras.backend.clear_session()
    resumed = Trainer(config(tmp_path / "interrupted"), synthetic_dataset())
    assert resumed.train()["steps_this_run"] == 2
    a, b = (read_log(tmp_path / name) for name in ("straight", "interrupted"))
    for step in (3, 4):
        for key in ("loss", "kl_loss", "hidden_cosine_loss", "attention_mse", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    assert a[2]["loss"] != a[4]["loss"]
    for name, variable in straight.model.variables_by_name().items():
        np.testing.assert_array_equal(variable.numpy(),
                                      resumed.model.variables_by_name()[name].numpy(), name)


def test_the_teacher_computes_in_the_students_precision(teacher_dir):
    model = distiller(teacher_dir, precision="bf16")
    assert model.teacher.bert.dtype_policy.name == "mixed_bfloat16"
    encoded = model.teacher.bert(batch_with_unequal_lengths(), output_hidden_states=True)
    assert encoded["hidden_states"][1].dtype == tf.bfloat16
    figures = model.compute_losses(batch_with_unequal_lengths(), training=True)
    assert all(np.isfinite(float(value)) for value in figures.values())


def hand_encoder(arrays, config, batch):
    """One layer of BERT in numpy: (hidden_states [embeddings, layer 0], attention probs)."""
    def layer_norm(x, prefix):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return ((x - mean) / np.sqrt(var + config.layer_norm_eps) * arrays[prefix + "/gamma"]
                + arrays[prefix + "/beta"])

    def dense(x, prefix):
        return x @ arrays[prefix + "/kernel"] + arrays[prefix + "/bias"]

    ids, segments = batch["input_ids"].numpy(), batch["segment_ids"].numpy()
    mask = batch["input_mask"].numpy()
    seq = ids.shape[1]
    e = "bert/embeddings/"
    x = (arrays[e + "word_embeddings"][ids] + arrays[e + "position_embeddings"][:seq]
         + arrays[e + "token_type_embeddings"][segments])
    x = layer_norm(x, e + "LayerNorm")
    p = "bert/encoder/layer_0/"
    heads, size = config.num_attention_heads, config.head_size

    def split(t):  # (B, S, D) -> (B, N, S, H)
        return t.reshape(t.shape[0], seq, heads, size).transpose(0, 2, 1, 3)

    q, k, v = (split(dense(x, p + f"attention/self/{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size) + (1 - mask[:, None, None, :]) * -10000.0
    probs = softmax(scores, -1)  # (B, N, S, S)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    attention = layer_norm(dense(context, p + "attention/output/dense") + x,
                           p + "attention/output/LayerNorm")
    inner = dense(attention, p + "intermediate/dense")
    inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
    out = layer_norm(dense(inner, p + "output/dense") + attention, p + "output/LayerNorm")
    return [x, out], probs


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_ops)])
def test_hidden_states_and_attention_maps_equal_a_hand_computation(fused):
    config = odd_model_config(num_hidden_layers=1)
    model = BertPretrainer(config, DropoutRng(0), ops=FUSED if fused else cfg.FusedOpsConfig())
    model.build()
    randomize(model, 3)
    batch = batch_with_unequal_lengths()
    arrays = {name: v.numpy().astype(np.float64) for name, v in model.variables_by_name().items()}
    hidden, probs = hand_encoder(arrays, config, batch)
    encoded = model.bert(batch, output_hidden_states=True, output_attentions=True)
    assert len(encoded["hidden_states"]) == 2 and len(encoded["attention_probs"]) == 1
    for got, expected in zip(encoded["hidden_states"], hidden):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(encoded["attention_probs"][0].numpy(), probs, atol=1e-5)
    # Off by default.
    assert set(model.bert(batch)) == {"sequence_output", "pooled_output"}


@needs_ops
def test_the_fused_softmax_with_dropout_returns_its_softmax_with_a_gradient():
    from tfbert.ops.attention_softmax_ops import (attention_softmax_reference, dropout_keep_mask,
                                                  fused_attention_softmax_and_softmax)

    rng = np.random.default_rng(0)
    scores = tf.constant(rng.normal(0, 2, [2, 3, 5, 5]), tf.float32)
    mask = np.ones([2, 1, 1, 5], np.float32)
    mask[1, ..., 3:] = 0
    mask_bias = tf.constant((1 - mask) * -10000.0)
    seed, rate = tf.constant([7, 11], tf.int64), 0.3
    w_probs = tf.constant(rng.normal(size=[2, 3, 5, 5]), tf.float32)
    w_softmax = tf.constant(rng.normal(size=[2, 3, 5, 5]), tf.float32)

    def loss(probs, softmax_):
        return tf.reduce_sum(w_probs * probs) + tf.reduce_sum(w_softmax * softmax_)

    with tf.GradientTape() as tape:
        tape.watch(scores)
        probs, fused_softmax = fused_attention_softmax_and_softmax(scores, mask_bias, seed,
                                                                   dropout_rate=rate)
        fused_loss = loss(probs, fused_softmax)
    fused_grad = tape.gradient(fused_loss, scores)
    keep = dropout_keep_mask(tf.shape(scores), seed, rate)
    with tf.GradientTape() as tape:
        tape.watch(scores)
        reference_softmax = attention_softmax_reference(scores, mask_bias)
        reference_probs = attention_softmax_reference(scores, mask_bias, dropout_rate=rate,
                                                      keep_mask=keep)
        reference_loss = loss(reference_probs, reference_softmax)
    reference_grad = tape.gradient(reference_loss, scores)
    np.testing.assert_allclose(probs, reference_probs, atol=1e-6)
    np.testing.assert_allclose(fused_softmax, reference_softmax, atol=1e-6)
    np.testing.assert_allclose(fused_grad, reference_grad, atol=1e-5)
    assert not np.allclose(probs, fused_softmax)  # dropout acted


def test_settings_that_cannot_work_are_refused(teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="--distill_attention_heads=average"):
        distiller(teacher_dir, config=odd_model_config(num_attention_heads=2))
    with pytest.raises(ConfigError, match="hidden_size: student 48, teacher 32"):
        distiller(teacher_dir, config=odd_model_config(hidden_size=48, num_attention_heads=4),
                  init_from_teacher="every_kth")
    with pytest.raises(ConfigError, match="vocabulary of 99 tokens, the student 120"):
        distiller(teacher_dir, config=odd_model_config(vocab_size=120))
    # A teacher without its MLM head (an encoder-only checkpoint) cannot give the KL loss.
    encoder_only = tmp_path / "encoder-only"
    teacher = BertPretrainer(odd_model_config(num_hidden_layers=4), DropoutRng(0))
    teacher.build()
    huggingface.write(str(encoder_only), teacher.config, {
        name: a for name, a in model_arrays(teacher).items() if name.startswith("bert/")})
    with pytest.raises(ConfigError, match="no masked-LM head"):
        distiller(str(encoder_only))
    # The other losses work, and a loss that is off is neither computed nor evaluated.
    model = distiller(str(encoder_only), loss_weights=dict(kl_loss=0.0))
    assert model.metric_names == ("loss", "mlm_loss", "mlm_accuracy", "hidden_cosine_loss",
                                  "attention_mse")
    figures = PretrainingEvaluator(lambda: synthetic_dataset(batch=4), SingleProcess(),
                                   max_eval_steps=2).evaluate(model)
    assert figures["loss"] == pytest.approx(figures["mlm_loss"] + figures["hidden_cosine_loss"]
                                            + figures["attention_mse"])
    for task, message in (
            (dict(), "needs --teacher"),
            (dict(teacher="t", kl_loss_weight=-1.0), "--kl_loss_weight must be >= 0"),
            (dict(teacher="t", kl_loss_weight=0, mlm_loss_weight=0, hidden_cosine_loss_weight=0,
                  attention_mse_weight=0), "every distillation loss weight is 0"),
            (dict(teacher="t", init_student_from_teacher="last"), "is not one of"),
            (dict(teacher="t", distill_temperature=0.0), "--distill_temperature")):
        with pytest.raises(ConfigError, match=message):
            cfg.TaskConfig(task="distillation", **task)
    with pytest.raises(ConfigError, match="--teacher is read by --mode=distill only"):
        cfg.TaskConfig(teacher="t")
    config = run_config(tmp_path)
    with pytest.raises(ConfigError, match="both initialise the student"):
        dataclasses.replace(config, runtime=dataclasses.replace(
            config.runtime, init_checkpoint="x"), task=cfg.TaskConfig(
                task="distillation", teacher="t", init_student_from_teacher="first_k"))


@pytest.mark.parametrize("argv, message", [
    (["--mode=distill"], "--mode=distill needs --teacher"),
    (["--teacher=x"], "--teacher is read by --mode=distill"),
    (["--mode=distill", "--teacher=x", "--cls_loss_weight=1"], "--cls_loss_weight is read by"),
    (["--mode=distill", "--teacher=/nonexistent"], "does not exist"),
])
def test_distillation_flags_are_checked_at_start_up(argv, message):
    from tfbert import run
    from tfbert.checkpoints import CheckpointError
    from test_finetuning import parse

    with pytest.raises((ConfigError, CheckpointError), match=message):
        run.build_config(parse(*argv))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tfbert_cache):
    """The default tiny model pretrained briefly on the sample corpus (a run directory)."""
    prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)
    out = tmp_path_factory.mktemp("tiny-teacher") / "run"
    train(f"--output_dir={out}", "--num_train_steps=100", "--max_seq_length=32",
          "--max_predictions_per_seq=5", "--train_batch_size=16", "--log_every_n_steps=50")
    return str(out)


def test_distilling_the_tiny_model_into_one_layer_lowers_every_loss(tiny_teacher, tmp_path):
    """A narrower 1-layer student (projection to the teacher's width for the cosine loss), with
    held-out evaluation; then the student loads as a model of its own."""
    out = tmp_path / "student"
    records = prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)[0]
    summary = train("--mode=distill", f"--teacher={tiny_teacher}", "--num_hidden_layers=1",
                    "--hidden_size=64", "--intermediate_size=256", f"--output_dir={out}",
                    "--num_train_steps=200", "--max_seq_length=32",
                    "--max_predictions_per_seq=5", "--train_batch_size=16",
                    "--log_every_n_steps=25", "--learning_rate=5e-3", "--num_warmup_steps=20",
                    "--attention_mse_weight=100", f"--eval_files={','.join(records)}",
                    "--max_eval_steps=4")
    assert summary["task"] == "distillation"
    # The first step against the last window of 25: the student imitates the teacher closely
    # (it reaches the teacher's MLM accuracy) and learns the labels as fast as the teacher did.
    for name in ("kl_loss", "hidden_cosine_loss", "attention_mse"):
        assert summary[f"final_{name}"] < 0.5 * summary[f"first_{name}"], name
    assert summary["final_mlm_loss"] < summary["first_mlm_loss"] - 0.7
    assert summary["final_loss"] < summary["first_loss"] - 1.5
    for name in ("loss", "kl_loss", "hidden_cosine_loss", "attention_mse", "mlm_loss"):
        assert np.isfinite(summary[f"eval_{name}"]), name
    with open(out / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["task"]["teacher"] == tiny_teacher and saved["model"]["num_hidden_layers"] == 1
    # The student is a model of its own: 1 layer, no teacher weights, the teacher's tokenizer.
    student, student_config = load_pretrained(str(out), with_heads=True)
    assert student_config.num_hidden_layers == 1 and student_config.hidden_size == 64
    assert (out / "spm.model").exists() or (out / "vocab.txt").exists()


@pytest.mark.skipif(HOROVODRUN is None, reason="horovodrun is not installed")
def test_two_ranks_with_accumulation_distil_as_one_process_with_the_whole_batch(teacher_dir,
                                                                              tmp_path):
    from distributed_worker import rank_dataset, worker_config

    two = tmp_path / "two"
    launch(2, two, "--batch=2", "--accumulation=2", "--steps=3", f"--teacher={teacher_dir}")
    # The one process in this one: the whole batch of 8, without accumulation.
    group = SingleProcess()
    trainer = Trainer(worker_config(tmp_path / "one", group, 8, 3, teacher=teacher_dir),
                      rank_dataset(group, 8, 1, 3), group)
    trainer.train()
    one = {name: v.numpy() for name, v in trainer.model.variables_by_name().items()}
    assert_close(weights(two), one, rtol=1e-4, atol=2e-6)
    # The ranks hold identical students (and no teacher weights).
    np.testing.assert_array_equal(weights(two)["bert/encoder/layer_0/output/dense/kernel"],
                                  weights(two, 1)["bert/encoder/layer_0/output/dense/kernel"])
    assert not [name for name in weights(two) if "layer_3" in name]
