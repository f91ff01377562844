// TfBert>FusedSoftmaxCrossEntropy and its gradient: the masked-LM head's bias add, softmax
// cross-entropy and argmax in one pass over the logits, in their own dtype (the reference casts
// the logits to float32, adds the bias, and runs TensorFlow's cross-entropy and argmax, each
// reading the [rows, cols] logits again).
//
// Legend: rows = the predictions, cols = the classes. With z = float32(logits) + bias:
//
//   loss        = log(sum_k exp(z_k - max z)) - (z_label - max z)    (TensorFlow's order)
//   log_sum_exp = max z + log(sum_k exp(z_k - max z))
//   predicted   = the lowest k with z_k = max z, as tf.argmax takes it
//
// Memory: the forward keeps no [rows, cols] probabilities (TensorFlow's op returns them as its
// backprop output); the gradient op recomputes them from the logits and log_sum_exp, one float
// per row: dlogits = dloss * (exp(z - log_sum_exp) - one_hot(label)), rounded once to T, and
// dbias its float32 sum over the rows.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// logits [rows, cols], bias [cols], labels [rows]: sets *rows and *cols.
Status LogitsBiasLabels(InferenceContext* c, int logits_input, DimensionHandle* rows,
                        DimensionHandle* cols) {
  ShapeHandle logits, bias, labels;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(logits_input), 2, &logits));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(logits_input + 1), 1, &bias));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(logits_input + 2), 1, &labels));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(logits, 0), c->Dim(labels, 0), rows));
  return c->Merge(c->Dim(logits, 1), c->Dim(bias, 0), cols);
}

Status ForwardShape(InferenceContext* c) {
  DimensionHandle rows, cols;
  TF_RETURN_IF_ERROR(LogitsBiasLabels(c, 0, &rows, &cols));
  for (int i = 0; i < 3; ++i) c->set_output(i, c->Vector(rows));
  return ::tensorflow::OkStatus();
}

Status GradShape(InferenceContext* c) {
  DimensionHandle rows, cols;
  TF_RETURN_IF_ERROR(LogitsBiasLabels(c, 1, &rows, &cols));
  ShapeHandle per_row;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &per_row));  // dloss
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(per_row, 0), rows, &rows));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &per_row));  // log_sum_exp
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(per_row, 0), rows, &rows));
  c->set_output(0, c->Matrix(rows, cols));
  c->set_output(1, c->Vector(cols));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedSoftmaxCrossEntropy")
    .Input("logits: T")
    .Input("bias: float")
    .Input("labels: int32")
    .Output("loss: float")
    .Output("log_sum_exp: float")
    .Output("predicted: int32")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(ForwardShape)
    .Doc(R"doc(
Softmax cross-entropy of logits + bias against integer labels, and the argmax, in one pass.

logits: [rows, cols] in T, before the bias.
bias: float32 [cols], added to the logits in float32.
labels: int32 [rows], each in [0, cols) (an error otherwise on the CPU, a NaN loss on a GPU).
loss: float32 [rows], -log softmax(logits + bias)[label].
log_sum_exp: float32 [rows], log(sum(exp(logits + bias))), kept for the gradient op (its own
  gradient is ignored, like FusedBatchNorm's reserve_space outputs).
predicted: int32 [rows], the lowest index of the largest logits + bias.
)doc");

REGISTER_OP("TfBert>FusedSoftmaxCrossEntropyGrad")
    .Input("dloss: float")
    .Input("logits: T")
    .Input("bias: float")
    .Input("labels: int32")
    .Input("log_sum_exp: float")
    .Output("dlogits: T")
    .Output("dbias: float")
    .Attr("T: {float, half, bfloat16}")
    .SetShapeFn(GradShape)
    .Doc(R"doc(
The gradient of TfBert>FusedSoftmaxCrossEntropy's loss.

dloss: float32 [rows], the gradient of loss.
logits, bias, labels: the forward op's inputs; log_sum_exp: its output.
dlogits: [rows, cols] in T, dloss * (softmax(logits + bias) - one_hot(labels)), the softmax
  recomputed as exp(logits + bias - log_sum_exp); rounded once from float32.
dbias: float32 [cols], the float32 dlogits summed over the rows (deterministic order).
)doc");

}  // namespace tfbert
