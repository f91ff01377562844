"""LAMB over one rank's shard of the optimizer state (ZeRO): the reference in TensorFlow.

Under ZeRO (`tfbert.training.gradient_sync`) each data-parallel rank owns a flat buffer of n
elements: the concatenation of its parts ("segments") of the model's variables, each segment a
contiguous range of one variable's elements. LAMB's update is element-wise except for the trust
ratio ||var|| / ||update||, which needs the norms of whole tensors, and a tensor may be split
across ranks. The step therefore has two halves with an all-reduce between them:

  1. `lamb_shard_moments`: m and v in place, and per segment the partial sums of var^2 and
     update^2 (update = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon), plus
     weight_decay * var where the segment's variable is decayed);
  2. the caller adds the sums of each variable's segments over ranks and computes
     scale = trust_ratio * lr per segment;
  3. `lamb_shard_apply`: new var = var - scale * update.

The numerics are tensorflow_addons' LAMB (see `lamb_ops.py`), so a ZeRO step equals the
unsharded one to float32 rounding (the norms are summed in another order).

Each half has a fused custom op (custom_ops/cc/ops/lamb_shard_ops.cc: one pass over the shard,
m and v in place, sums accumulated in float64 in a fixed order) and its TF reference here
(`*_reference`); `lamb_shard_moments` and `lamb_shard_apply` dispatch to either.

Legend: n = elements of the shard; S = segments. segment_ends: int64 [S], non-decreasing (an
empty segment repeats the previous end), the last equal to n (segment s is
[segment_ends[s-1], segment_ends[s])).
"""

from __future__ import annotations

import tensorflow as tf

from tfbert.ops import loader


def segment_ids(segment_ends: tf.Tensor, n: int) -> tf.Tensor:
    """int32 [n]: the segment of each element."""
    # Element i lies in segment s = the number of ends <= i (empty segments included), and the
    # result has the static shape [n].
    ends = tf.cast(segment_ends, tf.int64)
    return tf.searchsorted(ends, tf.range(n, dtype=tf.int64), side="right", out_type=tf.int32)


def _per_element(values: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """A per-segment [S] value broadcast to the segment's elements: [n]."""
    return tf.gather(values, ids)


def _bias_corrections(beta1, beta2, step):
    step = tf.cast(step, tf.float32)
    return 1.0 - tf.pow(tf.cast(beta1, tf.float32), step), \
        1.0 - tf.pow(tf.cast(beta2, tf.float32), step)


def lamb_direction(m, v, param, decay_per_element, beta1, beta2, epsilon, weight_decay, step):
    """float32 [n]: LAMB's update direction from the updated moments, in tfa's order."""
    bias_correction1, bias_correction2 = _bias_corrections(beta1, beta2, step)
    m_hat = m / bias_correction1
    v_hat = v / bias_correction2
    update = m_hat / (tf.sqrt(v_hat) + tf.cast(epsilon, tf.float32))
    # Decoupled weight decay inside the trust ratio, only where the variable is decayed.
    return update + tf.where(decay_per_element, tf.cast(weight_decay, tf.float32) * param, 0.0)


def lamb_shard_moments_reference(m: tf.Variable, v: tf.Variable, grad, param, segment_ends,
                                 apply_weight_decay, active, beta1, beta2, epsilon, weight_decay,
                                 step) -> tf.Tensor:
    """Updates m and v (float32 [n] variables) in place; returns float32 [S, 2]: per segment the
    sums of param^2 and update^2.

    Args:
      grad, param: float32 [n].
      segment_ends: int64 [S].
      apply_weight_decay: bool [S], add weight_decay * param to the segment's update.
      active: bool [S]; an inactive segment (a frozen variable) keeps m and v and sums to 0.
      beta1, beta2, epsilon, weight_decay: float32 scalars; step: the 1-based step t.
    """
    n = int(m.shape[0])
    ids = segment_ids(segment_ends, n)
    grad = tf.cast(grad, tf.float32)
    param = tf.cast(param, tf.float32)
    beta1 = tf.cast(beta1, tf.float32)
    beta2 = tf.cast(beta2, tf.float32)
    is_active = _per_element(active, ids)
    new_m = tf.where(is_active, m * beta1 + grad * (1.0 - beta1), m)
    new_v = tf.where(is_active, v * beta2 + (grad * grad) * (1.0 - beta2), v)
    m.assign(new_m)
    v.assign(new_v)
    update = lamb_direction(new_m, new_v, param, _per_element(apply_weight_decay, ids),
                            beta1, beta2, epsilon, weight_decay, step)
    num_segments = tf.size(segment_ends)

    def segment_sum_of_squares(x):
        # In float64, as the fused op accumulates: unsorted_segment_sum adds float32 one element
        # after the other, which over a segment of 1M elements is off by ~5e-4 (tf.norm's
        # tree sum in tfa: ~1e-7).
        x = tf.cast(x, tf.float64)
        return tf.math.unsorted_segment_sum(tf.where(is_active, x * x, tf.zeros_like(x)), ids,
                                            num_segments)

    return tf.cast(tf.stack([segment_sum_of_squares(param), segment_sum_of_squares(update)],
                            axis=1), tf.float32)


def lamb_shard_apply_reference(param, m, v, segment_ends, apply_weight_decay, active, scale,
                               beta1, beta2, epsilon, weight_decay, step) -> tf.Tensor:
    """float32 [n]: param - scale[segment] * update, param itself in inactive segments.

    Args:
      param: float32 [n]; m, v: the moments after `lamb_shard_moments` (variables or Tensors).
      scale: float32 [S], trust_ratio * lr of each segment's variable.
      Others as in `lamb_shard_moments_reference`.
    """
    n = int(param.shape[0])
    ids = segment_ids(segment_ends, n)
    param = tf.cast(param, tf.float32)
    update = lamb_direction(tf.convert_to_tensor(m), tf.convert_to_tensor(v), param,
                            _per_element(apply_weight_decay, ids), beta1, beta2, epsilon,
                            weight_decay, step)
    new_param = param - _per_element(tf.cast(scale, tf.float32), ids) * update
    return tf.where(_per_element(active, ids), new_param, param)


def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def lamb_shard_moments(m: tf.Variable, v: tf.Variable, grad, param, segment_ends,
                       apply_weight_decay, active, beta1, beta2, epsilon, weight_decay, step,
                       use_fused_op: bool) -> tf.Tensor:
    """The first half of the step: updates m and v in place and returns float32 [S, 2], per
    segment the sums of param^2 and update^2 (0 for an inactive segment).

    Args:
      m, v: float32 [n] resource tf.Variables, the shard's moments.
      grad, param: float32 [n], the shard's gradient and parameter values.
      segment_ends: int64 [S], non-decreasing, the last equal to n.
      apply_weight_decay: bool [S], add weight_decay * param to the segment's update.
      active: bool [S]; an inactive segment (a frozen variable) keeps m and v and sums to 0.
      beta1, beta2, epsilon, weight_decay: float32 scalars; step: the 1-based step t.
      use_fused_op: run TfBert>FusedLambShardMoments (raises loader.OpsNotBuiltError when the
        library is not built) rather than `lamb_shard_moments_reference`. On a GPU the op wants
        segment_ends, apply_weight_decay and active in host memory: pass constants.
    """
    if not use_fused_op:
        return lamb_shard_moments_reference(m, v, grad, param, segment_ends, apply_weight_decay,
                                            active, beta1, beta2, epsilon, weight_decay, step)
    return loader.load_ops().tf_bert_fused_lamb_shard_moments(
        m.handle, v.handle, _f32(grad), _f32(param), tf.cast(segment_ends, tf.int64),
        tf.cast(apply_weight_decay, tf.bool), tf.cast(active, tf.bool), _f32(beta1),
        _f32(beta2), _f32(epsilon), _f32(weight_decay), _f32(step))


def lamb_shard_apply(param, m: tf.Variable, v: tf.Variable, segment_ends, apply_weight_decay,
                     active, scale, beta1, beta2, epsilon, weight_decay, step,
                     use_fused_op: bool) -> tf.Tensor:
    """The second half: float32 [n], param - scale[segment] * update (param itself in inactive
    segments), update recomputed from m and v exactly as `lamb_shard_moments` computed it.

    Args:
      param: float32 [n], the values given to `lamb_shard_moments`.
      m, v: the float32 [n] resource tf.Variables after `lamb_shard_moments` (read only).
      scale: float32 [S], trust_ratio * lr of each segment's variable.
      use_fused_op: run TfBert>FusedLambShardApply rather than `lamb_shard_apply_reference`.
      Others as in `lamb_shard_moments`.
    """
    if not use_fused_op:
        return lamb_shard_apply_reference(param, m, v, segment_ends, apply_weight_decay, active,
                                          scale, beta1, beta2, epsilon, weight_decay, step)
    return loader.load_ops().tf_bert_fused_lamb_shard_apply(
        _f32(param), m.handle, v.handle, tf.cast(segment_ends, tf.int64),
        tf.cast(apply_weight_decay, tf.bool), tf.cast(active, tf.bool), _f32(scale),
        _f32(beta1), _f32(beta2), _f32(epsilon), _f32(weight_decay), _f32(step))
