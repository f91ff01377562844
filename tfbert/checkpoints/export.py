"""Writing a model out for other stacks: HuggingFace, google-research/bert, SavedModel."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfbert.checkpoints import google, huggingface
from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.pretrained import assign_pretrained, open_pretrained

TARGETS = ("huggingface", "google", "savedmodel")


class ServingModule(tf.Module):
    """The encoder behind a serving signature: int32 [batch, seq] token ids, mask and segment
    ids in; float32 `sequence_output` [batch, seq, hidden] and `pooled_output` [batch, hidden]
    out."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name=name)
                                  for name in ("input_ids", "input_mask", "segment_ids")])
    def serve(self, input_ids, input_mask, segment_ids):
        outputs = self.encoder(dict(input_ids=input_ids, input_mask=input_mask,
                                    segment_ids=segment_ids), training=False)
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}


def export(source: str, output_dir: str, to: str, tokenizer=None) -> list[str]:
    """Writes the model at `source` (any format `load_pretrained` reads) to `output_dir`.

    Args:
      source: a tfbert run directory or checkpoint, a HuggingFace or google-research/bert dir.
      output_dir: the directory to write (created).
      to: "huggingface" (config.json + model.safetensors, BertForPreTraining keys), "google"
        (bert_config.json + bert_model.ckpt) or "savedmodel" (a serving signature; computed
        with TensorFlow's ops only, so it loads without tfbert's op library).
      tokenizer: its files are written beside the weights (`save_pretrained`), when given.
    Returns:
      The paths written.
    """
    from tfbert.modeling.layers.dropout import DropoutRng
    from tfbert.modeling.models.bert_pretrainer import BertPretrainer

    if to not in TARGETS:
        raise CheckpointError(f"--to={to!r} is not one of {TARGETS}")
    pretrained = open_pretrained(source)
    config = pretrained.model_config
    model = BertPretrainer(config, rng=DropoutRng(0))  # reference ops: no op library needed
    model.build()
    left_at_init = set(assign_pretrained(model, pretrained))
    # Heads the source lacks are not written (they would be random numbers).
    arrays = {name: variable.numpy().astype(np.float32)
              for name, variable in model.variables_by_name().items() if name not in left_at_init}
    os.makedirs(output_dir, exist_ok=True)
    if to == "huggingface":
        pad = tokenizer.special_ids["pad"] if tokenizer is not None else 0
        written = huggingface.write(output_dir, config, arrays, pad_token_id=pad)
    elif to == "google":
        written = google.write(output_dir, config, arrays)
    else:
        # Without dropout: Keras traces the layers' training branch into the SavedModel too,
        # and a dropout generator would be state outside the served model.
        serving = BertPretrainer(dataclasses.replace(config, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0))
        serving.build()
        serving_variables = serving.variables_by_name()
        for name, variable in model.variables_by_name().items():
            serving_variables[name].assign(variable)
        module = ServingModule(serving.bert)
        tf.saved_model.save(module, output_dir, signatures={"serving_default": module.serve})
        written = [output_dir]
    if tokenizer is not None:
        written += tokenizer.save_pretrained(output_dir)
    else:
        logging.warning("%s has no tokenizer files; %s holds the weights only", source, output_dir)
    logging.info("Wrote %s (%s) from %s", output_dir, to, pretrained.description)
    return written
