"""Published and finished models in, whatever their format: `load_pretrained`, `--init_checkpoint`.

Three formats are recognised by what a directory holds:

    tfbert       a run directory (`config.json` with tfbert's sections, `ckpt-<step>.*`), or one
                 checkpoint prefix in it
    huggingface  `config.json` (flat, BERT) + `model.safetensors` | shards | `pytorch_model.bin`
    google       `bert_config.json` + a TF1 checkpoint (`bert_model.ckpt.*`)

Each gives a ModelConfig and the weights under documented names; the model is then built by
tfbert and the weights assigned by name, each shape checked.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfbert.checkpoints import google, huggingface
from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.native import (OBJECT_GRAPH_KEY, check_shapes, latest_checkpoint,
                                       open_reader)
from tfbert.checkpoints.weights import WeightSource, encoder_names, head_names, is_weight_name
from tfbert.config import Config, FusedOpsConfig, ModelConfig

FORMATS = ("tfbert", "huggingface", "google")
TFBERT_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One pretrained model on disk.

    Attributes:
      format: "tfbert", "huggingface" or "google".
      path: the directory (or checkpoint prefix) given.
      model_config: its shape, activation and epsilon, in tfbert's terms.
      weights: its tensors by documented name; None for a tfbert 0.1 object-based checkpoint,
        which is restored through its object graph (`legacy_prefix`).
      legacy_prefix: that checkpoint's prefix.
    """

    format: str
    path: str
    model_config: ModelConfig
    weights: WeightSource | None
    legacy_prefix: str | None = None

    @property
    def description(self) -> str:
        return self.weights.description if self.weights else f"tfbert checkpoint {self.legacy_prefix}"


def tfbert_run_dir(path: str) -> str | None:
    """The run directory of a tfbert run directory or checkpoint prefix, else None."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(directory, TFBERT_CONFIG_FILE)
    if os.path.isfile(config) and not huggingface.is_huggingface_dir(directory):
        return directory
    return None


def detect_format(path: str) -> str:
    if not os.path.exists(path) and not tf.io.gfile.exists(path + ".index"):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isdir(path):
        from tfbert.checkpoints.sharded import check_no_tensor_parallel_parts

        check_no_tensor_parallel_parts(path)  # a tensor-parallel run's parts: gather them first
    if tfbert_run_dir(path):
        return "tfbert"
    if os.path.isdir(path):
        if huggingface.is_huggingface_dir(path):
            return "huggingface"
        if google.is_google_dir(path):
            return "google"
    if latest_checkpoint(path):
        return "tfbert"  # checkpoints without the run's config.json
    raise CheckpointError(
        f"{path} is not a model tfbert can read: expected a tfbert run directory "
        f"({TFBERT_CONFIG_FILE} + ckpt-*), a HuggingFace BERT directory ({huggingface.CONFIG_FILE} "
        f"+ {' or '.join(huggingface.WEIGHT_FILES)}) or a google-research/bert directory "
        f"({google.CONFIG_FILE} + {google.CHECKPOINT_NAME}.*)")


def pretrained_model_config(path: str) -> ModelConfig | None:
    """The model config the checkpoint at `path` states; None for tfbert checkpoints that lie
    without their run's config.json (the run's flags then say the shape)."""
    return _stated_config(path, detect_format(path))


def _stated_config(path: str, fmt: str) -> ModelConfig | None:
    if fmt == "huggingface":
        return huggingface.read_config(path)
    if fmt == "google":
        return google.read_config(path)
    run_dir = tfbert_run_dir(path)
    return Config.load(os.path.join(run_dir, TFBERT_CONFIG_FILE)).model if run_dir else None


def open_pretrained(path: str, model_config: ModelConfig | None = None) -> Pretrained:
    """Reads the config of the model at `path` and opens its weights (lazily).

    Args:
      path: a directory or checkpoint prefix of one of the formats above.
      model_config: the config of tfbert checkpoints that lie without their run's config.json.
    """
    fmt = detect_format(path)
    if fmt == "huggingface":
        config = huggingface.read_config(path)
        return Pretrained(fmt, path, config, huggingface.read_weights(path, config))
    if fmt == "google":
        return Pretrained(fmt, path, google.read_config(path), google.read_weights(path))
    config = _stated_config(path, fmt) or model_config
    if config is None:
        raise CheckpointError(f"{path}: tfbert checkpoints without the {TFBERT_CONFIG_FILE} of "
                              f"their run: the model's shape is unknown")
    prefix = latest_checkpoint(path)
    if prefix is None:
        raise CheckpointError(f"{path}: a tfbert run directory without a checkpoint (ckpt-*)")
    reader = open_reader(prefix, "checkpoint")
    names = reader.get_variable_to_shape_map()
    if reader.has_tensor(OBJECT_GRAPH_KEY) and "bert/embeddings/word_embeddings" not in names:
        return Pretrained(fmt, path, config, None, legacy_prefix=prefix)
    shapes = {name: shape for name, shape in names.items() if is_weight_name(name)}
    return Pretrained(fmt, path, config, WeightSource(f"tfbert checkpoint {prefix}", shapes,
                                                      reader.get_tensor))


def assign_pretrained(model, pretrained: Pretrained, what: str = "",
                      sources: dict[str, str] | None = None) -> list[str]:
    """Assigns the pretrained weights to a built `BertTaskModel`, each by name and shape.

    Every encoder weight must be there (the pooler excepted: BertForMaskedLM checkpoints have
    none); heads that the checkpoint lacks keep their initialisation. The heads of other tasks
    (a pretraining checkpoint's "cls/" for a classifier) are not this model's and are left
    out. Returns the names of the model's variables left at their initialisation.

    sources: {model variable name: checkpoint name} read under another name (--reuse_head:
      the classifier from the next-sentence head); each must be in the checkpoint.
    """
    what = what or pretrained.path
    variables = model.variables_by_name()
    if pretrained.weights is None:  # tfbert 0.1: keyed by object path
        status = tf.train.Checkpoint(model=model).read(pretrained.legacy_prefix)
        try:
            status.expect_partial().assert_existing_objects_matched()
        except AssertionError as e:
            raise CheckpointError(f"{what}: {pretrained.legacy_prefix} lacks some model "
                                  f"weights: {e}") from None
        return []
    source = pretrained.weights
    sources = dict(sources or {})
    missing = sorted(f"{name} (for {target})" for target, name in sources.items()
                     if name not in source)
    if missing:
        raise CheckpointError(f"{what} ({source.description}) has no {missing}")
    # Whole shapes: under tensor parallelism each rank takes its part of every whole tensor.
    shapes = model.whole_shapes()
    heads = tuple(model.head_prefixes)
    optional = [n for n in variables
                if n.startswith(("bert/pooler/",) + heads) and n not in sources]
    required = {sources.get(n, n): shapes[n] for n in variables if n not in optional}
    check_shapes(required, source.shapes, f"{what} ({source.description})")
    present = {n: shapes[n] for n in optional if n in source}
    check_shapes(present, source.shapes, f"{what} ({source.description})")
    for name in [n for n in variables if n not in optional] + list(present):
        variables[name].assign(model.part_of_whole(name, source.read(sources.get(name, name))))
    left = [n for n in optional if n not in source]
    if left:
        logging.warning("%s has no %s: left at their initialisation", what, left)
    own = set(encoder_names(source.shapes)) | {n for n in head_names(source.shapes)
                                               if n.startswith(heads)}
    extra = sorted(own - set(variables))
    if extra:
        raise CheckpointError(f"{what} ({source.description}) has weights this model does not: "
                              f"{extra[:8]}; its config and weights disagree")
    others = sorted(set(head_names(source.shapes)) - own - set(sources.values()))
    if others:
        logging.info("%s: %d weights of other heads not used (%s, ...)", what, len(others),
                     others[0])
    return left


def load_pretrained(path: str, with_heads: bool = False, precision: str = "fp32",
                    ops: FusedOpsConfig = FusedOpsConfig(), seed: int = 0):
    """The model at `path` (any format above), built by tfbert with its weights.

    Args:
      path: a tfbert run directory or checkpoint, a HuggingFace or a google-research/bert dir.
      with_heads: also return the pretraining heads (MLM tied to the embeddings, NSP).
      precision: "fp32", "fp16" or "bf16".
      ops: which computations use the fused custom ops.
      seed: seeds the dropout masks when the encoder is called with training=True.
    Returns:
      (encoder, model_config). The encoder is a Keras model called as `encoder({"input_ids":
      ..., "input_mask": ..., "segment_ids": ...}, training=False)` with int32 [batch, seq]
      tensors; it returns {"sequence_output": [batch, seq, hidden], "pooled_output": [batch,
      hidden]}. With `with_heads`, the first item is the `BertPretrainer` (its encoder is `.bert`;
      called with "masked_lm_positions" too, it returns MLM and NSP logits).
    """
    from tfbert.modeling.layers.dropout import DropoutRng
    from tfbert.modeling.models.bert_pretrainer import BertPretrainer

    pretrained = open_pretrained(path)
    model = BertPretrainer(pretrained.model_config, rng=DropoutRng(seed), precision=precision,
                           ops=ops)
    model.build()
    assign_pretrained(model, pretrained)
    logging.info("Loaded %s (%s)", path, pretrained.description)
    return (model if with_heads else model.bert), pretrained.model_config


def init_from_pretrained(model, path: str, sources: dict[str, str] | None = None) -> str:
    """--init_checkpoint: the model's weights from a checkpoint of any format (not the optimizer
    state, step or data position: this starts a new run). Returns what was loaded.

    sources: variables read under other names (see `assign_pretrained`)."""
    pretrained = open_pretrained(path, model_config=model.config)
    assign_pretrained(model, pretrained, what=f"--init_checkpoint={path}", sources=sources)
    return pretrained.description


def model_arrays(model) -> dict[str, np.ndarray]:
    """A model's weights by documented name, as float32 numpy arrays."""
    return {name: v.numpy().astype(np.float32) for name, v in model.variables_by_name().items()}
