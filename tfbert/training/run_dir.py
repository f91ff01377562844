"""The run directory: one self-contained folder per run.

    <output_dir>/config.json        the full run configuration (tfbert.config.Config)
    <output_dir>/bert_config.json   the model, in google-research/bert's format
    <output_dir>/spm.model|vocab.txt the tokenizer, when the run has one
    <output_dir>/tokenizer_config.json its options (HuggingFace's format; a wordpiece casing)
    <output_dir>/ckpt-<step>.*      checkpoints, and the `checkpoint` index
    <output_dir>/train/             TensorBoard events
    <output_dir>/log.jsonl          one JSON line per logging window
    <output_dir>/summary.json       written at the end of training

`--init_checkpoint=<output_dir>` needs nothing else: the model config and tokenizer are there.
"""

from __future__ import annotations

import dataclasses
import json
import os

from tfbert.config import Config, ConfigError, atomic_write_text


def check_output_dir(config: Config) -> None:
    """Refuses to resume into a directory written by a different model shape or task (or label
    set): its checkpoints could not be restored, and its config would be overwritten."""
    config_path = os.path.join(config.runtime.output_dir, "config.json")
    if not os.path.exists(config_path):
        return
    saved = Config.load(config_path)
    if (saved.task.task, saved.task.labels) != (config.task.task, config.task.labels):
        raise ConfigError(
            f"--output_dir={config.runtime.output_dir} holds a run of --task={saved.task.task}"
            + (f" with labels {list(saved.task.labels)}" if saved.task.labels else "")
            + f", not --task={config.task.task}"
            + (f" with labels {list(config.task.labels)}" if config.task.labels else "")
            + ": use a new --output_dir")
    previous = saved.model
    if previous != config.model:
        before, after = dataclasses.asdict(previous), dataclasses.asdict(config.model)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        raise ConfigError(
            f"--output_dir={config.runtime.output_dir} holds a run of a different model "
            f"(field: (saved, requested) = {changed}); use a new --output_dir, or "
            f"--init_checkpoint={config.runtime.output_dir} to start a new run from its weights")


def write_run_files(config: Config, tokenizer=None) -> None:
    """Writes the config, model config and tokenizer files (after `check_output_dir`, and
    after the run's checkpoint was restored, so a failed resume overwrites nothing)."""
    output_dir = config.runtime.output_dir
    os.makedirs(output_dir, exist_ok=True)
    config.save(os.path.join(output_dir, "config.json"))
    atomic_write_text(os.path.join(output_dir, "bert_config.json"),
                      json.dumps(config.model.to_bert_config(), indent=2) + "\n")
    if tokenizer is not None:
        # Under the standard name, whatever the original was called, and with its options
        # (a wordpiece vocabulary's casing), so that --init_checkpoint=<output_dir> tokenizes
        # the same way.
        tokenizer.save_pretrained(output_dir)


def prepare_output_dir(config: Config, tokenizer=None) -> None:
    """`check_output_dir`, then `write_run_files`: for a run that restores nothing."""
    check_output_dir(config)
    write_run_files(config, tokenizer)
