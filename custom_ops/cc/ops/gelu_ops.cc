// TfBert>FusedBiasGelu, TfBert>FusedBiasGeglu and their gradients: the feed-forward block's
// bias add and activation in one pass.
//
//   FusedBiasGelu:  y = gelu(x + bias)                              x [..., N], y [..., N]
//   FusedBiasGeglu: y = gelu(gate + bias_g) * (value + bias_v)      x [..., 2M], y [..., M]
//                   with [gate | value] = x and [bias_g | bias_v] = bias split along the last axis.
//
// T is float, half or bfloat16, and bias is in T too: under Keras mixed precision the float32
// bias variable is autocast to the compute dtype before the layer sees it. The math is float32
// internally. The gradient ops recompute x + bias from x and bias rather than taking a saved
// pre-activation, so the forward pass keeps only its input alive for the backward pass.
// `approximate` picks the tanh form of GELU (as tf.nn.gelu's argument of the same name).

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// x (input `x_input`, rank >= 1) with its last dimension merged with bias's only dimension;
// `n` (if not null) gets that merged dimension.
Status XWithBias(InferenceContext* c, int x_input, int bias_input, ShapeHandle* x,
                 DimensionHandle* n_out = nullptr) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(x_input), 1, x));
  ShapeHandle bias;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(bias_input), 1, &bias));
  DimensionHandle n = c->Dim(*x, -1);
  TF_RETURN_IF_ERROR(c->Merge(n, c->Dim(bias, 0), &n));
  if (c->RankKnown(*x)) TF_RETURN_IF_ERROR(c->ReplaceDim(*x, -1, n, x));
  if (n_out != nullptr) *n_out = n;
  return ::tensorflow::OkStatus();
}

// x's shape with the last dimension halved (GeGLU's output); an odd known last dimension fails.
Status HalveLastDim(InferenceContext* c, ShapeHandle x, ShapeHandle* out) {
  if (!c->RankKnown(x)) {
    *out = x;
    return ::tensorflow::OkStatus();
  }
  DimensionHandle half;
  TF_RETURN_IF_ERROR(c->Divide(c->Dim(x, -1), 2, /*evenly_divisible=*/true, &half));
  return c->ReplaceDim(x, -1, half, out);
}

Status BiasGeluShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(XWithBias(c, /*x*/ 0, /*bias*/ 1, &x));
  c->set_output(0, x);  // y: [..., N]
  return ::tensorflow::OkStatus();
}

Status BiasGeluGradShape(InferenceContext* c) {
  ShapeHandle x;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(XWithBias(c, /*x*/ 1, /*bias*/ 2, &x, &n));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(0), &x));  // dy has x's shape
  if (c->RankKnown(x)) n = c->Dim(x, -1);             // dy may have told us N
  c->set_output(0, x);                                 // dx: [..., N]
  c->set_output(1, c->Vector(n));                      // dbias: [N]
  return ::tensorflow::OkStatus();
}

Status BiasGeluSaveShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(XWithBias(c, /*x*/ 0, /*bias*/ 1, &x));
  c->set_output(0, x);  // y: [..., N]
  c->set_output(1, x);  // derivative: [..., N]
  return ::tensorflow::OkStatus();
}

Status GradFromDerivativeShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(1), &x));  // derivative has dy's shape
  c->set_output(0, x);                                 // dx: [..., N]
  c->set_output(1, c->Vector(c->RankKnown(x) ? c->Dim(x, -1) : c->UnknownDim()));  // dbias
  return ::tensorflow::OkStatus();
}

Status BiasGegluShape(InferenceContext* c) {
  ShapeHandle x, y;
  TF_RETURN_IF_ERROR(XWithBias(c, /*x*/ 0, /*bias*/ 1, &x));
  TF_RETURN_IF_ERROR(HalveLastDim(c, x, &y));
  c->set_output(0, y);  // y: [..., M]
  return ::tensorflow::OkStatus();
}

Status BiasGegluGradShape(InferenceContext* c) {
  ShapeHandle x, y;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(XWithBias(c, /*x*/ 1, /*bias*/ 2, &x, &n));
  TF_RETURN_IF_ERROR(HalveLastDim(c, x, &y));
  TF_RETURN_IF_ERROR(c->Merge(y, c->input(0), &y));  // dy has y's shape [..., M]
  c->set_output(0, x);                                 // dx: [..., 2M]
  c->set_output(1, c->Vector(n));                      // dbias: [2M]
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedBiasGelu")
    .Input("x: T")
    .Input("bias: T")
    .Output("y: T")
    .Attr("approximate: bool = false")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(BiasGeluShape)
    .Doc(R"doc(
gelu(x + bias), computed in float32.

x: [..., N] in T.
bias: [N] in T.
y: [..., N] in T.
approximate: false for the exact erf form, true for the tanh approximation.
)doc");

REGISTER_OP("TfBert>FusedBiasGeluGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("bias: T")
    .Output("dx: T")
    .Output("dbias: T")
    .Attr("approximate: bool = false")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(BiasGeluGradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedBiasGelu with respect to x and bias.

dy: [..., N] in T, the gradient of y.
x: [..., N] in T, the forward input (x + bias is recomputed).
bias: [N] in T.
dx: [..., N] in T, dy * gelu'(x + bias).
dbias: [N] in T, dx summed over all leading dimensions (in float32, deterministically).
)doc");

REGISTER_OP("TfBert>FusedBiasGeluSave")
    .Input("x: T")
    .Input("bias: T")
    .Output("y: T")
    .Output("derivative: T")
    .Attr("approximate: bool = false")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(BiasGeluSaveShape)
    .Doc(R"doc(
gelu(x + bias) and its derivative gelu'(x + bias), computed in float32 in one pass.

The backward pass then multiplies by the saved derivative (TfBert>FusedBiasGeluGradFromDerivative)
instead of recomputing erf and exp from x: the derivative is kept instead of x (the same
memory), one more write here for much less arithmetic there.

x: [..., N] in T.
bias: [N] in T.
y: [..., N] in T.
derivative: [..., N] in T, gelu'(x + bias) rounded to T, kept for the gradient op (its own
  gradient is ignored).
approximate: false for the exact erf form, true for the tanh approximation.
)doc");

REGISTER_OP("TfBert>FusedBiasGeluGradFromDerivative")
    .Input("dy: T")
    .Input("derivative: T")
    .Output("dx: T")
    .Output("dbias: T")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(GradFromDerivativeShape)
    .Doc(R"doc(
The gradient of TfBert>FusedBiasGeluSave's y with respect to x and bias.

dy: [..., N] in T, the gradient of y.
derivative: [..., N] in T, the forward op's derivative output.
dx: [..., N] in T, dy * derivative in float32, rounded once.
dbias: [N] in T, dx (in float32) summed over every row, deterministically.
)doc");

REGISTER_OP("TfBert>FusedBiasGeglu")
    .Input("x: T")
    .Input("bias: T")
    .Output("y: T")
    .Attr("approximate: bool = false")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(BiasGegluShape)
    .Doc(R"doc(
GeGLU with its bias: gelu(gate + bias_gate) * (value + bias_value), computed in float32.

x: [..., 2M] in T, the gate in [..., :M] and the value in [..., M:].
bias: [2M] in T, split the same way.
y: [..., M] in T.
approximate: false for the exact erf GELU, true for the tanh approximation.
)doc");

REGISTER_OP("TfBert>FusedBiasGegluGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("bias: T")
    .Output("dx: T")
    .Output("dbias: T")
    .Attr("approximate: bool = false")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(BiasGegluGradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedBiasGeglu with respect to x and bias.

dy: [..., M] in T, the gradient of y.
x: [..., 2M] in T, the forward input.
bias: [2M] in T.
dx: [..., 2M] in T: [dy * value * gelu'(gate) | dy * gelu(gate)] with the biased gate and value.
dbias: [2M] in T, dx summed over all leading dimensions (in float32, deterministically).
)doc");

}  // namespace tfbert
