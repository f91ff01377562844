// TfBert>FusedLambUpdate: one LAMB step for one parameter tensor, updating the parameter and
// its two moments in place (resource variables, as TF's ResourceApplyAdam does), so a step
// allocates no [n]-sized temporaries beyond what copy-on-write of a shared buffer needs.
// TfBert>FusedLambMultiUpdate: the same step for N tensors in one op, so a model's few hundred
// parameters cost one launch (and on CPU one pass of the thread pool over all of them), not one
// each; every tensor's result is bit-identical to TfBert>FusedLambUpdate's.
//
// The math is tensorflow_addons' LAMB (tensorflow_addons/optimizers/lamb.py), with t = step:
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   update = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon)
//   update += weight_decay * var                         (if apply_weight_decay)
//   ratio = ||var|| / ||update|| if both > 0 and use_layer_adaptation, else 1
//   var -= ratio * lr * update
// The norms are over the whole tensor and are taken before var changes.
//
// Both ops also take what the training step decides after the gradients' global norm, so that
// no op per tensor and no conditional stand between the norm and the update:
//   grad_scale    every gradient is multiplied by it as it is read (g = grad * grad_scale, in
//                 float32: clipping by the global norm; 1 leaves g exactly as given);
//   apply_update  false leaves var, m and v as they are (a step skipped because a gradient was
//                 not finite).

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbert {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status FusedLambUpdateShape(InferenceContext* c) {
  // grad must match the shape recorded in each variable's handle (when it is known).
  ShapeHandle grad = c->input(3);
  for (int i = 0; i < 3; ++i) {
    const auto* handle_data = c->input_handle_shapes_and_types(i);
    if (handle_data != nullptr && handle_data->size() == 1) {
      TF_RETURN_IF_ERROR(c->Merge(grad, (*handle_data)[0].shape, &grad));
    }
  }
  // lr, beta1, beta2, epsilon, weight_decay, step, grad_scale, apply_update: scalars.
  ShapeHandle unused;
  for (int i = 4; i < 12; ++i) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  return ::tensorflow::OkStatus();
}

Status FusedLambMultiUpdateShape(InferenceContext* c) {
  int count;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &count));
  // Inputs: var[N], m[N], v[N], grad[N], then the eight scalars. Each grad must match the shapes
  // recorded in its variables' handles (when they are known).
  for (int t = 0; t < count; ++t) {
    ShapeHandle grad = c->input(3 * count + t);
    for (int i : {t, count + t, 2 * count + t}) {
      const auto* handle_data = c->input_handle_shapes_and_types(i);
      if (handle_data != nullptr && handle_data->size() == 1) {
        TF_RETURN_IF_ERROR(c->Merge(grad, (*handle_data)[0].shape, &grad));
      }
    }
  }
  ShapeHandle unused;
  for (int i = 4 * count; i < 4 * count + 8; ++i) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfBert>FusedLambUpdate")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("grad: float")
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("step: float")
    .Input("grad_scale: float")
    .Input("apply_update: bool")
    .Attr("use_layer_adaptation: bool = true")
    .Attr("apply_weight_decay: bool = true")
    .SetIsStateful()
    .SetShapeFn(FusedLambUpdateShape)
    .Doc(R"doc(
One LAMB step (tensorflow_addons' numerics) on float32 resource variables var, m and v of the
same shape, in place. grad: float32, var's shape. lr, beta1, beta2, epsilon, weight_decay:
float32 scalars. step: float32 scalar, the 1-based step t of the bias corrections 1 - beta^t.
use_layer_adaptation: scale by the trust ratio ||var|| / ||update||. apply_weight_decay: add
weight_decay * var to the update direction (decoupled decay, inside the trust ratio).
grad_scale: float32 scalar multiplying grad as it is read. apply_update: bool scalar; false
leaves var, m and v unchanged.
)doc");

REGISTER_OP("TfBert>FusedLambMultiUpdate")
    .Input("var: N * resource")
    .Input("m: N * resource")
    .Input("v: N * resource")
    .Input("grad: N * float")
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("step: float")
    .Input("grad_scale: float")
    .Input("apply_update: bool")
    .Attr("N: int >= 1")
    .Attr("use_layer_adaptation: list(bool)")
    .Attr("apply_weight_decay: list(bool)")
    .SetIsStateful()
    .SetShapeFn(FusedLambMultiUpdateShape)
    .Doc(R"doc(
TfBert>FusedLambUpdate for N parameter tensors in one op: var[i], m[i], v[i] float32 resource
variables of one shape, grad[i] float32 of that shape, all distinct. use_layer_adaptation and
apply_weight_decay: N flags, tensor i's. Each tensor's norms are its own, as if updated alone.
)doc");

}  // namespace tfbert
