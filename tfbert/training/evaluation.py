"""Held-out evaluation: what the training loop calls every --eval_every_n_steps and at the end.

An evaluator's `evaluate(model)` returns {metric: float}, the same on every rank: each
data-parallel rank evaluates its share of the examples and the figures are combined over the
data-parallel group, so a job of any size reports what one process would.

    PredictionEvaluator   fine-tuning: predicts every example of a table, gathers the predictions
                          in the table's order and scores them (`classification_scores`,
                          `regression_scores`, `token_classification_scores`); `predict`
                          alone serves --mode=predict.
    PretrainingEvaluator  pretraining: MLM and NSP losses and accuracies on a fixed number of
                          batches of held-out records.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from scipy import stats
from sklearn import metrics as sk_metrics

from tfbert.training.tracing import graph_function


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """loss (mean cross-entropy), accuracy and f1 (macro-averaged over every class of the
    label set, a class never predicted nor present counting 0).

    logits: float [N, C]; labels: int [N].
    """
    num_classes = logits.shape[-1]
    predicted = logits.argmax(axis=-1)
    loss = -_log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean()
    return dict(loss=float(loss), accuracy=float((predicted == labels).mean()),
                f1=float(sk_metrics.f1_score(labels, predicted, labels=list(range(num_classes)),
                                             average="macro", zero_division=0)))


def regression_scores(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """loss and mse (the same: mean squared error), pearson and spearman correlations (NaN
    when the predictions or the targets are constant)."""
    scores, targets = scores.astype(np.float64), targets.astype(np.float64)
    mse = float(np.mean(np.square(scores - targets)))
    constant = np.ptp(scores) == 0 or np.ptp(targets) == 0
    pearson = float("nan") if constant else float(stats.pearsonr(scores, targets)[0])
    spearman = float("nan") if constant else float(stats.spearmanr(scores, targets)[0])
    return dict(loss=mse, mse=mse, pearson=pearson, spearman=spearman)


def token_classification_scores(logits: np.ndarray, labels: np.ndarray,
                                tags: tuple[str, ...]) -> dict[str, float]:
    """loss (mean cross-entropy) and accuracy over the labelled tokens (each word's first
    sub-token), and entity-level precision, recall and F1 over the tag sequences (seqeval:
    CoNLL's rules for IOB tags).

    logits: float [N, S, C]; labels: int [N, S], -1 where no word starts; tags: tag names.
    """
    from seqeval import metrics as seq_metrics

    labelled = labels >= 0
    log_p = _log_softmax(logits[labelled].astype(np.float64))
    gold_ids = labels[labelled]
    predicted_ids = logits.argmax(axis=-1)
    gold = [[tags[i] for i in row[row >= 0]] for row in labels]
    predicted = [[tags[i] for i in p[row >= 0]] for p, row in zip(predicted_ids, labels)]
    return dict(loss=float(-log_p[np.arange(len(gold_ids)), gold_ids].mean()),
                accuracy=float((predicted_ids[labelled] == gold_ids).mean()),
                precision=float(seq_metrics.precision_score(gold, predicted, zero_division=0)),
                recall=float(seq_metrics.recall_score(gold, predicted, zero_division=0)),
                f1=float(seq_metrics.f1_score(gold, predicted, zero_division=0)))


class PredictionEvaluator:
    """Predicts a fine-tuning table and scores the predictions.

    Args:
      features: the table's features (`tfbert.data.finetuning_dataset.load_examples`): int32
        [N, S] inputs, and "label" to score against (absent: `predict` only).
      group: the data-parallel group; rank r predicts examples r, r + n, ...
      batch_size: examples per prediction batch, per rank.
      label_names: the tags, for token classification's entity-level scores.
    """

    def __init__(self, features: dict[str, np.ndarray], group, batch_size: int,
                 label_names: tuple[str, ...] = ()):
        self.label_names = tuple(label_names)
        self.labels = features.get("label")
        self.inputs = {name: features[name] for name in ("input_ids", "input_mask", "segment_ids")}
        self.group = group
        self.batch_size = batch_size
        self._predict_step = None
        self._model = None

    @property
    def num_examples(self) -> int:
        return len(self.inputs["input_ids"])

    def predict(self, model) -> dict[str, np.ndarray]:
        """The model's `predict` outputs for every example, in the table's order, on every
        rank: {"logits": float32 [N, C]} or {"score": float32 [N]}."""
        if self._model is not model:
            self._model = model
            self._predict_step = graph_function(model.predict, reduce_retracing=True)
        rank, size = self.group.rank, self.group.size
        share = {name: values[rank::size] for name, values in self.inputs.items()}
        dataset = tf.data.Dataset.from_tensor_slices(share).batch(self.batch_size)
        outputs: dict[str, list] = {}
        for batch in dataset:
            for name, value in self._predict_step(batch).items():
                outputs.setdefault(name, []).append(value)
        if not outputs:  # this rank has no examples: empty outputs of the right shape
            spec = self._predict_step.get_concrete_function(
                {name: tf.TensorSpec([None, values.shape[1]], tf.int32)
                 for name, values in share.items()}).structured_outputs
            outputs = {name: [tf.zeros([0] + t.shape[1:].as_list(), t.dtype)]
                       for name, t in spec.items()}
        # Rank 0's share, then rank 1's, ...: put each example back in its row.
        order = np.concatenate([np.arange(self.num_examples)[r::size] for r in range(size)])
        result = {}
        for name, values in outputs.items():
            gathered = self.group.allgather(tf.concat(values, axis=0)).numpy()
            result[name] = np.empty_like(gathered)
            result[name][order] = gathered
        return result

    def evaluate(self, model) -> dict[str, float]:
        return self.score(self.predict(model))

    def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of `predict`'s outputs against the table's labels."""
        if self.labels is None:
            raise ValueError("this table has no labels to evaluate against")
        if "score" in predictions:
            return regression_scores(predictions["score"], self.labels)
        if predictions["logits"].ndim == 3:
            return token_classification_scores(predictions["logits"], self.labels,
                                               self.label_names)
        return classification_scores(predictions["logits"], self.labels)


class QuestionAnsweringEvaluator:
    """SQuAD: predicts every window, picks each question's answer (`squad.best_answers`) and
    scores the answers with the official scripts (exact_match, f1, in percent).

    Args:
      data: the file's "data" list; examples, features: `squad.read_squad` / `squad_features`.
      version_2: SQuAD v2.0 (unanswerable questions).
      group, batch_size: as `PredictionEvaluator`'s.
    """

    def __init__(self, data: list, examples, features: dict[str, np.ndarray], version_2: bool,
                 group, batch_size: int, max_answer_length: int = 30,
                 null_score_diff_threshold: float = 0.0):
        self.data, self.examples, self.features = data, examples, features
        self.version_2 = version_2
        self.windows = PredictionEvaluator(features, group, batch_size)
        self.max_answer_length = max_answer_length
        self.null_score_diff_threshold = null_score_diff_threshold

    @property
    def has_answers(self) -> bool:
        """Whether the file has answers to score against."""
        return any(e.answers or e.is_impossible for e in self.examples)

    def answers(self, model) -> dict[str, str]:
        """{question id: answer text} (the same on every rank)."""
        from tfbert.data.squad import best_answers

        logits = self.windows.predict(model)
        return best_answers(self.examples, self.features, logits["start_logits"],
                            logits["end_logits"], max_answer_length=self.max_answer_length,
                            version_2=self.version_2,
                            null_score_diff_threshold=self.null_score_diff_threshold)

    def score(self, answers: dict[str, str]) -> dict[str, float]:
        from tfbert.data.squad import squad_scores

        return squad_scores(self.data, answers, self.version_2)

    def evaluate(self, model) -> dict[str, float]:
        return self.score(self.answers(model))


class PretrainingEvaluator:
    """Losses and accuracies of the pretraining heads on held-out records.

    Each evaluation reads the same batches: the first `max_eval_steps` batches of this rank's
    share of the records (not shuffled, not masked again). The figures of the masked tokens
    (`model.masked_token_metrics`: MLM, distillation's KL) are means over masked tokens, the
    others (NSP, multi-task pretraining's cls_loss, cls_accuracy, distil_mse, distillation's
    hidden_cosine_loss and attention_mse) over sequences, both over every rank's batches;
    "loss" is their sum weighted as in training (the model's `loss_weights`).

    Args:
      dataset_fn: returns a fresh tf.data.Dataset of this rank's batches of eval records.
      group: the data-parallel group.
      max_eval_steps: batches per rank.
    """

    def __init__(self, dataset_fn, group, max_eval_steps: int):
        self.dataset_fn = dataset_fn
        self.group = group
        self.max_eval_steps = max_eval_steps
        self._step = None
        self._model = None

    @staticmethod
    def _figures(model) -> list[str]:
        return [name for name in model.metric_names if name != "loss"]

    def _sums(self, model, batch):
        """Each figure times its count (masked tokens for MLM, else sequences), then the two
        counts; float64, so that sums over many batches stay exact."""
        outputs = model.compute_losses(batch, training=False)
        tokens = tf.reduce_sum(tf.cast(batch["masked_lm_weights"], tf.float32))
        sequences = tf.cast(tf.shape(batch["input_ids"])[0], tf.float32)
        per_token = model.masked_token_metrics
        sums = [outputs[name] * (tokens if name in per_token else sequences)
                for name in self._figures(model)]
        return tf.cast(tf.stack(sums + [tokens, sequences]), tf.float64)

    def evaluate(self, model) -> dict[str, float]:
        if self._model is not model:
            self._model = model
            self._step = graph_function(lambda batch: self._sums(model, batch),
                                        reduce_retracing=True)
        names = self._figures(model)
        totals = np.zeros([len(names) + 2])
        for batch in self.dataset_fn().take(self.max_eval_steps):
            totals += self._step(batch).numpy()
        totals = self.group.allgather_values(totals.tolist()).sum(axis=0)
        tokens, sequences = totals[-2:]
        if sequences == 0:
            raise ValueError("the evaluation records gave no batch")
        figures = {name: float(total / (max(tokens, 1.0) if name in model.masked_token_metrics
                                        else sequences))
                   for name, total in zip(names, totals)}
        loss = sum(weight * figures[name] for name, weight in model.loss_weights.items())
        return dict(loss=float(loss), **figures)
