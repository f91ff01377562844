"""Distillation: a student BERT trained to imitate a teacher (DistilBERT; the DistilRuBERT-small
recipe: a 2-layer student of a 12-layer teacher).

The student is this model's encoder ("bert/...") with a masked-LM head ("cls/predictions/...");
the teacher is any checkpoint `tfbert.checkpoints.open_pretrained` reads. Four losses, each
with its weight (0: not computed):

    kl_loss             KL(teacher || student) of the MLM distributions at temperature T, x T^2
    mlm_loss            the student's MLM cross-entropy on the labels
    hidden_cosine_loss  1 - cos between each student layer's output and the mean of its group
                        of teacher layers' outputs (through a learned projection where the
                        widths differ)
    attention_mse       the MSE between each student layer's attention map and the mean of its
                        group's teacher maps (heads matched one to one, or each side averaged)

Student layer i is matched with a group of consecutive teacher layers: uniform groups of
L_teacher / L_student by default (12 -> 2: layers 0-5 and 6-11), or explicit ones.

The teacher runs in inference mode (no dropout) in the student's precision, under
`tf.stop_gradient`: no gradient reaches it, its variables are not the model's (not trained,
not checkpointed, no optimizer slots), and its activations live only within the step.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from tfbert.config import DISTILLATION_LOSSES, ConfigError, ModelConfig
from tfbert.modeling import losses
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.models.bert_pretrainer import (BertPretrainer, PretrainingHeads,
                                                    gather_positions)
from tfbert.modeling.models.bert_task_model import BertTaskModel

# What must be equal for a teacher layer to be copied into a student layer.
_COPY_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                "vocab_size", "max_position_embeddings", "type_vocab_size", "use_bias_in_keys")


def uniform_layer_groups(teacher_layers: int, student_layers: int) -> list[tuple[int, ...]]:
    """Consecutive teacher layers for each student layer, as even as possible (the first
    groups take one more when `teacher_layers` is not a multiple of `student_layers`)."""
    if student_layers > teacher_layers:
        raise ConfigError(f"the student has {student_layers} layers and the teacher "
                          f"{teacher_layers}: uniform layer groups need a student with fewer "
                          f"layers; give --distill_layer_groups")
    size, extra = divmod(teacher_layers, student_layers)
    groups, start = [], 0
    for i in range(student_layers):
        end = start + size + (i < extra)
        groups.append(tuple(range(start, end)))
        start = end
    return groups


def layer_groups(specs: tuple[str, ...], teacher_layers: int,
                 student_layers: int) -> list[tuple[int, ...]]:
    """The teacher layers (0-based) of each student layer: `specs` ("0-5", "6-11" or "11": one
    per student layer, ranges inclusive), or uniform groups when empty."""
    if not specs:
        return uniform_layer_groups(teacher_layers, student_layers)
    if len(specs) != student_layers:
        raise ConfigError(f"--distill_layer_groups has {len(specs)} groups {list(specs)}, the "
                          f"student has {student_layers} layers: give one group per layer")
    groups = []
    for spec in specs:
        first, _, last = spec.strip().partition("-")
        try:
            first, last = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"--distill_layer_groups: {spec!r} is not a teacher layer ('3') "
                              f"or a range of them ('0-5')") from None
        if not 0 <= first <= last < teacher_layers:
            raise ConfigError(f"--distill_layer_groups: {spec!r} is not within the teacher's "
                              f"layers 0-{teacher_layers - 1}")
        groups.append(tuple(range(first, last + 1)))
    return groups


def student_init_layers(mode: str, groups: list[tuple[int, ...]]) -> list[int]:
    """The teacher layer each student layer starts from: "every_kth" the last of its group
    (uniform groups of k: layers k-1, 2k-1, ..., so the last student layer starts as the
    teacher's last, whose output the MLM head reads), "first_k" the teacher's first layers."""
    if mode == "every_kth":
        return [group[-1] for group in groups]
    if mode == "first_k":
        return list(range(len(groups)))
    raise ValueError(f"unknown student initialisation {mode!r}")


def check_copyable(student: ModelConfig, teacher: ModelConfig, mode: str) -> None:
    """Refuses --init_student_from_teacher where the teacher's weights cannot fit the student."""
    differ = [f"{name}: student {getattr(student, name)}, teacher {getattr(teacher, name)}"
              for name in _COPY_FIELDS if getattr(student, name) != getattr(teacher, name)]
    if differ:
        raise ConfigError(f"--init_student_from_teacher={mode} copies teacher layers into the "
                          f"student, so their shapes must match: {'; '.join(differ)}")
    if student.num_hidden_layers > teacher.num_hidden_layers:
        raise ConfigError(f"--init_student_from_teacher={mode}: the student has "
                          f"{student.num_hidden_layers} layers, the teacher only "
                          f"{teacher.num_hidden_layers}")


class HiddenProjection(tf.keras.layers.Layer):
    """Student hidden states to the teacher's width for the cosine loss, in float32.

    Variables: distill/hidden_projection/{kernel [D_student, D_teacher], bias [D_teacher]}
    (the layer is named "distill"). Only trained, never used by the student afterwards.
    """

    def __init__(self, teacher_width: int, initializer_range: float, **kwargs):
        super().__init__(**kwargs)
        self.teacher_width = teacher_width
        self.initializer_range = initializer_range

    def build(self, input_shape):
        with tf.name_scope("hidden_projection"):
            self.kernel = self.add_weight(
                "kernel", shape=[int(input_shape[-1]), self.teacher_width],
                initializer=tf.keras.initializers.TruncatedNormal(stddev=self.initializer_range))
            self.bias = self.add_weight("bias", shape=[self.teacher_width], initializer="zeros")
        super().build(input_shape)

    def call(self, hidden_states):
        """hidden_states: [B, S, D_student]. Returns float32 [B, S, D_teacher]."""
        return tf.einsum("bsd,de->bse", tf.cast(hidden_states, tf.float32), self.kernel) + self.bias


class _Untracked:
    """Holds the teacher out of sight of tf.Module and tf.train.Checkpoint: its variables are
    not the student's (`variables`, `trainable_variables`, checkpoints, optimizer slots)."""

    def __init__(self, model):
        self.model = model


class BertDistiller(BertTaskModel):
    """The student ("bert/...", "cls/predictions/...", and "distill/..." while it trains) and
    its frozen teacher.

    Args:
      config: the student's shape (its vocabulary is the teacher's).
      teacher: the teacher checkpoint (a tfbert run, HuggingFace or google directory).
      temperature: softens both MLM distributions in the KL loss.
      loss_weights: {"kl_loss", "mlm_loss", "hidden_cosine_loss", "attention_mse": weight};
        a loss with weight 0 is not computed (the MLM loss and accuracy always are, as figures).
      layer_groups: the teacher layers of each student layer (see `layer_groups`); empty:
        uniform groups.
      average_attention_heads: compare attention maps averaged over heads (needed when the
        head counts differ); else head i with head i.
      init_from_teacher: "none", "every_kth" or "first_k" (`student_init_layers`): the
        student's layers, embeddings, pooler and MLM head start as the teacher's.
      The rest: those of `BertTaskModel` (the teacher gets the same precision and fused ops).
    """

    head_prefixes = ("cls/", "distill/")
    masked_token_metrics = ("mlm_loss", "mlm_accuracy", "kl_loss", "teacher_mlm_accuracy")

    def __init__(self, config: ModelConfig, *args, teacher: str, temperature: float = 2.0,
                 loss_weights: dict[str, float] | None = None,
                 layer_groups: tuple[str, ...] = (), average_attention_heads: bool = False,
                 init_from_teacher: str = "none", **kwargs):
        super().__init__(config, *args, **kwargs)
        self._teacher_path = teacher
        self._precision = kwargs.get("precision", "fp32")
        self.temperature = temperature
        weights = dict(kl_loss=1.0, mlm_loss=1.0, hidden_cosine_loss=1.0, attention_mse=1.0)
        weights.update(loss_weights or {})
        # What each figure adds to the loss (the losses with weight 0 are not computed).
        self.loss_weights = {name: float(w) for name, w in weights.items() if w}
        self._layer_group_specs = tuple(layer_groups)
        self.average_attention_heads = average_attention_heads
        self.init_from_teacher = init_from_teacher
        on = [name for name in DISTILLATION_LOSSES if name in self.loss_weights]
        self.metric_names = ("loss", "mlm_loss", "mlm_accuracy", *on) + (
            ("teacher_mlm_accuracy",) if "kl_loss" in on else ())
        self.groups: list[tuple[int, ...]] = []
        self.teacher_config: ModelConfig | None = None

    def _uses(self, loss: str) -> bool:
        return loss in self.loss_weights

    @property
    def teacher(self) -> BertPretrainer:
        return self._teacher.model

    def build(self, seq_length: int = 8, num_predictions: int = 2) -> None:
        """Builds the student, loads the teacher and checks that the two fit together."""
        if self._built:
            return
        ids = tf.zeros([1, seq_length], tf.int32)
        inputs = dict(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=ids)
        self.bert(inputs)
        self.cls = PretrainingHeads(self.config, self.bert.embeddings.word_embeddings,
                                    self._factory, fused_layer_norm=self._ops.ln_ytf_impl,
                                    layer_norm_dtype=self._ops.ln_dtype, next_sentence=False,
                                    name="cls", dtype=self._policy)
        self._load_teacher(seq_length)
        teacher = self.teacher_config
        self.groups = layer_groups(self._layer_group_specs, teacher.num_hidden_layers,
                                   self.config.num_hidden_layers)
        logging.info("Distillation: student layer i <- mean of teacher layers %s",
                     {i: f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])
                      for i, g in enumerate(self.groups)})
        if (self._uses("attention_mse") and not self.average_attention_heads
                and self.config.num_attention_heads != teacher.num_attention_heads):
            raise ConfigError(
                f"attention_mse compares head i of the student with head i of the teacher, but "
                f"the student has {self.config.num_attention_heads} heads and the teacher "
                f"{teacher.num_attention_heads}: give --distill_attention_heads=average (each "
                f"side's heads averaged) or --attention_mse_weight=0")
        self.projection = None
        if self._uses("hidden_cosine_loss") and self.config.hidden_size != teacher.hidden_size:
            self.projection = HiddenProjection(teacher.hidden_size, self.config.initializer_range,
                                               name="distill")
            self.projection(tf.zeros([1, 1, self.config.hidden_size]))
        self(dict(inputs, masked_lm_positions=tf.zeros([1, num_predictions], tf.int32)))
        if self.init_from_teacher != "none":
            self._init_from_teacher()
        self._built = True

    def _load_teacher(self, seq_length: int) -> None:
        from tfbert.checkpoints.pretrained import assign_pretrained, open_pretrained

        pretrained = open_pretrained(self._teacher_path)
        self.teacher_config = teacher_config = pretrained.model_config
        if teacher_config.vocab_size != self.config.vocab_size:
            raise ConfigError(f"--teacher={self._teacher_path} has a vocabulary of "
                              f"{teacher_config.vocab_size} tokens, the student "
                              f"{self.config.vocab_size}: the KL loss compares distributions "
                              f"over one vocabulary (the student takes the teacher's tokenizer)")
        # Its dropout never runs (inference mode), but the layers want a generator.
        teacher = BertPretrainer(teacher_config, rng=DropoutRng(0), precision=self._precision,
                                 ops=self._ops)
        teacher.build(seq_length)
        left = assign_pretrained(teacher, pretrained, what=f"--teacher={self._teacher_path}")
        missing_head = [name for name in left if name.startswith("cls/predictions/")]
        if missing_head and self._uses("kl_loss"):
            raise ConfigError(f"--teacher={self._teacher_path} ({pretrained.description}) has "
                              f"no masked-LM head ({missing_head[0]}, ...): kl_loss needs the "
                              f"teacher's MLM logits; give --kl_loss_weight=0")
        self._teacher = _Untracked(teacher)
        logging.info("Teacher: %s, %d layers x %d (%s)", self._teacher_path,
                     teacher_config.num_hidden_layers, teacher_config.hidden_size,
                     pretrained.description)

    def _init_from_teacher(self) -> None:
        """Copies the teacher's embeddings, pooler, MLM head and the chosen layers."""
        check_copyable(self.config, self.teacher_config, self.init_from_teacher)
        layers = student_init_layers(self.init_from_teacher, self.groups)
        teacher = self.teacher.variables_by_name()
        for name, variable in self.variables_by_name().items():
            if name.startswith("distill/"):
                continue
            source = name
            if name.startswith("bert/encoder/layer_"):
                index, rest = name[len("bert/encoder/layer_"):].split("/", 1)
                source = f"bert/encoder/layer_{layers[int(index)]}/{rest}"
            variable.assign(teacher[source])
        logging.info("Student initialised from the teacher (--init_student_from_teacher=%s): "
                     "its layers from teacher layers %s", self.init_from_teacher, layers)

    def build_from_example(self, features: dict[str, tf.Tensor]) -> None:
        self.build(int(features["input_ids"].shape[1]),
                   int(features["masked_lm_positions"].shape[1]))

    def flops_per_example(self, seq_length: int, num_predictions: int = 0) -> int:
        """The student's training FLOPs and the teacher's forward pass (the work the step
        needs; the student's pooler and the teacher's next-sentence head are counted too)."""
        from tfbert.training.flops import model_flops_per_example

        return (model_flops_per_example(self.config, seq_length, num_predictions)
                + model_flops_per_example(self.teacher_config, seq_length, num_predictions,
                                          training=False))

    def __call__(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The student's MLM logits, float32 [B, P, V]."""
        encoded = self.bert(features, training=training)
        masked = gather_positions(encoded["sequence_output"], features["masked_lm_positions"])
        return self.cls(masked, encoded["pooled_output"])[0]

    def _teacher_outputs(self, features) -> dict:
        """What the losses need of the teacher, under stop_gradient: its MLM logits [B, P, V]
        and, per student layer, the mean of its group's outputs [B, S, D_teacher] and
        attention maps [B, N_teacher, S, S], all float32."""
        need_hidden, need_attention = self._uses("hidden_cosine_loss"), self._uses("attention_mse")
        encoded = self.teacher.bert(features, training=False, output_hidden_states=need_hidden,
                                    output_attentions=need_attention)
        outputs = {}
        if self._uses("kl_loss"):
            masked = gather_positions(encoded["sequence_output"],
                                      features["masked_lm_positions"])  # (B, P, D)
            outputs["mlm_logits"] = self.teacher.cls(masked, encoded["pooled_output"])[0]

        def group_means(states, offset):
            return [tf.add_n([tf.cast(states[j + offset], tf.float32) for j in group]) / len(group)
                    for group in self.groups]

        if need_hidden:  # hidden_states[0] is the embeddings' output: layer j is j + 1
            outputs["hidden_states"] = group_means(encoded["hidden_states"], 1)
        if need_attention:
            outputs["attention_probs"] = group_means(encoded["attention_probs"], 0)
        return tf.nest.map_structure(tf.stop_gradient, outputs)

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False):
        """Returns float32 scalars: mlm_loss, mlm_accuracy, each distillation loss with a
        weight (and teacher_mlm_accuracy with the KL loss), and loss, their weighted sum."""
        encoded = self.bert(features, training=training,
                            output_hidden_states=self._uses("hidden_cosine_loss"),
                            output_attentions=self._uses("attention_mse"))
        masked = gather_positions(encoded["sequence_output"],
                                  features["masked_lm_positions"])  # (B, P, D)
        mlm_logits = self.cls(masked, encoded["pooled_output"])[0]  # (B, P, V)
        label_ids, label_weights = features["masked_lm_ids"], features["masked_lm_weights"]
        mlm_loss, mlm_accuracy = losses.masked_lm_figures(mlm_logits, label_ids, label_weights,
                                                          fused=self._ops.fused_xent)
        figures = dict(mlm_loss=mlm_loss, mlm_accuracy=mlm_accuracy)
        teacher = self._teacher_outputs(features)
        if self._uses("kl_loss"):
            figures["kl_loss"] = losses.distillation_kl_loss(
                teacher["mlm_logits"], mlm_logits, label_weights, self.temperature)
            figures["teacher_mlm_accuracy"] = losses.masked_lm_accuracy(
                teacher["mlm_logits"], label_ids, label_weights)
        if self._uses("hidden_cosine_loss"):
            student = [self.projection(h) if self.projection is not None else tf.cast(h, tf.float32)
                       for h in encoded["hidden_states"][1:]]  # L_student x (B, S, D_teacher)
            figures["hidden_cosine_loss"] = losses.hidden_cosine_loss(
                student, teacher["hidden_states"], features["input_mask"])
        if self._uses("attention_mse"):
            student = [tf.cast(p, tf.float32) for p in encoded["attention_probs"]]
            figures["attention_mse"] = losses.attention_mse(
                student, teacher["attention_probs"], features["input_mask"],
                average_heads=self.average_attention_heads)
        figures["loss"] = tf.add_n([weight * figures[name]
                                    for name, weight in self.loss_weights.items()])
        return figures


def distiller_options(task) -> dict:
    """BertDistiller's arguments from a `TaskConfig` of --mode=distill."""
    return dict(teacher=task.teacher, temperature=task.distill_temperature,
                loss_weights={name: task.distillation_weight(name)
                              for name in ("mlm_loss",) + DISTILLATION_LOSSES},
                layer_groups=task.distill_layer_groups,
                average_attention_heads=task.distill_attention_heads == "average",
                init_from_teacher=task.init_student_from_teacher)


__all__ = ["BertDistiller", "HiddenProjection", "check_copyable", "distiller_options",
           "layer_groups", "student_init_layers", "uniform_layer_groups"]
