"""The benchmark scripts run and write one CSV row per setup."""

import functools
import importlib.util
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT, odd_model_config
from tfbert.training.sharding import model_variable_shapes


def run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs benchmarks/SCRIPT ARGS from the repository root; asserts it succeeded."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_throughput_benchmark_writes_a_row_per_setup(tmp_path, tfbert_cache):
    csv = tmp_path / "throughput.csv"
    result = run_benchmark("throughput.py", "--precisions=fp32", "--xla_modes=off,jit",
                           "--steps=3", "--batch=8", f"--csv={csv}")
    table = pd.read_csv(csv)
    assert list(table["setup"]) == ["fp32+xla=off", "fp32+xla=jit"]
    assert (table["examples_per_sec"] > 0).all()
    assert "| setup" in result.stdout  # the printed Markdown table


def test_optimizer_benchmark_times_each_way_of_the_lamb_step(tmp_path):
    from tfbert.ops import loader

    if not loader.ops_available():
        pytest.skip("the op library is not built")
    csv = tmp_path / "optimizer.csv"
    result = run_benchmark("optimizer_bench.py", "--models=tiny", "--vocab_size=500",
                           "--steps=1", "--repeats=2", f"--csv={csv}")
    table = pd.read_csv(csv)
    assert list(table["way"]) == ["multi", "multi_cond", "per_tensor", "reference", "tfa"]
    assert (table["ms_per_step"] > 0).all()
    assert table["vs_per_tensor"][2] == 1.0
    # Every trainable variable of the tiny pretrainer is stepped.
    assert (table["tensors"] == 46).all()
    assert "| model" in result.stdout


def test_ablation_writes_a_row_per_setup_a_table_and_a_chart(tmp_path, tfbert_cache):
    out = tmp_path / "ablation"
    run_benchmark("ablation.py", "--setups=baseline,optimal,optimald", "--steps=2",
                  "--size=--model=tiny --num_hidden_layers=1 --train_batch_size=4 "
                  "--max_seq_length=32 --max_predictions_per_seq=5", "--fp16_as=bf16",
                  f"--out={out}", timeout=900)
    table = pd.read_csv(f"{out}.csv")
    assert list(table["setup"]) == ["baseline", "optimal", "optimald"]
    assert list(table["status"]) == ["ok", "ok", "ok"]
    # optimal is fp16 with Horovod's fp16 compression (from base.cfg): run as bf16, it drops the
    # compression too, and says so; baseline (fp32) runs as its flagfile says. optimald (ZeRO-2,
    # float16 accumulators) also accumulates in float32 and, ZeRO refusing one process, runs
    # with 2 ranks.
    assert list(table["substituted"].fillna("")) == [
        "", "precision fp16->bf16; hvd_fp16_compression off",
        "precision fp16->bf16; hvd_fp16_compression off; grad_accum_dtype float16->float32; "
        "ranks 1->2 (ZeRO needs 2 replicas)"]
    assert list(table["ranks"]) == [1, 1, 2]
    assert "--nohvd_fp16_compression" in table["flags"][1]
    assert (table["examples_per_sec"] > 0).all()
    # The notes' own figures sit beside the measured ones.
    assert table["notes_max_gb"].tolist() == [69.4, 30.8, 26.61]
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "| optimal |" in (tmp_path / "ablation.md").read_text()


def test_zero_benchmark_halves_the_optimizer_state_per_rank(tmp_path, tfbert_cache):
    # One 2-rank job (ZeRO-2, flat): data parallelism's m and v are twice the parameter bytes.
    out = tmp_path / "zero"
    result = run_benchmark("zero.py", "--setups=zero2-flat", "--steps=2", "--repeats=1",
                           "--size=--model=tiny --num_hidden_layers=1 --train_batch_size=4 "
                           "--max_seq_length=32 --max_predictions_per_seq=5", f"--out={out}")
    table = pd.read_csv(f"{out}.csv").set_index("setup")
    assert list(table.index) == ["zero2-flat"]
    zero = table.loc["zero2-flat"]
    assert zero["status"] == "ok" and zero["zero_stage"] == 2
    assert zero["examples_per_sec_total"] > 0
    # Two ranks: each holds half of m and v (2 x 4 bytes per parameter); flat splits to one
    # element, so the largest and smallest shares agree.
    assert abs(zero["optimizer_state_bytes_max"] / zero["param_bytes_max"] - 1.0) < 0.005
    assert abs(zero["optimizer_state_bytes_min"] / zero["optimizer_state_bytes_max"] - 1) < 0.01
    assert "| zero2-flat |" in result.stdout  # the printed Markdown table
    assert (tmp_path / "zero.png").stat().st_size > 0


def test_reference_comparison_runs_both_implementations(tmp_path, tfbert_cache):
    from tfbert.data.sample import sample_corpus_files
    from tfbert.tokenization import train_sentencepiece

    csv = tmp_path / "reference.csv"
    # Both sides on a tokenizer of another size than the sample's own (--vocab_file).
    vocab_file = train_sentencepiece(sample_corpus_files(), str(tmp_path / "spm600"), 600)
    # The best setup only (the plain one is the same code path in float32): each side at its
    # best in bfloat16, tfbert with the fused ops and the fused LAMB.
    result = run_benchmark("compare_reference.py", "--model=tiny", "--setups=best",
                           "--repeats=1", "--steps=2", "--batch=8", "--seq=32",
                           "--predictions=5", f"--vocab_file={vocab_file}", f"--csv={csv}")
    table = pd.read_csv(csv)
    assert list(table["implementation"]) == ["tfbert", "tf-models-official BertPretrainer"]
    assert list(table["setup"]) == ["best", "best"]
    assert list(table["precision"]) == ["bf16", "bf16"]
    assert list(table["vocab_size"]) == [600, 600]
    assert "--attn_softmax_ytf_impl" in table["flags"][0]
    assert (table["examples_per_sec"] > 0).all()
    assert ((table["mfu"] > 0) & (table["mfu"] < 2)).all()
    assert (table["first_step_secs"] > 0).all()
    # Same model size and data: the untrained losses agree, about ln 600 + ln 2 (not ln 4000).
    assert abs(table["first_loss"][0] - table["first_loss"][1]) < 0.1
    assert abs(table["first_loss"][0] - (math.log(600) + math.log(2))) < 0.5
    assert "| best" in result.stdout and "speed_vs_reference" in result.stdout
    assert "vocabulary 600" in result.stdout


# The tensor-parallel benchmark's volume functions, without training.


@pytest.fixture
def tp_bench(monkeypatch):
    """benchmarks/tensor_parallel.py as a module (it imports benchmarks/jobs.py)."""
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "tensor_parallel_benchmark", os.path.join(REPO_ROOT, "benchmarks", "tensor_parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hand_split_elements(config) -> tuple[int, int]:
    """(replicated, split) elements, the split variables listed by hand (not by split_of)."""
    split_suffixes = ("attention/self/query/kernel", "attention/self/query/bias",
                      "attention/self/key/kernel", "attention/self/key/bias",
                      "attention/self/value/kernel", "attention/self/value/bias",
                      "attention/output/dense/kernel", "intermediate/dense/kernel",
                      "intermediate/dense/bias", "/output/dense/kernel")
    replicated = split = 0
    for name, shape in model_variable_shapes(config).items():
        size = math.prod(shape)
        if (name in ("bert/embeddings/word_embeddings", "cls/predictions/output_bias")
                or (name.startswith("bert/encoder/") and name.endswith(split_suffixes))):
            split += size
        else:
            replicated += size
    return replicated, split


@pytest.mark.parametrize("hidden_act", ["gelu", "geglu"])
def test_tensor_parallel_benchmark_parameter_and_gradient_bytes_per_rank(tp_bench, hidden_act):
    # Odd sizes that split in two (vocabulary 98, 38 FFN features, 4 heads) but not in four.
    config = odd_model_config(vocab_size=98, intermediate_size=38, hidden_act=hidden_act)
    replicated, split = hand_split_elements(config)
    assert replicated > 0 and split > 0
    assert tp_bench.parameter_bytes_per_rank(config, 1) == 4 * (replicated + split)
    assert tp_bench.parameter_bytes_per_rank(config, 2) == 4 * (replicated + split // 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4"):
        tp_bench.parameter_bytes_per_rank(config, 4)
    # 37 FFN features do not split in two, even where GeGLU's kernel holds 2 x 37 columns.
    with pytest.raises(ValueError, match="intermediate/dense"):
        tp_bench.parameter_bytes_per_rank(odd_model_config(vocab_size=98, hidden_act=hidden_act),
                                          2)
    # Data parallelism: each rank's own float16 gradients, ring all-reduced over 8 / 2 = 4 ranks.
    rank_bytes = 2 * (replicated + split // 2)
    assert tp_bench.data_parallel_bytes(config, 2, 8, 2) == pytest.approx(
        2 * 3 / 4 * rank_bytes)
    assert tp_bench.data_parallel_bytes(config, 2, 2, 2) == 0  # one replica: nothing to sum


def test_tensor_parallel_benchmark_activation_bytes(tp_bench):
    config = odd_model_config(num_hidden_layers=3)
    batch, seq, predictions, d = 13, 7, 3, config.hidden_size
    volume = functools.partial(tp_bench.tensor_parallel_bytes, batch=batch, seq=seq,
                               predictions=predictions, dtype_bytes=2)
    assert volume(config, 1) == 0
    # Per layer 2 forward + 2 backward [B, S, D] in 2 bytes; the embedding lookup's [B, S, D]
    # in float32; the MLM head's [B, P, D] gradient; the cross-entropy's max, 2 sums, argmax.
    tensors = (4 * 3 * batch * seq * d * 2 + batch * seq * d * 4 + batch * predictions * d * 2
               + 4 * batch * predictions * 4)
    assert volume(config, 2) == pytest.approx(2 * 1 / 2 * tensors)
    assert volume(config, 4) == pytest.approx(2 * 3 / 4 * tensors)
    # Two more layers add their 4 all-reduces each, and nothing else.
    deeper = odd_model_config(num_hidden_layers=5)
    assert volume(deeper, 2) - volume(config, 2) == pytest.approx(2 * 4 * batch * seq * d * 2)
