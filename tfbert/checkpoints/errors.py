"""The one error every checkpoint reader and writer raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing or corrupt files, another model's shapes, an
    architecture tfbert does not implement. The message names the file, the tensor or the config
    field, and both shapes where they differ."""
