"""Frozen, validated configuration of a tfbert run.

Configuration flows one way: the entry point (`tfbert/run.py`) turns its flags into a `Config`
once, validates it, logs it and writes it as `config.json` beside the checkpoints. Library code
takes explicit arguments or one of these dataclasses; nothing below the entry point reads flags.

Field names follow google-research/bert's `run_pretraining.py` and `bert_config.json` where those
have the same setting, so a flag, a field and a JSON key share one name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

PRECISIONS = ("fp32", "fp16", "bf16")
XLA_MODES = ("off", "auto", "jit")
# Grappler's memory optimizer modes (tfbert.training.grappler.MEMORY_OPTIMIZATIONS).
MEMORY_OPTIMIZATIONS = ("default", "no", "manual", "heuristic", "recomputation", "scheduling",
                        "swapping")
OPTIMIZERS = ("lamb", "adamw", "fused_lamb")
TOKENIZER_TYPES = ("sentencepiece", "wordpiece")
HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu", "geglu")

# Sizes from the benchmark notes. Parameter counts are with a 100k vocabulary; the vocabulary
# itself comes from the tokenizer (or --vocab_size / --bert_config_file).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # For tests and the embedded default run on a CPU.
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    # ~1.4B
    "xlarge": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, intermediate_size=8192),
    # ~2.6B
    "48x2048": dict(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, intermediate_size=8192),
    # ~3.4B
    "64x2048": dict(num_hidden_layers=64, hidden_size=2048, num_attention_heads=32, intermediate_size=8192),
    # ~4.4B
    "36x3072": dict(num_hidden_layers=36, hidden_size=3072, num_attention_heads=48, intermediate_size=12288),
    # ~5.75B
    "48x3072": dict(num_hidden_layers=48, hidden_size=3072, num_attention_heads=48, intermediate_size=12288),
}


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work. The message names the flag."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The encoder's shape. Keys match google-research/bert's `bert_config.json`."""

    vocab_size: int
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    use_bias_in_keys: bool = True

    def __post_init__(self):
        _require(self.vocab_size > 0, f"--vocab_size must be positive, got {self.vocab_size}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            _require(getattr(self, name) > 0, f"--{name} must be positive, got {getattr(self, name)}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"--hidden_size={self.hidden_size} is not divisible by "
                 f"--num_attention_heads={self.num_attention_heads}")
        _require(self.hidden_act in HIDDEN_ACTS,
                 f"--hidden_act={self.hidden_act!r} is not one of {HIDDEN_ACTS}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"--{name} must be in [0, 1), got {value}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_bert_config(self) -> dict[str, Any]:
        """The google-research/bert `bert_config.json` dictionary (plus tfbert's extra keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def bert_config_overrides(cls, path: str) -> dict[str, Any]:
        """Reads a google-style `bert_config.json`; returns the keys this class knows.

        Keys that change the computation but that tfbert does not implement are an error rather
        than silently dropped; purely descriptive keys (e.g. "directionality") are ignored.
        """
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--bert_config_file={path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--bert_config_file={path} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        descriptive = {"directionality", "pooler_fc_size", "pooler_num_attention_heads",
                       "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type",
                       "model_type", "architectures", "torch_dtype", "transformers_version"}
        unknown = set(raw) - known - descriptive
        _require(not unknown, f"--bert_config_file={path} has keys tfbert does not implement: "
                              f"{sorted(unknown)}")
        return {k: v for k, v in raw.items() if k in known}


LN_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class FusedOpsConfig:
    """How some computations are implemented: tfbert's fused custom ops (custom_ops/, built by
    `make ops`) and the dtype of the LayerNorm statistics.

    Not part of the model's shape: a run may resume with other settings here.
    """

    ln_ytf_impl: bool = False  # fused LayerNorm forward/backward
    attn_softmax_ytf_impl: bool = False  # fused scale + mask + softmax + dropout
    ytf_gelu: bool = False  # fused bias + GELU / GeGLU in the feed-forward block
    # With ytf_gelu (GELU): keep gelu'(x + bias) from the forward op for the backward one
    # instead of x, which is then not recomputed through erf and exp.
    gelu_save_derivative: bool = False
    ytf_dropout: bool = False  # the encoder's hidden dropout as one fused op, mask regenerated
    # Each sublayer's output bias, hidden dropout and residual add as one fused op before its
    # LayerNorm (the mask of --ytf_dropout).
    fused_bias_dropout_add: bool = False
    fused_qkv: bool = False  # Q, K and V projected by one matmul (no custom op)
    # With fused_qkv: its bias add and the split into Q, K and V heads as one op.
    fused_qkv_split: bool = False
    # The softmax cross-entropy losses (the MLM head's with its output bias) and their argmax
    # as one op on the logits in the compute dtype.
    fused_xent: bool = False
    # dtype of the LayerNorm mean and variance. float32 by default: a float16 variance of
    # activations in the hundreds overflows. A lower dtype saves the float32 copy of the input.
    ln_dtype: str = "float32"

    # The boolean fields above, each a --flag that asks for a fused op.
    FLAGS: ClassVar[tuple[str, ...]] = ("ln_ytf_impl", "attn_softmax_ytf_impl", "ytf_gelu",
                                        "ytf_dropout", "fused_bias_dropout_add", "fused_xent",
                                        "fused_qkv_split")

    def __post_init__(self):
        _require(not self.fused_qkv_split or self.fused_qkv,
                 "--fused_qkv_split splits the projection of --fused_qkv into heads; add "
                 "--fused_qkv")
        _require(not self.gelu_save_derivative or self.ytf_gelu,
                 "--gelu_save_derivative keeps the derivative of --ytf_gelu's fused op; add "
                 "--ytf_gelu")
        _require(self.ln_dtype in LN_DTYPES,
                 f"--ln_dtype={self.ln_dtype!r} is not one of {LN_DTYPES}")
        _require(not self.ln_ytf_impl or self.ln_dtype == "float32",
                 f"--ln_ytf_impl keeps the LayerNorm statistics in float32; it cannot honour "
                 f"--ln_dtype={self.ln_dtype} (drop one of the two)")

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in self.FLAGS)

    def enabled_flags(self) -> list[str]:
        """The --flags that ask for fused ops (for error messages)."""
        return [f"--{name}" for name in self.FLAGS if getattr(self, name)]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training data come from and how they are batched: pretraining records, or a
    fine-tuning table (`input_files` is then that one file, and there are no masked
    predictions: `max_predictions_per_seq` is 0)."""

    input_files: tuple[str, ...]
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    train_batch_size: int = 32  # per rank
    num_readers: int = 4
    shuffle_buffer: int = 1000
    dynamic_masking: bool = False
    masked_lm_prob: float = 0.15
    tokenizer_type: str = "sentencepiece"
    vocab_file: str = ""

    def __post_init__(self):
        _require(len(self.input_files) > 0, "--input_files is empty")
        _require(self.max_seq_length > 2, f"--max_seq_length must be > 2, got {self.max_seq_length}")
        _require(0 <= self.max_predictions_per_seq <= self.max_seq_length,
                 f"--max_predictions_per_seq={self.max_predictions_per_seq} must be in "
                 f"(0, --max_seq_length={self.max_seq_length}]")
        _require(self.train_batch_size > 0, f"--train_batch_size must be positive, got "
                                            f"{self.train_batch_size}")
        _require(self.num_readers > 0, f"--num_readers must be positive, got {self.num_readers}")
        _require(self.shuffle_buffer > 0,
                 f"--shuffle_buffer must be positive, got {self.shuffle_buffer}")
        _require(0.0 < self.masked_lm_prob < 1.0,
                 f"--masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")
        _require(self.tokenizer_type in TOKENIZER_TYPES,
                 f"--tokenizer_type={self.tokenizer_type!r} is not one of {TOKENIZER_TYPES}")
        _require(not self.dynamic_masking or self.vocab_file,
                 "--dynamic_masking needs --vocab_file: the [MASK] id and the vocabulary used for "
                 "random replacements come from the tokenizer")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then polynomial decay)."""

    optimizer: str = "lamb"
    learning_rate: float = 1e-3
    num_warmup_steps: int = 0
    end_learning_rate: float = 0.0
    decay_power: float = 1.0
    weight_decay_rate: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-6
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    # Decoupled weight decay skips LayerNorm parameters and biases, as google-research/bert does.
    exclude_from_weight_decay: tuple[str, ...] = ("LayerNorm", "layer_norm", "bias")

    def __post_init__(self):
        _require(self.optimizer in OPTIMIZERS,
                 f"--optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        _require(self.learning_rate > 0,
                 f"--learning_rate must be positive, got {self.learning_rate}")
        _require(self.num_warmup_steps >= 0,
                 f"--num_warmup_steps must be >= 0, got {self.num_warmup_steps}")
        _require(self.weight_decay_rate >= 0,
                 f"--weight_decay_rate must be >= 0, got {self.weight_decay_rate}")
        _require(self.clip_norm >= 0,
                 f"--clip_norm must be >= 0 (0 turns clipping off), got {self.clip_norm}")
        _require(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1, "--beta_1/--beta_2 must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the training step runs: numerics, compilation, checkpoints, logging."""

    output_dir: str
    num_train_steps: int = 300
    precision: str = "fp32"
    xla: str = "off"
    # Grappler for the training step (tfbert.training.grappler).
    memory_optimization: str = "default"
    suppress_grappler: bool = False
    # TF2 variables are always resource variables; False cannot be honoured (see __post_init__).
    enable_resource_variables: bool = True
    seed: int = 12345
    deterministic: bool = False
    # Initial weights: a tfbert, HuggingFace or google-research/bert checkpoint (any format
    # tfbert.checkpoints.load_pretrained reads).
    init_checkpoint: str = ""
    # Word embeddings from FastText/word2vec vectors (tfbert.training.embedding_init), the
    # first `init_embeddings_max_words` words of the file (0: all); frozen for the first
    # `freeze_embeddings_steps` steps.
    init_embeddings_from: str = ""
    init_embeddings_max_words: int = 0
    freeze_embeddings_steps: int = 0
    save_checkpoints_steps: int = 1000
    # Also checkpoint when this many seconds passed since the last one (rank 0's clock; 0: off).
    save_checkpoints_secs: float = 0.0
    keep_checkpoint_max: int = 5
    log_every_n_steps: int = 50
    initial_loss_scale: float = 2.0 ** 15
    loss_scale_growth_interval: int = 2000
    # Steps with non-finite gradients are skipped; this many in a row stop the run.
    max_consecutive_nonfinite_steps: int = 10
    # A rank whose step (or checkpoint save) takes longer ends itself (0: never); the first
    # step, which traces and compiles, has its own limit.
    step_timeout_secs: float = 1800.0
    first_step_timeout_secs: float = 3600.0
    # Fault injection for tests: rank `debug_fail_rank` raises (or hangs) at `debug_fail_at_step`.
    debug_fail_at_step: int = 0
    debug_fail_rank: int = 0
    debug_fail_mode: str = "raise"

    def __post_init__(self):
        _require(bool(self.output_dir), "--output_dir is empty")
        _require(self.num_train_steps > 0,
                 f"--num_train_steps must be positive, got {self.num_train_steps}")
        _require(self.precision in PRECISIONS,
                 f"--precision={self.precision!r} is not one of {PRECISIONS}")
        _require(self.xla in XLA_MODES, f"--xla={self.xla!r} is not one of {XLA_MODES}")
        _require(self.memory_optimization in MEMORY_OPTIMIZATIONS,
                 f"--memory_optimization={self.memory_optimization!r} is not one of "
                 f"{MEMORY_OPTIMIZATIONS}")
        _require(self.enable_resource_variables,
                 "--noenable_resource_variables asks for TF1 reference variables, which TF2 "
                 "cannot create in eager mode or in a tf.function: every tfbert variable is a "
                 "resource variable. Drop the flag")
        _require(self.save_checkpoints_steps > 0, "--save_checkpoints_steps must be positive")
        _require(self.save_checkpoints_secs >= 0, "--save_checkpoints_secs must be >= 0 (0 turns "
                                                  "time-based checkpoints off)")
        _require(self.keep_checkpoint_max > 0, "--keep_checkpoint_max must be positive")
        _require(self.log_every_n_steps > 0, "--log_every_n_steps must be positive")
        _require(self.initial_loss_scale >= 1, "--initial_loss_scale must be >= 1")
        _require(self.loss_scale_growth_interval > 0, "--loss_scale_growth_interval must be positive")
        _require(self.max_consecutive_nonfinite_steps > 0,
                 "--max_consecutive_nonfinite_steps must be positive")
        _require(self.step_timeout_secs >= 0 and self.first_step_timeout_secs >= 0,
                 "--step_timeout_secs and --first_step_timeout_secs must be >= 0 (0 turns the "
                 "watchdog off)")
        _require(not (self.init_embeddings_from and self.init_checkpoint),
                 "--init_embeddings_from and --init_checkpoint would both set the word "
                 "embeddings; give one")
        _require(self.init_embeddings_max_words >= 0, "--init_embeddings_max_words must be >= 0")
        _require(self.freeze_embeddings_steps >= 0, "--freeze_embeddings_steps must be >= 0")
        _require(self.freeze_embeddings_steps == 0 or self.init_embeddings_from
                 or self.init_checkpoint,
                 "--freeze_embeddings_steps keeps initialised word embeddings fixed; give "
                 "--init_embeddings_from or --init_checkpoint (random embeddings would stay random)")
        _require(self.debug_fail_mode in ("raise", "hang"),
                 f"--debug_fail_mode={self.debug_fail_mode!r} is not 'raise' or 'hang'")


TASKS = ("pretraining", "classification", "regression", "token_classification",
         "question_answering", "distillation")
# Evaluation metrics that are better when lower; every other one is better when higher.
LOWER_IS_BETTER = ("loss", "mlm_loss", "nsp_loss", "cls_loss", "distil_mse", "mse", "kl_loss",
                   "hidden_cosine_loss", "attention_mse")
# What --best_metric defaults to, per task (pretraining keeps no best checkpoint by default).
DEFAULT_BEST_METRIC = {"pretraining": "", "classification": "accuracy", "regression": "pearson",
                       "token_classification": "f1", "question_answering": "f1",
                       "distillation": ""}
EVAL_METRICS = {
    # Plus cls_loss, cls_accuracy and distil_mse when multi-task pretraining adds them.
    "pretraining": ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"),
    # Plus each distillation loss that has a weight (DISTILLATION_LOSSES).
    "distillation": ("loss", "mlm_loss", "mlm_accuracy"),
    "classification": ("loss", "accuracy", "f1"),
    "regression": ("loss", "mse", "pearson", "spearman"),
    # Entity-level precision, recall and F1 (seqeval, CoNLL's rules); accuracy per word.
    "token_classification": ("loss", "accuracy", "precision", "recall", "f1"),
    # SQuAD's exact match and F1 (percent), by the official scripts.
    "question_answering": ("exact_match", "f1"),
}


# Distillation's losses beside the MLM loss, each added with the weight of the field
# `<name>_weight` (0: not computed).
DISTILLATION_LOSSES = ("kl_loss", "hidden_cosine_loss", "attention_mse")
STUDENT_INITS = ("none", "every_kth", "first_k")
ATTENTION_HEAD_MATCHING = ("match", "average")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What is trained (pretraining or a fine-tuning task) and how it is evaluated.

    A fine-tuning run reads its training table from `DataConfig.input_files` (--train_file).
    """

    task: str = "pretraining"
    # Fine-tuning tables (TSV, CSV or JSONL) and their columns.
    eval_file: str = ""
    text_column: str = "text"
    text_b_column: str = "text_b"  # used when the table has it: sentence pairs
    label_column: str = "label"
    # Classification: the label names (token classification: the tags) in id order, read from
    # the training table at start-up.
    labels: tuple[str, ...] = ()
    pooler_dropout_prob: float = 0.1
    # Start a 2-class classifier from the pretraining next-sentence head.
    reuse_head: bool = False
    # Pretraining: held-out records evaluated on `max_eval_steps` batches per data-parallel rank.
    eval_files: tuple[str, ...] = ()
    max_eval_steps: int = 20
    eval_batch_size: int = 32  # per rank
    eval_every_n_steps: int = 0  # 0: at the end only
    # The checkpoint with the best value of this evaluation metric is kept in <output_dir>/best.
    best_metric: str = ""
    early_stopping_patience: int = 0  # evaluations without improvement; 0: never stop early
    # Multi-task pretraining: a sequence classification over `num_cls_labels` classes of the
    # records' "cls_label" (cls_loss) and a regression to their "teacher_score" (distil_mse),
    # each added to the loss with its weight (0: off).
    cls_loss_weight: float = 0.0
    num_cls_labels: int = 2
    distil_loss_weight: float = 0.0
    # Question answering (tfbert.data.squad): windows `doc_stride` tokens apart, questions cut
    # to `max_query_length` tokens, answers of at most `max_answer_length` tokens, and (SQuAD
    # v2.0) "no answer" when it beats the best span by more than `null_score_diff_threshold`.
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    # Distillation (tfbert.modeling.models.bert_distiller): the teacher (any checkpoint
    # `load_pretrained` reads) and the weight of each loss: KL(teacher || student) of the MLM
    # logits at `distill_temperature` (times T^2), the MLM loss on the labels, 1 - cosine
    # between each student layer's output and the mean of its group of teacher layers, and the
    # MSE of the attention maps averaged the same way. `distill_layer_groups`: the teacher
    # layers of each student layer ("0-5", "6-11"; empty: uniform groups).
    teacher: str = ""
    distill_temperature: float = 2.0
    kl_loss_weight: float = 1.0
    mlm_loss_weight: float = 1.0
    hidden_cosine_loss_weight: float = 1.0
    attention_mse_weight: float = 1.0
    distill_layer_groups: tuple[str, ...] = ()
    distill_attention_heads: str = "match"  # or "average" over heads (their counts differ)
    init_student_from_teacher: str = "none"

    def __post_init__(self):
        _require(self.task in TASKS, f"--task={self.task!r} is not one of {TASKS[1:]}")
        pretraining = self.reads_records
        self._check_distillation()
        _require(not (pretraining and self.eval_file),
                 "--eval_file is a fine-tuning table; pretraining evaluates --eval_files "
                 "(records)")
        _require(pretraining or not self.eval_files,
                 f"--eval_files holds pretraining records; --task={self.task} evaluates "
                 f"--eval_file")
        labelled = self.task in ("classification", "token_classification")
        _require(not labelled or len(self.labels) >= 2,
                 f"--task={self.task} needs at least 2 labels, the training table has "
                 f"{list(self.labels)}")
        _require(labelled or not self.labels, f"--task={self.task} has no label set")
        _require(0.0 <= self.pooler_dropout_prob < 1.0,
                 f"--pooler_dropout_prob must be in [0, 1), got {self.pooler_dropout_prob}")
        _require(not self.reuse_head or (self.task == "classification" and len(self.labels) == 2),
                 f"--reuse_head starts a 2-class classifier from the next-sentence head; this "
                 f"run is --task={self.task} with {len(self.labels)} labels")
        for name in ("max_eval_steps", "eval_batch_size", "doc_stride", "max_query_length",
                     "max_answer_length"):
            _require(getattr(self, name) > 0, f"--{name} must be positive")
        _require(self.eval_every_n_steps >= 0, "--eval_every_n_steps must be >= 0 (0: at the end)")
        _require(self.early_stopping_patience >= 0, "--early_stopping_patience must be >= 0")
        _require(not self.eval_every_n_steps or self.has_evaluation,
                 "--eval_every_n_steps needs something to evaluate: --eval_file (fine-tuning) "
                 "or --eval_files (pretraining)")
        _require(self.cls_loss_weight >= 0 and self.distil_loss_weight >= 0,
                 "--cls_loss_weight and --distil_loss_weight must be >= 0 (0: off)")
        _require(self.is_pretraining or not (self.cls_loss_weight or self.distil_loss_weight),
                 "--cls_loss_weight and --distil_loss_weight add tasks to pretraining; "
                 "fine-tuning and distillation train their task alone")
        _require(self.num_cls_labels >= 2, "--num_cls_labels must be >= 2")
        metrics = self.eval_metrics
        _require(not self.best_metric or self.best_metric in metrics,
                 f"--best_metric={self.best_metric!r} is not an evaluation metric of "
                 f"--task={self.task}: {metrics}")
        _require(not self.best_metric or self.has_evaluation,
                 f"--best_metric={self.best_metric} needs an evaluation set (--eval_file or "
                 f"--eval_files)")
        _require(not self.early_stopping_patience or (self.best_metric and
                                                      self.eval_every_n_steps),
                 "--early_stopping_patience counts evaluations without a better --best_metric: "
                 "it needs --eval_every_n_steps and --best_metric (a fine-tuning task has one "
                 "by default)")

    def _check_distillation(self) -> None:
        distilling = self.task == "distillation"
        _require(distilling == bool(self.teacher),
                 "--mode=distill needs --teacher (a checkpoint of any format --init_checkpoint "
                 "reads)" if distilling else "--teacher is read by --mode=distill only")
        if not distilling:
            return
        weights = {name: getattr(self, name) for name in (
            "kl_loss_weight", "mlm_loss_weight", "hidden_cosine_loss_weight",
            "attention_mse_weight")}
        for name, weight in weights.items():
            _require(weight >= 0, f"--{name} must be >= 0 (0: that loss is off), got {weight}")
        _require(any(weights.values()), f"every distillation loss weight is 0: {weights}")
        _require(self.distill_temperature > 0,
                 f"--distill_temperature must be positive, got {self.distill_temperature}")
        _require(self.distill_attention_heads in ATTENTION_HEAD_MATCHING,
                 f"--distill_attention_heads={self.distill_attention_heads!r} is not one of "
                 f"{ATTENTION_HEAD_MATCHING}")
        _require(self.init_student_from_teacher in STUDENT_INITS,
                 f"--init_student_from_teacher={self.init_student_from_teacher!r} is not one "
                 f"of {STUDENT_INITS}")

    @property
    def is_pretraining(self) -> bool:
        return self.task == "pretraining"

    @property
    def reads_records(self) -> bool:
        """Whether the task trains on pretraining records (pretraining, distillation)."""
        return self.task in ("pretraining", "distillation")

    def distillation_weight(self, loss: str) -> float:
        """The weight of distillation loss `loss` ("mlm_loss" or one of DISTILLATION_LOSSES)."""
        return getattr(self, f"{loss}_weight")

    @property
    def record_labels(self) -> tuple[str, ...]:
        """The label features multi-task pretraining reads from its records."""
        return (("cls_label",) if self.cls_loss_weight else ()) + (
            ("teacher_score",) if self.distil_loss_weight else ())

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        extra = (("cls_loss", "cls_accuracy") if self.cls_loss_weight else ()) + (
            ("distil_mse",) if self.distil_loss_weight else ())
        if self.task == "distillation":
            extra = tuple(name for name in DISTILLATION_LOSSES if self.distillation_weight(name))
        return EVAL_METRICS[self.task] + extra

    @property
    def has_evaluation(self) -> bool:
        return bool(self.eval_file or self.eval_files)

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head (1 for regression)."""
        return len(self.labels) if self.labels else 1


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` of evaluation metric `metric` improves on `best` (None: nothing yet).
    A NaN never does."""
    if value != value:
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


GRAD_ACCUM_DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Data parallelism and gradient accumulation.

    `num_processes` and `rank` are found at start-up (from the launcher), not set by flags.
    """

    num_processes: int = 1
    rank: int = 0
    hvd_fp16_compression: bool = False
    # Dense embedding-table gradients: the token-type lookup is a one-hot matmul and any sparse
    # gradient is densified before the all-reduce (tfbert.distributed.HorovodGroup).
    sparse_as_dense: bool = True
    hvd_fusion_threshold_mb: int | None = None
    hvd_cycle_time_ms: float | None = None
    # Horovod's stall inspector: warn after the first, shut down after the second (0: never).
    hvd_stall_check_secs: int = 60
    hvd_stall_shutdown_secs: int = 600
    scale_learning_rate: bool = False  # peak learning rate x num_processes
    num_accumulation_steps: int = 1
    grad_accum_dtype: str = "float32"
    # ZeRO (tfbert.training.gradient_sync): 0 off, 1 optimizer state split across the ranks,
    # 2 gradients and accumulators too; --state_split_strategy says who owns what.
    zero_stage: int = 0
    state_split_strategy: str = "naive"  # naive | greedy:N | flat (tfbert.training.sharding)
    # Tensor parallelism (tfbert.modeling.tensor_parallel): ranks per tensor-parallel group;
    # the num_processes / tensor_parallel_size groups are the data-parallel replicas.
    tensor_parallel_size: int = 1

    def __post_init__(self):
        _require(0 <= self.rank < self.num_processes,
                 f"rank {self.rank} is outside a group of {self.num_processes} processes")
        _require(self.num_accumulation_steps >= 1,
                 f"--num_accumulation_steps must be >= 1, got {self.num_accumulation_steps}")
        _require(self.grad_accum_dtype in GRAD_ACCUM_DTYPES,
                 f"--grad_accum_dtype={self.grad_accum_dtype!r} is not one of {GRAD_ACCUM_DTYPES}")
        _require(self.hvd_fusion_threshold_mb is None or self.hvd_fusion_threshold_mb >= 0,
                 "--hvd_fusion_threshold_mb must be >= 0")
        _require(self.hvd_cycle_time_ms is None or self.hvd_cycle_time_ms > 0,
                 "--hvd_cycle_time_ms must be positive")
        _require(self.hvd_stall_check_secs >= 0 and self.hvd_stall_shutdown_secs >= 0,
                 "--hvd_stall_check_secs and --hvd_stall_shutdown_secs must be >= 0")
        _require(self.hvd_stall_shutdown_secs == 0 or self.hvd_stall_check_secs > 0,
                 "--hvd_stall_shutdown_secs needs the stall check: --hvd_stall_check_secs=0 "
                 "turns it off")
        problem = tensor_parallel_problem(self.num_processes, self.tensor_parallel_size)
        _require(problem is None, problem or "")
        from tfbert.training.sharding import parse_split_strategy  # it imports this module

        try:
            parse_split_strategy(self.state_split_strategy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.zero_stage in (0, 1, 2),
                 f"--zero_stage={self.zero_stage} is not 1 (optimizer state split across ranks) "
                 f"or 2 (gradients and accumulators too)")
        _require(self.zero_stage or self.state_split_strategy == "naive",
                 "--state_split_strategy shapes the sharding of --custom_memory_optimization "
                 "(ZeRO), which is off")
        _require(not self.zero_stage or self.data_parallel_size >= 2,
                 f"--custom_memory_optimization (ZeRO-{self.zero_stage}) splits the optimizer "
                 f"state across data-parallel ranks, and this run has "
                 f"{self.data_parallel_size} ({self.num_processes} processes / "
                 f"--tensor_parallel_size={self.tensor_parallel_size}): launch it with "
                 f"horovodrun -np N (N >= {2 * self.tensor_parallel_size}) or drop the flag")

    @property
    def uses_accumulation(self) -> bool:
        return self.num_accumulation_steps > 1

    @property
    def data_parallel_size(self) -> int:
        """Model replicas: each a tensor-parallel group of tensor_parallel_size ranks."""
        return self.num_processes // self.tensor_parallel_size


def tensor_parallel_problem(num_processes: int, tensor_parallel_size: int) -> str | None:
    """Why `num_processes` ranks cannot form tensor-parallel groups of `tensor_parallel_size`
    (None when they can)."""
    if tensor_parallel_size < 1:
        return "--tensor_parallel_size must be >= 1"
    if num_processes % tensor_parallel_size:
        return (f"--tensor_parallel_size={tensor_parallel_size} splits each model over that many "
                f"ranks, and this job has {num_processes} process(es): launch it with "
                f"horovodrun -np N, N a multiple of {tensor_parallel_size}")
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    runtime: RuntimeConfig
    distribution: DistributionConfig = DistributionConfig()
    ops: FusedOpsConfig = FusedOpsConfig()
    task: TaskConfig = TaskConfig()

    def __post_init__(self):
        custom_ops = self.ops.enabled_flags() + (
            ["--optimizer=fused_lamb"] if self.optimizer.optimizer == "fused_lamb" else [])
        _require(self.runtime.xla != "jit" or not custom_ops,
                 f"--xla=jit compiles the whole step with XLA, which cannot hold the custom ops "
                 f"of {', '.join(custom_ops)}; use --xla=auto (auto-clustering compiles around "
                 f"them) or drop those flags")
        _require(not self.ops.ytf_gelu or self.model.hidden_act in ("gelu", "gelu_tanh", "geglu"),
                 f"--ytf_gelu fuses GELU/GeGLU, but --hidden_act={self.model.hidden_act}")
        _require(not self.ops.gelu_save_derivative
                 or self.model.hidden_act in ("gelu", "gelu_tanh"),
                 f"--gelu_save_derivative saves GELU's derivative; GeGLU's gradient needs two "
                 f"values per element (--hidden_act={self.model.hidden_act}): drop the flag")
        _require(not self.distribution.hvd_fp16_compression or self.runtime.precision == "fp16",
                 f"--hvd_fp16_compression sends gradients as float16, which only the loss scale "
                 f"of --precision=fp16 keeps from flushing to zero; with "
                 f"--precision={self.runtime.precision} drop it (or use --precision=fp16)")
        _require(self.distribution.grad_accum_dtype != "float16"
                 or self.runtime.precision == "fp16",
                 "--grad_accum_dtype=float16 needs --precision=fp16: float16 accumulators rely "
                 "on loss scaling to keep small gradients from flushing to zero")
        ln_precision = {"float16": "fp16", "bfloat16": "bf16"}.get(self.ops.ln_dtype)
        _require(ln_precision is None or self.runtime.precision == ln_precision,
                 f"--ln_dtype={self.ops.ln_dtype} computes LayerNorm statistics below the "
                 f"inputs' precision; it needs --precision={ln_precision}, not "
                 f"{self.runtime.precision}")
        _require(self.data.max_seq_length <= self.model.max_position_embeddings,
                 f"--max_seq_length={self.data.max_seq_length} exceeds "
                 f"--max_position_embeddings={self.model.max_position_embeddings}")
        self._check_tensor_parallelism()
        _require(not self.task.reads_records or self.data.max_predictions_per_seq > 0,
                 f"--max_predictions_per_seq must be positive for {self.task.task}")
        _require(not self.task.reuse_head or self.runtime.init_checkpoint,
                 "--reuse_head copies the next-sentence head of --init_checkpoint; give one")
        _require(self.task.task != "distillation"
                 or self.distribution.tensor_parallel_size == 1,
                 f"--mode=distill runs without tensor parallelism (--tensor_parallel_size="
                 f"{self.distribution.tensor_parallel_size}): the student and the teacher are "
                 f"whole on every rank; give the student ranks by data parallelism and ZeRO")
        _require(not (self.task.init_student_from_teacher != "none"
                      and self.runtime.init_checkpoint),
                 f"--init_student_from_teacher={self.task.init_student_from_teacher} and "
                 f"--init_checkpoint both initialise the student; give one")
        _require(self.task.reads_records or self.distribution.tensor_parallel_size == 1,
                 f"--task={self.task.task} runs without tensor parallelism "
                 f"(--tensor_parallel_size={self.distribution.tensor_parallel_size}): gather the "
                 f"pretrained checkpoint (python -m tfbert.tools.gather_checkpoint) and fine-tune "
                 f"it data-parallel")

    def _check_tensor_parallelism(self) -> None:
        t = self.distribution.tensor_parallel_size
        if t == 1:
            return
        model = self.model
        for flag, count, what in (
                ("--num_attention_heads", model.num_attention_heads, "heads"),
                ("--intermediate_size", model.intermediate_size, "FFN features"),
                ("--vocab_size", model.vocab_size, "vocabulary rows")):
            _require(count % t == 0,
                     f"--tensor_parallel_size={t} splits the {what} across ranks, and "
                     f"{flag}={count} is not divisible by {t}"
                     + (f": pad the vocabulary to {-(-count // t) * t} tokens (a tokenizer "
                        f"trained with --vocab_size={-(-count // t) * t}, or unused tokens "
                        f"appended to the vocabulary file)" if what == "vocabulary rows" else ""))
        _require(not self.ops.fused_xent,
                 f"--fused_xent computes the masked-LM softmax over whole vocabulary rows, and "
                 f"--tensor_parallel_size={t} splits the vocabulary across ranks (its loss "
                 f"sums the ranks' parts); drop --fused_xent")
        _require(self.runtime.xla != "jit",
                 f"--xla=jit compiles the forward and backward pass whole, and with "
                 f"--tensor_parallel_size={t} they hold Horovod all-reduces, which XLA cannot "
                 f"compile; use --xla=auto (clusters around them) or --xla=off")
        _require(not self.runtime.init_embeddings_from,
                 f"--init_embeddings_from builds the whole embedding table on one rank, and "
                 f"--tensor_parallel_size={t} splits it; initialise a run without tensor "
                 f"parallelism and start from its checkpoint (--init_checkpoint)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        def build(klass, values):
            kwargs = {}
            for field in dataclasses.fields(klass):
                if field.name in values:
                    value = values[field.name]
                    kwargs[field.name] = tuple(value) if isinstance(value, list) else value
            return klass(**kwargs)

        return cls(model=build(ModelConfig, d["model"]), data=build(DataConfig, d["data"]),
                   optimizer=build(OptimizerConfig, d["optimizer"]),
                   runtime=build(RuntimeConfig, d["runtime"]),
                   distribution=build(DistributionConfig, d.get("distribution", {})),
                   ops=build(FusedOpsConfig, d.get("ops", {})),
                   task=build(TaskConfig, d.get("task", {})))

    @classmethod
    def load(cls, path: str) -> "Config":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str) -> None:
        atomic_write_text(path, self.to_json() + "\n")


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
