"""The model: shapes, tied MLM weights, stable variable names, switches that change the graph."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import ODD, odd_model_config, synthetic_batch
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer


def build(precision="fp32", **overrides):
    model = BertPretrainer(odd_model_config(**overrides), DropoutRng(0), precision=precision)
    model.build(ODD["seq"], ODD["predictions"])
    return model


def test_output_shapes_on_odd_sizes():
    model = build()
    batch = synthetic_batch()
    encoded = model.bert(batch)
    sequence, pooled = encoded["sequence_output"], encoded["pooled_output"]
    assert sequence.shape == (ODD["batch"], ODD["seq"], 32)
    assert pooled.shape == (ODD["batch"], 32)
    mlm_logits, nsp_logits = model(batch)
    assert mlm_logits.shape == (ODD["batch"], ODD["predictions"], ODD["vocab"])
    assert nsp_logits.shape == (ODD["batch"], 2)
    losses = model.compute_losses(batch)
    assert set(losses) == {"loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"}
    for value in losses.values():
        assert value.shape == () and np.isfinite(value.numpy())
    # An untrained model is close to uniform over the vocabulary.
    assert abs(float(losses["mlm_loss"]) - np.log(ODD["vocab"])) < 1.0


def test_mlm_head_shares_the_word_embedding_matrix():
    model = build()
    table = model.word_embeddings
    # No second [V, D] matrix exists: the output projection is the embedding table.
    vocab_by_hidden = [v for v in model.trainable_variables if v.shape == table.shape]
    assert vocab_by_hidden == [table]
    batch = synthetic_batch()
    with tf.GradientTape() as tape:
        mlm_logits, _ = model(batch)
        loss = tf.reduce_sum(mlm_logits)
    grad = tf.convert_to_tensor(tape.gradient(loss, table))
    # Rows of tokens that never appear in the input still get a gradient through the head.
    unused = sorted(set(range(5, ODD["vocab"])) - set(batch["input_ids"].numpy().ravel()))
    assert unused and np.abs(grad.numpy()[unused]).sum() > 0
    # Changing the table changes the logits directly.
    before = model(batch)[0]
    table.assign_add(tf.ones_like(table))
    after = model(batch)[0]
    assert not np.allclose(before.numpy(), after.numpy())


def test_variable_names_follow_google_bert():
    names = set(build().variables_by_name())
    expected = {
        "bert/embeddings/word_embeddings", "bert/embeddings/position_embeddings",
        "bert/embeddings/token_type_embeddings", "bert/embeddings/LayerNorm/gamma",
        "bert/encoder/layer_0/attention/self/query/kernel",
        "bert/encoder/layer_1/attention/self/key/bias",
        "bert/encoder/layer_1/attention/output/dense/kernel",
        "bert/encoder/layer_1/attention/output/LayerNorm/beta",
        "bert/encoder/layer_0/intermediate/dense/kernel", "bert/encoder/layer_0/output/dense/bias",
        "bert/encoder/layer_0/output/LayerNorm/gamma", "bert/pooler/dense/kernel",
        "cls/predictions/transform/dense/kernel", "cls/predictions/transform/LayerNorm/gamma",
        "cls/predictions/output_bias", "cls/seq_relationship/output_weights",
        "cls/seq_relationship/output_bias",
    }
    assert expected <= names
    # 5 embedding + 16 per layer + 2 pooler + 7 heads.
    assert len(names) == 5 + 16 * 2 + 2 + 7


def test_use_bias_in_keys_removes_the_key_biases():
    with_bias = build(use_bias_in_keys=True).variables_by_name()
    without = build(use_bias_in_keys=False).variables_by_name()
    assert len(with_bias) - len(without) == 2  # one per layer
    assert not [n for n in without if n.endswith("attention/self/key/bias")]


def test_geglu_doubles_the_first_ffn_projection():
    gelu = build(hidden_act="gelu").variables_by_name()
    geglu = build(hidden_act="geglu").variables_by_name()
    name = "bert/encoder/layer_0/intermediate/dense/kernel"
    assert gelu[name].shape == (32, 37) and geglu[name].shape == (32, 74)
    assert geglu["bert/encoder/layer_0/output/dense/kernel"].shape == (37, 32)


def test_dropout_is_active_only_in_training():
    model = build(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    batch = synthetic_batch()
    eval_a, eval_b = model(batch)[0], model(batch)[0]
    np.testing.assert_array_equal(eval_a.numpy(), eval_b.numpy())
    train_a, train_b = model(batch, training=True)[0], model(batch, training=True)[0]
    assert not np.allclose(train_a.numpy(), train_b.numpy())
    no_dropout = build(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    np.testing.assert_array_equal(no_dropout(batch, training=True)[0].numpy(),
                                  no_dropout(batch, training=False)[0].numpy())


@pytest.mark.parametrize("precision,compute", [("fp16", tf.float16), ("bf16", tf.bfloat16)])
def test_mixed_precision_keeps_float32_variables(precision, compute):
    model = build(precision)
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    batch = synthetic_batch()
    sequence = model.bert(batch)["sequence_output"]
    assert sequence.dtype == compute
    mlm_logits, nsp_logits = model(batch)
    assert mlm_logits.dtype == tf.float32 and nsp_logits.dtype == tf.float32
    reference = build("fp32")
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        b.assign(a)
    np.testing.assert_allclose(model.compute_losses(batch)["loss"].numpy(),
                               reference.compute_losses(batch)["loss"].numpy(),
                               rtol=2e-2 if precision == "bf16" else 5e-3)


def test_padding_does_not_change_real_positions():
    model = build()
    batch = synthetic_batch()
    noisy = dict(batch)
    # Different token ids at padded positions must not change the outputs at real ones.
    noisy["input_ids"] = tf.where(batch["input_mask"] == 0, 7, batch["input_ids"])
    a = model.bert(batch)["sequence_output"]
    b = model.bert(noisy)["sequence_output"]
    np.testing.assert_allclose(a[:, :-2].numpy(), b[:, :-2].numpy(), atol=1e-5)


def test_one_hot_token_type_lookup_equals_the_gather():
    # Three token types with distinct rows, so a wrong row would show.
    config = odd_model_config(type_vocab_size=3, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    batch = synthetic_batch()
    batch["segment_ids"] = tf.random.Generator.from_seed(3).uniform(
        batch["segment_ids"].shape, 0, 3, tf.int32)
    results = []
    for one_hot in (True, False):
        tf.keras.utils.set_random_seed(1)
        model = BertPretrainer(config, one_hot_token_types=one_hot)
        model.build(ODD["seq"], ODD["predictions"])
        table = model.bert.embeddings.token_type_embeddings
        with tf.GradientTape() as tape:
            loss = model.compute_losses(batch)["loss"]
        grad = tape.gradient(loss, table)
        results.append((float(loss), tf.convert_to_tensor(grad).numpy(), type(grad)))
    (loss_a, grad_a, kind_a), (loss_b, grad_b, kind_b) = results
    assert loss_a == loss_b
    np.testing.assert_allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7)
    assert np.abs(grad_a).min(axis=1).max() > 0  # every type row has a gradient
    # What crosses ranks: a dense table for the one-hot lookup, sparse rows for the gather.
    assert kind_a is not tf.IndexedSlices and kind_b is tf.IndexedSlices
