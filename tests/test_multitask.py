"""Multi-task pretraining: labels from extra input columns through create_pretraining_data into
the records, and MLM + NSP + sequence classification (cls_loss) + regression to a teacher score
(distil_mse) trained and evaluated separately on held-out records."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfbert import config as cfg
from tfbert import run
from tfbert.data.create_pretraining_data import create_pretraining_data
from tfbert.data.pretraining_dataset import DataError, check_records, pretraining_dataset
from tfbert.data.sample import prepare_sample_data, sample_corpus_files
from tfbert.distributed import SingleProcess
from tfbert.tokenization import from_pretrained
from test_finetuning import parse


def labelled_corpus(directory) -> list[str]:
    """The sample corpus cut into 4-line documents, each labelled on its first line: class 0
    for English prose, 1 for Russian; the teacher's score is the document's share of Latin
    letters (a fact of its text a model can learn)."""
    paths = []
    for source in sample_corpus_files():
        lines = [line.strip() for line in open(source, encoding="utf-8") if line.strip()]
        documents = []
        for start in range(0, len(lines) - 3, 4):
            text = lines[start:start + 4]
            letters = [c for c in "".join(text) if c.isalpha()]
            latin = sum(c.isascii() for c in letters) / max(len(letters), 1)
            label = 0 if os.path.basename(source).startswith("en_") else 1
            documents.append([f"{text[0]}\t{label}\t{latin:.3f}"] + text[1:])
        path = os.path.join(directory, os.path.basename(source))
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join("\n".join(d) for d in documents) + "\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def records(tmp_path_factory, tfbert_cache):
    """(train records, held-out records, tokenizer file) with cls_label and teacher_score."""
    _, vocab_file = prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)
    tokenizer = from_pretrained(vocab_file)
    root = tmp_path_factory.mktemp("multitask")
    corpus = labelled_corpus(str(root))
    made = {}
    for name, files, seed in (("train", corpus, 1), ("held_out", corpus[::2], 2)):
        stats = create_pretraining_data(
            files, str(root / name), tokenizer, max_seq_length=32, max_predictions_per_seq=5,
            dupe_factor=1, random_seed=seed, label_columns=("cls_label", "teacher_score"))
        made[name] = stats["files"]
    return made["train"], made["held_out"], vocab_file


def test_labels_round_trip_from_input_columns_to_record_features(records):
    train, _, _ = records
    check_records(train, 32, 5, labels=("cls_label", "teacher_score"))
    batch = next(iter(pretraining_dataset(train, batch_size=64, max_seq_length=32,
                                          max_predictions_per_seq=5, is_training=False,
                                          labels=("cls_label", "teacher_score"))))
    labels = batch["cls_label"].numpy()[:, 0]
    scores = batch["teacher_score"].numpy()[:, 0]
    assert batch["cls_label"].dtype == tf.int32 and batch["teacher_score"].dtype == tf.float32
    assert set(labels) <= {0, 1} and 0 <= scores.min() and scores.max() <= 1
    # English documents (class 0) are mostly Latin letters, Russian ones (class 1) hardly any.
    assert scores[labels == 0].min() > 0.9 and scores[labels == 1].max() < 0.2
    # Records without the labels are refused by a run that needs them.
    plain, _ = prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)
    with pytest.raises(DataError, match="lacks the label 'teacher_score'.*--label_columns"):
        check_records(plain, 32, 5, labels=("teacher_score",))


def test_bad_label_columns_name_the_line(tmp_path, records):
    tokenizer = from_pretrained(records[2])
    corpus = tmp_path / "corpus.txt"
    for text, message in [("A river.\t1\n", r"corpus.txt:1: 1 value\(s\) after the text"),
                          ("A river.\tx\t0.5\n", r"corpus.txt:1: cls_label 'x' is not an integer"),
                          ("A river.\t1\t0.5\nIt flows.\t0\t0.5\n",
                           r"corpus.txt:2: labels .* differ from the document's"),
                          ("A river.\n", r"corpus.txt:1: a document without its labels")]:
        corpus.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            create_pretraining_data([str(corpus)], str(tmp_path / "out"), tokenizer,
                                    max_seq_length=32, max_predictions_per_seq=5,
                                    label_columns=("cls_label", "teacher_score"))


def test_every_loss_falls_and_is_evaluated_separately(records, tmp_path):
    train, held_out, vocab_file = records
    out = tmp_path / "run"
    config, tokenizer = run.build_config(parse(
        f"--input_files={','.join(train)}", f"--eval_files={','.join(held_out)}",
        f"--vocab_file={vocab_file}", f"--output_dir={out}", "--max_seq_length=32",
        "--max_predictions_per_seq=5", "--train_batch_size=16", "--eval_batch_size=16",
        "--max_eval_steps=4", "--num_train_steps=100", "--log_every_n_steps=10",
        "--eval_every_n_steps=50", "--cls_loss_weight=0.5", "--distil_loss_weight=2.0",
        "--optimizer=adamw", "--learning_rate=2e-3", "--num_warmup_steps=5"))
    assert config.task.record_labels == ("cls_label", "teacher_score")
    assert run.train(config, tokenizer, SingleProcess()) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("mlm_loss", "cls_loss", "distil_mse"):
        assert summary[f"final_{name}"] < summary[f"first_{name}"], name
    # Held-out figures for each loss, and the total weighted as in training.
    for name in ("eval_mlm_loss", "eval_nsp_loss", "eval_cls_loss", "eval_cls_accuracy",
                 "eval_distil_mse"):
        assert np.isfinite(summary[name]), name
    assert summary["eval_loss"] == pytest.approx(
        summary["eval_mlm_loss"] + summary["eval_nsp_loss"] + 0.5 * summary["eval_cls_loss"]
        + 2.0 * summary["eval_distil_mse"])
    evaluations = [json.loads(line) for line in open(out / "log.jsonl") if "eval_" in line]
    assert [e["step"] for e in evaluations] == [50, 100]
    assert evaluations[1]["eval_distil_mse"] < evaluations[0]["eval_distil_mse"]
    # The new heads are checkpointed under their documented names.
    names = tf.train.load_checkpoint(str(out / "ckpt-100")).get_variable_to_shape_map()
    assert names["cls/sequence_classification/output_weights"] == [2, 128]
    assert names["cls/teacher_score/output_weights"] == [1, 128]
    assert cfg.Config.load(str(out / "config.json")).task.distil_loss_weight == 2.0


def test_multitask_settings_that_cannot_work_are_refused(records):
    train, _, vocab_file = records
    common = [f"--input_files={','.join(train)}", f"--vocab_file={vocab_file}",
              "--output_dir=/tmp/unused", "--max_seq_length=32", "--max_predictions_per_seq=5"]
    with pytest.raises(cfg.ConfigError, match="--cls_loss_weight is read by --mode=pretrain"):
        run.build_config(parse("--mode=finetune", "--task=regression", "--train_file=x.tsv",
                               "--cls_loss_weight=1"))
    with pytest.raises(cfg.ConfigError, match="--num_cls_labels must be >= 2"):
        run.build_config(parse(*common, "--cls_loss_weight=1", "--num_cls_labels=1"))
    assert run.build_config(parse(*common, "--cls_loss_weight=1"))[0].task.record_labels == (
        "cls_label",)
    from tfbert.data.pretraining_dataset import check_class_labels

    with pytest.raises(DataError, match=r"cls_label 1, outside \[0, --num_cls_labels=1\)"):
        check_class_labels(train, 1)
