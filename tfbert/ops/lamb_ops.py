"""Fused LAMB: the custom op (custom_ops/cc/ops/lamb_ops.cc), its TF reference, and the update
step that uses them in place of tfa.optimizers.LAMB.

One op updates every parameter and its two moments in place (TfBert>FusedLambMultiUpdate: one
launch for the whole model, not one per tensor), with the same numerics as tensorflow_addons'
LAMB (t = the 1-based step), each tensor's norms its own:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    update = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon)
    update += weight_decay * var                      (unless excluded from weight decay)
    ratio = ||var|| / ||update|| if both > 0, else 1  (1 if excluded from layer adaptation)
    var -= ratio * lr * update

with g = grad * grad_scale (clipping by the global norm: one multiply as the op reads the
gradient, not one op per tensor before it), and no change at all when apply_update is false (a
step skipped on a non-finite gradient, without a tf.cond around the update).
"""

from __future__ import annotations

import re

import tensorflow as tf

from tfbert.config import OptimizerConfig
from tfbert.ops import loader
from tfbert.training.optimization import named_optimizer_state, scale_gradients, update_if


def fused_lamb_update(var, m, v, grad, lr, beta1, beta2, epsilon, weight_decay, step,
                      use_layer_adaptation: bool = True, apply_weight_decay: bool = True,
                      grad_scale=1.0, apply_update=True):
    """One LAMB step with the fused op, updating `var`, `m` and `v` in place.

    Args:
      var, m, v: float32 resource tf.Variables of the same shape: the parameter and its first
        and second moments.
      grad: float32 Tensor of var's shape (dense).
      lr, beta1, beta2, epsilon, weight_decay: float32 scalars.
      step: scalar, the 1-based step t of the bias corrections (cast to float32, as tfa does).
      use_layer_adaptation: scale the step by the trust ratio ||var|| / ||update||.
      apply_weight_decay: add weight_decay * var to the update direction.
      grad_scale: float32 scalar; the step uses grad * grad_scale.
      apply_update: bool scalar; False leaves var, m and v unchanged.

    Returns:
      The op (no outputs); eager callers can ignore it.

    Raises:
      loader.OpsNotBuiltError: the op library is not built; use `lamb_update_reference`.
    """
    f32 = lambda x: tf.cast(x, tf.float32)  # noqa: E731
    return loader.load_ops().tf_bert_fused_lamb_update(
        var.handle, m.handle, v.handle, f32(grad), f32(lr), f32(beta1), f32(beta2),
        f32(epsilon), f32(weight_decay), f32(step), f32(grad_scale),
        tf.cast(apply_update, tf.bool), use_layer_adaptation=use_layer_adaptation,
        apply_weight_decay=apply_weight_decay)


def fused_lamb_multi_update(variables, ms, vs, grads, lr, beta1, beta2, epsilon, weight_decay,
                            step, use_layer_adaptation, apply_weight_decay, grad_scale=1.0,
                            apply_update=True):
    """`fused_lamb_update` of several tensors in one op; each tensor's result is bit-identical
    to `fused_lamb_update` of it alone.

    Args:
      variables, ms, vs: equal-length lists of distinct float32 resource tf.Variables; tensor i
        is (variables[i], ms[i], vs[i]), all three of one shape.
      grads: float32 Tensors, grads[i] of variables[i]'s shape.
      lr, beta1, beta2, epsilon, weight_decay, step, grad_scale, apply_update: as in
        `fused_lamb_update` (one of each for all tensors).
      use_layer_adaptation, apply_weight_decay: lists of bools, one per tensor.

    Returns:
      The op (no outputs).

    Raises:
      loader.OpsNotBuiltError: the op library is not built.
    """
    f32 = lambda x: tf.cast(x, tf.float32)  # noqa: E731
    return loader.load_ops().tf_bert_fused_lamb_multi_update(
        [x.handle for x in variables], [x.handle for x in ms], [x.handle for x in vs],
        [f32(g) for g in grads], f32(lr), f32(beta1), f32(beta2), f32(epsilon),
        f32(weight_decay), f32(step), f32(grad_scale), tf.cast(apply_update, tf.bool),
        use_layer_adaptation=[bool(x) for x in use_layer_adaptation],
        apply_weight_decay=[bool(x) for x in apply_weight_decay])


def lamb_update_reference(var, m, v, grad, lr, beta1, beta2, epsilon, weight_decay, step,
                          use_layer_adaptation: bool = True, apply_weight_decay: bool = True):
    """The same step in plain TensorFlow, written as tfa's LAMB writes it: the fallback and the
    test oracle. Pure: nothing is assigned.

    Args:
      var, m, v: float32 Tensors (or variables, read once) of the same shape.
      grad: float32 Tensor of var's shape.
      lr, beta1, beta2, epsilon, weight_decay, step: scalars as in `fused_lamb_update`.

    Returns:
      (new_var, new_m, new_v): float32 Tensors of var's shape.
    """
    f32 = lambda x: tf.cast(tf.convert_to_tensor(x), tf.float32)  # noqa: E731
    var, m, v, grad = f32(var), f32(m), f32(v), f32(grad)
    lr, beta1, beta2, epsilon, weight_decay, step = map(
        f32, (lr, beta1, beta2, epsilon, weight_decay, step))
    new_m = m * beta1 + grad * (1.0 - beta1)
    new_v = v * beta2 + (grad * grad) * (1.0 - beta2)
    m_hat = new_m / (1.0 - tf.pow(beta1, step))
    v_hat = new_v / (1.0 - tf.pow(beta2, step))
    update = m_hat / (tf.sqrt(v_hat) + epsilon)
    if apply_weight_decay:
        # Decoupled weight decay inside the trust ratio: adding L2 to the loss is not the same
        # under LAMB, whose moments would rescale it.
        update += weight_decay * var
    ratio = tf.constant(1.0)
    if use_layer_adaptation:
        w_norm = tf.norm(var, ord=2)
        g_norm = tf.norm(update, ord=2)
        ratio = tf.where(w_norm > 0, tf.where(g_norm > 0, w_norm / g_norm, 1.0), 1.0)
    new_var = var - ratio * lr * update
    return new_var, new_m, new_v


class LambState(tf.Module):
    """The optimizer state of `FusedLambUpdate`: the step counter and the m and v slots.

    Slots are keyed by their variable's name (`m["bert/pooler/dense/kernel"]`), so a checkpoint
    restores each slot to its own variable whatever order the variables are built in.
    """

    def __init__(self, name: str = "FusedLAMB"):
        super().__init__(name=name)
        self.iterations = None  # int64 scalar tf.Variable, the number of steps taken
        self.m = {}
        self.v = {}

    def get_slot(self, variable, slot_name: str) -> tf.Variable:
        """The "m" or "v" slot of `variable`, as Keras optimizers' `get_slot`."""
        return {"m": self.m, "v": self.v}[slot_name][_variable_key(variable)]

    # The trainer broadcasts `optimizer.variables()` (a method on Keras optimizers), so this
    # replaces tf.Module's `variables` property.
    def variables(self):
        """[iterations] + m slots + v slots, in sorted name order (the same on every rank)."""
        return ([self.iterations] + [self.m[k] for k in sorted(self.m)]
                + [self.v[k] for k in sorted(self.v)])


def _variable_key(variable) -> str:
    # "bert/pooler/dense/kernel:0" -> "bert/pooler/dense/kernel"
    return re.sub(r":\d+$", "", variable.name)


class FusedLambUpdate:
    """The update step with the fused LAMB op: a drop-in replacement of
    `KerasOptimizerUpdate(build_optimizer(config, learning_rate))` for `config.optimizer ==
    "lamb"`, with the same numerics as tfa.optimizers.LAMB.

    Variables whose names match one of `config.exclude_from_weight_decay` (regex search, as tfa
    does) get neither weight decay nor layer adaptation, like `build_optimizer`'s LAMB.
    """

    def __init__(self, config: OptimizerConfig, learning_rate, use_fused_op: bool | None = None):
        """
        Args:
          config: optimizer settings (beta_1, beta_2, epsilon, weight_decay_rate, exclusions).
          learning_rate: a zero-argument callable returning the current learning rate.
          use_fused_op: None uses the op when the library loads and the TF reference otherwise;
            True requires the op (raises loader.OpsNotBuiltError if it is not built).
        """
        if config.optimizer not in ("lamb", "fused_lamb"):
            raise ValueError(f"FusedLambUpdate implements LAMB, not {config.optimizer!r}")
        if use_fused_op is None:
            use_fused_op = loader.ops_available()
        elif use_fused_op:
            loader.load_ops()  # fail now, with the loader's message
        self.config = config
        self.learning_rate = learning_rate
        self.use_fused_op = use_fused_op
        self.optimizer = LambState()
        self._exclude = [re.compile(p) for p in config.exclude_from_weight_decay]
        self._keys = []  # per variable: its name, the key of its slots
        self._flags = []  # per variable: use_layer_adaptation and apply_weight_decay

    def _excluded(self, variable) -> bool:
        return any(p.search(variable.name) for p in self._exclude)

    def _slot_shape(self, variable) -> tf.TensorShape:
        return variable.shape

    def build(self, variables) -> None:
        """Creates the step counter and the zero m and v slots eagerly (before any checkpoint
        restore and before the step is traced)."""
        variables = list(variables)
        for variable in variables:
            if variable.dtype != tf.float32:
                raise ValueError(f"FusedLambUpdate updates float32 variables; {variable.name} "
                                 f"is {variable.dtype.name}")
        keys = [_variable_key(variable) for variable in variables]
        if len(set(keys)) != len(keys):
            raise ValueError(f"FusedLambUpdate keys its slots by variable name, but some names "
                             f"repeat: {sorted(k for k in keys if keys.count(k) > 1)}")
        state = self.optimizer
        with tf.init_scope():
            state.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
            for key, variable in zip(keys, variables):
                with tf.device(variable.device):
                    state.m[key] = tf.Variable(tf.zeros(self._slot_shape(variable), tf.float32),
                                               trainable=False, name=key + "/m")
                    state.v[key] = tf.Variable(tf.zeros(self._slot_shape(variable), tf.float32),
                                               trainable=False, name=key + "/v")
        self._keys = keys
        self._flags = [not self._excluded(variable) for variable in variables]

    def apply(self, grads, variables, grad_scale=None, apply_update=None) -> None:
        """One LAMB step on `variables` (the list given to `build`, in the same order).

        Args:
          grads: float32 gradients (Tensor or IndexedSlices, densified here), one per variable;
            None skips the variable (its moments do not decay, as with Keras optimizers).
          variables: the variables, in `build`'s order.
          grad_scale: float32 scalar every gradient is multiplied by (clipping), or None.
          apply_update: bool scalar, False to leave everything (the step counter too) as it
            is; None to always step. The fused op takes both itself: no op per tensor for
            the clipping and no tf.cond around the update.
        """
        variables = list(variables)
        if len(variables) != len(self._flags):
            raise ValueError(f"FusedLambUpdate was built over {len(self._flags)} variables, "
                             f"apply got {len(variables)}")
        if not self.use_fused_op:
            update_if(apply_update,
                      lambda: self._apply(scale_gradients(grads, grad_scale), variables))
            return
        self._apply(grads, variables, grad_scale, apply_update)

    def _apply(self, grads, variables, grad_scale=None, apply_update=None) -> None:
        state = self.optimizer
        config = self.config
        lr = tf.cast(self.learning_rate(), tf.float32)
        # tfa: local_step = iterations + 1, cast to the variable's dtype.
        step = tf.cast(state.iterations + 1, tf.float32)
        args = (lr, config.beta_1, config.beta_2, config.epsilon, config.weight_decay_rate, step)
        stepped = []  # (grad, var, m, v, not excluded) of the variables with a gradient
        for grad, var, key, not_excluded in zip(grads, variables, self._keys, self._flags):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            stepped.append((tf.cast(grad, tf.float32), var, state.m[key], state.v[key],
                            not_excluded))
        if stepped and self.use_fused_op:
            grads, variables, ms, vs, flags = zip(*stepped)
            fused_lamb_multi_update(
                variables, ms, vs, grads, *args, use_layer_adaptation=flags,
                apply_weight_decay=flags, grad_scale=1.0 if grad_scale is None else grad_scale,
                apply_update=True if apply_update is None else apply_update)
        elif stepped:
            for grad, var, m, v, not_excluded in stepped:
                new_var, new_m, new_v = lamb_update_reference(
                    var, m, v, grad, *args, use_layer_adaptation=not_excluded,
                    apply_weight_decay=not_excluded)
                m.assign(new_m)
                v.assign(new_v)
                var.assign(new_var)
        if apply_update is None:
            state.iterations.assign_add(1)
        else:
            state.iterations.assign_add(tf.cast(apply_update, tf.int64))

    def checkpoint_items(self) -> dict:
        return {"optimizer": self.optimizer}

    def named_state(self, variables) -> dict[str, tf.Variable]:
        return named_optimizer_state(self.optimizer, variables)


class LambWithSummedNorms(FusedLambUpdate):
    """LAMB whose trust ratios come from norms added over other ranks: the update of a tensor
    split across a tensor-parallel group (each rank holds a part) needs the norms of the whole
    tensor. Each variable is one segment of the shard ops (`lamb_shard_ops`: fused, or their TF
    reference), so its moments are kept flat ([elements]) under `FusedLambUpdate`'s names, and
    the squared norms of all variables are summed in one call of `sum_norms` between the two
    halves of the step.

    Args:
      config, learning_rate: as `FusedLambUpdate`.
      sum_norms: float32 [V, 2] (per variable: this rank's sums of var^2 and update^2) ->
        [V, 2], the sums over the parts of each tensor (`gradient_sync.TensorNorms.total`).
      use_fused_op: the fused shard ops (TfBert>FusedLambShardMoments/Apply) rather than their
        TF reference.
    """

    def __init__(self, config: OptimizerConfig, learning_rate, sum_norms, use_fused_op: bool):
        super().__init__(config, learning_rate, use_fused_op=use_fused_op)
        self.sum_norms = sum_norms

    def _slot_shape(self, variable) -> tf.TensorShape:
        return tf.TensorShape([variable.shape.num_elements()])

    def apply(self, grads, variables, grad_scale=None, apply_update=None) -> None:
        update_if(apply_update,
                  lambda: self._apply_split(scale_gradients(grads, grad_scale), variables))

    def _apply_split(self, grads, variables) -> None:
        from tfbert.ops.lamb_shard_ops import lamb_shard_apply, lamb_shard_moments

        variables = list(variables)
        state, c = self.optimizer, self.config
        lr = tf.cast(self.learning_rate(), tf.float32)
        hyper = (c.beta_1, c.beta_2, c.epsilon, c.weight_decay_rate,
                 tf.cast(state.iterations + 1, tf.float32))
        segments, sums = [], []
        for grad, var, key, adapted in zip(grads, variables, self._keys, self._flags):
            if grad is None:  # frozen: no update, moments kept, nothing added to the norms
                segments.append(None)
                sums.append(tf.zeros([2], tf.float32))
                continue
            # One segment: the whole variable (constants: the GPU op reads them on the host).
            segment = (tf.constant([var.shape.num_elements()], tf.int64),
                       tf.constant([adapted]), tf.constant([True]))
            param = tf.reshape(tf.convert_to_tensor(var), [-1])
            grad = tf.reshape(tf.cast(tf.convert_to_tensor(grad), tf.float32), [-1])
            sums.append(lamb_shard_moments(state.m[key], state.v[key], grad, param, *segment,
                                           *hyper, use_fused_op=self.use_fused_op)[0])
            segments.append((param, segment))
        norms = tf.sqrt(self.sum_norms(tf.stack(sums)))  # (V, 2)
        for i, (var, key, adapted) in enumerate(zip(variables, self._keys, self._flags)):
            if segments[i] is None:
                continue
            param, segment = segments[i]
            ratio = tf.constant(1.0)
            if adapted:
                w_norm, u_norm = norms[i, 0], norms[i, 1]
                ratio = tf.where(w_norm > 0, tf.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)
            new_param = lamb_shard_apply(param, state.m[key], state.v[key], *segment,
                                         tf.reshape(ratio * lr, [1]), *hyper,
                                         use_fused_op=self.use_fused_op)
            var.assign(tf.reshape(new_param, var.shape))
        state.iterations.assign_add(1)
