"""What the training loop trains: the BERT encoder plus one task's heads.

Every task (pretraining, classification, regression, ...) is a `BertTaskModel` that returns its
losses and metrics from `compute_losses`, so one loop (`tfbert.training.trainer.Trainer`)
trains them all with the same precision, XLA, Horovod, accumulation, checkpoints and logging.
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.config import FusedOpsConfig, ModelConfig
from tfbert.modeling.layers.dense import make_dense_factory
from tfbert.modeling.layers.dropout import DropoutRng
from tfbert.modeling.networks.bert_encoder import BertEncoder


class BertTaskModel(tf.Module):
    """The encoder ("bert/...") and the heads of one task.

    A `tf.Module` rather than a Keras model so that its variables keep google-research/bert's
    names with no extra prefix: every name is documented (`BertEncoder` and each task's heads)
    and stable across versions (checkpoint import/export relies on it).

    Subclasses set `metric_names` (the float32 scalars `compute_losses` returns, "loss" first,
    which the loop averages over each logging window) and `head_prefixes` (the checkpoint-name
    prefixes of their heads: weights under other heads' prefixes in a checkpoint are not this
    model's, and `--init_checkpoint` leaves them out), and may set `init_sources`.

    Args:
      config: model shape.
      rng: DropoutRng (None when all dropouts are 0).
      precision: "fp32", "fp16" or "bf16" (mixed precision: float32 variables).
      dense_factory_cls: the factory class for every projection; None lets `make_dense_factory`
        choose (split over `tensor_group` when it has more than one rank).
      ops: which computations use the fused custom ops.
      one_hot_token_types: token-type lookup by one-hot matmul, whose gradient is dense (see
        `Embeddings`); False looks it up with a gather, whose gradient is sparse.
      tensor_group: the tensor-parallel process group (None: the model is whole on this rank).
      attention_rng: DropoutRng of the attention-probability masks; None uses `rng`.
    """

    POLICIES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}
    metric_names: tuple[str, ...] = ("loss",)
    # The metrics that are means over masked tokens (the rest: over sequences).
    masked_token_metrics: tuple[str, ...] = ()
    head_prefixes: tuple[str, ...] = ()
    # {variable name: checkpoint name} that --init_checkpoint reads under another name.
    init_sources: dict[str, str] = {}

    def __init__(self, config: ModelConfig, rng: DropoutRng | None = None, precision: str = "fp32",
                 dense_factory_cls=None, ops: FusedOpsConfig = FusedOpsConfig(),
                 one_hot_token_types: bool = True, tensor_group=None,
                 attention_rng: DropoutRng | None = None):
        super().__init__(name=None)
        self.config = config
        policy = tf.keras.mixed_precision.Policy(self.POLICIES[precision])
        if dense_factory_cls is None:
            factory = make_dense_factory(config.initializer_range, policy, tensor_group)
        else:
            factory = dense_factory_cls(config.initializer_range, dtype=policy)
        self.bert = BertEncoder(config, rng=rng, dense_factory=factory, dtype=policy, name="bert",
                                ops=ops, one_hot_token_types=one_hot_token_types,
                                attention_rng=attention_rng)
        self._ops = ops
        self.tensor_group = tensor_group
        self._built = False
        self._factory = factory
        self._policy = policy

    def build(self, seq_length: int = 8) -> None:
        """Creates every variable eagerly (so names and shapes exist before any tf.function)
        by calling the model on one sequence of `seq_length` tokens."""
        if self._built:
            return
        ids = tf.zeros([1, seq_length], tf.int32)
        self(dict(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=ids))
        self._built = True

    def build_from_example(self, features: dict[str, tf.Tensor]) -> None:
        """`build` for the shapes of one batch of the task's features."""
        self.build(int(features["input_ids"].shape[1]))

    def compute_losses(self, features: dict[str, tf.Tensor], training: bool = False
                       ) -> dict[str, tf.Tensor]:
        """A dict of float32 scalars: "loss" (what is minimised) and `metric_names`."""
        raise NotImplementedError

    def flops_per_example(self, seq_length: int, num_predictions: int = 0) -> int:
        """Model FLOPs of training on one example (`tfbert.training.flops`): the encoder and
        pooler; a task's small heads are not counted, the pretrainer's MLM head is."""
        from tfbert.training.flops import model_flops_per_example

        return model_flops_per_example(self.config, seq_length, 0)

    @property
    def word_embeddings(self) -> tf.Variable:
        return self.bert.embeddings.word_embeddings

    def part_of_whole(self, name: str, whole):
        """This rank's part of the whole value (numpy) of variable `name`: the value itself
        unless tensor parallelism splits that variable."""
        from tfbert.modeling.tensor_parallel import part_of_whole

        if self.tensor_group is None or self.tensor_group.size == 1:
            return whole
        return part_of_whole(name, whole, self.tensor_group, self.config.hidden_act == "geglu")

    def whole_shapes(self) -> dict[str, tuple]:
        """{documented name: the shape of the whole variable} (under tensor parallelism, the
        shape before the split)."""
        from tfbert.modeling.tensor_parallel import split_of

        shapes = {}
        parts = 1 if self.tensor_group is None else self.tensor_group.size
        for name, variable in self.variables_by_name().items():
            shape = list(variable.shape)
            split = split_of(name, self.config.hidden_act == "geglu") if parts > 1 else None
            if split is not None:
                shape[split.axis] *= parts
            shapes[name] = tuple(shape)
        return shapes

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """{"bert/embeddings/word_embeddings": variable, ...}: the documented names."""
        names = {v.name.split(":")[0]: v for v in self.variables}
        if len(names) != len(self.variables):
            raise ValueError("two model variables share a name; checkpoints key them by name")
        return names
