"""Flags -> frozen Config: round trips, precedence and the start-up errors that name a flag."""

import dataclasses
import json

import pytest
from absl import flags

from tfbert import config as cfg
from tfbert import run
from tfbert.training.run_dir import prepare_output_dir


def parse(*argv):
    flag_values = flags.FlagValues()
    run.define_flags(flag_values)
    flag_values(["tfbert.run", *argv])
    return flag_values


def build(*argv, tokenizer_size=None, monkeypatch=None):
    """Config from flags with pre-tokenized (non-existent) input files: no tokenizer involved."""
    return run.build_config(parse("--input_files=/data/part-*.tfrecord", *argv))[0]


def test_flagfile_round_trips_to_the_same_config(tmp_path):
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("--model=mini\n--vocab_size=1000\n--hidden_act=geglu\n--precision=bf16\n"
                        "--xla=auto\n--optimizer=adamw\n--learning_rate=3e-4\n"
                        "--use_bias_in_keys=false\n--train_batch_size=12\n--fused_qkv\n"
                        f"--output_dir={tmp_path / 'out'}\n")
    config = build(f"--flagfile={flagfile}")
    assert config.model.hidden_size == 256 and config.model.hidden_act == "geglu"
    assert config.model.use_bias_in_keys is False and config.runtime.xla == "auto"
    assert config.ops.fused_qkv and not config.ops.any  # no custom op asked for
    # Flags written back out parse to the same config ...
    again = tmp_path / "again.cfg"
    again.write_text(parse(f"--flagfile={flagfile}",
                           "--input_files=/data/part-*.tfrecord").flags_into_string())
    assert build(f"--flagfile={again}") == config
    # ... and so does the saved config.json.
    config.save(str(tmp_path / "config.json"))
    assert cfg.Config.load(str(tmp_path / "config.json")) == config


def test_flagfiles_compose_by_inclusion(tmp_path):
    base = tmp_path / "base.cfg"
    base.write_text("--model=mini\n--vocab_size=1000\n--precision=fp16\n")
    derived = tmp_path / "derived.cfg"
    derived.write_text(f"--flagfile={base}\n--hidden_act=gelu_tanh\n")
    config = build(f"--flagfile={derived}", "--output_dir=/tmp/x")
    assert config.runtime.precision == "fp16" and config.model.hidden_act == "gelu_tanh"
    assert config.model.num_hidden_layers == 4


def test_precedence_preset_then_bert_config_then_flags(tmp_path):
    bert_config = tmp_path / "bert_config.json"
    bert_config.write_text(json.dumps(dict(vocab_size=500, hidden_size=64, num_attention_heads=4,
                                           num_hidden_layers=3, directionality="bidi")))
    config = build(f"--bert_config_file={bert_config}", "--num_hidden_layers=5", "--output_dir=x")
    assert config.model.vocab_size == 500 and config.model.hidden_size == 64
    assert config.model.num_hidden_layers == 5  # the flag wins
    assert config.model.intermediate_size == 512  # from the tiny preset


@pytest.mark.parametrize("argv,message", [
    (["--vocab_size=100", "--hidden_size=130", "--num_attention_heads=4"],
     "--hidden_size=130 is not divisible by --num_attention_heads=4"),
    (["--vocab_size=100", "--max_seq_length=1024"], "--max_seq_length=1024 exceeds"),
    (["--vocab_size=100", "--num_warmup_steps=-1"], "--num_warmup_steps"),
    (["--vocab_size=100", "--max_predictions_per_seq=200"], "--max_predictions_per_seq=200"),
    (["--vocab_size=100", "--model=huge"], "--model='huge'"),
    (["--vocab_size=100", "--hidden_dropout_prob=1.5"], "--hidden_dropout_prob"),
    (["--vocab_size=100", "--dynamic_masking"], "--dynamic_masking needs --vocab_file"),
    ([], "vocabulary size is unknown"),
    (["--vocab_size=100", "--hvd_fp16_compression"], "--hvd_fp16_compression acts on the all-reduce"),
    (["--vocab_size=100", "--hvd_stall_shutdown_secs=5"],
     "--hvd_stall_shutdown_secs acts on the all-reduce"),
    (["--vocab_size=100", "--max_consecutive_nonfinite_steps=0"],
     "--max_consecutive_nonfinite_steps must be positive"),
    (["--vocab_size=100", "--step_timeout_secs=-1"],
     "--step_timeout_secs and --first_step_timeout_secs must be >= 0"),
    (["--vocab_size=100", "--save_checkpoints_secs=-1"], "--save_checkpoints_secs must be >= 0"),
    (["--vocab_size=100", "--grad_accum_dtype=float16"], "--grad_accum_dtype=float16 needs --precision=fp16"),
    (["--vocab_size=100", "--num_accumulation_steps=0"], "--num_accumulation_steps must be >= 1"),
    (["--vocab_size=100", "--ln_ytf_impl", "--xla=jit"], "--xla=jit compiles the whole step"),
    (["--vocab_size=100", "--optimizer=fused_lamb", "--xla=jit"], "custom ops of --optimizer=fused_lamb"),
    (["--vocab_size=100", "--fused_bias_dropout_add", "--xla=jit"],
     "custom ops of --fused_bias_dropout_add"),
    (["--vocab_size=100", "--fused_xent", "--xla=jit"], "custom ops of --fused_xent"),
    (["--vocab_size=100", "--ytf_gelu", "--hidden_act=relu"], "--ytf_gelu fuses GELU/GeGLU"),
    (["--vocab_size=100", "--gelu_save_derivative"], "add --ytf_gelu"),
    (["--vocab_size=100", "--fused_qkv_split"], "add --fused_qkv"),
    (["--vocab_size=100", "--ytf_gelu", "--gelu_save_derivative", "--hidden_act=geglu"],
     "--gelu_save_derivative saves GELU's derivative"),
])
def test_invalid_settings_fail_at_start_naming_the_flag(argv, message):
    with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(")):
        build("--output_dir=x", *argv)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_float16_compression_needs_the_fp16_loss_scale(precision):
    # Without a loss scale, float16 flushes small fp32/bf16 gradients to zero on the wire.
    config = build("--vocab_size=100", "--output_dir=x")
    with pytest.raises(cfg.ConfigError, match=f"--hvd_fp16_compression .* --precision={precision}"):
        dataclasses.replace(
            config, runtime=dataclasses.replace(config.runtime, precision=precision),
            distribution=dataclasses.replace(config.distribution, hvd_fp16_compression=True))
    dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, precision="fp16"),
                        distribution=dataclasses.replace(config.distribution,
                                                         hvd_fp16_compression=True))


def test_bert_config_with_unknown_computation_is_refused(tmp_path):
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(dict(vocab_size=10, position_embedding_type="relative_key")))
    with pytest.raises(cfg.ConfigError, match="position_embedding_type"):
        build(f"--bert_config_file={path}", "--output_dir=x")


def test_output_dir_of_another_model_is_refused(tmp_path):
    config = build("--vocab_size=100", f"--output_dir={tmp_path}")
    prepare_output_dir(config)
    prepare_output_dir(dataclasses.replace(config, optimizer=cfg.OptimizerConfig(learning_rate=1)))
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_size=64))
    with pytest.raises(cfg.ConfigError, match="different model.*hidden_size"):
        prepare_output_dir(other)
    saved = json.loads((tmp_path / "bert_config.json").read_text())
    assert saved["hidden_size"] == 128 and saved["vocab_size"] == 100


def test_presets_have_the_sizes_of_the_notes():
    def params(name, vocab=100_000):
        m = cfg.ModelConfig(vocab_size=vocab, **cfg.MODEL_PRESETS[name])
        per_layer = 4 * m.hidden_size ** 2 + 2 * m.hidden_size * m.intermediate_size
        return m.num_hidden_layers * per_layer + vocab * m.hidden_size

    assert params("xlarge") == pytest.approx(1.4e9, rel=0.05)
    assert params("48x2048") == pytest.approx(2.6e9, rel=0.05)
    assert params("64x2048") == pytest.approx(3.4e9, rel=0.05)
    assert params("36x3072") == pytest.approx(4.4e9, rel=0.05)
    assert params("48x3072") == pytest.approx(5.75e9, rel=0.05)
    large = cfg.MODEL_PRESETS["large"]
    assert (large["num_hidden_layers"], large["hidden_size"]) == (24, 1024)


def test_fused_op_without_the_library_fails_at_start_saying_how_to_build(monkeypatch, tmp_path):
    from tfbert.ops import loader

    monkeypatch.setattr(loader, "LIBRARY_PATH", str(tmp_path / "missing.so"))
    loader.load_ops.cache_clear()
    try:
        with pytest.raises(cfg.ConfigError, match="--attn_softmax_ytf_impl.*make ops"):
            build("--vocab_size=100", "--attn_softmax_ytf_impl", "--output_dir=x")
    finally:
        loader.load_ops.cache_clear()


def test_the_fused_op_flags_reach_the_config():
    # Each flag lands in FusedOpsConfig (the model tests then count the ops it puts in the
    # step graph): a flag parsed and dropped here would fail.
    config = build("--vocab_size=100", "--output_dir=x", "--ytf_gelu", "--gelu_save_derivative",
                   "--fused_qkv", "--fused_qkv_split", "--fused_xent")
    ops = config.ops
    assert ops.gelu_save_derivative and ops.fused_qkv_split and ops.fused_xent
    assert {"--fused_qkv_split", "--fused_xent"} <= set(ops.enabled_flags())
