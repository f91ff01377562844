"""LAMB over a ZeRO shard: the fused ops against their TF reference, and both against tfa's LAMB.

- TfBert>FusedLambShardMoments and TfBert>FusedLambShardApply equal the reference on odd
  segmentations: empty segments, a segment crossing the CPU kernel's 16K-element chunks,
  segments aligned with the chunks, inactive segments, mixed weight decay;
- a step over two variables split into segments across two simulated ranks (each rank's sums,
  added per variable, give the whole tensors' trust ratios) equals one step of
  tfa.optimizers.LAMB, with the fused ops (eagerly and in a tf.function) and the reference;
- the empty shard, determinism and copy-on-write of m and v, and clear errors for bad segments.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_addons as tfa

from tfbert.ops import loader
from tfbert.ops.lamb_shard_ops import lamb_shard_apply, lamb_shard_moments

requires_ops = pytest.mark.skipif(
    not loader.ops_available(),
    reason=f"the op library is not built ({loader.LIBRARY_PATH}); run `make ops`")
# Every comparison with tfa runs against both the fused ops and the TF reference.
BOTH = [pytest.param(True, marks=requires_ops, id="fused"), pytest.param(False, id="reference")]

BETA1, BETA2, EPSILON, WEIGHT_DECAY, LR = 0.9, 0.999, 1e-6, 0.01, 0.01
HYPER = (BETA1, BETA2, EPSILON, WEIGHT_DECAY)

# (segment_ends, apply_weight_decay, active, step): n = segment_ends[-1].
SEGMENTATIONS = {
    "odd": ([37, 38, 96], [True, False, True], [True, True, True], 1),
    "empty_and_inactive": ([0, 13, 13, 50, 77], [True, False, True, True, False],
                           [True, True, True, False, True], 3),
    # A segment of 20000 elements over two CPU chunks, between a small one and an inactive one.
    "crosses_chunks": ([3, 20003, 20014], [False, True, True], [True, True, False], 2),
    # Boundaries on the chunk boundary 16384, with an empty segment there.
    "chunk_aligned": ([16384, 16384, 32769], [True, True, False], [True, True, True], 5),
}


def random_shard(n, seed):
    """m, v (v >= 0), grad, param: float32 [n], as after a few steps."""
    rng = np.random.default_rng(seed)
    m = (0.1 * rng.standard_normal(n)).astype(np.float32)
    v = (0.01 * rng.random(n)).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    param = rng.standard_normal(n).astype(np.float32)
    return m, v, grad, param


def shard_step(m0, v0, grad, param, segments, scale, step, use_fused_op):
    """Both halves on fresh variables: (sums [S, 2], m, v, new_param) as numpy."""
    ends, decay, active = segments
    m, v = tf.Variable(m0), tf.Variable(v0)
    sums = lamb_shard_moments(m, v, grad, param, ends, decay, active, *HYPER, step,
                              use_fused_op=use_fused_op)
    new_param = lamb_shard_apply(param, m, v, ends, decay, active, scale, *HYPER, step,
                                 use_fused_op=use_fused_op)
    return sums.numpy(), m.numpy(), v.numpy(), new_param.numpy()


@requires_ops
@pytest.mark.parametrize("name", list(SEGMENTATIONS))
def test_fused_ops_match_reference(name):
    ends, decay, active, step = SEGMENTATIONS[name]
    n, num_segments = ends[-1], len(ends)
    m0, v0, grad, param = random_shard(n, seed=n)
    segments = (tf.constant(ends, tf.int64), tf.constant(decay), tf.constant(active))
    scale = np.random.default_rng(1).uniform(0.001, 0.1, num_segments).astype(np.float32)
    fused = shard_step(m0, v0, grad, param, segments, scale, step, use_fused_op=True)
    reference = shard_step(m0, v0, grad, param, segments, scale, step, use_fused_op=False)

    sums = fused[0]
    assert sums.shape == (num_segments, 2) and fused[3].shape == (n,)
    for output, got, want in zip(["sums", "m", "v", "new_param"], fused, reference):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=output)
    begins = [0] + ends[:-1]
    for s, (begin, end) in enumerate(zip(begins, ends)):
        if not active[s]:  # untouched, and no contribution to the norms
            np.testing.assert_array_equal(sums[s], [0.0, 0.0])
            np.testing.assert_array_equal(fused[1][begin:end], m0[begin:end])
            np.testing.assert_array_equal(fused[2][begin:end], v0[begin:end])
            np.testing.assert_array_equal(fused[3][begin:end], param[begin:end])
        else:  # float64 sums: against numpy's
            np.testing.assert_allclose(
                sums[s, 0], np.sum(param[begin:end].astype(np.float64) ** 2), rtol=1e-6)
        if begin == end:
            np.testing.assert_array_equal(sums[s], [0.0, 0.0])


# --- Two ranks against tfa.optimizers.LAMB --------------------------------------------------

# A decayed and adapted matrix of 19497 elements (more than a CPU chunk), and a vector that tfa
# excludes from weight decay and layer adaptation, as BERT's LayerNorm parameters.
VARIABLES = {"dense/kernel": [201, 97], "LayerNorm/gamma": [37]}
EXCLUDE = ["LayerNorm", "bias"]
SPLIT = 10000  # rank 0 owns kernel[:10000]; rank 1 the rest of kernel, then all of gamma


def rank_segments(sizes, begin, end):
    """The segments of the flat range [begin, end) of the concatenated variables: per variable
    its overlap with the range (possibly empty), as ZeRO lays out a rank's shard."""
    ends, offset, total = [], 0, 0
    for size in sizes:
        overlap = max(0, min(end, offset + size) - max(begin, offset))
        total += overlap
        ends.append(total)
        offset += size
    return ends


def tfa_step(values, grads):
    variables = [tf.Variable(x, name=name) for name, x in zip(VARIABLES, values)]
    optimizer = tfa.optimizers.LAMB(
        learning_rate=LR, beta_1=BETA1, beta_2=BETA2, epsilon=EPSILON, weight_decay=WEIGHT_DECAY,
        exclude_from_weight_decay=EXCLUDE, exclude_from_layer_adaptation=EXCLUDE)
    optimizer.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    return ([x.numpy().ravel() for x in variables],
            [optimizer.get_slot(x, "m").numpy().ravel() for x in variables],
            [optimizer.get_slot(x, "v").numpy().ravel() for x in variables])


def zero_step(flat_param, flat_grad, sizes, excluded, use_fused_op, in_function):
    """One ZeRO step from zero moments, the flat buffers split between two ranks: each rank's
    moments half, the sums added per variable (the all-reduce), each rank's apply half.
    Returns the flat new parameters, m and v, and each rank's sums."""
    n = len(flat_param)
    ranks = []
    for begin, end in [(0, SPLIT), (SPLIT, n)]:
        ends = rank_segments(sizes, begin, end)
        ranks.append(dict(
            begin=begin, end=end, ends=tf.constant(ends, tf.int64),
            decay=tf.constant([not e for e in excluded]),
            active=tf.constant([True] * len(sizes)),
            m=tf.Variable(tf.zeros([end - begin])), v=tf.Variable(tf.zeros([end - begin]))))
    step = tf.constant(1.0)

    def moments(r):
        return lamb_shard_moments(r["m"], r["v"], flat_grad[r["begin"]:r["end"]],
                                  flat_param[r["begin"]:r["end"]], r["ends"], r["decay"],
                                  r["active"], *HYPER, step, use_fused_op=use_fused_op)

    def apply(r, scale):
        return lamb_shard_apply(flat_param[r["begin"]:r["end"]], r["m"], r["v"], r["ends"],
                                r["decay"], r["active"], scale, *HYPER, step,
                                use_fused_op=use_fused_op)

    if in_function:
        moments, apply = tf.function(moments), tf.function(apply)
    sums = [moments(r) for r in ranks]
    assert all(s.shape == (len(sizes), 2) for s in sums)
    # The all-reduce: each variable's sums over its segments on every rank, then tfa's ratio.
    totals = tf.add_n(sums)
    w_norm, u_norm = tf.sqrt(totals[:, 0]), tf.sqrt(totals[:, 1])
    ratio = tf.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    ratio = tf.where(tf.constant(excluded), 1.0, ratio)
    scale = ratio * LR
    new_param = np.concatenate([apply(r, scale).numpy() for r in ranks])
    m = np.concatenate([r["m"].numpy() for r in ranks])
    v = np.concatenate([r["v"].numpy() for r in ranks])
    return new_param, m, v, [x.numpy() for x in sums]


@pytest.mark.parametrize("use_fused_op", BOTH)
@pytest.mark.parametrize("in_function", [False, True])
def test_two_ranks_match_tfa_lamb(use_fused_op, in_function):
    rng = np.random.default_rng(3)
    shapes = list(VARIABLES.values())
    values = [(0.3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    # The kernel's part on rank 1 is 20x smaller than rank 0's: a rank's own half of the norms
    # would give a trust ratio far from the whole tensor's.
    values[0].reshape(-1)[SPLIT:] *= 0.05
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    want_param, want_m, want_v = tfa_step(values, grads)

    sizes = [int(np.prod(s)) for s in shapes]
    excluded = [any(e in name for e in EXCLUDE) for name in VARIABLES]
    assert excluded == [False, True] and sizes[0] > SPLIT  # the kernel is split across ranks
    new_param, m, v, sums = zero_step(np.concatenate([x.ravel() for x in values]),
                                      np.concatenate([g.ravel() for g in grads]), sizes,
                                      excluded, use_fused_op, in_function)
    for name, got, want in [("param", new_param, want_param), ("m", m, want_m),
                            ("v", v, want_v)]:
        np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-7, err_msg=name)
    # Not vacuous: the kernel's ratio from rank 0's sums alone is far from the whole tensor's.
    def kernel_ratio(s):
        return np.sqrt(s[0, 0] / s[0, 1])

    assert abs(kernel_ratio(sums[0]) / kernel_ratio(sums[0] + sums[1]) - 1) > 0.2
    np.testing.assert_array_equal(sums[0][1], [0.0, 0.0])  # rank 0's empty gamma segment


# --- Edge cases and errors ------------------------------------------------------------------


@pytest.mark.parametrize("use_fused_op", BOTH)
@pytest.mark.parametrize("ends", [[], [0, 0]], ids=["no_segments", "empty_segments"])
def test_empty_shard(use_fused_op, ends):
    empty = tf.zeros([0])
    segments = (tf.constant(ends, tf.int64), tf.constant([True] * len(ends), tf.bool),
                tf.constant([True] * len(ends), tf.bool))
    m, v = tf.Variable(empty), tf.Variable(empty)
    sums = lamb_shard_moments(m, v, empty, empty, *segments, *HYPER, 1.0,
                              use_fused_op=use_fused_op)
    np.testing.assert_array_equal(sums.numpy(), np.zeros([len(ends), 2], np.float32))
    new_param = lamb_shard_apply(empty, m, v, *segments, tf.ones([len(ends)]), *HYPER, 1.0,
                                 use_fused_op=use_fused_op)
    assert new_param.shape == (0,)


@requires_ops
def test_fused_ops_are_deterministic_and_copy_on_write():
    ends, decay, active, step = SEGMENTATIONS["crosses_chunks"]
    m0, v0, grad, param = random_shard(ends[-1], seed=11)
    results = []
    for _ in range(2):
        m, v = tf.Variable(m0), tf.Variable(v0)
        before = m.read_value()  # a read that shares the buffer: copy-on-write keeps it
        sums = lamb_shard_moments(m, v, grad, param, ends, decay, active, *HYPER, step,
                                  use_fused_op=True)
        np.testing.assert_array_equal(before.numpy(), m0)
        new_param = lamb_shard_apply(param, m, v, ends, decay, active, [0.1, 0.2, 0.3], *HYPER,
                                     step, use_fused_op=True)
        results.append((sums.numpy(), new_param.numpy()))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


BAD_SEGMENTS = {
    "decreasing": ([4, 2, 6], "non-decreasing.*segment_ends\\[1\\] = 2 < segment_ends\\[0\\] = 4"),
    "negative": ([-1, 6], "segment_ends\\[0\\] = -1 < 0"),
    "short": ([2, 5], "last segment_ends entry must be n = 6"),
    "long": ([2, 7], "last segment_ends entry must be n = 6"),
    "none": ([], "segment_ends is empty but the shard has n = 6"),
}


@requires_ops
@pytest.mark.parametrize("case", list(BAD_SEGMENTS))
def test_bad_segment_ends_are_clear_errors(case):
    ends, message = BAD_SEGMENTS[case]
    flags = tf.constant([True] * len(ends))
    m, v, x = tf.Variable(tf.zeros([6])), tf.Variable(tf.zeros([6])), tf.ones([6])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        lamb_shard_moments(m, v, x, x, tf.constant(ends, tf.int64), flags, flags, *HYPER, 1.0,
                           use_fused_op=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        lamb_shard_apply(x, m, v, tf.constant(ends, tf.int64), flags, flags,
                         tf.ones([len(ends)]), *HYPER, 1.0, use_fused_op=True)
    np.testing.assert_array_equal(m.numpy(), np.zeros(6))  # nothing was written


@requires_ops
def test_bad_shapes_are_clear_errors():
    m, v, x = tf.Variable(tf.zeros([6])), tf.Variable(tf.zeros([6])), tf.ones([6])
    ends = tf.constant([2, 6], tf.int64)
    two, three = tf.constant([True, True]), tf.constant([True, True, False])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        lamb_shard_moments(m, v, x, x, ends, two, three, *HYPER, 1.0, use_fused_op=True)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        lamb_shard_moments(m, v, tf.ones([5]), x, ends, two, two, *HYPER, 1.0,
                           use_fused_op=True)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        lamb_shard_apply(x, m, v, ends, two, two, tf.ones([3]), *HYPER, 1.0, use_fused_op=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1-based"):
        lamb_shard_moments(m, v, x, x, ends, two, two, *HYPER, 0.0, use_fused_op=True)
