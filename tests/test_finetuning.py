"""Fine-tuning on the one training loop: tables in, classification and regression learnt,
evaluation, the best checkpoint, early stopping, --reuse_head, prediction, and the errors of
bad input. Evaluation under 2 ranks is compared with one process in a real horovodrun job."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from conftest import REPO_ROOT
from tfbert import config as cfg
from tfbert import run
from tfbert.checkpoints import open_pretrained
from tfbert.data.finetuning_dataset import Columns, load_examples
from tfbert.data.pretraining_dataset import DataError
from tfbert.data.sample import prepare_sample_data
from tfbert.distributed import SingleProcess
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models import BertPretrainer
from tfbert.tokenization import from_pretrained
from tfbert.training.evaluation import classification_scores, regression_scores
from tfbert.training.trainer import Trainer
from test_distributed import HOROVOD_ENV
from test_zero import HOROVODRUN, needs_horovod

WORDS = ("river stone water hill rain snow valley stream field road house train night city "
         "light farm").split()
SEQ = ["--max_seq_length=32", "--train_batch_size=16", "--eval_batch_size=16"]
FINETUNE = ["--mode=finetune", "--optimizer=adamw", "--learning_rate=1e-3",
            "--num_warmup_steps=6", "--log_every_n_steps=10", *SEQ]


def parse(*argv) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    run.define_flags(flag_values)
    flag_values(["tfbert.run", *argv])
    return flag_values


def train(*argv) -> dict:
    """Runs the entry point's training in this process; returns summary.json."""
    config, tokenizer = run.build_config(parse(*argv))
    assert run.train(config, tokenizer, SingleProcess()) == 0
    with open(os.path.join(config.runtime.output_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def write_table(path, rows, columns=("text", "label")) -> str:
    """rows: tuples in `columns` order; the format follows the extension."""
    path = str(path)
    if path.endswith(".jsonl"):
        lines = [json.dumps(dict(zip(columns, row))) for row in rows]
    else:
        sep = "\t" if path.endswith(".tsv") else ","
        lines = [sep.join(columns)] + [sep.join(str(v) for v in row) for row in rows]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def sentiment_rows(count: int, seed: int):
    """A separable task: one key word in random filler says the class."""
    rng = random.Random(seed)
    keys = {"pos": ("sunny", "warm", "bright"), "neg": ("cold", "dark", "storm")}
    rows = []
    for _ in range(count):
        label = rng.choice(("pos", "neg"))
        words = rng.choices(WORDS, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(keys[label]))
        rows.append((" ".join(words), label))
    return rows


def tagged_sentences(count: int, seed: int):
    """NER: people and places (one or two words) among filler words, tagged IOB2."""
    rng = random.Random(seed)
    entities = [(["anna"], "PER"), (["boris"], "PER"), (["maria", "ivanova"], "PER"),
                (["paris"], "LOC"), (["new", "york"], "LOC"), (["moscow"], "LOC")]
    rows = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.3:
                names, kind = rng.choice(entities)
                words += names
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(names) - 1)
            else:
                words.append(rng.choice(WORDS))
                tags.append("O")
        rows.append((words, tags))
    return rows


CITIES = ("paris", "moscow", "berlin", "london", "rome", "madrid")


def squad_file(path, count: int, seed: int, impossible: float = 0.0) -> str:
    """A SQuAD-format file: "which city ?" about contexts of 8-30 filler words holding one
    city (or, for a share `impossible` of the questions, none: SQuAD v2.0)."""
    rng = random.Random(seed)
    articles = []
    for i in range(count):
        words = rng.choices(WORDS, k=rng.randint(8, 30))
        qa = dict(id=f"q{i}", question="which city is it ?")
        if rng.random() < impossible:
            qa.update(answers=[], is_impossible=True)
        else:
            city = rng.choice(CITIES)
            position = rng.randint(0, len(words))
            words.insert(position, city)
            start = len(" ".join(words[:position])) + (1 if position else 0)
            qa.update(answers=[dict(text=city, answer_start=start)], is_impossible=False)
        articles.append(dict(title=f"t{i}", paragraphs=[dict(context=" ".join(words),
                                                             qas=[qa])]))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(version="v2.0" if impossible else "v1.1", data=articles), f)
    return str(path)


def counting_pairs(count: int, seed: int):
    """A pair regression: the score is how many times "sunny" occurs in the second text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        k = rng.randint(0, 3)
        b = rng.choices(WORDS, k=4) + ["sunny"] * k
        rng.shuffle(b)
        rows.append((" ".join(rng.choices(WORDS, k=5)), " ".join(b), float(k)))
    return rows


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tfbert_cache):
    """A run directory of the default tiny model, pretrained briefly on the sample corpus."""
    prepare_sample_data(max_seq_length=32, max_predictions_per_seq=5)
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(f"--output_dir={out}", "--num_train_steps=10", "--max_seq_length=32",
          "--max_predictions_per_seq=5", "--train_batch_size=16", "--log_every_n_steps=5")
    return str(out)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    return dict(
        train=write_table(root / "train.tsv", sentiment_rows(160, 0)),
        # 41 rows: 2 ranks get unequal shares.
        dev=write_table(root / "dev.tsv", sentiment_rows(41, 1)),
        pairs_train=write_table(root / "pairs_train.csv", counting_pairs(192, 2),
                                ("first", "second", "score")),
        pairs_dev=write_table(root / "pairs_dev.jsonl", counting_pairs(40, 3),
                              ("first", "second", "score")),
        # Words and tags as JSON lists, and as space-separated strings in a TSV.
        ner_train=write_table(root / "ner_train.jsonl", tagged_sentences(160, 4),
                              ("tokens", "tags")),
        ner_dev=write_table(root / "ner_dev.tsv", [(" ".join(w), " ".join(t))
                                                    for w, t in tagged_sentences(40, 5)],
                            ("tokens", "tags")))


@pytest.fixture(scope="module")
def classifier(pretrained, tables, tmp_path_factory):
    """A classifier fine-tuned from `pretrained`, evaluated every 20 steps: (run dir, summary)."""
    out = tmp_path_factory.mktemp("classifier") / "run"
    summary = train(*FINETUNE, "--task=classification", f"--init_checkpoint={pretrained}",
                    f"--train_file={tables['train']}", f"--eval_file={tables['dev']}",
                    f"--output_dir={out}", "--num_train_steps=60", "--eval_every_n_steps=20")
    return str(out), summary


def test_classification_learns_a_separable_task_and_keeps_the_best_checkpoint(classifier):
    out, summary = classifier
    assert summary["task"] == "classification" and summary["steps"] == 60
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_f1"] >= 0.9, summary
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["best_metric"] == "accuracy"
    assert summary["best_eval_accuracy"] >= summary["eval_accuracy"]
    # Every evaluation is logged; the best one's checkpoint is a model directory of its own.
    evaluations = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))
                   if "eval_accuracy" in line]
    assert [e["step"] for e in evaluations] == [20, 40, 60]
    best = max(evaluations, key=lambda e: e["eval_accuracy"])  # the first of equals
    assert summary["best_step"] == best["step"]
    assert os.path.exists(summary["best_checkpoint"] + ".index")
    state = json.load(open(os.path.join(out, "best", "best.json")))
    assert state["step"] == best["step"] and state["value"] == best["eval_accuracy"]
    assert open_pretrained(os.path.join(out, "best")).model_config.hidden_size == 128
    config = cfg.Config.load(os.path.join(out, "config.json"))
    assert config.task.labels == ("neg", "pos")  # sorted label names, saved with the run


def test_predict_writes_the_best_checkpoints_predictions_and_scores(classifier, tables, tmp_path,
                                                                     capsys):
    out, summary = classifier
    predictions = tmp_path / "predictions.jsonl"
    fv = parse("--mode=predict", f"--init_checkpoint={out}/best",
               f"--predict_file={tables['dev']}", f"--predictions_file={predictions}")
    assert run.predict(fv, SingleProcess()) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    labels = [line.split("\t")[1] for line in open(tables["dev"]).read().splitlines()[1:]]
    assert [r["index"] for r in rows] == list(range(41))
    accuracy = np.mean([r["label"] == label for r, label in zip(rows, labels)])
    assert accuracy == pytest.approx(summary["best_eval_accuracy"])
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert f"accuracy: {summary['best_eval_accuracy']:.4f}" in capsys.readouterr().out


def test_pair_regression_learns_and_reports_correlations(pretrained, tables, tmp_path):
    summary = train(*FINETUNE, "--task=regression", f"--init_checkpoint={pretrained}",
                    f"--train_file={tables['pairs_train']}", f"--eval_file={tables['pairs_dev']}",
                    "--text_column=first", "--text_b_column=second", "--label_column=score",
                    f"--output_dir={tmp_path / 'run'}", "--num_train_steps=80",
                    "--learning_rate=2e-3")
    # Predicting the mean (variance of uniform 0..3 = 1.25) would give mse ~1.25, pearson ~0.
    assert summary["eval_mse"] < 0.5 and summary["eval_pearson"] > 0.8, summary
    assert summary["best_metric"] == "pearson" and summary["best_step"] == 80


def test_pair_classification_learns_from_the_second_text(pretrained, tmp_path):
    # "many" when the second text holds "sunny" at least twice: the label needs text_b.
    rows = [(a, b, "many" if k >= 2 else "few") for a, b, k in counting_pairs(232, 2)]
    columns = ("text", "text_b", "label")
    train_file = write_table(tmp_path / "train.tsv", rows[:192], columns)
    dev_file = write_table(tmp_path / "dev.tsv", rows[192:], columns)
    summary = train(*FINETUNE, "--task=classification", f"--init_checkpoint={pretrained}",
                    f"--train_file={train_file}", f"--eval_file={dev_file}",
                    f"--output_dir={tmp_path / 'run'}", "--num_train_steps=80",
                    "--learning_rate=2e-3")
    assert summary["eval_accuracy"] >= 0.85 and summary["eval_f1"] >= 0.85, summary


def test_token_classification_learns_entities_and_predicts_a_tag_per_word(pretrained, tables,
                                                                          tmp_path):
    out = tmp_path / "run"
    summary = train(*FINETUNE, "--task=token_classification", f"--init_checkpoint={pretrained}",
                    f"--train_file={tables['ner_train']}", f"--eval_file={tables['ner_dev']}",
                    "--text_column=tokens", "--label_column=tags", f"--output_dir={out}",
                    "--num_train_steps=60", "--learning_rate=2e-3")
    assert summary["best_metric"] == "f1"
    assert summary["eval_f1"] > 0.8 and summary["eval_accuracy"] > 0.9, summary
    assert cfg.Config.load(str(out / "config.json")).task.labels == (
        "B-LOC", "B-PER", "I-LOC", "I-PER", "O")
    predictions = tmp_path / "tags.jsonl"
    fv = parse("--mode=predict", f"--init_checkpoint={out}", f"--predict_file={tables['ner_dev']}",
               "--text_column=tokens", "--label_column=tags", f"--predictions_file={predictions}")
    assert run.predict(fv, SingleProcess()) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    gold = [line.split("\t")[1].split() for line in open(tables["ner_dev"]).read().splitlines()[1:]]
    assert [len(r["tags"]) for r in rows] == [len(tags) for tags in gold]  # one per word
    hits = sum(p == g for r, tags in zip(rows, gold) for p, g in zip(r["tags"], tags))
    assert hits / sum(map(len, gold)) == pytest.approx(summary["eval_accuracy"])


def test_words_get_their_tag_on_the_first_sub_token(pretrained, tmp_path):
    tokenizer = from_pretrained(pretrained)
    path = write_table(tmp_path / "ner.jsonl", [(["anna", "riverstonewater"], ["B-PER", "O"])],
                       ("text", "label"))
    features = load_examples(path, tokenizer, 16, "token_classification",
                             labels=("B-PER", "O"))
    pieces = [len(tokenizer.tokenize(w)) for w in ("anna", "riverstonewater")]
    assert pieces[1] > 1  # the long word is split: only its first piece carries the tag
    expected = [-1, 0] + [-1] * (pieces[0] - 1) + [1] + [-1] * (pieces[1] - 1) + [-1]
    assert list(features["label"][0, :len(expected)]) == expected
    assert (features["label"][0, len(expected):] == -1).all()
    assert list(np.flatnonzero(features["word_start"][0])) == [1, 1 + pieces[0]]
    bad = write_table(tmp_path / "bad.jsonl", [(["anna", "paris"], ["B-PER"])], ("text", "label"))
    with pytest.raises(DataError, match="row 1: 2 words but 1 tags"):
        load_examples(bad, tokenizer, 16, "token_classification", labels=("B-PER", "O"))


def test_question_answering_finds_the_answers_and_when_there_is_none(pretrained, tmp_path):
    # SQuAD v2.0: 30% of the questions have no answer. Short windows (32 tokens, an 8-token
    # stride) over contexts of up to 31 words: most contexts span several windows, and the
    # answer must be found in the right one.
    train_file = squad_file(tmp_path / "train.json", 240, 6, impossible=0.3)
    dev_file = squad_file(tmp_path / "dev.json", 40, 7, impossible=0.3)
    out = tmp_path / "run"
    summary = train(*FINETUNE, "--task=question_answering", f"--init_checkpoint={pretrained}",
                    f"--train_file={train_file}", f"--eval_file={dev_file}",
                    f"--output_dir={out}", "--num_train_steps=100", "--learning_rate=2e-3",
                    "--doc_stride=8", "--max_query_length=8", "--max_answer_length=4")
    assert summary["best_metric"] == "f1"
    assert summary["eval_exact_match"] > 80 and summary["eval_f1"] > 80, summary
    predictions = tmp_path / "answers.jsonl"
    fv = parse("--mode=predict", f"--init_checkpoint={out}", f"--predict_file={dev_file}",
               f"--predictions_file={predictions}", "--doc_stride=8", "--max_query_length=8",
               "--max_answer_length=4")
    assert run.predict(fv, SingleProcess()) == 0
    answers = {r["id"]: r["answer"] for r in map(json.loads, predictions.read_text().splitlines())}
    gold = {qa["id"]: [a["text"] for a in qa["answers"]] or [""]
            for article in json.load(open(dev_file))["data"]
            for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    exact = np.mean([answers[qid] in texts for qid, texts in gold.items()])
    assert 100 * exact == pytest.approx(summary["eval_exact_match"])


def test_squad_scores_are_the_official_scripts_in_percent(tmp_path):
    from tfbert.data.squad import read_squad, squad_scores

    data, examples, version_2 = read_squad(squad_file(tmp_path / "v1.json", 4, 8))
    assert not version_2
    answers = {e.id: e.answers[0] for e in examples}
    answers[examples[0].id] = "the " + examples[0].answers[0] + " river"  # 1 of 3 words right
    scores = squad_scores(data, answers, version_2=False)
    assert scores["exact_match"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(100 * (3 + 2 * (1 / 2) * 1 / (1 / 2 + 1)) / 4)
    data, examples, version_2 = read_squad(squad_file(tmp_path / "v2.json", 6, 9, 0.5))
    assert version_2 and any(e.is_impossible for e in examples)
    answers = {e.id: "" if e.is_impossible else e.answers[0] for e in examples}
    assert squad_scores(data, answers, version_2=True) == dict(exact_match=100.0, f1=100.0)


def test_squad_windows_hold_the_answer_where_it_is_whole(pretrained):
    from tfbert.data.squad import SquadExample, best_answers, squad_features

    tokenizer = from_pretrained(pretrained)
    words = [f"w{i}" for i in range(12)] + ["paris"] + ["stone"] * 6
    example = SquadExample("q", "which city ?", words, ["paris"], start_word=12, end_word=12)
    features = squad_features([example], tokenizer, 24, doc_stride=4, max_query_length=8)
    query = len(tokenizer.tokenize("which city ?"))
    assert len(features["input_ids"]) > 2 and (features["example_index"] == 0).all()
    paris = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("paris"))
    for window in range(len(features["input_ids"])):
        ids = list(features["input_ids"][window])
        start = features["start_position"][window]
        if start:  # the answer's tokens, and the word they map to
            assert ids[start:features["end_position"][window] + 1] == paris
            assert features["token_to_word"][window][start] == 12
        else:  # not (wholly) in this window
            assert not any(ids[i:i + len(paris)] == paris and
                           features["token_to_word"][window][i] == 12 for i in range(24))
        assert (features["token_to_word"][window][:query + 2] == -1).all()
    # Each context token has its most context in exactly one window.
    counts = np.zeros(len(words), int)
    for window in range(len(features["input_ids"])):
        for i in np.flatnonzero(features["max_context"][window]):
            counts[features["token_to_word"][window][i]] += 1
    assert list(counts) == [len(tokenizer.tokenize(word)) for word in words]
    # Logits that point at the answer's tokens give the answer's words back.
    start_logits = np.zeros(features["input_ids"].shape)
    end_logits = np.zeros(features["input_ids"].shape)
    for window in range(len(features["input_ids"])):
        if features["start_position"][window] and features["max_context"][window][
                features["start_position"][window]]:
            start_logits[window, features["start_position"][window]] = 10
            end_logits[window, features["end_position"][window]] = 10
    assert best_answers([example], features, start_logits, end_logits) == {"q": "paris"}


def test_the_null_answer_wins_by_the_threshold_and_pooler_dropout_reaches_the_head(pretrained,
                                                                                 tables):
    from tfbert.data.squad import SquadExample, best_answers, squad_features

    tokenizer = from_pretrained(pretrained)
    example = SquadExample("q", "which city ?", ["paris", "stone"], [])
    features = squad_features([example], tokenizer, 24, doc_stride=8, max_query_length=8)
    start, end = np.zeros(features["input_ids"].shape), np.zeros(features["input_ids"].shape)
    first = int(np.flatnonzero(features["token_to_word"][0] == 0)[0])
    start[0, first], end[0, first] = 3.0, 3.0  # the span scores 6, the null answer 0
    for threshold, answer in ((-7.0, ""), (-5.0, "paris"), (0.0, "paris")):
        assert best_answers([example], features, start, end, version_2=True,
                            null_score_diff_threshold=threshold) == {"q": answer}, threshold
    config, _ = run.build_config(parse(
        *FINETUNE, "--task=classification", f"--init_checkpoint={pretrained}",
        f"--train_file={tables['train']}", "--output_dir=/tmp/unused",
        "--pooler_dropout_prob=0.37"))
    from tfbert.modeling.models import create_model

    assert create_model(config, DropoutRng(0)).classifier.dropout.rate == 0.37


def test_bad_squad_files_say_which_question(tmp_path):
    from tfbert.data.squad import read_squad

    path = tmp_path / "bad.json"
    for content, message in [
            ("{", "is not JSON"), ("{}", "no \"data\" list"),
            (json.dumps(dict(data=[dict(paragraphs=[dict(context="a b", qas=[dict(
                id="q1", question="x?", answers=[dict(text="c", answer_start=0)])])])])),
             "question 'q1': the answer 'c' is not at answer_start 0"),
            (json.dumps(dict(data=[])), "holds no questions")]:
        path.write_text(content)
        with pytest.raises(DataError, match=message):
            read_squad(str(path))


def test_early_stopping_stops_after_the_patience_and_keeps_the_first_best(pretrained, tables,
                                                                          tmp_path):
    # A learning rate too small to change a prediction: the accuracy never improves.
    summary = train(*FINETUNE, "--task=classification", f"--init_checkpoint={pretrained}",
                    f"--train_file={tables['train']}", f"--eval_file={tables['dev']}",
                    f"--output_dir={tmp_path / 'run'}", "--num_train_steps=50",
                    "--learning_rate=1e-12", "--eval_every_n_steps=4",
                    "--early_stopping_patience=2")
    assert summary["stopped_early"] is True
    assert summary["steps"] == 12 and summary["best_step"] == 4, summary
    assert (tmp_path / "run" / "ckpt-12.index").exists()  # a checkpoint of where it stopped


def test_reuse_head_copies_the_next_sentence_head_and_the_encoder_loads_without_its_heads(
        pretrained, tables, tmp_path):
    source = open_pretrained(pretrained).weights

    def classifier(*extra):
        config, tokenizer = run.build_config(parse(
            *FINETUNE, "--task=classification", f"--init_checkpoint={pretrained}",
            f"--train_file={tables['train']}", f"--output_dir={tmp_path / 'run'}", *extra))
        examples = load_examples(tables["train"], tokenizer, 32, "classification",
                                 labels=config.task.labels)
        dataset = tf.data.Dataset.from_tensor_slices(examples).batch(4)
        trainer = Trainer(config, dataset)
        trainer.restore_or_initialize()
        return trainer.model.variables_by_name()

    reused = classifier("--reuse_head")
    for name, checkpoint_name in (("classifier/output_weights",
                                   "cls/seq_relationship/output_weights"),
                                  ("classifier/output_bias", "cls/seq_relationship/output_bias")):
        np.testing.assert_array_equal(reused[name].numpy(), source.read(checkpoint_name))
    fresh = classifier()
    assert not np.allclose(fresh["classifier/output_weights"].numpy(),
                           source.read("cls/seq_relationship/output_weights"))
    # The encoder comes from the pretraining checkpoint, whose MLM/NSP heads are left out.
    for variables in (reused, fresh):
        assert not any(name.startswith("cls/") for name in variables)
        for name in ("bert/embeddings/word_embeddings", "bert/encoder/layer_1/output/dense/kernel",
                     "bert/pooler/dense/kernel"):
            np.testing.assert_array_equal(variables[name].numpy(), source.read(name))


def test_a_pretraining_model_loads_the_encoder_of_a_fine_tuned_checkpoint(classifier):
    out, _ = classifier
    pretrained = open_pretrained(out)
    model = BertPretrainer(pretrained.model_config, rng=DropoutRng(0))
    model.build()
    from tfbert.checkpoints.pretrained import assign_pretrained

    left = assign_pretrained(model, pretrained)
    assert left and all(name.startswith("cls/") for name in left)  # its heads: not in there
    np.testing.assert_array_equal(model.word_embeddings.numpy(),
                                  pretrained.weights.read("bert/embeddings/word_embeddings"))


def test_metrics_against_hand_computed_values():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = np.array([0, 1, 2, 2])
    scores = classification_scores(logits, labels)
    assert scores["accuracy"] == 0.75
    # Per class F1: class 0 1.0; class 1 precision 1/2, recall 1 -> 2/3; class 2 p 1, r 1/2 -> 2/3.
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert scores["loss"] == pytest.approx(-np.mean(log_p[np.arange(4), labels]))
    reg = regression_scores(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 5.0]))
    assert reg["mse"] == pytest.approx(2 / 3) and reg["spearman"] == pytest.approx(1.0)
    assert reg["pearson"] == pytest.approx(np.corrcoef([1, 2, 4], [1, 3, 5])[0, 1])
    assert np.isnan(regression_scores(np.ones(3), np.array([1.0, 2.0, 3.0]))["pearson"])


def test_tables_are_tokenised_as_bert_input_with_pairs_truncated_longest_first(pretrained,
                                                                                tmp_path):
    tokenizer = from_pretrained(pretrained)
    long_a = " ".join(["river"] * 30)
    path = write_table(tmp_path / "pairs.jsonl", [("stone", long_a, 1), ("hill farm", "rain", 0)],
                       ("text", "text_b", "label"))
    features = load_examples(path, tokenizer, 16, "classification", labels=("0", "1"))
    special = tokenizer.special_ids
    ids, mask, segments = (features[k] for k in ("input_ids", "input_mask", "segment_ids"))
    stone = tokenizer.encode("stone", add_special_tokens=False)
    # Row 0: [CLS] stone [SEP] river... [SEP], the long second text cut to fit 16.
    assert list(ids[0, :len(stone) + 2]) == [special["cls"], *stone, special["sep"]]
    assert ids[0, 15] == special["sep"] and mask[0].sum() == 16
    assert list(segments[0]) == [0] * (len(stone) + 2) + [1] * (14 - len(stone))
    # Row 1 is padded.
    assert mask[1].sum() < 16 and ids[1, -1] == special["pad"]
    assert list(features["label"]) == [1, 0]


@pytest.mark.parametrize("content, extra, message", [
    ("", {}, "is empty"),
    ("text\tlabel\n", {}, "no rows"),
    ("sentence\tlabel\nriver\tpos\n", {}, "has no column 'text'"),
    ("text\tlabel\nriver\tpos\nstone\tmaybe\n", {}, r"row 2: label 'maybe' is not one of"),
    ("text\tlabel\nriver\tpos\n \tneg\n", {}, r"row 2: 'text' is ' ', not a text"),
    ("text\tlabel\nriver\t\n", {}, r"row 1: the label \('label'\) is missing"),
    ("text\tlabel\n\u200b\tpos\n", {}, r"row 1: 'text' '\\u200b' tokenises to nothing"),
    ("text\tscore\nriver\tlots\n", dict(task="regression", column="score"),
     r"row 1: the label 'lots' is not a number"),
])
def test_bad_tables_name_the_file_and_the_row(pretrained, tmp_path, content, extra, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    tokenizer = from_pretrained(pretrained)
    task = extra.get("task", "classification")
    with pytest.raises(DataError, match=message) as error:
        load_examples(str(path), tokenizer, 16, task, Columns(label=extra.get("column", "label")),
                      labels=("neg", "pos") if task == "classification" else ())
    assert str(path) in str(error.value)


def test_missing_and_unknown_files_are_named(pretrained, tmp_path):
    tokenizer = from_pretrained(pretrained)
    with pytest.raises(DataError, match="--eval_file=.*nope.tsv does not exist"):
        load_examples(str(tmp_path / "nope.tsv"), tokenizer, 16, "regression",
                      what="--eval_file")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown table format '.parquet'"):
        load_examples(str(tmp_path / "data.parquet"), tokenizer, 16, "regression")


@pytest.mark.parametrize("argv, message", [
    (["--train_file=t.tsv"], "--train_file is read by --mode=finetune, not by --mode=pretrain"),
    (["--mode=finetune", "--train_file=t.tsv"], "--mode=finetune needs --task"),
    (["--mode=finetune", "--task=regression"], "needs --train_file"),
    (["--mode=finetune", "--task=regression", "--train_file=t.tsv", "--input_files=x"],
     "--input_files is read by --mode=pretrain"),
    (["--mode=predict", "--eval_files=x"], "--eval_files is read by --mode=pretrain"),
    (["--eval_every_n_steps=10", "--input_files=/data/part-*.tfrecord"],
     "--eval_every_n_steps needs something to evaluate"),
    (["--pooler_dropout_prob=0.2"], "--pooler_dropout_prob is read by --mode=finetune"),
])
def test_flags_another_mode_reads_are_refused(argv, message):
    fv = parse("--vocab_size=100", "--output_dir=/tmp/unused", *argv)
    with pytest.raises(cfg.ConfigError, match=message):
        if fv.mode == "predict":
            run.check_mode_flags(fv)
        else:
            run.build_config(fv)


def test_task_settings_that_cannot_work_are_refused(pretrained, tables):
    common = [*FINETUNE, f"--init_checkpoint={pretrained}", f"--train_file={tables['train']}",
              "--output_dir=/tmp/unused"]
    three = tables["train"].replace("train.tsv", "three.tsv")
    write_table(three, [("river", "a"), ("stone", "b"), ("hill", "c")])
    for argv, message in [
            (["--task=regression", "--reuse_head"], "--reuse_head starts a 2-class classifier"),
            (["--task=classification", f"--train_file={three}", "--reuse_head"],
             "with 3 labels"),
            (["--task=classification", "--early_stopping_patience=2",
              f"--eval_file={tables['dev']}"], "--early_stopping_patience counts evaluations"),
            (["--task=classification", f"--eval_file={tables['dev']}", "--best_metric=mse"],
             "--best_metric='mse' is not an evaluation metric of --task=classification")]:
        with pytest.raises(cfg.ConfigError, match=message):
            run.build_config(parse(*common, *argv))


WORKER = os.path.join(REPO_ROOT, "tests", "finetune_worker.py")


@needs_horovod
def test_evaluation_under_two_ranks_equals_one_process(classifier, pretrained, tables, tmp_path):
    """2 ranks evaluate unequal shares (21 + 20 rows) of the fine-tuned model's table and of 31
    held-out pretraining records; the gathered figures equal one process's."""
    out, _ = classifier
    records = str(tmp_path / "held_out.tfrecord")
    source = cfg.Config.load(os.path.join(pretrained, "config.json")).data.input_files[0]
    with tf.io.TFRecordWriter(records) as writer:
        for record in tf.data.TFRecordDataset(source).take(31):
            writer.write(record.numpy())
    path = tmp_path / "two_ranks.json"
    result = subprocess.run(
        [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, WORKER, out,
         tables["dev"], pretrained, records, str(path)], capture_output=True, text=True,
        timeout=600, env=dict(os.environ, PYTHONPATH=REPO_ROOT, **HOROVOD_ENV))
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(path.read_text())
    # One process: the same code, in this process.
    sys.path.insert(0, os.path.dirname(WORKER))
    from finetune_worker import evaluate

    one = evaluate(out, tables["dev"], pretrained, records, SingleProcess())
    np.testing.assert_allclose(two["logits"], one["logits"], atol=1e-5)
    for name in ("accuracy", "f1"):
        assert two["classification"][name] == one["classification"][name]
    assert two["classification"]["loss"] == pytest.approx(one["classification"]["loss"], abs=1e-6)
    for name, value in one["pretraining"].items():
        assert two["pretraining"][name] == pytest.approx(value, abs=1e-5), name


def test_sweep_runs_every_setting_and_survives_a_failing_one(pretrained, tables, tmp_path):
    out = tmp_path / "sweep"
    base = [flag for flag in FINETUNE if not flag.startswith("--learning_rate")]
    result = subprocess.run(
        [sys.executable, "-m", "tfbert.sweep", f"--output_dir={out}", "--parallel=2",
         "--grid=learning_rate=1e-3,2e-3", "--grid=pooler_dropout_prob=0.1,1.5", "--",
         *base, "--task=classification", f"--init_checkpoint={pretrained}",
         f"--train_file={tables['train']}", f"--eval_file={tables['dev']}",
         "--num_train_steps=6"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    runs = pd.read_csv(out / "sweep.csv")
    assert len(runs) == 4
    assert list(runs["status"]) == ["ok", "failed", "ok", "failed"]
    # pooler_dropout_prob=1.5 fails at start-up, and its log says why.
    failed = runs[runs["status"] == "failed"]
    assert all("--pooler_dropout_prob must be in [0, 1)" in open(path).read()
               for path in failed["log"])
    ok = runs[runs["status"] == "ok"]
    for _, row in ok.iterrows():
        summary = json.load(open(os.path.join(row["output_dir"], "summary.json")))
        assert row["metric"] == pytest.approx(summary["best_eval_accuracy"])
    # The notes' table: a row per pooler dropout, the metric per learning rate in one cell.
    table = (out / "sweep.md").read_text()
    cells = [f"{value:.4g}" for value in ok["metric"]]
    assert f"[{cells[0]}, {cells[1]}]" in table and "[failed, failed]" in table
    assert "[1e-3, 2e-3]" in table and "[failed, failed]" in result.stdout  # printed too
    assert (out / "sweep.png").stat().st_size > 1000


def test_sweep_table_averages_seeds_and_says_what_failed():
    from tfbert.sweep import SweepError, parse_grid, sweep_table

    grid = parse_grid(["learning_rate=1,2", "hidden_dropout_prob=0.1", "seed=1,2"])
    results = []
    for lr, seed, status, metric in [("1", "1", "ok", 0.5), ("1", "2", "ok", 0.7),
                                     ("2", "1", "ok", 0.9), ("2", "2", "diverged", None)]:
        results.append(dict(learning_rate=lr, hidden_dropout_prob="0.1", seed=seed,
                            status=status, metric=metric))
    table = sweep_table(grid, results, "learning_rate")
    assert list(table.columns) == ["№", "hidden_dropout_prob", "learning_rate", "metric"]
    assert table["metric"][0] == "[0.6, 0.9 (1 diverged)]"
    for axes, message in [([], "at least one"), (["learning_rate"], "FLAG=V1"),
                          (["lr=1,1"], "repeats"), (["lr=1", "lr=2"], "twice"),
                          (["output_dir=a,b"], "chosen by the sweep")]:
        with pytest.raises(SweepError, match=message):
            parse_grid(axes)
