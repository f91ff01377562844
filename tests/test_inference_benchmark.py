"""benchmarks/inference.py: a table of size, latency and throughput for a teacher and its student.

Timings are only checked for being positive and finite: which model is faster on a shared
2-core machine is not something a test can rely on.
"""

import importlib.util
import math
import os

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, odd_model_config
from test_benchmarks import run_benchmark
from tfbert.checkpoints import google, huggingface, native
from tfbert.checkpoints.pretrained import model_arrays
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import BertPretrainer

MIB = 2 ** 20
# What a tiny run measures: short sequences, one warm-up and two timed calls per model.
QUICK = ["--seq_length=32", "--repeats=2", "--warmup=1"]


def encoder_params(vocab, hidden, layers, intermediate, positions=512, types=2) -> int:
    """BERT's encoder parameters, counted by hand: embeddings and their LayerNorm; per layer
    Q, K, V and the attention output, two LayerNorms, the FFN; the pooler."""
    embeddings = (vocab + positions + types) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + 5 * hidden
    return embeddings + layers * layer + hidden * hidden + hidden


def head_params(vocab, hidden) -> int:
    """The pretraining heads: MLM transform (dense + LayerNorm) and output bias, NSP."""
    return hidden * hidden + 3 * hidden + vocab + 2 * hidden + 2


def write_model(directory, config, to=huggingface) -> dict[str, np.ndarray]:
    """A random-weight model of `config` written to `directory` (module `to`'s format)."""
    model = BertPretrainer(config, rng=DropoutRng(0))
    model.build()
    arrays = model_arrays(model)
    to.write(str(directory), config, arrays)
    return arrays


def check_outputs(out, stdout, precisions, shapes):
    """The CSV, Markdown and PNG of one run. shapes: {model: (vocab, hidden, layers, ffn,
    positions)}."""
    table = pd.read_csv(out / "inference.csv")
    devices = sorted(set(table["device"]))
    assert "CPU" in devices
    assert sorted(zip(table["model"], table["precision"], table["device"])) == sorted(
        (m, p, d) for m in ("teacher", "student") for p in precisions for d in devices)
    for name, (vocab, hidden, layers, ffn, positions) in shapes.items():
        rows = table[table["model"] == name]
        assert (rows["layers"] == layers).all() and (rows["hidden"] == hidden).all()
        # The timed encoder's parameters, and the checkpoint's (the pretraining heads too).
        assert (rows["params"] == encoder_params(vocab, hidden, layers, ffn, positions)).all()
        assert (rows["checkpoint_params"]
                == rows["params"] + head_params(vocab, hidden)).all()
        # float32 files: 4 bytes per parameter, plus a header (safetensors: its JSON index).
        stored = rows["size_checkpoint_mb"] * MIB
        assert ((stored >= 4 * rows["checkpoint_params"])
                & (stored <= 4 * rows["checkpoint_params"] + 64 * 1024)).all()
        # The SavedModel: the encoder's float32 variables plus the serving graph.
        saved = rows["size_savedmodel_mb"] * MIB
        assert ((saved >= 4 * rows["params"]) & (saved <= 4 * rows["params"] + 2 * MIB)).all()
        for column in ("latency_s", "latency_min_s", "latency_max_s", "throughput",
                       "throughput_min", "throughput_max"):
            assert (np.isfinite(rows[column]) & (rows[column] > 0)).all(), column
        assert (rows["latency_min_s"] <= rows["latency_s"]).all()
        assert (rows["latency_s"] <= rows["latency_max_s"]).all()
        assert (rows["traces"] == 1).all()  # one trace serves both batch sizes
    teacher = table[table["model"] == "teacher"].set_index(["precision", "device"])
    student = table[table["model"] == "student"].set_index(["precision", "device"])
    assert (student["size_checkpoint_mb"] < teacher["size_checkpoint_mb"]).all()
    assert (student["size_savedmodel_mb"] < teacher["size_savedmodel_mb"]).all()
    markdown = (out / "inference.md").read_text()
    for precision in precisions:
        assert f"| Teacher | {precision} |" in markdown
        assert f"| Student vs teacher | {precision} |" in markdown
    assert "| Student vs teacher |" in stdout  # the printed table
    assert (out / "inference.png").stat().st_size > 0
    return table


def test_random_teacher_and_student_from_a_preset(tmp_path):
    out = tmp_path / "inference"
    result = run_benchmark("inference.py", "--teacher_model=tiny", "--student_layers=1",
                           "--vocab_size=300", "--precisions=fp32,bf16", *QUICK,
                           f"--output_dir={out}")
    check_outputs(out, result.stdout, ["fp32", "bf16"],
                  {"teacher": (300, 128, 2, 512, 512), "student": (300, 128, 1, 512, 512)})


def test_teacher_and_student_checkpoints(tmp_path):
    # BERT's tester sizes (nothing a multiple of 8), as HuggingFace directories.
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    write_model(teacher, odd_model_config(num_hidden_layers=3))
    write_model(student, odd_model_config(num_hidden_layers=1))
    out = tmp_path / "inference"
    result = run_benchmark("inference.py", f"--teacher={teacher}", f"--student={student}",
                           "--precisions=fp32", *QUICK, f"--output_dir={out}")
    table = check_outputs(out, result.stdout, ["fp32"],
                          {"teacher": (99, 32, 3, 37, 64), "student": (99, 32, 1, 37, 64)})
    assert set(table["path"]) == {str(teacher), str(student)}


@pytest.fixture
def inference_bench(monkeypatch):
    """benchmarks/inference.py as a module (it imports benchmarks/jobs.py)."""
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "inference_benchmark", os.path.join(REPO_ROOT, "benchmarks", "inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_size_counts_the_weight_files_of_each_format(tmp_path, inference_bench):
    config = odd_model_config(hidden_act="gelu_tanh")  # google's configs know no exact GELU
    arrays = write_model(tmp_path / "google", config, to=google)
    weight_bytes = 4 * sum(math.prod(a.shape) for a in arrays.values())
    files = inference_bench.checkpoint_files(str(tmp_path / "google"))
    assert {os.path.basename(f).split(".")[1] for f in files} == {"ckpt"}
    assert weight_bytes <= sum(os.path.getsize(f) for f in files) <= weight_bytes + 64 * 1024

    # A tfbert run directory: only its latest checkpoint counts.
    run_dir = tmp_path / "run"
    for step in (1, 2):
        native.write_tensors(str(run_dir / f"ckpt-{step}"), arrays)
    native.write_index(str(run_dir), "ckpt-2", ["ckpt-1", "ckpt-2"])
    files = inference_bench.checkpoint_files(str(run_dir))
    assert files and all(os.path.basename(f).startswith("ckpt-2.") for f in files)

    write_model(tmp_path / "hf", config)
    assert inference_bench.checkpoint_files(str(tmp_path / "hf")) == [
        str(tmp_path / "hf" / huggingface.SAFETENSORS_FILE)]
