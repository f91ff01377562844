// TfBert>FusedAttentionSoftmax and TfBert>FusedAttentionSoftmaxGrad: the attention
// probabilities in one pass,
//
//   softmax = softmax(scores * scale + mask_bias)          over the last axis (keys)
//   probs   = softmax * keep / (1 - dropout_rate)          inverted dropout
//
// and TfBert>DropoutKeepMask, the same keep mask on its own (for tests and checks).
//
// Legend: B batch, N heads, Sq queries, Sk keys. The softmax is computed in float32 with the
// maximum subtracted, whatever T is (a float16 exp() of unnormalised scores overflows).
//
// Dropout without a stored mask: keep is a pure function of (seed, flat index), the
// counter-based generator of cuda/dropout_rng.h, which the backward op evaluates again.
//
// Memory: the backward pass needs the pre-dropout softmax p, because
//   dscores = scale * p * (dsoftmax - sum_k(dsoftmax * p)),  dsoftmax = dprobs * keep / (1 - rate)
// and p cannot be recovered from probs where keep = 0. So the forward op has two outputs: probs
// (for the probs x values matmul) and softmax (kept only for the backward op). With
// dropout_rate = 0 both outputs share one buffer, so nothing extra is allocated. The reference
// path keeps the softmax, the dropout mask (and its random uniforms) and the dropped probs; the
// fused op keeps softmax and probs, never a mask.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status SeedShape(InferenceContext* c, int input) {
  ShapeHandle seed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(input), 1, &seed));
  DimensionHandle two;
  return c->WithValue(c->Dim(seed, 0), 2, &two);
}

Status AttentionSoftmaxShape(InferenceContext* c) {
  ShapeHandle scores, mask;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &scores));  // [B, N, Sq, Sk]
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &mask));    // [B, 1, 1 or Sq, Sk]
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(scores, 0), c->Dim(mask, 0), &unused));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(mask, 1), 1, &unused));
  DimensionHandle sk = c->Dim(scores, 3);
  TF_RETURN_IF_ERROR(c->Merge(sk, c->Dim(mask, 3), &sk));
  TF_RETURN_IF_ERROR(c->ReplaceDim(scores, 3, sk, &scores));
  TF_RETURN_IF_ERROR(SeedShape(c, 2));
  c->set_output(0, scores);  // probs
  c->set_output(1, scores);  // softmax
  return ::tensorflow::OkStatus();
}

Status AttentionSoftmaxGradShape(InferenceContext* c) {
  ShapeHandle shape;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &shape));
  TF_RETURN_IF_ERROR(c->Merge(shape, c->input(1), &shape));  // softmax has dprobs' shape
  TF_RETURN_IF_ERROR(SeedShape(c, 2));
  c->set_output(0, shape);
  return ::tensorflow::OkStatus();
}

Status DropoutKeepMaskShape(InferenceContext* c) {
  ShapeHandle shape;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(0, &shape));
  TF_RETURN_IF_ERROR(SeedShape(c, 1));
  c->set_output(0, shape);
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedAttentionSoftmax")
    .Input("scores: T")
    .Input("mask_bias: T")
    .Input("seed: int64")
    .Output("probs: T")
    .Output("softmax: T")
    .Attr("scale: float = 1.0")
    .Attr("dropout_rate: float = 0.0")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(AttentionSoftmaxShape)
    .Doc(R"doc(
Scale, additive mask, softmax over the last axis (in float32) and inverted dropout, fused.

scores: [B, N, Sq, Sk] in T, the attention logits.
mask_bias: [B, 1, 1, Sk] or [B, 1, Sq, Sk] in T, added after scaling (0 or -10000).
seed: int64 [2], the dropout seed; the mask is a function of (seed, flat index) only.
probs: [B, N, Sq, Sk] in T, softmax * keep / (1 - dropout_rate).
softmax: [B, N, Sq, Sk] in T, the pre-dropout softmax, saved for the backward op (its gradient
  is ignored, like FusedBatchNorm's reserve_space outputs). The same buffer as probs when
  dropout_rate is 0.
scale: multiplies the scores before the mask is added.
dropout_rate: probability of dropping an element, in [0, 1).
)doc");

REGISTER_OP("TfBert>FusedAttentionSoftmaxGrad")
    .Input("dprobs: T")
    .Input("softmax: T")
    .Input("seed: int64")
    .Output("dscores: T")
    .Attr("scale: float = 1.0")
    .Attr("dropout_rate: float = 0.0")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(AttentionSoftmaxGradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedAttentionSoftmax's probs with respect to its scores.

dprobs: [B, N, Sq, Sk] in T, the gradient of probs.
softmax: [B, N, Sq, Sk] in T, the forward op's softmax output.
seed, scale, dropout_rate: the forward op's; the keep mask is regenerated from the seed.
dscores: [B, N, Sq, Sk] in T, scale * softmax * (d - sum_k(d * softmax)) with
  d = dprobs * keep / (1 - dropout_rate), reduced in float32.
)doc");

REGISTER_OP("TfBert>DropoutKeepMask")
    .Input("shape: int32")
    .Input("seed: int64")
    .Output("keep: bool")
    .Attr("rate: float = 0.0")
    .SetShapeFn(DropoutKeepMaskShape)
    .Doc(R"doc(
The keep mask TfBert>FusedAttentionSoftmax applies for this seed and rate to a tensor of this
shape (element i, in row-major order, is kept when its uniform from cuda/dropout_rng.h >= rate).

shape: int32 [rank], the shape of the tensor.
seed: int64 [2].
keep: bool Tensor of `shape`.
)doc");

}  // namespace tfbert
