"""Evaluates a fine-tuned classifier on a table and a pretrained model on held-out records, alone
or under horovodrun; rank 0 writes the figures as JSON. Used by test_finetuning.py, which also
calls `evaluate` in its own process for the one-process figures.

    python tests/finetune_worker.py CLASSIFIER_DIR TABLE PRETRAINED_DIR RECORDS OUT.json
    horovodrun -np 2 -H localhost:2 --gloo python tests/finetune_worker.py ...
"""

import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfbert.checkpoints import init_from_pretrained  # noqa: E402
from tfbert.config import Config  # noqa: E402
from tfbert.data.finetuning_dataset import load_examples  # noqa: E402
from tfbert.data.pretraining_dataset import pretraining_dataset  # noqa: E402
from tfbert.distributed import create_group  # noqa: E402
from tfbert.modeling.layers.dropout import DropoutRng  # noqa: E402
from tfbert.modeling.models import create_model  # noqa: E402
from tfbert.tokenization import from_pretrained  # noqa: E402
from tfbert.training.evaluation import PredictionEvaluator, PretrainingEvaluator  # noqa: E402


def load(run_dir: str):
    config = Config.load(os.path.join(run_dir, "config.json"))
    model = create_model(config, DropoutRng(0))
    features = {"input_ids": tf.zeros([1, config.data.max_seq_length], tf.int32)}
    if config.task.is_pretraining:
        features["masked_lm_positions"] = tf.zeros([1, config.data.max_predictions_per_seq],
                                                   tf.int32)
    model.build_from_example(features)
    init_from_pretrained(model, run_dir)
    return config, model


def evaluate(classifier_dir, table, pretrained_dir, records, group) -> dict:
    """The classifier's logits and scores on `table`, and the pretrained model's figures on
    `records`, over `group` (every rank gets them)."""
    config, classifier = load(classifier_dir)
    examples = load_examples(table, from_pretrained(classifier_dir), config.data.max_seq_length,
                             "classification", labels=config.task.labels)
    evaluator = PredictionEvaluator(examples, group, batch_size=8)
    predictions = evaluator.predict(classifier)

    pretraining_config, pretrainer = load(pretrained_dir)
    data = pretraining_config.data
    held_out = PretrainingEvaluator(
        # Batches of 1: no rank drops a partial batch, so every record counts once.
        lambda: pretraining_dataset([records], batch_size=1, max_seq_length=data.max_seq_length,
                                    max_predictions_per_seq=data.max_predictions_per_seq,
                                    is_training=False, input_pipeline_id=group.rank,
                                    num_input_pipelines=group.size),
        group, max_eval_steps=1000)
    return dict(logits=predictions["logits"].tolist(),
                classification=evaluator.score(predictions),
                pretraining=held_out.evaluate(pretrainer))


def main(classifier_dir, table, pretrained_dir, records, out_path):
    group = create_group()
    figures = evaluate(classifier_dir, table, pretrained_dir, records, group)
    if group.is_chief:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(figures, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
