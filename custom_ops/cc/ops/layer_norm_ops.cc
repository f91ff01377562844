// TfBert>FusedLayerNorm and TfBert>FusedLayerNormGrad: LayerNorm over the last axis.
//
//   y = (x - mean) / sqrt(var + epsilon) * gamma + beta
//
// x is [..., H] in T (float, half or bfloat16); gamma and beta are float32 [H], because the
// variables stay float32 under mixed precision. The statistics mean and rstd = 1/sqrt(var + eps)
// are always float32, whatever T is: a float16 variance overflows (x^2 > 65504 once |x| > 256)
// or underflows (var < 6e-8 flushes to zero and rstd becomes 1/sqrt(eps)), and bfloat16 has only
// 8 bits of mantissa to average over hundreds of elements. They are outputs, one per row
// (rows = the product of the leading dimensions), so the backward op need not recompute them.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// The hidden size H: x's last dimension, merged with gamma's (and beta's) only dimension.
Status MergeHiddenSize(InferenceContext* c, ShapeHandle x, int vector_input, DimensionHandle* h) {
  ShapeHandle vector;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(vector_input), 1, &vector));
  return c->Merge(*h, c->Dim(vector, 0), h);
}

// The number of rows: the product of x's leading dimensions (unknown if any of them is).
Status RowCount(InferenceContext* c, ShapeHandle x, DimensionHandle* rows) {
  if (!c->RankKnown(x)) {
    *rows = c->UnknownDim();
    return ::tensorflow::OkStatus();
  }
  *rows = c->MakeDim(1);
  for (int i = 0; i < c->Rank(x) - 1; ++i) {
    TF_RETURN_IF_ERROR(c->Multiply(*rows, c->Dim(x, i), rows));
  }
  return ::tensorflow::OkStatus();
}

Status LayerNormShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
  DimensionHandle h = c->Dim(x, -1);
  TF_RETURN_IF_ERROR(MergeHiddenSize(c, x, /*gamma*/ 1, &h));
  TF_RETURN_IF_ERROR(MergeHiddenSize(c, x, /*beta*/ 2, &h));
  if (c->RankKnown(x)) TF_RETURN_IF_ERROR(c->ReplaceDim(x, -1, h, &x));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(RowCount(c, x, &rows));
  c->set_output(0, x);                  // y: [..., H]
  c->set_output(1, c->Vector(rows));    // mean: [rows]
  c->set_output(2, c->Vector(rows));    // rstd: [rows]
  return ::tensorflow::OkStatus();
}

Status LayerNormGradShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 1, &x));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(0), &x));  // dy has x's shape
  DimensionHandle h = c->Dim(x, -1);
  TF_RETURN_IF_ERROR(MergeHiddenSize(c, x, /*gamma*/ 4, &h));
  if (c->RankKnown(x)) TF_RETURN_IF_ERROR(c->ReplaceDim(x, -1, h, &x));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(RowCount(c, x, &rows));
  for (int stats_input : {2, 3}) {  // mean, rstd: [rows]
    ShapeHandle stats;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(stats_input), 1, &stats));
    TF_RETURN_IF_ERROR(c->Merge(rows, c->Dim(stats, 0), &rows));
  }
  c->set_output(0, x);              // dx: [..., H]
  c->set_output(1, c->Vector(h));   // dgamma: [H]
  c->set_output(2, c->Vector(h));   // dbeta: [H]
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedLayerNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("epsilon: float = 1e-12")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(LayerNormShape)
    .Doc(R"doc(
LayerNorm over the last axis with float32 statistics.

x: [..., H] in T.
gamma: float32 [H], the scale.
beta: float32 [H], the shift.
y: [..., H] in T, (x - mean) * rstd * gamma + beta.
mean: float32 [rows], each row's mean (rows = the product of the leading dimensions of x).
rstd: float32 [rows], each row's 1 / sqrt(variance + epsilon) (biased variance).
)doc");

REGISTER_OP("TfBert>FusedLayerNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: float")
    .Input("rstd: float")
    .Input("gamma: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(LayerNormGradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedLayerNorm with respect to x, gamma and beta.

dy: [..., H] in T, the gradient of y.
x: [..., H] in T, the forward input.
mean: float32 [rows] and rstd: float32 [rows], the forward op's statistics.
gamma: float32 [H].
dx: [..., H] in T.
dgamma: float32 [H], sum over rows of dy * (x - mean) * rstd.
dbeta: float32 [H], sum over rows of dy.
)doc");

}  // namespace tfbert
