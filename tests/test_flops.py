"""Model FLOPs of a pretraining example and the cached matmul peak (tfbert.training.flops)."""

import json
import math

import pytest

from tfbert import config as cfg
from tfbert.training import flops


def mini(**overrides) -> cfg.ModelConfig:
    """The mini preset with an 8000-token vocabulary."""
    values = dict(vocab_size=8000, **cfg.MODEL_PRESETS["mini"])
    values.update(overrides)
    return cfg.ModelConfig(**values)


def test_mini_model_flops_match_a_hand_computation():
    # 4 layers, D=256, I=1024, V=8000, S=128, P=20, written out term by term.
    per_layer = (4 * 2 * 128 * 256 * 256  # query, key, value, output projections
                 + 2 * 2 * 128 * 128 * 256  # QK^T and probs @ V
                 + 2 * 2 * 128 * 256 * 1024)  # the two FFN projections
    heads = 2 * 20 * 256 * 256 + 2 * 20 * 256 * 8000  # MLM transform and vocabulary
    pooler_nsp = 2 * 256 * 256 + 2 * 256 * 2
    forward = 4 * per_layer + heads + pooler_nsp
    assert flops.model_flops_per_example(mini(), 128, 20, training=False) == forward
    assert flops.model_flops_per_example(mini(), 128, 20) == 3 * forward
    assert abs(flops.model_flops_per_example(mini(), 128, 20) / 1e9 - 2.87) < 0.01


def test_flops_grow_linearly_with_layers():
    one, two, three = (flops.model_flops_per_example(mini(num_hidden_layers=n), 128, 20)
                       for n in (1, 2, 3))
    assert three - two == two - one > 0
    # The heads do not depend on the depth.
    parts = flops.forward_flops_by_part(mini(num_hidden_layers=3), 128, 20)
    assert parts["mlm_vocab"] == flops.forward_flops_by_part(mini(), 128, 20)["mlm_vocab"]


def test_doubling_the_sequence_doubles_projections_and_quadruples_attention_scores():
    short = flops.forward_flops_by_part(mini(), 128, 20)
    long = flops.forward_flops_by_part(mini(), 256, 20)
    assert long["attention_projections"] == 2 * short["attention_projections"]
    assert long["ffn"] == 2 * short["ffn"]
    assert long["attention_scores_context"] == 4 * short["attention_scores_context"]
    # The MLM head runs on the P masked positions only.
    assert long["mlm_vocab"] == short["mlm_vocab"]
    assert long["mlm_transform"] == short["mlm_transform"]


def test_geglu_widens_the_first_ffn_projection():
    gelu = flops.forward_flops_by_part(mini(), 128, 20)["ffn"]
    geglu = flops.forward_flops_by_part(mini(hidden_act="geglu"), 128, 20)["ffn"]
    # 2SD(2I) + 2SID against 2SDI + 2SID.
    assert geglu * 2 == gelu * 3


def test_more_predictions_cost_only_in_the_mlm_head():
    few = flops.forward_flops_by_part(mini(), 128, 20)
    many = flops.forward_flops_by_part(mini(), 128, 40)
    assert {k for k in few if few[k] != many[k]} == {"mlm_transform", "mlm_vocab"}
    with pytest.raises(ValueError, match="seq_length"):
        flops.model_flops_per_example(mini(), 0, 20)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_peak_is_a_positive_finite_rate(dtype):
    peak = flops.measure_matmul_peak(dtype, size=128, repeats=3, warmup=1)
    assert math.isfinite(peak) and peak > 0


def test_matmul_peak_refuses_other_dtypes():
    with pytest.raises(ValueError, match="int32"):
        flops.measure_matmul_peak("int32", size=8)


def test_cached_peak_is_measured_once_per_device_and_dtype(tmp_path, monkeypatch):
    calls = []

    def fake_measure(dtype, size, device):
        calls.append((dtype, size, device))
        return 1e9 * len(calls)

    monkeypatch.setattr(flops, "measure_matmul_peak", fake_measure)
    assert flops.matmul_peak("bfloat16", 64, cache_dir=str(tmp_path)) == 1e9
    assert flops.matmul_peak("bfloat16", 64, cache_dir=str(tmp_path)) == 1e9  # from the file
    assert len(calls) == 1
    # Another dtype or size is another entry; refresh measures again.
    assert flops.matmul_peak("float32", 64, cache_dir=str(tmp_path)) == 2e9
    assert flops.matmul_peak("bfloat16", 64, cache_dir=str(tmp_path), refresh=True) == 3e9
    assert flops.matmul_peak("bfloat16", 64, cache_dir=str(tmp_path)) == 3e9
    assert len(calls) == 3
    with open(tmp_path / flops.PEAK_CACHE_FILE) as f:
        cached = json.load(f)
    assert len(cached) == 2
    key = next(k for k in cached if "| bfloat16 | 64 |" in k)
    assert key.startswith(flops.device_description())
    assert cached[key]["flops_per_sec"] == 3e9


def test_cache_lives_in_tfbert_cache_dir_and_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBERT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda dtype, size, device: 5e9)
    (tmp_path / flops.PEAK_CACHE_FILE).write_text("{not json")
    assert flops.matmul_peak("float32", 32) == 5e9
    assert json.loads((tmp_path / flops.PEAK_CACHE_FILE).read_text())


def test_a_run_reports_its_model_flops_utilisation(tmp_path, monkeypatch):
    """summary.json holds the model FLOPs per example (the pretrainer's, with its MLM head), the
    achieved model TFLOP/s and the MFU against the (here: stubbed) cached peak."""
    from conftest import run_config, synthetic_dataset
    from tfbert.training.trainer import Trainer

    monkeypatch.setenv("TFBERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)
    config = run_config(tmp_path / "run", num_train_steps=4)
    summary = Trainer(config, synthetic_dataset()).train()
    expected = flops.model_flops_per_example(config.model, 16, 3)
    assert summary["model_flops_per_example"] == expected
    achieved = summary["examples_per_sec"] * expected
    assert summary["model_tflops_per_sec"] == pytest.approx(achieved / 1e12)
    assert summary["matmul_peak_tflops"] == pytest.approx(0.1)
    assert summary["mfu"] == pytest.approx(achieved / 1e11)
    with open(tmp_path / "run" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["mfu"] == pytest.approx(summary["mfu"])
