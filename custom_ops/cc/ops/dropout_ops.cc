// TfBert>FusedDropout: inverted dropout whose mask is never stored,
//
//   y = x * keep / (1 - rate)
//
// keep being a pure function of (seed, flat index), the counter-based generator of
// cuda/dropout_rng.h (the mask of TfBert>DropoutKeepMask). Its gradient is the same op on the
// upstream gradient with the same seed and rate, so the backward pass regenerates the mask
// instead of keeping one (or the uniforms it came from) alive between the passes.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status FusedDropoutShape(InferenceContext* c) {
  ShapeHandle seed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &seed));
  DimensionHandle two;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(seed, 0), 2, &two));
  c->set_output(0, c->input(0));
  return ::tensorflow::OkStatus();
}

Status FusedBiasDropoutAddShape(InferenceContext* c) {
  // x and residual: one shape of rank >= 1; bias: [x's last dimension]; seed: int64 [2].
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(2), &x));
  ShapeHandle bias;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &bias));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(bias, 0), c->Dim(x, -1), &unused));
  ShapeHandle seed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &seed));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(seed, 0), 2, &unused));
  c->set_output(0, x);
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedDropout")
    .Input("x: T")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("rate: float = 0.0")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(FusedDropoutShape)
    .Doc(R"doc(
Inverted dropout with a regenerated mask: y = x * keep / (1 - rate), in float32 arithmetic.

x: a Tensor of any shape in T.
seed: int64 [2]; element i (in row-major order) is kept when its uniform from
  cuda/dropout_rng.h >= rate, as in TfBert>DropoutKeepMask.
y: x's shape and T.
rate: probability of dropping an element, in [0, 1).
)doc");

REGISTER_OP("TfBert>FusedBiasDropoutAdd")
    .Input("x: T")
    .Input("bias: T")
    .Input("residual: T")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("rate: float = 0.0")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(FusedBiasDropoutAddShape)
    .Doc(R"doc(
The end of a transformer sublayer before its LayerNorm in one pass:
y = dropout(x + bias) + residual, in float32 arithmetic rounded once to T.

x: [..., D] in T, the projection without its bias.
bias: [D] in T.
residual: x's shape, in T.
seed: int64 [2]; the mask is TfBert>FusedDropout's for x's shape and this seed (element i, in
  row-major order, is kept when its uniform from cuda/dropout_rng.h >= rate).
y: x's shape and T.
rate: probability of dropping an element, in [0, 1).
)doc");

}  // namespace tfbert
