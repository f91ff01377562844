"""Every checkpoint format tfbert reads or writes, in one place.

- `native`: tfbert's training checkpoints, keyed by the documented google-research/bert names.
- `google`: google-research/bert's `bert_config.json` + TF1 checkpoint.
- `huggingface`: HuggingFace's `config.json` + `model.safetensors` (or `pytorch_model.bin`).
- `pretrained`: `load_pretrained` and `--init_checkpoint` over all of them.
- `export`: writing a model out in each format (`python -m tfbert.tools.convert`).
"""

from tfbert.checkpoints.errors import CheckpointError
from tfbert.checkpoints.native import (CheckpointKeeper, NamedCheckpointKeeper, checkpoint_step,
                                       latest_checkpoint)
from tfbert.checkpoints.pretrained import (Pretrained, detect_format, init_from_pretrained,
                                           load_pretrained, open_pretrained,
                                           pretrained_model_config)

__all__ = ["CheckpointError", "CheckpointKeeper", "NamedCheckpointKeeper", "Pretrained",
           "checkpoint_step", "detect_format", "init_from_pretrained", "latest_checkpoint",
           "load_pretrained", "open_pretrained", "pretrained_model_config"]
