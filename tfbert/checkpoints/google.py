"""google-research/bert directories: `bert_config.json` and a TF1 name-based checkpoint.

The checkpoint's tensors carry the documented names themselves (`bert/embeddings/...`); its
optimizer slots (`.../adam_m`, `.../adam_v`) and `global_step` are not weights and are skipped.
google's `modeling.py` computes its `"gelu"` in the tanh form, so a google config's "gelu" is
tfbert's "gelu_tanh"; tfbert's exact "gelu" cannot be written to a google config (export it to
HuggingFace, whose "gelu" is exact).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import tensorflow as tf

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.native import open_reader, write_tensors
from tfbert.checkpoints.weights import WeightSource, read_config_file
from tfbert.config import ModelConfig, atomic_write_text

CONFIG_FILE = "bert_config.json"
CHECKPOINT_NAME = "bert_model.ckpt"

_ACTIVATIONS_IN = {"gelu": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_OUT = {"gelu_tanh": "gelu", "relu": "relu"}
_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
         "max_position_embeddings", "type_vocab_size", "initializer_range")


def checkpoint_prefix(path: str) -> str | None:
    """The TF1 checkpoint of a google directory: `bert_model.ckpt`, else the newest in its
    `checkpoint` index, else the only `*.index` bundle."""
    named = os.path.join(path, CHECKPOINT_NAME)
    if tf.io.gfile.exists(named + ".index"):
        return named
    latest = tf.train.latest_checkpoint(path)
    if latest:
        return latest
    bundles = glob.glob(os.path.join(path, "*.index"))
    return bundles[0][:-len(".index")] if len(bundles) == 1 else None


def is_google_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and checkpoint_prefix(path) is not None


def read_config(path: str) -> ModelConfig:
    raw, config_path = read_config_file(path, CONFIG_FILE)
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS_IN:
        raise CheckpointError(f"{config_path}: hidden_act={act!r}: tfbert computes google's "
                              f"{sorted(_ACTIVATIONS_IN)}")
    values = {key: raw[key] for key in _KEYS if key in raw}
    values["hidden_act"] = _ACTIVATIONS_IN[act]
    try:
        # google's modeling.py normalises with epsilon 1e-12 (no config key).
        return ModelConfig(**values, layer_norm_eps=raw.get("layer_norm_eps", 1e-12))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def read_weights(path: str) -> WeightSource:
    prefix = checkpoint_prefix(path)
    if prefix is None:
        raise CheckpointError(f"{path}: no TF1 checkpoint ({CHECKPOINT_NAME}.index)")
    reader = open_reader(prefix, "google checkpoint")
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()
              if name.startswith(("bert/", "cls/")) and not name.endswith(("/adam_m", "/adam_v"))}
    return WeightSource(f"TF1 checkpoint {prefix}", shapes, reader.get_tensor)


def write(directory: str, config: ModelConfig, arrays: dict[str, np.ndarray]) -> list[str]:
    """Writes `bert_config.json` and `bert_model.ckpt` (a name-based checkpoint google's TF1 code
    restores with `tf.train.init_from_checkpoint`). Returns the files written."""
    if config.hidden_act not in _ACTIVATIONS_OUT:
        raise CheckpointError(
            f"hidden_act={config.hidden_act!r} cannot be written to a google config: google's "
            f"modeling.py computes 'gelu' in its tanh form (tfbert's 'gelu_tanh') and knows no "
            f"exact GELU or GeGLU; export with --to=huggingface (its 'gelu' is exact)")
    os.makedirs(directory, exist_ok=True)
    arrays = dict(arrays)
    if not config.use_bias_in_keys:
        # google's attention always has a key bias; zero is exact (softmax cancels it).
        for i in range(config.num_hidden_layers):
            arrays[f"bert/encoder/layer_{i}/attention/self/key/bias"] = np.zeros(
                [config.hidden_size], np.float32)
    prefix = os.path.join(directory, CHECKPOINT_NAME)
    write_tensors(prefix, arrays)
    tf.compat.v1.train.update_checkpoint_state(directory, CHECKPOINT_NAME)
    values = {key: getattr(config, key) for key in _KEYS}
    values.update(hidden_act=_ACTIVATIONS_OUT[config.hidden_act],
                  layer_norm_eps=config.layer_norm_eps)
    config_path = os.path.join(directory, CONFIG_FILE)
    atomic_write_text(config_path, json.dumps(values, indent=2) + "\n")
    return [config_path] + glob.glob(prefix + ".*")
