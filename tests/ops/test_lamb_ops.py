"""The fused LAMB op against its pure-TF reference, and FusedLambUpdate against tfa's LAMB.

- one op call equals `lamb_update_reference` on odd shapes, with and without weight decay and
  layer adaptation, a zero-norm variable (ratio 1), and a tensor spanning several CPU chunks;
- the multi-tensor op steps a list of tensors (odd sizes, several chunks, mixed flags, an empty
  one) bit-identically to one op per tensor, and refuses a variable given twice;
- grad_scale is the gradient multiplied first (bit for bit), and apply_update=False changes
  nothing;
- FusedLambUpdate over 20 steps on a tiny model equals tfa.optimizers.LAMB with the same
  hyperparameters and exclusions, eagerly and inside tf.function;
- the slots and the step counter survive a checkpoint round trip.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_addons as tfa

from tfbert.config import OptimizerConfig
from tfbert.ops import loader

if not loader.ops_available():
    pytest.skip(f"the op library is not built ({loader.LIBRARY_PATH}); run `make ops`",
                allow_module_level=True)

from tfbert.ops.lamb_ops import (FusedLambUpdate, fused_lamb_multi_update,  # noqa: E402
                                 fused_lamb_update, lamb_update_reference)

HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, epsilon=1e-6, weight_decay=0.01)
FLAGS = list(itertools.product([True, False], [True, False]))  # (adaptation, weight decay)


def random_state(shape, seed, zero_var=False):
    """var, m, v (v >= 0), grad: float32 numpy arrays of `shape`, as after a few steps."""
    rng = np.random.default_rng(seed)
    var = np.zeros(shape, np.float32) if zero_var else rng.standard_normal(shape).astype(np.float32)
    m = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    v = (0.01 * rng.random(shape)).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    return var, m, v, grad


@pytest.mark.parametrize("use_layer_adaptation,apply_weight_decay", FLAGS)
@pytest.mark.parametrize("shape,zero_var,step", [
    ([37], False, 1), ([13, 7], False, 3), ([1], False, 2), ([13, 7], True, 1),
    ([201, 200], False, 5)])  # 40200 elements: several CPU chunks of partial sums
def test_op_matches_reference(shape, zero_var, step, use_layer_adaptation, apply_weight_decay):
    var0, m0, v0, grad = random_state(shape, seed=len(shape) * 100 + shape[0], zero_var=zero_var)
    flags = dict(use_layer_adaptation=use_layer_adaptation, apply_weight_decay=apply_weight_decay)
    want_var, want_m, want_v = lamb_update_reference(var0, m0, v0, grad, step=step, **HYPER,
                                                     **flags)
    var, m, v = tf.Variable(var0), tf.Variable(m0), tf.Variable(v0)
    fused_lamb_update(var, m, v, tf.constant(grad), step=step, **HYPER, **flags)
    # Sums over 40K elements (double partials vs tf.norm's float32) differ in the 7th digit.
    tol = 1e-5 if np.prod(shape) > 10000 else 1e-6
    for name, got, want in [("m", m, want_m), ("v", v, want_v), ("var", var, want_var)]:
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=tol, atol=tol * 1e-2,
                                   err_msg=name)
    if zero_var and not apply_weight_decay:
        # ||var|| = 0: the ratio is 1, so the step is lr * update whatever adaptation says.
        f32 = np.float32  # bias corrections as float32 computes them (1 - 0.999 is not 1e-3)
        update = (want_m.numpy() / (f32(1) - f32(0.9))) / (
            np.sqrt(want_v.numpy() / (f32(1) - f32(0.999))) + f32(1e-6))
        np.testing.assert_allclose(var.numpy(), -f32(HYPER["lr"]) * update, rtol=1e-6, atol=1e-9)


def test_op_is_deterministic_and_reads_before_writing():
    var0, m0, v0, grad = random_state([201, 200], seed=7)
    results = []
    for _ in range(2):
        var, m, v = tf.Variable(var0), tf.Variable(m0), tf.Variable(v0)
        before = var.read_value()  # a read that shares the buffer: copy-on-write keeps it
        fused_lamb_update(var, m, v, grad, step=4, **HYPER)
        np.testing.assert_array_equal(before.numpy(), var0)
        results.append(var.numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_op_rejects_bad_inputs():
    var, m, v = tf.Variable(tf.ones([3])), tf.Variable(tf.zeros([3])), tf.Variable(tf.zeros([3]))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        fused_lamb_update(var, m, v, tf.ones([4]), step=1, **HYPER)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1-based"):
        fused_lamb_update(var, m, v, tf.ones([3]), step=0, **HYPER)


def test_multi_tensor_op_equals_one_op_per_tensor_bit_for_bit():
    # Sizes around the CPU chunk (16384) and the GPU block (1024), a scalar, an empty tensor, a
    # zero variable (ratio 1); every combination of the two flags.
    shapes = [[37], [16384], [16385], [3, 1024], [1], [], [0], [201, 200], [5, 3], [40000]]
    flags = [FLAGS[i % len(FLAGS)] for i in range(len(shapes))]
    states = [random_state(shape, seed=i, zero_var=(i == 8)) for i, shape in enumerate(shapes)]
    make = lambda: [tuple(tf.Variable(x) for x in state[:3]) for state in states]  # noqa: E731
    one_by_one, together = make(), make()
    for step in (1, 2, 3):  # the moments carry over: later steps use the updated m and v
        grads = [tf.constant(state[3] * step) for state in states]
        for (var, m, v), grad, (adapt, decay) in zip(one_by_one, grads, flags):
            fused_lamb_update(var, m, v, grad, step=step, **HYPER, use_layer_adaptation=adapt,
                              apply_weight_decay=decay)
        variables, ms, vs = zip(*together)
        fused_lamb_multi_update(variables, ms, vs, grads, step=step, **HYPER,
                                use_layer_adaptation=[f[0] for f in flags],
                                apply_weight_decay=[f[1] for f in flags])
    for i, (alone, multi) in enumerate(zip(one_by_one, together)):
        for name, a, b in zip(("var", "m", "v"), alone, multi):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name} of {shapes[i]}")
    # And the step did move the variables (an op that did nothing would pass the above).
    assert not np.array_equal(together[0][0].numpy(), states[0][0])


def test_grad_scale_is_the_gradient_multiplied_before_the_step():
    # The op reads grad * grad_scale in float32: the same bits as the product computed first.
    # m and v start from a random state (not from this gradient), so the scale changes the
    # step even though LAMB's direction is nearly scale-free for fresh moments.
    shapes = [[201, 200], [37], [0]]
    states = [random_state(shape, seed=20 + i) for i, shape in enumerate(shapes)]
    make = lambda: [tuple(tf.Variable(x) for x in state[:3]) for state in states]  # noqa: E731
    scaled_in_op, scaled_before = make(), make()
    scale = np.float32(0.37)
    flags = dict(use_layer_adaptation=[True, False, True], apply_weight_decay=[True, True, False])
    variables, ms, vs = zip(*scaled_in_op)
    fused_lamb_multi_update(variables, ms, vs, [tf.constant(s[3]) for s in states], step=2,
                            **HYPER, **flags, grad_scale=scale)
    variables, ms, vs = zip(*scaled_before)
    fused_lamb_multi_update(variables, ms, vs, [tf.constant(s[3]) * scale for s in states],
                            step=2, **HYPER, **flags)
    for got, want in zip(scaled_in_op, scaled_before):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The single-tensor op reads it the same way.
    var, m, v = (tf.Variable(x) for x in states[0][:3])
    fused_lamb_update(var, m, v, tf.constant(states[0][3]), step=2, **HYPER, grad_scale=scale)
    np.testing.assert_array_equal(var.numpy(), scaled_before[0][0].numpy())
    # And the scale mattered: unscaled, the step differs.
    unscaled = tf.Variable(states[0][0]), tf.Variable(states[0][1]), tf.Variable(states[0][2])
    fused_lamb_update(*unscaled, tf.constant(states[0][3]), step=2, **HYPER)
    assert not np.array_equal(unscaled[0].numpy(), var.numpy())


def test_apply_update_false_leaves_everything_as_it_was():
    states = [random_state(shape, seed=30 + i) for i, shape in enumerate([[201, 200], [5]])]
    variables, ms, vs = zip(*[tuple(tf.Variable(x) for x in state[:3]) for state in states])
    nan_grads = [tf.constant(np.full_like(s[3], np.nan)) for s in states]

    @tf.function
    def step(apply_update):  # the decision as a tensor computed in the step, as the trainer has it
        fused_lamb_multi_update(variables, ms, vs, nan_grads, step=3, **HYPER,
                                use_layer_adaptation=[True, False],
                                apply_weight_decay=[True, True], grad_scale=float("nan"),
                                apply_update=apply_update)

    step(tf.constant(False))
    for state, var, m, v in zip(states, variables, ms, vs):
        for x, want in zip((var, m, v), state[:3]):
            np.testing.assert_array_equal(x.numpy(), want)
    step(tf.constant(True))  # the same call taken: NaN everywhere
    assert np.isnan(variables[0].numpy()).all() and np.isnan(ms[1].numpy()).all()


def test_multi_tensor_op_rejects_bad_inputs():
    a = [tf.Variable(tf.ones([3])) for _ in range(3)]
    b = [tf.Variable(tf.ones([2])) for _ in range(3)]
    c = [tf.Variable(tf.ones([3])) for _ in range(3)]
    grads = [tf.ones([3]), tf.ones([2])]
    flags = dict(use_layer_adaptation=[True, True], apply_weight_decay=[True, False])
    with pytest.raises(tf.errors.InvalidArgumentError, match="appears twice"):
        fused_lamb_multi_update([a[0], a[0]], [a[1], c[1]], [a[2], c[2]], [grads[0], grads[0]],
                                step=1, **HYPER, **flags)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        fused_lamb_multi_update([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], grads[::-1], step=1,
                                **HYPER, **flags)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="N = 2|length"):
        fused_lamb_multi_update([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], grads, step=1,
                                **HYPER, use_layer_adaptation=[True],
                                apply_weight_decay=[True, True])
    np.testing.assert_array_equal(a[0].numpy(), np.ones(3))  # nothing was stepped


# --- FusedLambUpdate against tfa.optimizers.LAMB -------------------------------------------

CONFIG = OptimizerConfig(learning_rate=0.01, weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999,
                         epsilon=1e-6)
# Names as in tfbert's model: LayerNorm and bias are excluded from decay and adaptation.
VARIABLE_SHAPES = {"encoder/dense/kernel": [13, 7], "encoder/dense/bias": [7],
                   "encoder/LayerNorm/gamma": [7], "head/kernel": [7, 3],
                   "head/zero_init": [3], "embeddings/word": [11, 13]}


def make_variables(seed=0):
    rng = np.random.default_rng(seed)
    variables = []
    for name, shape in VARIABLE_SHAPES.items():
        if name.endswith("zero_init") or name.endswith("bias"):
            init = np.zeros(shape, np.float32)  # zero norm on the first step: ratio 1
        elif name.endswith("gamma"):
            init = np.ones(shape, np.float32)
        else:
            init = (0.3 * rng.standard_normal(shape)).astype(np.float32)
        variables.append(tf.Variable(init, name=name))
    return variables


def make_loss(seed=1):
    """A fixed random regression loss over the variables; the embedding lookup gives an
    IndexedSlices gradient (with a repeated id) that the update must densify."""
    rng = np.random.default_rng(seed)
    ids = tf.constant([3, 0, 3, 10, 5], tf.int32)
    target = tf.constant(rng.standard_normal([5, 3]).astype(np.float32))

    def loss(variables):
        kernel, bias, gamma, head, zero_init, word = variables
        x = tf.gather(word, ids)                               # [5, 13]
        h = tf.tanh(tf.matmul(x, kernel) + bias) * gamma       # [5, 7]
        y = tf.matmul(h, head) + zero_init                     # [5, 3]
        return tf.reduce_mean(tf.square(y - target)) + tf.reduce_sum(zero_init * [0.1, -0.2, 0.3])

    return loss


def train(step_fn, variables, loss, steps):
    for _ in range(steps):
        step_fn(variables, loss)


def gradient_step(apply):
    def step(variables, loss):
        with tf.GradientTape() as tape:
            value = loss(variables)
        apply(tape.gradient(value, variables), variables)
    return step


def run_tfa(steps, loss):
    variables = make_variables()
    exclude = list(CONFIG.exclude_from_weight_decay)
    optimizer = tfa.optimizers.LAMB(
        learning_rate=lambda: CONFIG.learning_rate, beta_1=CONFIG.beta_1, beta_2=CONFIG.beta_2,
        epsilon=CONFIG.epsilon, weight_decay=CONFIG.weight_decay_rate,
        exclude_from_weight_decay=exclude, exclude_from_layer_adaptation=exclude)
    train(gradient_step(lambda g, v: optimizer.apply_gradients(zip(g, v))), variables, loss,
          steps)
    return variables, optimizer


@pytest.mark.parametrize("use_fused_op,in_function", [(True, False), (True, True),
                                                      (False, False)])
def test_update_matches_tfa_lamb_over_20_steps(use_fused_op, in_function):
    loss = make_loss()
    want, tfa_optimizer = run_tfa(20, loss)

    variables = make_variables()
    update = FusedLambUpdate(CONFIG, lambda: CONFIG.learning_rate, use_fused_op=use_fused_op)
    update.build(variables)
    step = gradient_step(update.apply)
    if in_function:
        step = tf.function(step)
    train(step, variables, loss, 20)

    assert int(update.optimizer.iterations.numpy()) == 20
    for got, expected in zip(variables, want):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=got.name)
    for slot in ("m", "v"):
        for mine, var in zip(variables, want):
            got = update.optimizer.get_slot(mine, slot)
            np.testing.assert_allclose(got.numpy(), tfa_optimizer.get_slot(var, slot).numpy(),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{var.name} {slot}")


def test_slots_and_variables_interface():
    variables = make_variables()
    update = FusedLambUpdate(CONFIG, lambda: 0.01)
    update.build(variables)
    state = update.optimizer
    assert len(state.variables()) == 1 + 2 * len(variables)
    assert state.iterations.dtype == tf.int64
    for var in variables:
        m, v = state.get_slot(var, "m"), state.get_slot(var, "v")
        assert m.shape == var.shape and v.shape == var.shape
        assert m.dtype == tf.float32 and not m.trainable
        assert m.name.startswith(var.name.split(":")[0] + "/m")
    assert set(update.checkpoint_items()) == {"optimizer"}


def test_checkpoint_round_trip(tmp_path):
    loss = make_loss()
    variables = make_variables()
    update = FusedLambUpdate(CONFIG, lambda: CONFIG.learning_rate)
    update.build(variables)
    step = gradient_step(update.apply)
    train(step, variables, loss, 3)
    path = tf.train.Checkpoint(model=variables, **update.checkpoint_items()).save(
        str(tmp_path / "ckpt"))

    restored_variables = make_variables(seed=99)
    restored = FusedLambUpdate(CONFIG, lambda: CONFIG.learning_rate)
    restored.build(restored_variables)
    tf.train.Checkpoint(model=restored_variables, **restored.checkpoint_items()).restore(
        path).assert_consumed()
    assert int(restored.optimizer.iterations.numpy()) == 3
    for got, want in zip(restored.optimizer.variables(), update.optimizer.variables()):
        np.testing.assert_array_equal(got.numpy(), want.numpy())

    # Both continue identically (same step counter in the bias corrections, same moments).
    train(step, variables, loss, 2)
    train(gradient_step(restored.apply), restored_variables, loss, 2)
    for got, want in zip(restored_variables, variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_checkpoint_restores_slots_by_variable_name_not_position(tmp_path):
    # Two variables of one shape: restored by position, their moments would silently swap.
    def two(seed):
        g = tf.random.Generator.from_seed(seed)
        return [tf.Variable(g.normal([3, 4]), name=name) for name in ("layer_a/kernel",
                                                                       "layer_b/kernel")]

    variables = two(0)
    update = FusedLambUpdate(CONFIG, lambda: CONFIG.learning_rate)
    update.build(variables)
    update.apply([tf.ones([3, 4]), 3.0 * tf.ones([3, 4])], variables)
    path = tf.train.Checkpoint(**update.checkpoint_items()).save(str(tmp_path / "ckpt"))

    reordered = list(reversed(two(1)))
    restored = FusedLambUpdate(CONFIG, lambda: CONFIG.learning_rate)
    restored.build(reordered)
    tf.train.Checkpoint(**restored.checkpoint_items()).restore(path).assert_consumed()
    for var in variables:
        twin = next(v for v in reordered if v.name == var.name)
        for slot in ("m", "v"):
            np.testing.assert_array_equal(restored.optimizer.get_slot(twin, slot).numpy(),
                                          update.optimizer.get_slot(var, slot).numpy())
    assert not np.array_equal(update.optimizer.get_slot(variables[0], "m").numpy(),
                              update.optimizer.get_slot(variables[1], "m").numpy())
