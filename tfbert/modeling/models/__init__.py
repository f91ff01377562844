"""What gets trained: the encoder with one task's heads. `create_model` is the one place that
maps a run's task to its model."""

from __future__ import annotations

from tfbert.config import Config
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_classifier import BertClassifier
from tfbert.modeling.models.bert_distiller import BertDistiller, distiller_options
from tfbert.modeling.models.bert_pretrainer import BertPretrainer
from tfbert.modeling.models.bert_question_answering import BertQuestionAnswering
from tfbert.modeling.models.bert_task_model import BertTaskModel
from tfbert.modeling.models.bert_token_classifier import BertTokenClassifier


def create_model(config: Config, rng: DropoutRng | None, tensor_group=None,
                 attention_rng: DropoutRng | None = None) -> BertTaskModel:
    """The (unbuilt) model of `config.task`: pretraining heads, a student and its teacher
    (distillation), a classifier / regressor on the pooled output, a tag classifier on every
    token, or a span head (question answering)."""
    options = dict(rng=rng, precision=config.runtime.precision, ops=config.ops,
                   one_hot_token_types=config.distribution.sparse_as_dense,
                   tensor_group=tensor_group, attention_rng=attention_rng)
    task = config.task
    if task.is_pretraining:
        return BertPretrainer(config.model, cls_loss_weight=task.cls_loss_weight,
                              num_cls_labels=task.num_cls_labels,
                              distil_loss_weight=task.distil_loss_weight, **options)
    if task.task == "distillation":
        return BertDistiller(config.model, **distiller_options(task), **options)
    if task.task == "question_answering":
        return BertQuestionAnswering(config.model, dropout=task.pooler_dropout_prob, **options)
    if task.task == "token_classification":
        return BertTokenClassifier(config.model, num_labels=task.num_labels,
                                   dropout=task.pooler_dropout_prob, **options)
    return BertClassifier(config.model, num_labels=task.num_labels,
                          pooler_dropout=task.pooler_dropout_prob,
                          reuse_head=task.reuse_head, **options)


__all__ = ["BertClassifier", "BertDistiller", "BertPretrainer", "BertQuestionAnswering",
           "BertTaskModel", "BertTokenClassifier", "create_model"]
