// TfBert>FusedLambShardMoments and TfBert>FusedLambShardApply: LAMB over one rank's flat shard of
// the optimizer state under ZeRO (tfbert/ops/lamb_shard_ops.py), the two halves of the step on
// either side of the all-reduce of the trust ratios' norms.
//
// Legend: n = elements of the shard; S = segments. segment_ends: int64 [S], non-decreasing, the
// last equal to n; segment s is [segment_ends[s-1], segment_ends[s]) (an empty segment is
// allowed), a contiguous part of one variable.
//
// The math is tensorflow_addons' LAMB (as TfBert>FusedLambUpdate, cc/ops/lamb_ops.cc), t = step:
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   update = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon)
//   update += weight_decay * param                       (where apply_weight_decay[s])
// Moments: m and v in place, and per segment sums[s] = (sum param^2, sum update^2).
// The caller adds each variable's sums over its segments on all ranks and sets
// scale[s] = ratio * lr, ratio = ||param|| / ||update|| (1 if either is 0).
// Apply: new_param = param - scale[s] * update, with update recomputed bit-identically.
// An inactive segment (active[s] false: a frozen variable) keeps m, v and param, and sums to 0.

#include <initializer_list>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// The [n] shape of the float inputs `float_inputs` merged with the handle shapes of the resource
// inputs `variables` (when they are known).
Status MergeShardShape(InferenceContext* c, std::initializer_list<int> float_inputs,
                       std::initializer_list<int> variables, ShapeHandle* shard) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(*float_inputs.begin()), 1, shard));
  for (int i : float_inputs) TF_RETURN_IF_ERROR(c->Merge(*shard, c->input(i), shard));
  for (int i : variables) {
    const auto* handle_data = c->input_handle_shapes_and_types(i);
    if (handle_data != nullptr && handle_data->size() == 1) {
      TF_RETURN_IF_ERROR(c->Merge(*shard, (*handle_data)[0].shape, shard));
    }
  }
  return ::tensorflow::OkStatus();
}

// The [S] inputs (segment_ends, apply_weight_decay, active[, scale]) all have one size S.
Status MergeSegmentsShape(InferenceContext* c, std::initializer_list<int> inputs,
                          DimensionHandle* num_segments) {
  ShapeHandle segments;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(*inputs.begin()), 1, &segments));
  for (int i : inputs) TF_RETURN_IF_ERROR(c->Merge(segments, c->input(i), &segments));
  *num_segments = c->Dim(segments, 0);
  return ::tensorflow::OkStatus();
}

Status ScalarInputs(InferenceContext* c, int first, int last) {
  ShapeHandle unused;
  for (int i = first; i <= last; ++i) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  return ::tensorflow::OkStatus();
}

Status FusedLambShardMomentsShape(InferenceContext* c) {
  // m 0, v 1 (resources); grad 2, param 3: [n].
  ShapeHandle shard;
  TF_RETURN_IF_ERROR(MergeShardShape(c, {2, 3}, {0, 1}, &shard));
  // segment_ends 4, apply_weight_decay 5, active 6: [S].
  DimensionHandle num_segments;
  TF_RETURN_IF_ERROR(MergeSegmentsShape(c, {4, 5, 6}, &num_segments));
  // beta1, beta2, epsilon, weight_decay, step: scalars.
  TF_RETURN_IF_ERROR(ScalarInputs(c, 7, 11));
  c->set_output(0, c->Matrix(num_segments, 2));
  return ::tensorflow::OkStatus();
}

Status FusedLambShardApplyShape(InferenceContext* c) {
  // param 0: [n]; m 1, v 2 (resources).
  ShapeHandle shard;
  TF_RETURN_IF_ERROR(MergeShardShape(c, {0}, {1, 2}, &shard));
  // segment_ends 3, apply_weight_decay 4, active 5, scale 6: [S].
  DimensionHandle num_segments;
  TF_RETURN_IF_ERROR(MergeSegmentsShape(c, {3, 4, 5, 6}, &num_segments));
  // beta1, beta2, epsilon, weight_decay, step: scalars.
  TF_RETURN_IF_ERROR(ScalarInputs(c, 7, 11));
  c->set_output(0, shard);
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedLambShardMoments")
    .Input("m: resource")
    .Input("v: resource")
    .Input("grad: float")
    .Input("param: float")
    .Input("segment_ends: int64")
    .Input("apply_weight_decay: bool")
    .Input("active: bool")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("step: float")
    .Output("sums: float")
    .SetIsStateful()
    .SetShapeFn(FusedLambShardMomentsShape)
    .Doc(R"doc(
The first half of a LAMB step (tensorflow_addons' numerics) over a ZeRO shard of n elements cut
into S segments: updates the moments m and v (float32 [n] resource variables) in place and
returns sums: float32 [S, 2], per segment the sums of param^2 and update^2 (accumulated in
float64 over a fixed partition: deterministic), 0 for an inactive segment.
grad, param: float32 [n]. segment_ends: int64 [S], non-decreasing, the last equal to n.
apply_weight_decay: bool [S], add weight_decay * param to the segment's update.
active: bool [S]; an inactive segment keeps its m and v. beta1, beta2, epsilon, weight_decay:
float32 scalars. step: float32 scalar, the 1-based step t of the bias corrections 1 - beta^t.
)doc");

REGISTER_OP("TfBert>FusedLambShardApply")
    .Input("param: float")
    .Input("m: resource")
    .Input("v: resource")
    .Input("segment_ends: int64")
    .Input("apply_weight_decay: bool")
    .Input("active: bool")
    .Input("scale: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("step: float")
    .Output("new_param: float")
    // It only reads m and v, but marked stateful so that it is never constant-folded or merged
    // with another call that read the variables at a different step.
    .SetIsStateful()
    .SetShapeFn(FusedLambShardApplyShape)
    .Doc(R"doc(
The second half of a LAMB step over a ZeRO shard: new_param = param - scale[s] * update, with
update recomputed from the moments m and v (float32 [n] resource variables, read only, as left by
TfBert>FusedLambShardMoments) exactly as that op computed it; param itself in inactive segments.
param: float32 [n]. scale: float32 [S], trust_ratio * lr of each segment's variable. The other
inputs as in TfBert>FusedLambShardMoments.
)doc");

}  // namespace tfbert
