"""The tiny BERT with fused ops equals the reference model with the same weights."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import ODD, odd_model_config, synthetic_batch
from tfbert.config import FusedOpsConfig
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer
from tfbert.ops.loader import load_ops, ops_available

OP_OF_FLAG = {"ln_ytf_impl": "tf_bert_fused_layer_norm",
              "attn_softmax_ytf_impl": "tf_bert_fused_attention_softmax",
              "ytf_gelu": "tf_bert_fused_bias_gelu",
              "ytf_dropout": "tf_bert_fused_dropout",
              "fused_bias_dropout_add": "tf_bert_fused_bias_dropout_add",
              "fused_xent": "tf_bert_fused_softmax_cross_entropy",
              "fused_qkv_split": "tf_bert_fused_bias_split_heads"}


def built(flag: str) -> bool:
    return ops_available() and hasattr(load_ops(), OP_OF_FLAG[flag])


CASES = [dict(ln_ytf_impl=True), dict(attn_softmax_ytf_impl=True), dict(ytf_gelu=True),
         dict(ytf_gelu=True, gelu_save_derivative=True),
         dict(fused_qkv=True), dict(fused_qkv=True, use_bias_in_keys=False),
         dict(fused_qkv=True, fused_qkv_split=True, use_bias_in_keys=False),
         dict(fused_bias_dropout_add=True), dict(fused_xent=True),
         dict(ln_ytf_impl=True, attn_softmax_ytf_impl=True, ytf_gelu=True, fused_qkv=True,
              fused_bias_dropout_add=True, fused_xent=True, gelu_save_derivative=True,
              fused_qkv_split=True)]


def losses_and_grads(model, batch):
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, training=False)
    grads = tape.gradient(losses["loss"], model.trainable_variables)
    return losses, [tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.mark.parametrize("flags", CASES, ids=lambda f: "+".join(
    k if v is True else f"{k}={v}" for k, v in sorted(f.items())))
@pytest.mark.parametrize("hidden_act", ["gelu", "geglu"])
def test_fused_model_equals_reference(flags, hidden_act):
    flags = dict(flags)
    use_bias_in_keys = flags.pop("use_bias_in_keys", True)
    missing = [f for f in flags if f in OP_OF_FLAG and not built(f)]
    if missing:
        pytest.skip(f"ops not built for {missing}")
    if flags.get("gelu_save_derivative") and hidden_act == "geglu":
        pytest.skip("GeGLU has no saved-derivative gradient (refused at start-up)")
    config = odd_model_config(hidden_act=hidden_act, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, use_bias_in_keys=use_bias_in_keys)
    reference = BertPretrainer(config, DropoutRng(0))
    fused = BertPretrainer(config, DropoutRng(0), ops=FusedOpsConfig(**flags))
    reference.build(ODD["seq"], ODD["predictions"])
    fused.build(ODD["seq"], ODD["predictions"])
    assert [v.name for v in fused.trainable_variables] == [
        v.name for v in reference.trainable_variables]
    for i, (source, target) in enumerate(zip(reference.trainable_variables,
                                             fused.trainable_variables)):
        if "bias" in source.name:  # non-zero biases: a misplaced one would show
            source.assign(tf.random.stateless_normal(source.shape, seed=[i, 0], stddev=0.1))
        target.assign(source)
    batch = synthetic_batch()
    ref_losses, ref_grads = losses_and_grads(reference, batch)
    fused_losses, fused_grads = losses_and_grads(fused, batch)
    np.testing.assert_allclose(fused_losses["loss"].numpy(), ref_losses["loss"].numpy(), rtol=1e-5)
    for var, a, b in zip(reference.trainable_variables, fused_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=var.name)


def copied_pair(config, ops_a: FusedOpsConfig, ops_b: FusedOpsConfig, precision="fp32"):
    """Two built BertPretrainers of `config` with the same weights (random non-zero biases),
    each with its own DropoutRng(0): the same seeds in the same order."""
    a = BertPretrainer(config, DropoutRng(0), precision=precision, ops=ops_a)
    b = BertPretrainer(config, DropoutRng(0), precision=precision, ops=ops_b)
    a.build(ODD["seq"], ODD["predictions"])
    b.build(ODD["seq"], ODD["predictions"])
    assert [v.name for v in a.trainable_variables] == [v.name for v in b.trainable_variables]
    for i, (source, target) in enumerate(zip(a.trainable_variables, b.trainable_variables)):
        if "bias" in source.name:
            source.assign(tf.random.stateless_normal(source.shape, seed=[i, 1], stddev=0.1))
        target.assign(source)
    return a, b


@pytest.mark.skipif(not built("fused_bias_dropout_add"), reason="fused ops not built")
def test_fused_bias_dropout_add_trains_like_the_fused_dropout_it_replaces():
    # Training mode, hidden dropout 0.2: each layer's two output dropouts now come from the
    # fused bias + dropout + residual op, with the masks --ytf_dropout draws from the same
    # seeds, so losses and gradients match the separate bias add, fused dropout and residual
    # add (float32: the same operations). A wrong mask, bias or residual would not.
    config = odd_model_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    separate, fused = copied_pair(config, FusedOpsConfig(ytf_dropout=True),
                                  FusedOpsConfig(ytf_dropout=True, fused_bias_dropout_add=True))
    batch = synthetic_batch()

    def losses_and_grads_training(model):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch, training=True)
        grads = tape.gradient(losses["loss"], model.trainable_variables)
        return losses["loss"].numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]

    want_loss, want_grads = losses_and_grads_training(separate)
    got_loss, got_grads = losses_and_grads_training(fused)
    eval_loss = fused.compute_losses(batch, training=False)["loss"].numpy()
    assert got_loss != pytest.approx(eval_loss)  # dropout was on
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for var, a, b in zip(fused.trainable_variables, got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=var.name)
    graph = tf.function(lambda: fused.compute_losses(batch, training=True),
                        autograph=False).get_concrete_function().graph
    op_types = [op.type for op in graph.get_operations()]
    assert op_types.count("TfBert>FusedBiasDropoutAdd") == 2 * config.num_hidden_layers
    assert op_types.count("TfBert>FusedDropout") == 1  # the embeddings' output


@pytest.mark.skipif(not built("fused_xent"), reason="fused ops not built")
def test_fused_xent_in_bfloat16_reads_the_logits_once_and_matches_the_float32_loss():
    # bfloat16 compute: the fused op adds the float32 MLM bias to the bfloat16 logits itself,
    # where the reference casts them to float32 first; both sum the same values in float32, so
    # the losses agree to float32 rounding and the gradients to bfloat16's. Unequal masked
    # counts: a third of the predictions are padding (weight 0).
    config = odd_model_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference, fused = copied_pair(config, FusedOpsConfig(), FusedOpsConfig(fused_xent=True),
                                   precision="bf16")
    batch = synthetic_batch()
    weights = tf.cast(tf.range(ODD["batch"] * ODD["predictions"]) % 3 > 0, tf.float32)
    batch["masked_lm_weights"] = tf.reshape(weights, [ODD["batch"], ODD["predictions"]])
    want_losses, want_grads = losses_and_grads(reference, batch)
    got_losses, got_grads = losses_and_grads(fused, batch)
    for name in ("mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"):
        np.testing.assert_allclose(got_losses[name].numpy(), want_losses[name].numpy(),
                                   rtol=1e-5, err_msg=name)
    for var, a, b in zip(fused.trainable_variables, got_grads, want_grads):
        scale = np.abs(b).max() + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-2, err_msg=var.name)
    def step():
        with tf.GradientTape() as tape:
            loss = fused.compute_losses(batch)["loss"]
        return tape.gradient(loss, fused.trainable_variables)

    graph = tf.function(step, autograph=False).get_concrete_function().graph
    op_types = [op.type for op in graph.get_operations()]
    # The MLM and next-sentence losses, no TensorFlow cross-entropy, no float32 logits.
    assert op_types.count("TfBert>FusedSoftmaxCrossEntropy") == 2
    assert op_types.count("TfBert>FusedSoftmaxCrossEntropyGrad") == 2
    assert "SparseSoftmaxCrossEntropyWithLogits" not in op_types
    vocab_casts = [op for op in graph.get_operations() if op.type == "Cast"
                   and op.outputs[0].shape.rank and op.outputs[0].shape[-1] == ODD["vocab"]
                   and op.outputs[0].dtype == tf.float32 and op.inputs[0].shape.rank == 3]
    assert not vocab_casts, [op.name for op in vocab_casts]


@pytest.mark.parametrize("flags, op_type, grad_type, replaced", [
    (dict(ytf_gelu=True, gelu_save_derivative=True), "TfBert>FusedBiasGeluSave",
     "TfBert>FusedBiasGeluGradFromDerivative", "TfBert>FusedBiasGelu"),
    (dict(fused_qkv=True, fused_qkv_split=True), "TfBert>FusedBiasSplitHeads",
     "TfBert>FusedBiasSplitHeadsGrad", "Unpack"),
])
def test_flag_puts_its_op_in_every_layer(flags, op_type, grad_type, replaced):
    # The model equivalence above would also pass with the flag ignored: here the step graph
    # must hold the flag's op and its gradient once per layer, and none of what it replaces.
    if not built("ytf_gelu") or not hasattr(load_ops(), "tf_bert_fused_bias_split_heads"):
        pytest.skip("fused ops not built")
    config = odd_model_config()
    model = BertPretrainer(config, DropoutRng(0), ops=FusedOpsConfig(**flags))
    model.build(ODD["seq"], ODD["predictions"])
    batch = synthetic_batch()

    def step():
        with tf.GradientTape() as tape:
            loss = model.compute_losses(batch)["loss"]
        return tape.gradient(loss, model.trainable_variables)

    graph = tf.function(step, autograph=False).get_concrete_function().graph
    op_types = [op.type for op in graph.get_operations()]
    assert op_types.count(op_type) == config.num_hidden_layers
    assert op_types.count(grad_type) == config.num_hidden_layers
    assert replaced not in op_types


@pytest.mark.parametrize("fused_qkv, projections_per_layer", [(False, 3), (True, 1)])
def test_fused_qkv_projects_queries_keys_and_values_with_one_matmul(fused_qkv,
                                                                    projections_per_layer):
    config = odd_model_config()
    model = BertPretrainer(config, DropoutRng(0), ops=FusedOpsConfig(fused_qkv=fused_qkv))
    model.build(ODD["seq"], ODD["predictions"])
    batch = synthetic_batch()
    graph = tf.function(lambda: model.compute_losses(batch, training=False),
                        autograph=False).get_concrete_function().graph
    projections = [op for op in graph.get_operations()
                   if op.type == "MatMul" and "/attention/self/" in op.name]
    assert len(projections) == projections_per_layer * config.num_hidden_layers


@pytest.mark.skipif(not built("ytf_dropout"), reason="fused dropout not built")
def test_fused_dropout_replaces_every_hidden_dropout_of_the_encoder():
    """With --ytf_dropout the training graph drops the embeddings' output and each layer's
    attention and feed-forward outputs with the fused op, and draws no random uniforms for
    them (the attention probabilities' dropout stays TensorFlow's without
    --attn_softmax_ytf_impl); the model still trains (finite gradients for every weight)."""
    config = odd_model_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    model = BertPretrainer(config, DropoutRng(0), ops=FusedOpsConfig(ytf_dropout=True))
    model.build(ODD["seq"], ODD["predictions"])
    batch = synthetic_batch()

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            loss = model.compute_losses(batch, training=True)["loss"]
        return loss, tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function().graph
    op_types = [op.type for op in graph.get_operations()]
    fused_forward = 1 + 2 * config.num_hidden_layers
    # The forward ops and their gradients (the same op on the upstream gradient).
    assert op_types.count("TfBert>FusedDropout") == 2 * fused_forward
    # No float uniforms (the generator's tiny int64 seed draws remain).
    assert "StatelessRandomUniformV2" not in op_types
    loss, grads = step()
    eval_loss = model.compute_losses(batch, training=False)["loss"]
    assert np.isfinite(loss.numpy()) and loss.numpy() != pytest.approx(eval_loss.numpy())
    assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in grads)


@pytest.mark.skipif(not (ops_available() and hasattr(load_ops(), "tf_bert_fused_lamb_update")),
                    reason="fused LAMB not built")
def test_fused_lamb_trains_the_model_like_addons_lamb(tmp_path):
    import json

    from conftest import run_config, synthetic_dataset
    from tfbert import config as cfg
    from tfbert.ops.lamb_ops import FusedLambUpdate
    from tfbert.training.trainer import Pretrainer

    # clip_norm well below the gradients' norm, so every step is clipped: tfa's LAMB gets
    # tf.clip_by_global_norm's gradients, the fused op reads them through its grad_scale.
    clip_norm = 0.05
    trained = {}
    for name in ("lamb", "fused_lamb"):
        optimizer = cfg.OptimizerConfig(optimizer=name, learning_rate=1e-3, clip_norm=clip_norm)
        config = run_config(tmp_path / name, odd_model_config(hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0),
                            optimizer=optimizer, num_train_steps=5)
        trainer = Pretrainer(config, synthetic_dataset())
        assert isinstance(trainer.update, FusedLambUpdate) == (name == "fused_lamb")
        trainer.train()
        trained[name] = [v.numpy() for v in trainer.variables]
        with open(tmp_path / name / "log.jsonl") as f:
            assert min(json.loads(line)["grad_norm"] for line in f) > 4 * clip_norm
    for a, b in zip(trained["lamb"], trained["fused_lamb"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def step_ops(trainer) -> tuple[list[str], list[str]]:
    """(op types, op names) of the training step's graph, outside any function it calls."""
    graph = trainer.train_step.get_concrete_function(synthetic_batch(batch=8, seq=16,
                                                                     predictions=3),
                                                     tf.zeros([2])).graph
    ops = graph.get_operations()
    return [op.type for op in ops], [op.name for op in ops]


@pytest.mark.skipif(not (ops_available() and hasattr(load_ops(), "tf_bert_fused_lamb_update")),
                    reason="fused LAMB not built")
def test_fused_lamb_takes_the_clip_and_the_skip_without_ops_around_it(tmp_path):
    # The clip factor and the skip decision go into the one op: no multiply per gradient and no
    # conditional around the update (whose branch would hold the op). Keras' LAMB keeps both.
    from conftest import run_config, synthetic_dataset
    from tfbert import config as cfg
    from tfbert.training.trainer import Pretrainer

    counts = {}
    for name in ("lamb", "fused_lamb"):
        config = run_config(tmp_path / name, optimizer=cfg.OptimizerConfig(optimizer=name))
        trainer = Pretrainer(config, synthetic_dataset())
        types, names = step_ops(trainer)
        counts[name] = (types.count("TfBert>FusedLambMultiUpdate"),
                        sum(t in ("If", "StatelessIf") for t in types),
                        sum(t == "Mul" and "clip" in n.lower() for t, n in zip(types, names)))
    assert counts["fused_lamb"] == (1, 0, 0)
    assert counts["lamb"][:2] == (0, 1)
