// TfBert>FusedBiasSplitHeads and its gradient: with --fused_qkv the attention's Q, K and V come
// out of one [B, S, 3D] projection, and this op adds its bias and cuts it into the three
// [B, n, S, H] head layouts in one pass. TensorFlow's ops for the same (a bias add, a reshape,
// a transpose to [3, B, n, S, H] and an unstack) read and write the projection twice, and their
// gradient three times (a Pack, a transpose and the bias gradient's Sum): here the gradient is
// one gather into [B, S, 3D] that also sums dbias.
//
// Legend: B batch, S sequence, n heads, H head size, D = n * H.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status ForwardShape(InferenceContext* c) {
  ShapeHandle x, bias;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));  // [B, S, 3D]
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &bias));
  DimensionHandle cols = c->Dim(x, 2);
  TF_RETURN_IF_ERROR(c->Merge(cols, c->Dim(bias, 0), &cols));
  int heads;
  TF_RETURN_IF_ERROR(c->GetAttr("heads", &heads));
  DimensionHandle head_size = c->UnknownDim();
  if (c->ValueKnown(cols)) {
    if (c->Value(cols) % (3 * heads) != 0) {
      return ::tensorflow::errors::InvalidArgument(
          "FusedBiasSplitHeads: x's last dimension ", c->Value(cols), " is not 3 * heads (",
          heads, ") * head_size");
    }
    head_size = c->MakeDim(c->Value(cols) / (3 * heads));
  }
  ShapeHandle out = c->MakeShape({c->Dim(x, 0), c->MakeDim(heads), c->Dim(x, 1), head_size});
  for (int i = 0; i < 3; ++i) c->set_output(i, out);
  return ::tensorflow::OkStatus();
}

Status GradShape(InferenceContext* c) {
  ShapeHandle part;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &part));  // [B, n, S, H]
  for (int i = 1; i < 3; ++i) TF_RETURN_IF_ERROR(c->Merge(part, c->input(i), &part));
  DimensionHandle width, cols;
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(part, 1), c->Dim(part, 3), &width));
  TF_RETURN_IF_ERROR(c->Multiply(width, 3, &cols));
  c->set_output(0, c->MakeShape({c->Dim(part, 0), c->Dim(part, 2), cols}));
  c->set_output(1, c->Vector(cols));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedBiasSplitHeads")
    .Input("x: T")
    .Input("bias: T")
    .Output("query: T")
    .Output("key: T")
    .Output("value: T")
    .Attr("heads: int >= 1")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(ForwardShape)
    .Doc(R"doc(
x + bias split into the attention's query, key and value, each in the [B, n, S, H] layout.

x: [B, S, 3D] in T, the fused Q/K/V projection: [B, S, 3, n, H] row-major.
bias: [3D] in T, [query | key | value] biases.
query, key, value: [B, n, S, H] in T, (x + bias)[:, :, p] transposed, p = 0, 1, 2; the sum is
  taken in float32 and rounded once.
heads: n.
)doc");

REGISTER_OP("TfBert>FusedBiasSplitHeadsGrad")
    .Input("dquery: T")
    .Input("dkey: T")
    .Input("dvalue: T")
    .Output("dx: T")
    .Output("dbias: T")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(GradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedBiasSplitHeads.

dquery, dkey, dvalue: [B, n, S, H] in T.
dx: [B, S, 3D] in T, the three gradients back in x's layout (unchanged values).
dbias: [3D] in T, dx summed over B and S in float32 (deterministic order), rounded once.
)doc");

}  // namespace tfbert
