"""HuggingFace BERT directories: `config.json` and PyTorch-layout weights, in and out.

The weights are read from `model.safetensors` (or the shards of `model.safetensors.index.json`)
with the `safetensors` package, or from `pytorch_model.bin` when PyTorch is installed. Both
`BertModel` keys (`embeddings.word_embeddings.weight`) and `BertForPreTraining`/`BertForMaskedLM`
keys (`bert.` prefix, `cls.` heads) are understood, as are the LayerNorm `gamma`/`beta` names of
old checkpoints. Tensors that safetensors leaves out because they are tied to another one (the
MLM decoder's weight is the word-embedding table, its bias `cls.predictions.bias`) are found
under either name; `embeddings.position_ids` is a buffer, not a weight, and is ignored.

A PyTorch `Linear` stores its weight as [out, in]; tfbert (and google) kernels are [in, out].
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.weights import WeightSource, read_config_file
from tfbert.config import ModelConfig, atomic_write_text

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, PYTORCH_FILE)

# HuggingFace hidden_act -> tfbert's. HF's "gelu" is the exact erf form; "gelu_new",
# "gelu_pytorch_tanh" and "gelu_fast" are the tanh approximation (the same formula).
_ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# config.json keys that carry the same meaning in tfbert's ModelConfig.
_SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps")


def is_huggingface_dir(path: str) -> bool:
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    # tfbert's own config.json has sections ("model", "runtime", ...), HF's is flat.
    return isinstance(raw, dict) and "hidden_size" in raw and "model" not in raw


def read_config(path: str) -> ModelConfig:
    """A HuggingFace BERT `config.json` -> ModelConfig; what tfbert cannot compute exactly (other
    architectures, relative positions, a decoder) is an error naming the field."""
    raw, config_path = read_config_file(path, CONFIG_FILE)

    def unsupported(field, why):
        raise CheckpointError(f"{config_path}: {field}={raw.get(field)!r}: {why}")

    if raw.get("model_type", "bert") != "bert":
        unsupported("model_type", "tfbert implements BERT (model_type 'bert') only")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        unsupported("position_embedding_type", "tfbert implements absolute position embeddings "
                                               "only")
    for field in ("is_decoder", "add_cross_attention"):
        if raw.get(field):
            unsupported(field, "tfbert implements the bidirectional encoder only")
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS_IN:
        unsupported("hidden_act", f"tfbert computes {sorted(_ACTIVATIONS_IN)}")
    values = {key: raw[key] for key in _SHARED_KEYS if key in raw}
    values["hidden_act"] = _ACTIVATIONS_IN[act]
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def config_dict(config: ModelConfig, pad_token_id: int = 0) -> dict:
    """ModelConfig -> a HuggingFace `config.json` dictionary (BertForPreTraining)."""
    if config.hidden_act not in _ACTIVATIONS_OUT:
        raise CheckpointError(f"hidden_act={config.hidden_act!r} has no HuggingFace BERT "
                              f"equivalent ({sorted(_ACTIVATIONS_OUT)} do)")
    values = {key: getattr(config, key) for key in _SHARED_KEYS}
    values.update(architectures=["BertForPreTraining"], model_type="bert",
                  hidden_act=_ACTIVATIONS_OUT[config.hidden_act],
                  position_embedding_type="absolute", pad_token_id=pad_token_id,
                  torch_dtype="float32")
    return values


def key_map(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """documented name -> (BertForPreTraining key, whether the array is transposed)."""
    keys = {}

    def dense(name, key):
        keys[f"{name}/kernel"] = (f"{key}.weight", True)
        keys[f"{name}/bias"] = (f"{key}.bias", False)

    def layer_norm(name, key):
        keys[f"{name}/gamma"] = (f"{key}.weight", False)
        keys[f"{name}/beta"] = (f"{key}.bias", False)

    for table in ("word", "position", "token_type"):
        keys[f"bert/embeddings/{table}_embeddings"] = (f"bert.embeddings.{table}_embeddings.weight",
                                                       False)
    layer_norm("bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        name, key = f"bert/encoder/layer_{i}", f"bert.encoder.layer.{i}"
        for projection in ("query", "key", "value"):
            dense(f"{name}/attention/self/{projection}", f"{key}.attention.self.{projection}")
        dense(f"{name}/attention/output/dense", f"{key}.attention.output.dense")
        layer_norm(f"{name}/attention/output/LayerNorm", f"{key}.attention.output.LayerNorm")
        dense(f"{name}/intermediate/dense", f"{key}.intermediate.dense")
        dense(f"{name}/output/dense", f"{key}.output.dense")
        layer_norm(f"{name}/output/LayerNorm", f"{key}.output.LayerNorm")
    dense("bert/pooler/dense", "bert.pooler.dense")
    dense("cls/predictions/transform/dense", "cls.predictions.transform.dense")
    layer_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm")
    keys["cls/predictions/output_bias"] = ("cls.predictions.bias", False)
    keys["cls/seq_relationship/output_weights"] = ("cls.seq_relationship.weight", False)
    keys["cls/seq_relationship/output_bias"] = ("cls.seq_relationship.bias", False)
    return keys


def _alternatives(key: str) -> list[str]:
    """The names `key` may have in a file: without the `bert.` prefix (BertModel), with
    old-style LayerNorm names, or under the tied tensor's name."""
    names = [key]
    if key.startswith("bert."):
        names.append(key[len("bert."):])
    if ".LayerNorm." in key:
        old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                        "LayerNorm.beta")
        names += [old, old[len("bert."):]] if old.startswith("bert.") else [old]
    tied = {"bert.embeddings.word_embeddings.weight": "cls.predictions.decoder.weight",
            "cls.predictions.bias": "cls.predictions.decoder.bias"}
    if key in tied:
        names.append(tied[key])
    return names


class _TensorFiles:
    """{key: tensor} over the weight files of one directory, read lazily."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, SAFETENSORS_INDEX_FILE)
        single = os.path.join(path, SAFETENSORS_FILE)
        self._torch_state = None
        if os.path.isfile(single) or os.path.isfile(index):
            from safetensors import safe_open

            if os.path.isfile(single):
                files = {single}
            else:
                with open(index, encoding="utf-8") as f:
                    files = {os.path.join(path, name) for name in json.load(f)["weight_map"].values()}
            self._files = {}
            self.keys = {}
            for file in sorted(files):
                try:
                    handle = safe_open(file, framework="numpy")
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{file} is unreadable: {e}") from None
                metadata = handle.metadata() or {}
                if metadata.get("format") == "tf":
                    raise CheckpointError(
                        f"{file} holds TensorFlow-layout weights (saved by a transformers "
                        f"TFBertModel); tfbert reads the PyTorch layout, which transformers "
                        f"writes with BertModel.save_pretrained")
                self._files[file] = handle
                for key in handle.keys():
                    self.keys[key] = file
            self.description = f"HuggingFace {', '.join(os.path.basename(f) for f in sorted(files))}"
        elif os.path.isfile(os.path.join(path, PYTORCH_FILE)):
            try:
                import torch
            except ImportError:
                raise CheckpointError(
                    f"{path} holds {PYTORCH_FILE}, which only PyTorch can read and it is not "
                    f"installed: install torch, or save the model with safetensors "
                    f"(model.save_pretrained(dir, safe_serialization=True))") from None
            state = torch.load(os.path.join(path, PYTORCH_FILE), map_location="cpu",
                               weights_only=True)
            self._torch_state = {k: v.float().numpy() for k, v in state.items()}
            self.keys = {k: PYTORCH_FILE for k in self._torch_state}
            self.description = f"HuggingFace {PYTORCH_FILE}"
        else:
            raise CheckpointError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")

    def shape(self, key: str) -> tuple:
        if self._torch_state is not None:
            return self._torch_state[key].shape
        return tuple(self._files[self.keys[key]].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        if self._torch_state is not None:
            return self._torch_state[key]
        # bfloat16 works (TensorFlow, loaded by now, registers it with numpy); WeightSource
        # casts every dtype to float32.
        return self._files[self.keys[key]].get_tensor(key)


def read_weights(path: str, config: ModelConfig) -> WeightSource:
    """The weights of a HuggingFace directory under documented names."""
    files = _TensorFiles(path)
    found = {}  # documented name -> (key in the file, transposed)
    for name, (key, transposed) in key_map(config).items():
        for candidate in _alternatives(key):
            if candidate in files.keys:
                found[name] = (candidate, transposed)
                break
    used = {key for key, _ in found.values()}
    tied_decoder = "cls.predictions.decoder.weight"
    if tied_decoder in files.keys and found.get("bert/embeddings/word_embeddings",
                                                (tied_decoder,))[0] != tied_decoder:
        # Stored under both names: tfbert ties them, so they must be equal.
        embedding_key = found["bert/embeddings/word_embeddings"][0]
        if not np.array_equal(files.read(tied_decoder), files.read(embedding_key)):
            raise CheckpointError(
                f"{path}: {tied_decoder} differs from {embedding_key}; tfbert ties the MLM "
                f"output layer to the word embeddings and cannot hold an untied decoder")
        used.add(tied_decoder)
    ignored = sorted(set(files.keys) - used - {"embeddings.position_ids",
                                               "bert.embeddings.position_ids",
                                               "cls.predictions.decoder.bias"})
    if ignored:
        logging.warning("%s: not part of BERT's encoder or pretraining heads, ignored: %s",
                        path, ignored[:10] + (["..."] if len(ignored) > 10 else []))

    def shape(name):
        key, transposed = found[name]
        shape = files.shape(key)
        return tuple(reversed(shape)) if transposed else shape

    def read(name):
        key, transposed = found[name]
        value = files.read(key)
        return value.T if transposed else value

    return WeightSource(f"{files.description} in {path}", {n: shape(n) for n in found}, read)


def write(directory: str, config: ModelConfig, arrays: dict[str, np.ndarray],
          pad_token_id: int = 0) -> list[str]:
    """Writes `config.json` and `model.safetensors` (BertForPreTraining layout, float32).

    A model without key biases (--nouse_bias_in_keys) gets zero key biases: a key bias adds the
    same amount to every score of a query, which the softmax cancels, so the outputs are equal.
    Returns the files written.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, (key, transposed) in key_map(config).items():
        if name in arrays:
            value = arrays[name]
        elif name.endswith("attention/self/key/bias"):
            value = np.zeros([config.hidden_size], np.float32)
        elif name.startswith("cls/"):
            continue  # an encoder without heads
        else:
            raise CheckpointError(f"cannot write a HuggingFace checkpoint: {name} is missing")
        tensors[key] = np.ascontiguousarray(value.T if transposed else value, dtype=np.float32)
    weights = os.path.join(directory, SAFETENSORS_FILE)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config_path = os.path.join(directory, CONFIG_FILE)
    atomic_write_text(config_path, json.dumps(config_dict(config, pad_token_id), indent=2) + "\n")
    return [config_path, weights]
