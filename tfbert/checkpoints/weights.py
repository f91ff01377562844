"""A checkpoint's weights under tfbert's documented (google-research/bert) names, read lazily."""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from tfbert.checkpoints.errors import CheckpointError


class WeightSource:
    """The tensors of one checkpoint by documented name, each read only when asked for (a
    5.75B-parameter model must not be held twice in host memory).

    Args:
      description: what the tensors come from, for messages ("HuggingFace model.safetensors ...").
      shapes: {documented name: shape} of every tensor the checkpoint holds.
      read: documented name -> float32 numpy array.
    """

    def __init__(self, description: str, shapes: dict[str, tuple], read: Callable[[str], np.ndarray]):
        self.description = description
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self._read = read

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._read(name), dtype=np.float32)

    @classmethod
    def from_arrays(cls, description: str, arrays: dict[str, np.ndarray]) -> "WeightSource":
        return cls(description, {name: a.shape for name, a in arrays.items()}, arrays.__getitem__)


# Where a model's weights live in a checkpoint: the encoder, then each task's heads (pretraining
# "cls/", classification, regression and token classification "classifier/", question
# answering "qa/", distillation's projection "distill/"). Anything else is training state.
ENCODER_PREFIX = "bert/"
HEAD_PREFIXES = ("cls/", "classifier/", "qa/", "distill/")
WEIGHT_PREFIXES = (ENCODER_PREFIX,) + HEAD_PREFIXES


def is_weight_name(name: str) -> bool:
    """Whether checkpoint tensor `name` is a model weight (not optimizer or training state)."""
    return name.startswith(WEIGHT_PREFIXES) and not name.endswith(("/adam_m", "/adam_v"))


def encoder_names(names) -> list[str]:
    return [name for name in names if name.startswith(ENCODER_PREFIX)]


def head_names(names) -> list[str]:
    return [name for name in names if name.startswith(HEAD_PREFIXES)]


def read_config_file(directory: str, name: str) -> tuple[dict, str]:
    """A checkpoint directory's JSON config: (its dictionary, its path)."""
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {name}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return raw, path
