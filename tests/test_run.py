"""The entry point end to end, in real subprocesses, on the shipped sample corpus."""

import json
import shutil

import pytest

from conftest import run_tfbert
from tfbert import run
from tfbert.data.sample import prepare_sample_data

TINY_STEPS = ["--train_batch_size=8", "--log_every_n_steps=1"]


@pytest.fixture(scope="module")
def sample(tfbert_cache):
    """(record files, sentencepiece model) of the sample corpus, built once for the module."""
    return prepare_sample_data()


def test_default_run_trains_and_the_loss_falls(tmp_path, sample):
    out = tmp_path / "run"
    result = run_tfbert(f"--output_dir={out}", "--num_train_steps=80", "--log_every_n_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "last window:  loss" in result.stdout and "mlm_loss" in result.stdout
    assert "checkpoint:" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80
    # From ln(4000) ~ 8.3 at the start: the model must have learnt token frequencies at least.
    assert summary["final_mlm_loss"] < summary["first_mlm_loss"] - 1.0, summary
    assert summary["examples_per_sec"] > 0 and summary["tokens_per_sec"] > 0
    assert 0 < summary["first_step_secs"] < 600  # tracing and the first step, timed apart
    assert summary["peak_memory_bytes"] > 2 ** 20  # batch 32 x seq 128 activations are counted
    assert summary["op_determinism"] is False  # on with --deterministic only
    for name in ("config.json", "bert_config.json", "spm.model", "checkpoint", "log.jsonl"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 4000 and config["model"]["num_hidden_layers"] == 2

    # The same command again: nothing left to train, said plainly, exit 0, nothing rewritten.
    summary_text, config_text = (out / "summary.json").read_text(), (out / "config.json").read_text()
    again = run_tfbert(f"--output_dir={out}", "--num_train_steps=80", "--log_every_n_steps=20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout
    assert (out / "summary.json").read_text() == summary_text

    # A resume that cannot restore (an fp32 checkpoint has no fp16 loss scale) fails at start
    # and leaves the run directory's files as they were.
    failed = run_tfbert(f"--output_dir={out}", "--num_train_steps=90", "--precision=fp16")
    assert failed.returncode == 2 and "tfbert: error:" in failed.stderr
    assert "lacks part of this run's state" in failed.stderr
    assert (out / "config.json").read_text() == config_text


def test_divergence_stops_the_run_with_exit_status_3(tmp_path, sample):
    # A loss scale of 1e38 makes every scaled gradient infinite: every step is skipped.
    result = run_tfbert(f"--output_dir={tmp_path}", "--precision=fp16", "--initial_loss_scale=1e38",
                        "--max_consecutive_nonfinite_steps=2", "--num_train_steps=5",
                        *TINY_STEPS)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training diverged: 2 steps in a row" in result.stderr
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("mode", ["off", "auto", "jit"])
def test_each_xla_mode_runs_and_compiles_only_when_asked(tmp_path, sample, mode):
    result = run_tfbert(f"--output_dir={tmp_path}", f"--xla={mode}", "--num_train_steps=2",
                        *TINY_STEPS, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = "Compiled cluster using XLA" in result.stderr
    assert compiled == (mode != "off")


def test_init_checkpoint_from_a_run_directory_needs_nothing_else(tmp_path, sample):
    first = tmp_path / "first"
    result = run_tfbert(f"--output_dir={first}", "--hidden_size=64", "--num_train_steps=2",
                        *TINY_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    # In-process: flags -> config only. The model shape and tokenizer come from the directory.
    flag_values = run.flags.FlagValues()
    run.define_flags(flag_values)
    flag_values(["tfbert.run", f"--init_checkpoint={first}", f"--output_dir={tmp_path / 'next'}",
                 f"--input_files={','.join(sample[0])}"])
    config, tokenizer = run.build_config(flag_values)
    assert config.model.hidden_size == 64 and tokenizer.vocab_size == 4000
    assert config.data.vocab_file == str(first / "spm.model")
    second = run_tfbert(f"--init_checkpoint={first}", f"--output_dir={tmp_path / 'next'}",
                        "--num_train_steps=1", *TINY_STEPS)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Initialised weights from" in second.stderr


def test_corrupt_record_file_is_named_in_a_clear_error(tmp_path, sample):
    broken = tmp_path / "broken-00000.tfrecord"
    shutil.copyfile(sample[0][0], broken)
    data = bytearray(broken.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the first record's payload: its CRC no longer matches
    broken.write_bytes(bytes(data))
    result = run_tfbert(f"--output_dir={tmp_path / 'out'}", f"--input_files={broken}",
                        f"--vocab_file={sample[1]}", "--num_train_steps=1", *TINY_STEPS)
    assert result.returncode == 2
    assert str(broken) in result.stderr and "tfbert: error:" in result.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_missing_input_files_give_a_clear_error(tmp_path, sample):
    result = run_tfbert(f"--output_dir={tmp_path}", "--input_files=/nonexistent/part-*.tfrecord",
                        f"--vocab_file={sample[1]}", "--num_train_steps=1")
    assert result.returncode == 2
    assert "/nonexistent/part-*.tfrecord" in result.stderr


def test_tokenizer_and_model_vocab_mismatch_fails_at_start(tmp_path, sample):
    result = run_tfbert(f"--output_dir={tmp_path}", "--vocab_size=3000", "--num_train_steps=1")
    assert result.returncode == 2
    assert "4000 tokens but the model's vocab_size is 3000" in result.stderr


def test_records_of_another_sequence_length_fail_at_start(tmp_path, sample):
    result = run_tfbert(f"--output_dir={tmp_path}", f"--input_files={sample[0][0]}",
                        f"--vocab_file={sample[1]}", "--max_seq_length=64", "--num_train_steps=1")
    assert result.returncode == 2
    assert "128" in result.stderr and "64" in result.stderr


def test_deterministic_turns_on_op_determinism_and_repeats_the_run(tmp_path, sample):
    # (Without the flag it is off: test_default_run_trains_and_the_loss_falls.)
    checksums = []
    for name in ("first", "second"):
        out = tmp_path / name
        result = run_tfbert(f"--output_dir={out}", "--deterministic", "--num_train_steps=2",
                            *TINY_STEPS)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["op_determinism"] is True
        checksums.append(summary["per_rank"]["weights_checksum"])
    assert checksums[0] == checksums[1]
