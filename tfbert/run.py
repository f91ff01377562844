"""tfbert's entry point: pretraining, fine-tuning, prediction and distillation.

    python -m tfbert.run                                  # the embedded default: tiny model,
                                                          # sample corpus, a few hundred steps
    python -m tfbert.run --flagfile=my_run.cfg --input_files='data/*.tfrecord' ...
    horovodrun -np 8 -H host1:8 python -m tfbert.run --flagfile=my_run.cfg ...
    python -m tfbert.run --mode=finetune --task=classification --init_checkpoint=RUN_DIR \
        --train_file=train.tsv --eval_file=dev.tsv --output_dir=...
    python -m tfbert.run --mode=predict --init_checkpoint=FINETUNED_DIR --predict_file=test.tsv
    python -m tfbert.run --mode=distill --teacher=TEACHER_DIR --num_hidden_layers=2 \
        --init_student_from_teacher=every_kth --input_files=... --output_dir=...

The only module that reads flags: it turns them into one frozen `Config`, validates it, logs it,
saves it as `<output_dir>/config.json` and hands it to the library.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

from absl import app, flags, logging

# Model flags default to None: unset means "from --model / --bert_config_file".
MODEL_OVERRIDES = {
    "vocab_size": (flags.DEFINE_integer, "Vocabulary size (default: the tokenizer's)."),
    "hidden_size": (flags.DEFINE_integer, "Hidden size D."),
    "num_hidden_layers": (flags.DEFINE_integer, "Number of transformer blocks."),
    "num_attention_heads": (flags.DEFINE_integer, "Attention heads N (must divide D)."),
    "intermediate_size": (flags.DEFINE_integer, "Feed-forward width."),
    "hidden_act": (flags.DEFINE_string, "gelu | gelu_tanh | relu | geglu."),
    "hidden_dropout_prob": (flags.DEFINE_float, "Dropout on hidden states (default 0.1)."),
    "attention_probs_dropout_prob": (flags.DEFINE_float, "Dropout on attention probabilities "
                                                         "(default 0.1)."),
    "max_position_embeddings": (flags.DEFINE_integer, "Position table size (default 512)."),
    "type_vocab_size": (flags.DEFINE_integer, "Segment table size (default 2)."),
    "initializer_range": (flags.DEFINE_float, "Stddev of the weight initializer (default 0.02)."),
    "layer_norm_eps": (flags.DEFINE_float, "LayerNorm epsilon (default 1e-12)."),
    "use_bias_in_keys": (flags.DEFINE_boolean, "Bias in the attention key projection "
                                               "(default True; softmax cancels it)."),
}


MODES = ("pretrain", "finetune", "predict", "distill")
FINETUNING_TASKS = ("classification", "regression", "token_classification",
                    "question_answering")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    # What runs.
    flags.DEFINE_enum("mode", "pretrain", MODES, "pretrain on records; finetune a pretrained "
                                                 "model on a table (--task); predict a table "
                                                 "with a fine-tuned model; distill --teacher "
                                                 "into a student (the model flags) on "
                                                 "records.", **fv)
    flags.DEFINE_enum("task", None, FINETUNING_TASKS, "--mode=finetune: classification (single "
                                                      "texts or pairs, labels any strings), "
                                                      "regression (a number per example) or "
                                                      "token_classification (a tag per word: "
                                                      "NER) or question_answering (SQuAD v1.1/"
                                                      "v2.0 JSON files).", **fv)
    # Fine-tuning and prediction tables (tfbert/data/finetuning_dataset.py).
    flags.DEFINE_string("train_file", "", "--mode=finetune: the training table (.tsv, .csv or "
                                          ".jsonl with a header).", **fv)
    flags.DEFINE_string("eval_file", "", "--mode=finetune: the evaluation table.", **fv)
    flags.DEFINE_string("predict_file", "", "--mode=predict: the table to predict.", **fv)
    flags.DEFINE_string("predictions_file", "", "--mode=predict: where predictions go (JSON "
                                                "lines); default <predict_file "
                                                "stem>.predictions.jsonl.", **fv)
    flags.DEFINE_string("text_column", "text", "Tables: the text column.", **fv)
    flags.DEFINE_string("text_b_column", "text_b", "Tables: the second text of a pair (used when "
                                                   "the table has it).", **fv)
    flags.DEFINE_string("label_column", "label", "Tables: the label column.", **fv)
    flags.DEFINE_float("pooler_dropout_prob", 0.1, "Fine-tuning: dropout on the pooled output "
                                                   "(token classification: on each token's "
                                                   "output) before the classifier.", **fv)
    flags.DEFINE_integer("doc_stride", 128, "Question answering: tokens between the windows of "
                                            "a long context.", **fv)
    flags.DEFINE_integer("max_query_length", 64, "Question answering: question tokens kept.",
                         **fv)
    flags.DEFINE_integer("max_answer_length", 30, "Question answering: longest answer, in "
                                                  "tokens.", **fv)
    flags.DEFINE_float("null_score_diff_threshold", 0.0, "SQuAD v2.0: answer nothing when that "
                                                         "scores this much above the best "
                                                         "span.", **fv)
    flags.DEFINE_boolean("reuse_head", False, "Fine-tuning: start a 2-class classifier from "
                                              "--init_checkpoint's next-sentence head.", **fv)
    # Evaluation (tfbert/training/evaluation.py).
    flags.DEFINE_list("eval_files", [], "Pretraining: held-out records (globs), evaluated every "
                                        "--eval_every_n_steps and at the end.", **fv)
    flags.DEFINE_integer("max_eval_steps", 20, "Pretraining: evaluation batches per "
                                               "data-parallel rank.", **fv)
    flags.DEFINE_integer("eval_batch_size", 32, "Evaluation and prediction batch size per rank.",
                         **fv)
    flags.DEFINE_integer("eval_every_n_steps", 0, "Evaluate every N steps (0: at the end only).",
                         **fv)
    flags.DEFINE_string("best_metric", None, "Keep the checkpoint with the best value of this "
                                             "evaluation metric in <output_dir>/best (default: "
                                             "accuracy for classification, pearson for "
                                             "regression, none in pretraining).", **fv)
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many evaluations "
                                                       "without a better --best_metric (0: "
                                                       "never).", **fv)
    # Multi-task pretraining (records from create_pretraining_data --label_columns).
    flags.DEFINE_float("cls_loss_weight", 0.0, "Pretraining: add a sequence classification of "
                                               "the records' cls_label (cls_loss) with this "
                                               "weight (0: off).", **fv)
    flags.DEFINE_integer("num_cls_labels", 2, "Classes of cls_label.", **fv)
    flags.DEFINE_float("distil_loss_weight", 0.0, "Pretraining: add the mean squared error to "
                                                  "the records' teacher_score (distil_mse) with "
                                                  "this weight (0: off).", **fv)
    # Distillation (tfbert/modeling/models/bert_distiller.py).
    flags.DEFINE_string("teacher", "", "--mode=distill: the teacher, any checkpoint "
                                       "--init_checkpoint reads; it also gives the tokenizer and "
                                       "the student's default shape (change it with the model "
                                       "flags, e.g. --num_hidden_layers=2).", **fv)
    flags.DEFINE_float("distill_temperature", 2.0, "Temperature of both MLM distributions in "
                                                   "kl_loss (which is multiplied by its square).",
                       **fv)
    flags.DEFINE_float("kl_loss_weight", 1.0, "Weight of KL(teacher || student) of the MLM "
                                              "logits (0: off).", **fv)
    flags.DEFINE_float("mlm_loss_weight", 1.0, "Weight of the student's MLM loss on the labels.",
                       **fv)
    flags.DEFINE_float("hidden_cosine_loss_weight", 1.0, "Weight of 1 - cosine between each "
                                                         "student layer's output and the mean "
                                                         "of its teacher layers' (through a "
                                                         "learned projection when the widths "
                                                         "differ).", **fv)
    flags.DEFINE_float("attention_mse_weight", 1.0, "Weight of the MSE between each student "
                                                    "attention map and the mean of its teacher "
                                                    "layers' maps.", **fv)
    flags.DEFINE_list("distill_layer_groups", [], "Teacher layers (0-based, ranges inclusive) "
                                                  "per student layer, e.g. 0-5,6-11. Empty: "
                                                  "uniform groups of L_teacher / L_student.",
                      **fv)
    flags.DEFINE_enum("distill_attention_heads", "match", ["match", "average"],
                      "attention_mse: head i of the student against head i of the teacher "
                      "(equal head counts), or each side averaged over its heads.", **fv)
    flags.DEFINE_enum("init_student_from_teacher", "none", ["none", "every_kth", "first_k"],
                      "Start the student as the teacher's embeddings, pooler and MLM head and "
                      "one teacher layer per student layer: every_kth the last of each layer "
                      "group (layers k-1, 2k-1, ...), first_k the first ones. Needs the "
                      "teacher's widths.", **fv)
    # Model.
    flags.DEFINE_string("model", "tiny", "Size preset: one of tfbert.config.MODEL_PRESETS.", **fv)
    flags.DEFINE_string("bert_config_file", "", "google-style bert_config.json; overrides --model.",
                        **fv)
    for name, (define, help_text) in MODEL_OVERRIDES.items():
        define(name, None, help_text, **fv)
    # Data.
    flags.DEFINE_list("input_files", [], "Comma-separated globs of pretraining TFRecords. "
                                         "Empty: the sample corpus shipped with tfbert.", **fv)
    flags.DEFINE_integer("max_seq_length", 128, "Sequence length of the records.", **fv)
    flags.DEFINE_integer("max_predictions_per_seq", 20, "Masked positions per sequence.", **fv)
    flags.DEFINE_integer("train_batch_size", 32, "Batch size per rank.", **fv)
    flags.DEFINE_integer("num_readers", 4, "Files read in parallel (interleave cycle length).", **fv)
    flags.DEFINE_integer("shuffle_buffer", 1000, "Records in the shuffle buffer.", **fv)
    flags.DEFINE_boolean("dynamic_masking", False, "Re-mask every batch on the fly.", **fv)
    flags.DEFINE_float("masked_lm_prob", 0.15, "Masking rate for --dynamic_masking.", **fv)
    flags.DEFINE_enum("tokenizer_type", "sentencepiece", ["sentencepiece", "wordpiece"],
                      "Tokenizer kind. Unset: the kind --vocab_file holds (a .model file is "
                      "sentencepiece, another file wordpiece); set, it must agree. Also the kind "
                      "trained for the sample corpus.", **fv)
    flags.DEFINE_string("vocab_file", "", "Tokenizer: a sentencepiece .model, a wordpiece "
                                          "vocab.txt, or a directory holding one (HuggingFace, "
                                          "google-research/bert, tfbert run or train_tokenizer "
                                          "output). Default: --init_checkpoint's, if a "
                                          "directory with one. Optional for pre-tokenized "
                                          "records.", **fv)
    flags.DEFINE_boolean("do_lower_case", True, "Wordpiece: lower-case and strip accents (must "
                                                "match the vocabulary). For a bare vocab.txt; a "
                                                "directory's tokenizer_config.json says it, and "
                                                "a different value given here is an error.", **fv)
    # Optimizer.
    flags.DEFINE_enum("optimizer", "lamb", ["lamb", "adamw", "fused_lamb"],
                      "Optimizer; fused_lamb is LAMB as one custom op per tensor (make ops).", **fv)
    # Fused custom ops (built by `make ops`).
    flags.DEFINE_boolean("ln_ytf_impl", False, "Fused LayerNorm op.", **fv)
    flags.DEFINE_boolean("attn_softmax_ytf_impl", False, "Fused attention scale + mask + softmax "
                                                         "+ dropout op (the dropout mask is "
                                                         "regenerated, not stored).", **fv)
    flags.DEFINE_boolean("ytf_gelu", False, "Fused bias + GELU/GeGLU op in the feed-forward "
                                            "block.", **fv)
    flags.DEFINE_boolean("gelu_save_derivative", False, "With --ytf_gelu: the fused GELU op "
                                                        "also writes gelu'(x + bias), kept for "
                                                        "the backward pass instead of x, which "
                                                        "then multiplies instead of recomputing "
                                                        "erf and exp (the same memory; faster "
                                                        "where GELU is compute-bound, as on "
                                                        "CPUs).", **fv)
    flags.DEFINE_boolean("ytf_dropout", False, "The encoder's hidden dropout (embeddings, "
                                               "attention output, feed-forward output) as one "
                                               "fused op whose mask is regenerated in the "
                                               "backward pass, not stored.", **fv)
    flags.DEFINE_boolean("fused_bias_dropout_add", False, "Add each sublayer's output bias, "
                                                          "drop out and add the residual in one "
                                                          "fused op before its LayerNorm (the "
                                                          "mask of --ytf_dropout, regenerated in "
                                                          "the backward pass).", **fv)
    flags.DEFINE_boolean("fused_xent", False, "Compute the softmax cross-entropy losses (the "
                                              "masked-LM head's with its output bias) and their "
                                              "argmax in one fused op on the logits in the "
                                              "compute dtype; the backward recomputes the "
                                              "softmax instead of keeping it.", **fv)
    flags.DEFINE_boolean("fused_qkv", False, "Project the attention's queries, keys and values "
                                             "with one matmul of their three kernels side by "
                                             "side (the same variables; no custom op).", **fv)
    flags.DEFINE_boolean("fused_qkv_split", False, "With --fused_qkv: add the projection's "
                                                   "bias and split it into the query, key and "
                                                   "value heads with one fused op (its "
                                                   "gradient gathers them back and sums the "
                                                   "bias gradient in the same pass).", **fv)
    flags.DEFINE_enum("ln_dtype", "float32", ["float32", "float16", "bfloat16"],
                      "dtype of the LayerNorm's elementwise arithmetic (the mean and variance "
                      "are summed in float32 whatever it is); float16 needs --precision=fp16, "
                      "bfloat16 --precision=bf16; the fused LayerNorm is float32 only.", **fv)
    flags.DEFINE_float("learning_rate", 1e-2, "Peak learning rate.", **fv)
    flags.DEFINE_integer("num_warmup_steps", 50, "Linear warm-up steps.", **fv)
    flags.DEFINE_float("end_learning_rate", 0.0, "Learning rate at --num_train_steps.", **fv)
    flags.DEFINE_float("decay_power", 1.0, "Power of the polynomial decay (1 = linear).", **fv)
    flags.DEFINE_float("weight_decay_rate", 0.01, "Decoupled weight decay (not on LayerNorm or "
                                                  "biases).", **fv)
    flags.DEFINE_float("beta_1", 0.9, "Adam/LAMB beta_1.", **fv)
    flags.DEFINE_float("beta_2", 0.999, "Adam/LAMB beta_2.", **fv)
    flags.DEFINE_float("epsilon", 1e-6, "Adam/LAMB epsilon.", **fv)
    flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clipping; 0 turns it off.", **fv)
    # Runtime.
    flags.DEFINE_string("output_dir", "", "Run directory: config, tokenizer, checkpoints, logs. "
                                          "Resumed if it holds checkpoints. Default: "
                                          "runs/tfbert-<time>.", **fv)
    flags.DEFINE_integer("num_train_steps", 500, "Optimizer steps.", **fv)
    flags.DEFINE_enum("precision", "fp32", ["fp32", "fp16", "bf16"],
                      "fp16/bf16: mixed precision with float32 variables; fp16 with dynamic loss "
                      "scaling.", **fv)
    flags.DEFINE_enum("xla", "off", ["off", "auto", "jit"],
                      "off; auto = auto-clustering (works with custom ops); jit = compile the "
                      "whole step (no custom ops).", **fv)
    # Grappler (tfbert/training/grappler.py).
    flags.DEFINE_enum("memory_optimization", "default",
                      ["default", "no", "manual", "heuristic", "recomputation", "scheduling",
                       "swapping"],
                      "Grappler's memory optimizer for the training step (RewriterConfig."
                      "MemOptType). manual recomputes the feed-forward activations in backward.",
                      **fv)
    flags.DEFINE_boolean("suppress_grappler", False, "Grappler off for the training step (a "
                                                     "--memory_optimization other than default/"
                                                     "no still runs, alone).", **fv)
    flags.DEFINE_boolean("enable_resource_variables", True, "Resource variables (TF2 has no "
                                                            "other kind: False is an error).",
                         **fv)
    flags.DEFINE_integer("seed", 12345, "Seed for weights, data order and dropout.", **fv)
    flags.DEFINE_boolean("deterministic", False, "TensorFlow op determinism (slower).", **fv)
    flags.DEFINE_string("init_checkpoint", "", "Initial weights, and the model config and "
                                               "tokenizer unless given: a tfbert run directory or "
                                               "checkpoint, a HuggingFace BERT directory "
                                               "(config.json + model.safetensors) or a "
                                               "google-research/bert directory (bert_config.json "
                                               "+ bert_model.ckpt).", **fv)
    flags.DEFINE_string("init_embeddings_from", "", "Initialise the word embeddings from a "
                                                    "FastText/word2vec file (.vec text; .bin with "
                                                    "gensim or fasttext installed); rank 0 reads "
                                                    "it and logs the vocabulary's coverage.", **fv)
    flags.DEFINE_integer("init_embeddings_max_words", 0, "Read only the first (most frequent) N "
                                                         "words of --init_embeddings_from (0: "
                                                         "all).", **fv)
    flags.DEFINE_integer("freeze_embeddings_steps", 0, "Keep the initialised word embeddings "
                                                       "fixed for the first N steps (their "
                                                       "gradient is then neither computed nor "
                                                       "sent).", **fv)
    flags.DEFINE_integer("save_checkpoints_steps", 1000, "Checkpoint every N steps (and at the "
                                                         "end).", **fv)
    flags.DEFINE_float("save_checkpoints_secs", 0, "Also checkpoint when this many seconds have "
                                                   "passed since the last checkpoint (rank 0's "
                                                   "clock decides for all ranks; 0: off).", **fv)
    flags.DEFINE_integer("keep_checkpoint_max", 5, "Checkpoints kept.", **fv)
    flags.DEFINE_integer("log_every_n_steps", 50, "Log metrics every N steps.", **fv)
    # Distribution and gradient accumulation.
    flags.DEFINE_boolean("hvd_fp16_compression", False, "All-reduce gradients in float16 "
                                                        "(Horovod's fp16 compression), each "
                                                        "divided by the number of ranks before "
                                                        "the sum. Needs --precision=fp16, whose "
                                                        "loss scale keeps small gradients "
                                                        "representable.", **fv)
    flags.DEFINE_boolean("sparse_as_dense", True, "Embedding-table gradients cross ranks dense: "
                                                  "the token-type table is looked up by a one-hot "
                                                  "matmul and any sparse gradient is densified "
                                                  "before the all-reduce. --nosparse_as_dense "
                                                  "looks it up with a gather, whose gradient (one "
                                                  "row per token) Horovod all-gathers from every "
                                                  "rank; under gradient accumulation it is summed "
                                                  "into a dense accumulator, so only the lookup "
                                                  "changes. (The word embeddings are tied to the "
                                                  "MLM head: their gradient is always dense.)",
                         **fv)
    flags.DEFINE_integer("hvd_fusion_threshold_mb", None, "Horovod tensor-fusion buffer in MB "
                                                          "(default: Horovod's, 64).", **fv)
    flags.DEFINE_float("hvd_cycle_time_ms", None, "Horovod cycle time in ms (default: "
                                                  "Horovod's, 1).", **fv)
    flags.DEFINE_integer("hvd_stall_check_secs", 60, "Horovod warns, naming the ranks, when some "
                                                     "ranks wait this long in a collective that "
                                                     "others have not joined (0: no check).", **fv)
    flags.DEFINE_integer("hvd_stall_shutdown_secs", 600, "... and shuts down after this long "
                                                         "(0: never). Must exceed the longest "
                                                         "checkpoint save. See also "
                                                         "--step_timeout_secs.", **fv)
    flags.DEFINE_float("step_timeout_secs", 1800, "A rank whose step or checkpoint save takes "
                                                  "longer prints its threads' stacks and exits "
                                                  "with status 1, so a hung rank ends the job "
                                                  "(0: never).", **fv)
    flags.DEFINE_float("first_step_timeout_secs", 3600, "The same for the first step, which "
                                                        "traces and compiles (0: never).", **fv)
    flags.DEFINE_integer("max_consecutive_nonfinite_steps", 10, "Steps with NaN/inf gradients are "
                                                                "skipped (and counted); this many "
                                                                "in a row stop the run with exit "
                                                                "status 3.", **fv)
    flags.DEFINE_boolean("scale_learning_rate", False, "Multiply the peak learning rate by the "
                                                       "number of ranks.", **fv)
    flags.DEFINE_integer("num_accumulation_steps", 1, "Micro-batches per optimizer step "
                                                      "(gradient accumulation).", **fv)
    flags.DEFINE_enum("grad_accum_dtype", "float32", ["float32", "float16"],
                      "Accumulator dtype; float16 needs --precision=fp16.", **fv)
    flags.DEFINE_boolean("custom_memory_optimization", False, "ZeRO: split the optimizer state "
                                                              "(LAMB/AdamW m and v) across the "
                                                              "data-parallel ranks (stage 1 "
                                                              "unless --zero_stage says 2).",
                         **fv)
    flags.DEFINE_integer("zero_stage", None, "ZeRO stage: 1 optimizer state split across "
                                             "ranks, 2 the gradients and accumulators too "
                                             "(implies --custom_memory_optimization).", **fv)
    flags.DEFINE_boolean("split_opt_state", False, "The notes' name of ZeRO-1 (= "
                                                   "--custom_memory_optimization).", **fv)
    flags.DEFINE_boolean("split_grad_accum", False, "The notes' name of ZeRO-2 (= "
                                                    "--custom_memory_optimization "
                                                    "--zero_stage=2).", **fv)
    flags.DEFINE_string("state_split_strategy", "naive", "Who owns which optimizer state under "
                                                         "ZeRO: naive (whole variables by "
                                                         "layer), greedy:N (balanced bytes, "
                                                         "tensors over 1/N of a share split by "
                                                         "rows) or flat (all variables "
                                                         "concatenated, split evenly).", **fv)
    flags.DEFINE_integer("tensor_parallel_size", 1, "Ranks per tensor-parallel group: each model "
                         "replica is split (Megatron-style: attention heads, FFN features, "
                         "vocabulary) over that many consecutive ranks; the number of ranks "
                         "must be a multiple of it.", **fv)
    flags.DEFINE_integer("debug_fail_at_step", 0, "Testing only: raise at this step on "
                                                  "--debug_fail_rank (0 = never).", **fv)
    flags.DEFINE_integer("debug_fail_rank", 0, "Testing only: the rank that fails.", **fv)
    flags.DEFINE_enum("debug_fail_mode", "raise", ["raise", "hang"], "Testing only: how it fails.",
                      **fv)
    flags.DEFINE_float("initial_loss_scale", 2.0 ** 15, "fp16: initial dynamic loss scale.", **fv)
    flags.DEFINE_integer("loss_scale_growth_interval", 2000, "fp16: finite steps before the loss "
                                                             "scale doubles.", **fv)


def expand_flagfiles(argv: list[str]) -> list[str]:
    """Replaces every --flagfile=PATH in argv by the flags in PATH, recursively.

    As absl's own --flagfile, except for where a nested --flagfile points: relative to the file
    that includes it (then, failing that, to the working directory, absl's rule). So
    flags/optimal.cfg can say `--flagfile=basef.cfg` and work from any directory. Lines that are
    blank or start with # or // are comments; a later flag overrides an earlier one.
    """
    expanded = argv[:1]
    args = iter(argv[1:])
    for arg in args:
        name, has_value, value = arg.partition("=")
        if name not in ("--flagfile", "-flagfile"):
            expanded.append(arg)
            continue
        if not has_value:
            value = next(args, "")
        expanded.extend(_read_flagfile(value, including_file=None, chain=()))
    return expanded


def _read_flagfile(path: str, including_file: str | None, chain: tuple[str, ...]) -> list[str]:
    candidates = [path]
    if including_file and not os.path.isabs(path):
        candidates.insert(0, os.path.join(os.path.dirname(including_file), path))
    found = next((c for c in candidates if os.path.isfile(c)), None)
    where = f" (included from {including_file})" if including_file else ""
    if found is None:
        raise app.UsageError(f"--flagfile={path}: no such file{where}")
    found = os.path.abspath(found)
    if found in chain:
        raise app.UsageError(f"--flagfile={path} includes itself: {' -> '.join(chain + (found,))}")
    result = []
    with open(found, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", "//")):
                continue
            name, _, value = line.partition("=")
            if name in ("--flagfile", "-flagfile"):
                result.extend(_read_flagfile(value, found, chain + (found,)))
            else:
                result.append(line)
    return result


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing after expand_flagfiles (app.run's flags_parser)."""
    try:
        argv = expand_flagfiles(argv)
    except app.UsageError as e:
        print(f"tfbert: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


def _model_config(fv: flags.FlagValues, pretrained_config, vocab_size: int | None,
                  teacher_config=None):
    """--model (distillation: the teacher's shape unless --model is given), then
    --bert_config_file or --init_checkpoint's config, then single flags."""
    from tfbert.config import MODEL_PRESETS, ConfigError, ModelConfig

    if fv.model not in MODEL_PRESETS:
        raise ConfigError(f"--model={fv.model!r} is not one of {sorted(MODEL_PRESETS)}")
    values = dict(MODEL_PRESETS[fv.model])
    if teacher_config is not None and not fv["model"].present:
        values = dataclasses.asdict(teacher_config)
    if fv.bert_config_file:
        values.update(ModelConfig.bert_config_overrides(fv.bert_config_file))
    elif pretrained_config is not None:
        values.update(dataclasses.asdict(pretrained_config))
    for name in MODEL_OVERRIDES:
        if fv[name].present:
            values[name] = fv[name].value
    if "vocab_size" not in values:
        if vocab_size is None:
            raise ConfigError("the vocabulary size is unknown: give --vocab_file (a tokenizer), "
                              "--vocab_size or --bert_config_file")
        values["vocab_size"] = vocab_size
    elif vocab_size is not None and values["vocab_size"] != vocab_size:
        raise ConfigError(f"the tokenizer (--vocab_file) has {vocab_size} tokens but the model's "
                          f"vocab_size is {values['vocab_size']}: they must match")
    return ModelConfig(**values)


def zero_stage_from_flags(fv) -> int:
    """The ZeRO stage the flags ask for: --zero_stage when given, else 2 with
    --split_grad_accum, 1 with --custom_memory_optimization or --split_opt_state, else 0."""
    from tfbert import config as cfg

    on = fv.custom_memory_optimization or fv.split_opt_state or fv.split_grad_accum
    stage = fv.zero_stage
    if stage is None:
        return 2 if fv.split_grad_accum else 1 if on else 0
    if stage == 0 and on:
        raise cfg.ConfigError("--zero_stage=0 turns ZeRO off, but --custom_memory_optimization, "
                              "--split_opt_state or --split_grad_accum turns it on")
    if stage == 1 and fv.split_grad_accum:
        raise cfg.ConfigError("--split_grad_accum splits the gradient accumulators (ZeRO-2); "
                              "it contradicts --zero_stage=1")
    return stage


# Flags that only one --mode reads; given in another mode, they are an error, not ignored.
MODE_FLAGS = {
    "pretrain": ("cls_loss_weight", "num_cls_labels", "distil_loss_weight"),
    "finetune": ("task", "train_file", "eval_file", "pooler_dropout_prob", "reuse_head"),
    "predict": ("predict_file", "predictions_file"),
    "distill": ("teacher", "distill_temperature", "kl_loss_weight", "mlm_loss_weight",
                "hidden_cosine_loss_weight", "attention_mse_weight", "distill_layer_groups",
                "distill_attention_heads", "init_student_from_teacher"),
}
# ... and those that two modes read.
MODE_FLAGS_SHARED = {
    ("finetune", "predict"): ("text_column", "text_b_column", "label_column", "doc_stride",
                              "max_query_length", "max_answer_length",
                              "null_score_diff_threshold"),
    # Pretraining records.
    ("pretrain", "distill"): ("input_files", "max_predictions_per_seq", "dynamic_masking",
                              "masked_lm_prob", "num_readers", "shuffle_buffer", "eval_files",
                              "max_eval_steps"),
}


def check_mode_flags(fv: flags.FlagValues) -> None:
    """Refuses flags that --mode does not read."""
    from tfbert.config import ConfigError

    owners = {name: (mode,) for mode, names in MODE_FLAGS.items() for name in names}
    owners.update({name: modes for modes, names in MODE_FLAGS_SHARED.items() for name in names})
    for name, modes in owners.items():
        # A flag written out with its default (absl's flags_into_string) is not a request.
        if fv[name].present and fv[name].value != fv[name].default and fv.mode not in modes:
            raise ConfigError(f"--{name} is read by --mode={' / --mode='.join(modes)}, not by "
                              f"--mode={fv.mode}; drop it")
    if fv.mode == "finetune" and not fv.task:
        raise ConfigError(f"--mode=finetune needs --task (one of {FINETUNING_TASKS})")
    if fv.mode == "finetune" and not fv.train_file:
        raise ConfigError("--mode=finetune needs --train_file (a table: .tsv, .csv or .jsonl)")
    if fv.mode == "distill" and not fv.teacher:
        raise ConfigError("--mode=distill needs --teacher (a tfbert run directory, a "
                          "HuggingFace or a google-research/bert directory)")


def task_config(fv: flags.FlagValues):
    """The TaskConfig of --mode / --task and the evaluation flags (fine-tuning: the label set
    comes from the training table)."""
    from tfbert import config as cfg
    from tfbert.data.finetuning_dataset import label_names, read_table

    task = {"pretrain": "pretraining", "distill": "distillation"}.get(fv.mode, fv.task)
    labels = ()
    if task in ("classification", "token_classification"):
        labels = label_names(read_table(fv.train_file, "--train_file"), fv.train_file,
                             fv.label_column, task)
    has_evaluation = bool(fv.eval_file or fv.eval_files)
    best_metric = (fv.best_metric if fv.best_metric is not None
                   else cfg.DEFAULT_BEST_METRIC[task] if has_evaluation else "")
    return cfg.TaskConfig(
        task=task, eval_file=os.path.abspath(fv.eval_file) if fv.eval_file else "",
        text_column=fv.text_column, text_b_column=fv.text_b_column,
        label_column=fv.label_column, labels=labels, pooler_dropout_prob=fv.pooler_dropout_prob,
        reuse_head=fv.reuse_head, eval_files=tuple(fv.eval_files),
        max_eval_steps=fv.max_eval_steps, eval_batch_size=fv.eval_batch_size,
        eval_every_n_steps=fv.eval_every_n_steps, best_metric=best_metric,
        early_stopping_patience=fv.early_stopping_patience, doc_stride=fv.doc_stride,
        max_query_length=fv.max_query_length, max_answer_length=fv.max_answer_length,
        null_score_diff_threshold=fv.null_score_diff_threshold, cls_loss_weight=fv.cls_loss_weight,
        num_cls_labels=fv.num_cls_labels, distil_loss_weight=fv.distil_loss_weight,
        teacher=os.path.abspath(fv.teacher) if fv.teacher else "",
        distill_temperature=fv.distill_temperature, kl_loss_weight=fv.kl_loss_weight,
        mlm_loss_weight=fv.mlm_loss_weight,
        hidden_cosine_loss_weight=fv.hidden_cosine_loss_weight,
        attention_mse_weight=fv.attention_mse_weight,
        distill_layer_groups=tuple(fv.distill_layer_groups),
        distill_attention_heads=fv.distill_attention_heads,
        init_student_from_teacher=fv.init_student_from_teacher)


def build_config(fv: flags.FlagValues, group=None):
    """Flags -> (validated Config, tokenizer or None). Prepares the sample data when
    pretraining --input_files is empty.

    group: the run's ProcessGroups, or one group (then the world)."""
    group = getattr(group, "world", group)
    from tfbert import config as cfg
    from tfbert.tokenization import from_pretrained, load_tokenizer, tokenizer_files

    check_mode_flags(fv)
    records = fv.mode in ("pretrain", "distill")  # trains on pretraining records
    input_files, vocab_file, tokenizer_type = list(fv.input_files), fv.vocab_file, fv.tokenizer_type
    if not records:
        input_files = [os.path.abspath(fv.train_file)]
    pretrained_config = teacher_config = None
    if fv.init_checkpoint or fv.teacher:
        from tfbert.checkpoints import CheckpointError, pretrained_model_config
    if fv.init_checkpoint:
        # A pretrained model (tfbert run, HuggingFace or google directory) brings its model
        # config and its tokenizer.
        pretrained_config = pretrained_model_config(fv.init_checkpoint)
    if fv.teacher:
        # ... and so does a teacher: the student shares its tokenizer and, unless the model
        # flags say otherwise, its shape.
        teacher_config = pretrained_model_config(fv.teacher)
        if teacher_config is None:
            raise CheckpointError(f"--teacher={fv.teacher}: tfbert checkpoints without the "
                                  f"config.json of their run; give the run directory")
    for source in (fv.init_checkpoint, fv.teacher):
        if source and os.path.isdir(source) and not vocab_file and tokenizer_files(source):
            vocab_file = source  # a run, HuggingFace or google directory's tokenizer
    # Unset flags defer to what the tokenizer records (a directory's kind and casing).
    tokenizer_options = dict(
        tokenizer_type=tokenizer_type if fv["tokenizer_type"].present else None,
        do_lower_case=fv.do_lower_case if fv["do_lower_case"].present else None)
    tokenizer = from_pretrained(vocab_file, **tokenizer_options) if vocab_file else None
    if not records and tokenizer is None:
        raise cfg.ConfigError("fine-tuning tokenises text with the model's tokenizer: give "
                              "--init_checkpoint (a directory that holds one) or --vocab_file")
    if not input_files:
        from tfbert.data.sample import prepare_sample_data

        if tokenizer is not None:
            tokenizer_type, vocab_file = tokenizer.tokenizer_type, tokenizer.files[0]
        input_files, vocab_file = prepare_sample_data(
            tokenizer_type=tokenizer_type, vocab_file=vocab_file or None,
            max_seq_length=fv.max_seq_length, max_predictions_per_seq=fv.max_predictions_per_seq)
        tokenizer = tokenizer or from_pretrained(vocab_file, **tokenizer_options)
        # The sample records are tokenized with load_tokenizer's defaults (wordpiece: uncased).
        sample_tokenizer = load_tokenizer(tokenizer.tokenizer_type, vocab_file)
        if sample_tokenizer.tokenizer_config() != tokenizer.tokenizer_config():
            raise cfg.ConfigError(f"the sample corpus is tokenized by {sample_tokenizer}, not by "
                                  f"{tokenizer}; give --input_files")
    if tokenizer is not None:
        tokenizer_type, vocab_file = tokenizer.tokenizer_type, tokenizer.files[0]

    output_dir = fv.output_dir or default_output_dir(group)
    model = _model_config(fv, pretrained_config, tokenizer.vocab_size if tokenizer else None,
                          teacher_config)
    data = cfg.DataConfig(
        input_files=tuple(input_files), max_seq_length=fv.max_seq_length,
        max_predictions_per_seq=fv.max_predictions_per_seq if records else 0,
        train_batch_size=fv.train_batch_size,
        num_readers=fv.num_readers, shuffle_buffer=fv.shuffle_buffer,
        dynamic_masking=fv.dynamic_masking, masked_lm_prob=fv.masked_lm_prob,
        tokenizer_type=tokenizer_type, vocab_file=os.path.abspath(vocab_file) if vocab_file else "")
    optimizer = cfg.OptimizerConfig(
        optimizer=fv.optimizer, learning_rate=fv.learning_rate,
        num_warmup_steps=fv.num_warmup_steps, end_learning_rate=fv.end_learning_rate,
        decay_power=fv.decay_power, weight_decay_rate=fv.weight_decay_rate, beta_1=fv.beta_1,
        beta_2=fv.beta_2, epsilon=fv.epsilon, clip_norm=fv.clip_norm)
    runtime = cfg.RuntimeConfig(
        output_dir=output_dir, num_train_steps=fv.num_train_steps, precision=fv.precision,
        xla=fv.xla, memory_optimization=fv.memory_optimization,
        suppress_grappler=fv.suppress_grappler,
        enable_resource_variables=fv.enable_resource_variables, seed=fv.seed,
        deterministic=fv.deterministic,
        init_checkpoint=fv.init_checkpoint, init_embeddings_from=fv.init_embeddings_from,
        init_embeddings_max_words=fv.init_embeddings_max_words,
        freeze_embeddings_steps=fv.freeze_embeddings_steps,
        save_checkpoints_steps=fv.save_checkpoints_steps,
        save_checkpoints_secs=fv.save_checkpoints_secs,
        keep_checkpoint_max=fv.keep_checkpoint_max, log_every_n_steps=fv.log_every_n_steps,
        initial_loss_scale=fv.initial_loss_scale,
        loss_scale_growth_interval=fv.loss_scale_growth_interval,
        max_consecutive_nonfinite_steps=fv.max_consecutive_nonfinite_steps,
        step_timeout_secs=fv.step_timeout_secs,
        first_step_timeout_secs=fv.first_step_timeout_secs,
        debug_fail_at_step=fv.debug_fail_at_step, debug_fail_rank=fv.debug_fail_rank,
        debug_fail_mode=fv.debug_fail_mode)
    distribution = cfg.DistributionConfig(
        num_processes=group.size if group else 1, rank=group.rank if group else 0,
        hvd_fp16_compression=fv.hvd_fp16_compression, sparse_as_dense=fv.sparse_as_dense,
        hvd_fusion_threshold_mb=fv.hvd_fusion_threshold_mb,
        hvd_cycle_time_ms=fv.hvd_cycle_time_ms, hvd_stall_check_secs=fv.hvd_stall_check_secs,
        hvd_stall_shutdown_secs=fv.hvd_stall_shutdown_secs,
        scale_learning_rate=fv.scale_learning_rate,
        num_accumulation_steps=fv.num_accumulation_steps, grad_accum_dtype=fv.grad_accum_dtype,
        zero_stage=zero_stage_from_flags(fv), state_split_strategy=fv.state_split_strategy,
        tensor_parallel_size=fv.tensor_parallel_size)
    if not (group and group.uses_horovod):
        # Checked after the distribution config, whose errors (features not built) come first.
        for name in ("hvd_fp16_compression", "hvd_fusion_threshold_mb", "hvd_cycle_time_ms",
                     "hvd_stall_check_secs", "hvd_stall_shutdown_secs"):
            if fv[name].present and fv[name].value != fv[name].default:
                raise cfg.ConfigError(
                    f"--{name} acts on the all-reduce between ranks, but this process runs "
                    f"alone; launch with horovodrun (-np 1 is fine) or drop the flag")
    ops = cfg.FusedOpsConfig(ln_ytf_impl=fv.ln_ytf_impl,
                             attn_softmax_ytf_impl=fv.attn_softmax_ytf_impl, ytf_gelu=fv.ytf_gelu,
                             gelu_save_derivative=fv.gelu_save_derivative,
                             ytf_dropout=fv.ytf_dropout,
                             fused_bias_dropout_add=fv.fused_bias_dropout_add,
                             fused_qkv=fv.fused_qkv, fused_qkv_split=fv.fused_qkv_split,
                             fused_xent=fv.fused_xent,
                             ln_dtype=fv.ln_dtype)
    config = cfg.Config(model=model, data=data, optimizer=optimizer, runtime=runtime,
                        distribution=distribution, ops=ops, task=task_config(fv))
    check_custom_ops(config)
    if fv.init_embeddings_from and not os.path.isfile(fv.init_embeddings_from):
        # Checked on every rank: only rank 0 reads the file, later.
        raise cfg.ConfigError(f"--init_embeddings_from={fv.init_embeddings_from} does not exist")
    return config, tokenizer


def default_output_dir(group=None) -> str:
    """runs/tfbert-<time> by rank 0's clock, the same on every rank."""
    path = os.path.join("runs", "tfbert-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return group.broadcast_object(path) if group is not None else path


def check_custom_ops(config) -> None:
    """Fails at start when a fused op is asked for but cannot run here."""
    from tfbert.config import ConfigError

    op_of_flag = {"--ln_ytf_impl": "tf_bert_fused_layer_norm",
                  "--attn_softmax_ytf_impl": "tf_bert_fused_attention_softmax",
                  "--ytf_gelu": "tf_bert_fused_bias_gelu",
                  "--ytf_dropout": "tf_bert_fused_dropout",
                  "--fused_bias_dropout_add": "tf_bert_fused_bias_dropout_add",
                  "--fused_xent": "tf_bert_fused_softmax_cross_entropy",
                  "--fused_qkv_split": "tf_bert_fused_bias_split_heads",
                  "--optimizer=fused_lamb": "tf_bert_fused_lamb_update"}
    wanted = config.ops.enabled_flags() + (
        ["--optimizer=fused_lamb"] if config.optimizer.optimizer == "fused_lamb" else [])
    if not wanted:
        return
    import tensorflow as tf

    from tfbert.ops.loader import OpsNotBuiltError, gpu_kernels_built, load_ops

    try:
        library = load_ops()
    except OpsNotBuiltError as e:
        raise ConfigError(f"{', '.join(wanted)}: {e}") from None
    for flag in wanted:
        if not hasattr(library, op_of_flag[flag]):
            raise ConfigError(f"{flag}: the op library has no {op_of_flag[flag]}; rebuild it "
                              f"with `make ops`")
    if tf.config.list_physical_devices("GPU") and not gpu_kernels_built():
        raise ConfigError(f"{', '.join(wanted)}: this machine has a GPU but the op library was "
                          f"built without CUDA kernels; rebuild with `make ops WITH_CUDA=1`")


def print_summary(config, summary: dict, metrics=None) -> None:
    """metrics: the model's metric names (`BertTaskModel.metric_names`)."""
    gb = 2 ** 30
    metrics = metrics or [name[len("final_"):] for name in summary if name.startswith("final_")]
    if summary["steps_this_run"] == 0:
        print(f"\ntfbert: nothing to train: {config.runtime.output_dir} is at step "
              f"{summary['steps']} and --num_train_steps={config.runtime.num_train_steps}\n"
              f"  checkpoint:   {summary['checkpoint']}", flush=True)
        return
    from tfbert.training.trainer import format_figure

    first, final = ([f"{name} {format_figure(summary[f'{key}_{name}'])}" for name in metrics]
                    for key in ("first", "final"))
    evaluation = [f"{name[len('eval_'):]} {format_figure(value)}"
                  for name, value in summary.items()
                  if name.startswith("eval_") and name != "eval_step"]
    best = ""
    if summary.get("best_step") is not None:
        best = (f"\n  best:         {summary['best_metric']} "
                f"{summary['best_eval_' + summary['best_metric']]:.4f} at step "
                f"{summary['best_step']} ({summary['best_checkpoint']})"
                + (" (stopped early)" if summary["stopped_early"] else ""))
    print(
        f"\ntfbert: {summary['steps_this_run']} steps of {summary['task']}, the "
        f"{config.model.num_hidden_layers}x{config.model.hidden_size} model (now at step "
        f"{summary['steps']})\n"
        f"  first step:   {' | '.join(first)}\n"
        f"  last window:  {' | '.join(final)}\n"
        + (f"  evaluation:   {' | '.join(evaluation)} (step {summary['eval_step']})" + best + "\n"
           if evaluation else "") +
        f"  throughput:   {summary['examples_per_sec']:.1f} examples/s, "
        f"{summary['tokens_per_sec']:.0f} tokens/s per rank (first step excluded); "
        f"{summary['examples_per_sec_total']:.1f} examples/s over {summary['num_processes']} "
        f"rank(s)" + (f"; MFU {100 * summary['mfu']:.1f}% of the measured matmul peak"
                      if summary.get("mfu") is not None else "") + "\n"
        f"  peak memory:  {summary['peak_memory_bytes'] / gb:.3f} GB TensorFlow allocator "
        f"({summary['memory_device']}; {summary['peak_memory_bytes_min'] / gb:.3f}-"
        f"{summary['peak_memory_bytes_max'] / gb:.3f} GB over ranks), "
        f"{summary['peak_rss_bytes'] / gb:.2f} GB process RSS\n"
        f"  skipped:      {summary['skipped_steps']} steps with non-finite gradients\n"
        f"  checkpoint:   {summary['checkpoint']}\n"
        f"  summary:      {os.path.join(config.runtime.output_dir, 'summary.json')}",
        flush=True)


# Exit statuses: 0 trained (or nothing left to train), 1 crashed, 2 bad configuration or input,
# 3 diverged, 128 + N stopped by signal N after saving a checkpoint (resume with the same command).
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # TensorFlow's C++ INFO lines drown the training log; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if flags.FLAGS.xla == "auto":
        from tfbert.training.xla import request_cpu_autoclustering

        request_cpu_autoclustering()  # before TensorFlow is imported: see its docstring
    from tfbert.config import ConfigError
    from tfbert.data.pretraining_dataset import DataError
    from tfbert.tokenization import TokenizerError
    from tfbert.checkpoints import CheckpointError
    from tfbert.training.embedding_init import VectorFileError
    from tfbert.training.trainer import Preempted, TrainingDiverged

    from tfbert.distributed import create_process_groups

    fv = flags.FLAGS
    try:
        # Horovod is initialised before anything else touches TensorFlow's devices, with the
        # process sets of tensor parallelism.
        groups = create_process_groups(fv.tensor_parallel_size, fv.hvd_fp16_compression,
                                       fv.sparse_as_dense, fv.hvd_fusion_threshold_mb,
                                       fv.hvd_cycle_time_ms, fv.hvd_stall_check_secs,
                                       fv.hvd_stall_shutdown_secs)
        if not groups.world.is_chief:
            logging.set_verbosity(logging.WARNING)  # the console log comes from rank 0
        if fv.mode == "predict":
            check_mode_flags(fv)
            return predict(fv, groups.world)
        config, tokenizer = build_config(fv, groups)
        return train(config, tokenizer, groups)
    except (ConfigError, DataError, TokenizerError, CheckpointError, VectorFileError) as e:
        return _fail(f"{type(e).__name__}: {e}", EXIT_BAD_INPUT)
    except TrainingDiverged as e:
        return _fail(f"training diverged: {e}", EXIT_DIVERGED)
    except Preempted as e:
        return _fail(str(e), 128 + e.signal_number)


def _fail(message: str, status: int) -> int:
    logging.error("%s", message)
    print(f"tfbert: error: {message}", file=sys.stderr, flush=True)
    return status


def pretraining_data(config, tokenizer, data_group):
    """This rank's pretraining batches, and the evaluator of --eval_files (or None)."""
    import tensorflow as tf

    from tfbert.data.pretraining_dataset import (MaskingSpec, check_class_labels, check_records,
                                                 check_token_ids, pretraining_dataset,
                                                 resolve_input_files)
    from tfbert.training.evaluation import PretrainingEvaluator

    data, task = config.data, config.task
    labels = task.record_labels  # multi-task pretraining's

    def check(files):
        check_records(files, data.max_seq_length, data.max_predictions_per_seq, labels)
        check_token_ids(files, config.model.vocab_size)
        if task.cls_loss_weight:
            check_class_labels(files, task.num_cls_labels)

    files = resolve_input_files(list(data.input_files))
    check(files)
    masking = None
    if data.dynamic_masking:
        special = tokenizer.special_ids
        masking = MaskingSpec(vocab_size=config.model.vocab_size, mask_id=special["mask"],
                              cls_id=special["cls"], sep_id=special["sep"], pad_id=special["pad"],
                              masked_lm_prob=data.masked_lm_prob,
                              max_predictions_per_seq=data.max_predictions_per_seq)
    dataset = pretraining_dataset(
        files, batch_size=data.train_batch_size, max_seq_length=data.max_seq_length,
        max_predictions_per_seq=data.max_predictions_per_seq, is_training=True,
        num_readers=data.num_readers, shuffle_buffer=data.shuffle_buffer,
        seed=config.runtime.seed + data_group.rank, input_pipeline_id=data_group.rank,
        num_input_pipelines=data_group.size, dynamic_masking=masking, labels=labels)
    if not task.eval_files:
        return dataset, None
    eval_files = resolve_input_files(list(task.eval_files))
    check(eval_files)

    def eval_dataset() -> tf.data.Dataset:
        # The masks written in the records: every evaluation scores the same predictions.
        return pretraining_dataset(
            eval_files, batch_size=task.eval_batch_size, max_seq_length=data.max_seq_length,
            max_predictions_per_seq=data.max_predictions_per_seq, is_training=False,
            input_pipeline_id=data_group.rank, num_input_pipelines=data_group.size,
            labels=labels)

    return dataset, PretrainingEvaluator(eval_dataset, data_group, task.max_eval_steps)


def finetuning_data(config, tokenizer, data_group):
    """This rank's batches of the training table, and the evaluator of --eval_file (or None)."""
    from tfbert.data.finetuning_dataset import Columns, finetuning_dataset, load_examples
    from tfbert.training.evaluation import PredictionEvaluator

    data, task = config.data, config.task
    if task.task == "question_answering":
        return question_answering_data(config, tokenizer, data_group)
    columns = Columns(task.text_column, task.text_b_column, task.label_column)
    train = load_examples(data.input_files[0], tokenizer, data.max_seq_length, task.task,
                          columns, task.labels, what="--train_file")
    dataset = finetuning_dataset(train, data.train_batch_size, seed=config.runtime.seed,
                                 input_pipeline_id=data_group.rank,
                                 num_input_pipelines=data_group.size)
    if not task.eval_file:
        return dataset, None
    held_out = load_examples(task.eval_file, tokenizer, data.max_seq_length, task.task, columns,
                             task.labels, what="--eval_file")
    return dataset, PredictionEvaluator(held_out, data_group, task.eval_batch_size, task.labels)


def question_answering_data(config, tokenizer, data_group, eval_file: str | None = None):
    """SQuAD: this rank's batches of the training windows (None for prediction) and the
    evaluator of the evaluation file (or None)."""
    from tfbert.data.finetuning_dataset import finetuning_dataset
    from tfbert.data.squad import read_squad, squad_features
    from tfbert.training.evaluation import QuestionAnsweringEvaluator

    data, task = config.data, config.task

    def windows(examples):
        return squad_features(examples, tokenizer, data.max_seq_length, task.doc_stride,
                              task.max_query_length)

    dataset = None
    if eval_file is None:
        _, examples, _ = read_squad(data.input_files[0], "--train_file")
        train = windows(examples)
        dataset = finetuning_dataset(
            {name: train[name] for name in ("input_ids", "input_mask", "segment_ids",
                                            "start_position", "end_position")},
            data.train_batch_size, seed=config.runtime.seed, input_pipeline_id=data_group.rank,
            num_input_pipelines=data_group.size)
        eval_file, what = task.eval_file, "--eval_file"
    else:
        what = "--predict_file"
    if not eval_file:
        return dataset, None
    squad, examples, version_2 = read_squad(eval_file, what, with_answers=False)
    return dataset, QuestionAnsweringEvaluator(
        squad, examples, windows(examples), version_2, data_group, task.eval_batch_size,
        max_answer_length=task.max_answer_length,
        null_score_diff_threshold=task.null_score_diff_threshold)


def train(config, tokenizer, groups) -> int:
    """Trains `config` (any task) on the run's `ProcessGroups` (or one group: the world, no
    tensor parallelism); returns the exit status."""
    import tensorflow as tf

    from tfbert.training.run_dir import check_output_dir, write_run_files
    from tfbert.training.trainer import Trainer

    world = getattr(groups, "world", groups)
    # The ranks of one tensor-parallel group read the same shard of the data.
    data_group = getattr(groups, "data", groups)
    logging.info("Configuration:\n%s", config.to_json())
    # Before the input pipeline is built: tf.data's shuffle seeds combine with the global seed.
    tf.keras.utils.set_random_seed(config.runtime.seed)
    check_output_dir(config)
    task_data = pretraining_data if config.task.reads_records else finetuning_data
    dataset, evaluator = task_data(config, tokenizer, data_group)
    trainer = Trainer(config, dataset, groups, tokenizer=tokenizer, evaluator=evaluator)
    trainer.restore_or_initialize()
    # Only now, with the checkpoint restored: a failed resume leaves the run directory as it was.
    if world.is_chief:
        write_run_files(config, tokenizer)
    summary = trainer.train()
    if world.is_chief:
        print_summary(config, summary)
    return 0


def predict(fv, group) -> int:
    """--mode=predict: the predictions of a fine-tuned model for every row of --predict_file,
    written as JSON lines (each rank predicts its share; rank 0 writes). Scored too when the
    table has labels."""
    import json

    import tensorflow as tf

    from tfbert.checkpoints import CheckpointError, init_from_pretrained
    from tfbert.checkpoints.pretrained import TFBERT_CONFIG_FILE, tfbert_run_dir
    from tfbert.config import Config, ConfigError
    from tfbert.data.finetuning_dataset import Columns, load_examples, read_table
    from tfbert.modeling.layers.dropout import DropoutRng
    from tfbert.modeling.models import create_model
    from tfbert.tokenization import from_pretrained
    from tfbert.training.evaluation import PredictionEvaluator

    if not fv.init_checkpoint or not fv.predict_file:
        raise ConfigError("--mode=predict needs --init_checkpoint (a fine-tuned run directory or "
                          "its best/) and --predict_file")
    run_dir = tfbert_run_dir(fv.init_checkpoint) if os.path.exists(fv.init_checkpoint) else None
    if run_dir is None:
        raise CheckpointError(f"--init_checkpoint={fv.init_checkpoint} is not a tfbert run "
                              f"directory (with {TFBERT_CONFIG_FILE})")
    trained = Config.load(os.path.join(run_dir, TFBERT_CONFIG_FILE))
    task = trained.task
    if task.reads_records:
        raise ConfigError(f"--init_checkpoint={fv.init_checkpoint} is a {task.task} run; "
                          f"--mode=predict needs a fine-tuned one (--mode=finetune)")
    config = dataclasses.replace(
        trained, runtime=dataclasses.replace(trained.runtime, precision=fv.precision,
                                             output_dir=run_dir),
        task=dataclasses.replace(
            task, text_column=fv.text_column, text_b_column=fv.text_b_column,
            label_column=fv.label_column, doc_stride=fv.doc_stride,
            max_query_length=fv.max_query_length, max_answer_length=fv.max_answer_length,
            null_score_diff_threshold=fv.null_score_diff_threshold))
    task = config.task
    tokenizer = from_pretrained(run_dir)
    model = create_model(config, rng=DropoutRng(config.runtime.seed))  # inference: unused
    model.build(config.data.max_seq_length)
    source = init_from_pretrained(model, fv.init_checkpoint)
    logging.info("Predicting with %s", source)
    path = fv.predictions_file or os.path.splitext(fv.predict_file)[0] + ".predictions.jsonl"
    if task.task == "question_answering":
        _, evaluator = question_answering_data(config, tokenizer, group, fv.predict_file)
        answers = evaluator.answers(model)
        scores = evaluator.score(answers) if evaluator.has_answers else {}
        lines = [json.dumps(dict(id=qid, answer=text)) for qid, text in answers.items()]
        return _write_predictions(group, lines, path, fv.predict_file, scores)
    columns = Columns(fv.text_column, fv.text_b_column, fv.label_column)
    with_labels = fv.label_column in read_table(fv.predict_file, "--predict_file").columns
    examples = load_examples(fv.predict_file, tokenizer, config.data.max_seq_length, task.task,
                             columns, task.labels, what="--predict_file", with_labels=with_labels)
    evaluator = PredictionEvaluator(examples, group, fv.eval_batch_size, task.labels)
    outputs = evaluator.predict(model)
    scores = evaluator.score(outputs) if with_labels else {}
    lines = []
    if "score" in outputs:
        lines = [json.dumps(dict(index=i, score=float(score)))
                 for i, score in enumerate(outputs["score"])]
    elif outputs["logits"].ndim == 3:  # a tag per word, from its first sub-token
        predicted = outputs["logits"].argmax(axis=-1)
        lines = [json.dumps(dict(index=i, tags=[task.labels[t] for t in row[starts > 0]]))
                 for i, (row, starts) in enumerate(zip(predicted, examples["word_start"]))]
    else:
        probabilities = tf.nn.softmax(outputs["logits"]).numpy()
        for i, row in enumerate(probabilities):
            lines.append(json.dumps(dict(index=i, label=task.labels[int(row.argmax())],
                                         probabilities=dict(zip(task.labels,
                                                                map(float, row))))))
    return _write_predictions(group, lines, path, fv.predict_file, scores)


def _write_predictions(group, lines: list[str], path: str, source: str, scores: dict) -> int:
    """Rank 0 writes the predictions (JSON lines) and prints the scores."""
    from tfbert.config import atomic_write_text

    if group.is_chief:
        atomic_write_text(path, "\n".join(lines) + "\n")
        print(f"\ntfbert: {len(lines)} predictions of {source} -> {path}"
              + "".join(f"\n  {name}: {value:.4f}" for name, value in scores.items()),
              flush=True)
    return 0


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
