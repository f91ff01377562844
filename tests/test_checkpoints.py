"""Checkpoint formats: tfbert's named checkpoints, HuggingFace and google-research/bert in and
out, SavedModel export. The reference for HuggingFace is transformers' own TensorFlow BERT
(`TFBertModel`, `TFBertForPreTraining`) reading the same files."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_config, synthetic_dataset
from tfbert.checkpoints import CheckpointError, load_pretrained, open_pretrained
from tfbert.checkpoints.export import export
from tfbert.checkpoints.huggingface import key_map
from tfbert.config import ModelConfig
from tfbert.training.trainer import Pretrainer

# Odd sizes, a non-default epsilon, and weights far from their initialisation.
SHAPE = dict(vocab_size=37, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
             intermediate_size=40, max_position_embeddings=20, type_vocab_size=2)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(32)]


def random_weights(seed=0) -> dict[str, np.ndarray]:
    """Documented name -> array for SHAPE, LayerNorm scales around 1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, _ in key_map(ModelConfig(**SHAPE)).items():
        shape = _shape(name)
        if name.endswith("/gamma"):
            arrays[name] = (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arrays[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return arrays


def _shape(name):
    d, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    if name.endswith(("word_embeddings",)):
        return [v, d]
    if name.endswith("position_embeddings"):
        return [SHAPE["max_position_embeddings"], d]
    if name.endswith("token_type_embeddings"):
        return [2, d]
    if name == "cls/predictions/output_bias":
        return [v]
    if name == "cls/seq_relationship/output_weights":
        return [2, d]
    if name == "cls/seq_relationship/output_bias":
        return [2]
    if "intermediate/dense" in name:
        return [d, i] if name.endswith("kernel") else [i]
    if "/output/dense" in name and "attention" not in name:
        return [i, d] if name.endswith("kernel") else [d]
    return [d, d] if name.endswith("kernel") else [d]


def write_huggingface(directory, arrays, hidden_act="gelu", prefix="bert.", heads=True,
                      **config_overrides):
    """A HuggingFace directory as transformers' PyTorch BERT saves it: PyTorch layout, tied
    tensors left out, the position_ids buffer in."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, (key, transposed) in key_map(ModelConfig(**SHAPE)).items():
        if name.startswith("cls/") and not heads:
            continue
        if not key.startswith("cls."):
            key = prefix + key[len("bert."):]
        tensors[key] = np.ascontiguousarray(arrays[name].T if transposed else arrays[name])
    tensors[prefix + "embeddings.position_ids"] = np.arange(SHAPE["max_position_embeddings"])[None]
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = dict(SHAPE, model_type="bert", architectures=["BertForPreTraining"],
                  hidden_act=hidden_act, layer_norm_eps=1e-3, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, initializer_range=0.02, pad_token_id=0)
    config.update(config_overrides)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    return str(directory)


def write_google(directory, arrays):
    """A google-research/bert directory written by TF1 code: a name-based tf.compat.v1 Saver."""
    os.makedirs(directory, exist_ok=True)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = [tf.compat.v1.get_variable(name, initializer=value)
                     for name, value in arrays.items()]
        extra = tf.compat.v1.get_variable(  # an optimizer slot, as in google's checkpoints
            "bert/pooler/dense/kernel/adam_m", initializer=np.zeros([24, 24], np.float32))
        step = tf.compat.v1.train.get_or_create_global_step()
        session.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver(variables + [extra, step]).save(
            session, os.path.join(directory, "bert_model.ckpt"), write_meta_graph=False)
    config = dict(SHAPE, hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, initializer_range=0.02)
    with open(os.path.join(directory, "bert_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    return str(directory)


def inputs():
    # Unequal padding, both segments.
    ids = np.array([[2, 7, 9, 11, 3, 20, 21, 3, 0, 0], [2, 30, 5, 6, 8, 3, 12, 13, 14, 3]], np.int32)
    mask = (ids > 0).astype(np.int32)
    mask[0, 0] = 1
    segments = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0] * 6 + [1] * 4], np.int32)
    return dict(input_ids=tf.constant(ids), input_mask=tf.constant(mask),
                segment_ids=tf.constant(segments))


def transformers_outputs(directory, with_heads=True):
    """sequence, pooled (and MLM, NSP logits) of transformers' TF BERT on `directory`."""
    from transformers import TFBertForPreTraining, TFBertModel

    x = inputs()
    kwargs = dict(input_ids=x["input_ids"], attention_mask=x["input_mask"],
                  token_type_ids=x["segment_ids"], training=False)
    model, info = TFBertModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    out = model(**kwargs)
    result = dict(sequence_output=out.last_hidden_state.numpy(), pooled_output=out.pooler_output.numpy())
    if with_heads:
        model, info = TFBertForPreTraining.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"], info
        out = model(**kwargs)
        result.update(mlm=out.prediction_logits.numpy(), nsp=out.seq_relationship_logits.numpy())
    return result


def tfbert_outputs(path):
    model, config = load_pretrained(path, with_heads=True)
    x = inputs()
    encoded = model.bert(x, training=False)
    positions = tf.tile(tf.range(10)[None], [2, 1])
    mlm, nsp = model(dict(x, masked_lm_positions=positions))
    return dict(sequence_output=encoded["sequence_output"].numpy(),
                pooled_output=encoded["pooled_output"].numpy(), mlm=mlm.numpy(), nsp=nsp.numpy()), config


@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, weights):
    return write_huggingface(tmp_path_factory.mktemp("hf"), weights)


def assert_outputs_close(ours, reference, atol=1e-5):
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], atol=atol, rtol=0, err_msg=key)


def test_huggingface_import_equals_transformers(hf_dir):
    ours, config = tfbert_outputs(hf_dir)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-3
    reference = transformers_outputs(hf_dir)
    assert_outputs_close(ours, reference)
    # Not vacuous: the tanh GELU is measurably different on these weights.
    assert np.abs(ours["sequence_output"]).max() > 0.5


def test_bertmodel_layout_without_prefix_or_heads_and_tanh_gelu(tmp_path, weights):
    directory = write_huggingface(tmp_path / "bare", weights, hidden_act="gelu_new", prefix="",
                                  heads=False)
    encoder, config = load_pretrained(directory)
    assert config.hidden_act == "gelu_tanh"
    ours = {k: v.numpy() for k, v in encoder(inputs(), training=False).items()}
    assert_outputs_close(ours, transformers_outputs(directory, with_heads=False))


def test_google_checkpoint_import(tmp_path, weights):
    # google's "gelu" is the tanh form: the same weights as a HuggingFace "gelu_new" model.
    google_dir = write_google(tmp_path / "google", weights)
    ours, config = tfbert_outputs(google_dir)
    assert config.hidden_act == "gelu_tanh" and config.layer_norm_eps == 1e-12
    hf = write_huggingface(tmp_path / "hf", weights, hidden_act="gelu_new", layer_norm_eps=1e-12)
    assert_outputs_close(ours, transformers_outputs(hf))


def test_exports_load_in_transformers_and_import_exactly(tmp_path, hf_dir, weights):
    from tfbert.tokenization import from_pretrained

    out = str(tmp_path / "hf_export")
    export(hf_dir, out, "huggingface", tokenizer=from_pretrained(hf_dir))
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(out))
    assert_outputs_close(transformers_outputs(out), transformers_outputs(hf_dir), atol=0)
    reimported = open_pretrained(out).weights
    for name, value in weights.items():
        np.testing.assert_array_equal(reimported.read(name), value, err_msg=name)

    # google: a tanh-GELU model (google cannot state the exact one).
    google_dir = write_google(tmp_path / "google", weights)
    google_out = str(tmp_path / "google_export")
    export(google_dir, google_out, "google")
    names = tf.train.load_checkpoint(os.path.join(google_out, "bert_model.ckpt"))
    assert "bert/encoder/layer_1/attention/self/query/kernel" in names.get_variable_to_shape_map()
    reimported = open_pretrained(google_out)
    assert reimported.model_config == open_pretrained(google_dir).model_config
    for name, value in weights.items():
        np.testing.assert_array_equal(reimported.weights.read(name), value, err_msg=name)
    with pytest.raises(CheckpointError, match="exact GELU"):
        export(hf_dir, str(tmp_path / "refused"), "google")


def test_savedmodel_serving_signature(tmp_path, hf_dir):
    out = str(tmp_path / "saved")
    export(hf_dir, out, "savedmodel")
    serving = tf.saved_model.load(out).signatures["serving_default"]
    outputs = serving(**inputs())
    encoder, _ = load_pretrained(hf_dir)
    expected = encoder(inputs(), training=False)
    for key in ("sequence_output", "pooled_output"):  # a graph, so not bit for bit
        np.testing.assert_allclose(outputs[key].numpy(), expected[key].numpy(), atol=1e-5)


def test_unsupported_models_and_bad_files_are_named(tmp_path, weights):
    relative = write_huggingface(tmp_path / "relative", weights,
                                 position_embedding_type="relative_key")
    with pytest.raises(CheckpointError, match="position_embedding_type='relative_key'"):
        load_pretrained(relative)
    roberta = write_huggingface(tmp_path / "roberta", weights, model_type="roberta")
    with pytest.raises(CheckpointError, match="model_type='roberta'"):
        load_pretrained(roberta)
    # A config that disagrees with the weights: the variable and both shapes are named.
    wrong = write_huggingface(tmp_path / "wrong", weights, intermediate_size=41)
    with pytest.raises(CheckpointError, match=r"intermediate/dense/kernel: checkpoint \[24, 40\], "
                                              r"model \[24, 41\]"):
        load_pretrained(wrong)
    os.remove(os.path.join(wrong, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights"):
        load_pretrained(wrong)
    with pytest.raises(CheckpointError, match="is not a model tfbert can read"):
        load_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))


def test_training_checkpoints_are_keyed_by_documented_names(tmp_path, hf_dir, weights):
    # --init_checkpoint from a HuggingFace directory, then the run's own checkpoint.
    model = ModelConfig(**SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = run_config(tmp_path, model, num_train_steps=1, init_checkpoint=hf_dir)
    trainer = Pretrainer(config, synthetic_dataset(vocab=SHAPE["vocab_size"]))
    trainer.restore_or_initialize()
    variables = trainer.model.variables_by_name()
    for name, value in weights.items():
        np.testing.assert_array_equal(variables[name].numpy(), value, err_msg=name)
    trainer.train()
    reader = tf.train.load_checkpoint(trainer.checkpoints.latest)
    names = reader.get_variable_to_shape_map()
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in names
    for name in ("bert/embeddings/word_embeddings", "cls/predictions/output_bias",
                 "bert/encoder/layer_1/output/dense/kernel/adam_m",
                 "bert/encoder/layer_1/output/dense/kernel/adam_v", "global_step",
                 "optimizer/iterations"):
        assert name in names, name
    np.testing.assert_array_equal(reader.get_tensor("bert/embeddings/word_embeddings"),
                                  variables["bert/embeddings/word_embeddings"].numpy())
    assert reader.get_tensor("global_step") == 1


def test_a_relative_run_directory_finds_its_own_checkpoints(tmp_path, monkeypatch):
    # `make run` writes to runs/tfbert-<time>, a relative path: the index must name checkpoints
    # relative to the run directory, not to the working directory ("../../ckpt-2").
    from tfbert.checkpoints import NamedCheckpointKeeper

    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.join("runs", "x"))
    variable = tf.Variable([1.0, 2.0])
    keeper = NamedCheckpointKeeper(os.path.join("runs", "x"), 2, {"w": variable})
    for step in (1, 2, 3):
        keeper.save(step)
    assert keeper.latest == os.path.join("runs", "x", "ckpt-3")
    variable.assign([0.0, 0.0])
    assert keeper.restore_latest() == os.path.join("runs", "x", "ckpt-3")
    assert variable.numpy().tolist() == [1.0, 2.0]
    assert sorted(os.path.basename(p) for p in tf.train.get_checkpoint_state(
        "runs/x").all_model_checkpoint_paths) == ["ckpt-2", "ckpt-3"]
    assert not (tmp_path / "runs" / "x" / "ckpt-1.index").exists()


def test_object_based_checkpoints_of_tfbert_0_1_still_restore(tmp_path):
    config = run_config(tmp_path, num_train_steps=2)
    old = Pretrainer(config, synthetic_dataset())
    old.train(max_steps=1)
    # Rewrite step 1 as tfbert 0.1 wrote it: tf.train.Checkpoint keyed by object paths.
    legacy = tf.train.Checkpoint(**old.checkpoints.legacy_objects)
    prefix = legacy.write(str(tmp_path / "ckpt-1"))
    assert "model/bert/blocks/0/attention/query/kernel/.ATTRIBUTES/VARIABLE_VALUE" in (
        tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    expected = {n: v.numpy() for n, v in old.named_state().items()}
    tf.keras.backend.clear_session()
    resumed = Pretrainer(config, synthetic_dataset())
    assert resumed.restore_or_initialize() == 1
    for name, variable in resumed.named_state().items():
        np.testing.assert_array_equal(variable.numpy(), expected[name], err_msg=name)


def test_convert_command(tmp_path, hf_dir):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = tmp_path / "hf"  # (refusals are tested on export(); this is the command itself)
    done = subprocess.run([sys.executable, "-m", "tfbert.tools.convert", f"--input={hf_dir}",
                           "--to=huggingface", f"--output_dir={out}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= set(
        os.listdir(out))


def test_init_checkpoint_brings_the_model_config_and_tokenizer(tmp_path, hf_dir):
    # --init_checkpoint=<HF dir>: its config (exact GELU, eps 1e-3) and its tokenizer; single
    # model flags still override. (The weights' loading is the test above.)
    from tfbert import run

    flag_values = run.flags.FlagValues()
    run.define_flags(flag_values)
    flag_values(["tfbert.run", f"--init_checkpoint={hf_dir}", "--input_files=records",
                 "--max_seq_length=16", "--max_predictions_per_seq=3", "--hidden_dropout_prob=0.05",
                 f"--output_dir={tmp_path / 'run'}"])
    config, tokenizer = run.build_config(flag_values)
    assert config.model == ModelConfig(**SHAPE, hidden_act="gelu", layer_norm_eps=1e-3,
                                       hidden_dropout_prob=0.05)
    assert tokenizer.vocab_size == SHAPE["vocab_size"] and tokenizer.files[0].startswith(hf_dir)


def test_tied_tensors_under_either_name(tmp_path, weights):
    from safetensors.numpy import load_file, save_file

    directory = write_huggingface(tmp_path / "tied", weights)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    # The table kept under the decoder's name, the bias under the decoder's bias name.
    tensors["cls.predictions.decoder.weight"] = tensors.pop("bert.embeddings.word_embeddings.weight")
    tensors["cls.predictions.decoder.bias"] = tensors.pop("cls.predictions.bias")
    save_file(tensors, path, metadata={"format": "pt"})
    source = open_pretrained(directory).weights
    for name in ("bert/embeddings/word_embeddings", "cls/predictions/output_bias"):
        np.testing.assert_array_equal(source.read(name), weights[name])
    # Both names, different tensors: an untied decoder, which tfbert cannot hold.
    tensors["bert.embeddings.word_embeddings.weight"] = tensors["cls.predictions.decoder.weight"] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="untied decoder"):
        open_pretrained(directory)
