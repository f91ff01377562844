// What the LAMB kernels (lamb_kernels.cc: TfBert>FusedLambUpdate; lamb_shard_kernels.cc:
// TfBert>FusedLambShardMoments and TfBert>FusedLambShardApply) share around their functors: the
// hyper-parameters every LAMB step takes and their scalar inputs, and the handling of the float32
// resource variables they read or update in place (lookup, checks, copy-on-write on CPU and, in
// a WITH_CUDA=1 build, on GPU). Every error names the op that failed, which the caller passes in.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_VARIABLES_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_VARIABLES_H_

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include <cmath>
#include <string>

#include "absl/strings/match.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/platform/strcat.h"

#if GOOGLE_CUDA
#include "lamb_launch.h"  // tfbert_lamb_copy_f32, the copy-on-write copy
#endif

namespace tfbert {
namespace functor {

// The hyper-parameters of every LAMB step, with the bias corrections 1 - beta^t already taken on
// the host (see HyperparamInputs).
struct LambStepHyperparams {
  float beta1;
  float beta2;
  float epsilon;
  float weight_decay;
  float bias_correction1;  // 1 - beta1^step
  float bias_correction2;  // 1 - beta2^step
};

}  // namespace functor

#if GOOGLE_CUDA
inline Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}
#endif  // GOOGLE_CUDA

// --- Scalar inputs. ---------------------------------------------------------------------------

inline Status ScalarInput(OpKernelContext* context, const char* op, int input, const char* name,
                          float* value) {
  const Tensor& t = context->input(input);
  if (!::tensorflow::TensorShapeUtils::IsScalar(t.shape())) {
    return errors::InvalidArgument(op, ": ", name, " must be a scalar, got shape ",
                                   t.shape().DebugString());
  }
  *value = t.scalar<float>()();
  return ::tensorflow::OkStatus();
}

// beta1, beta2, epsilon, weight_decay, step at inputs first..first + 4.
inline Status HyperparamInputs(OpKernelContext* context, const char* op, int first,
                               functor::LambStepHyperparams* hp) {
  float step = 0.0f;
  TF_RETURN_IF_ERROR(ScalarInput(context, op, first, "beta1", &hp->beta1));
  TF_RETURN_IF_ERROR(ScalarInput(context, op, first + 1, "beta2", &hp->beta2));
  TF_RETURN_IF_ERROR(ScalarInput(context, op, first + 2, "epsilon", &hp->epsilon));
  TF_RETURN_IF_ERROR(ScalarInput(context, op, first + 3, "weight_decay", &hp->weight_decay));
  TF_RETURN_IF_ERROR(ScalarInput(context, op, first + 4, "step", &step));
  // tfa: 1 - pow(beta, t) in float32.
  hp->bias_correction1 = 1.0f - std::pow(hp->beta1, step);
  hp->bias_correction2 = 1.0f - std::pow(hp->beta2, step);
  if (hp->bias_correction1 == 0.0f || hp->bias_correction2 == 0.0f) {
    return errors::InvalidArgument(op, ": the bias corrections 1 - beta^step are 0 (step ", step,
                                   ", beta1 ", hp->beta1, ", beta2 ", hp->beta2,
                                   "); step is 1-based");
  }
  return ::tensorflow::OkStatus();
}

// --- Resource variables. ----------------------------------------------------------------------

// Copies a variable's buffer that a pending read still shares, so the in-place update does not
// change what that read sees (copy-on-write, as PrepareToUpdateVariable does).
template <typename Device>
struct CopyOnWrite;

template <>
struct CopyOnWrite<CPUDevice> {
  Status operator()(OpKernelContext* context, const char* /*op*/, ::tensorflow::Var* variable) {
    return ::tensorflow::PrepareToUpdateVariable<CPUDevice, float>(
        context, variable->tensor(), variable->copy_on_read_mode.load());
  }
};

#if GOOGLE_CUDA
// training_op_helpers' PrepareToUpdateVariable<GpuDevice> would call DenseUpdate<GpuDevice>,
// whose definition lives in TensorFlow's main library and is not exported to custom ops: the
// WITH_CUDA=1 library would not load. The same logic with a cudaMemcpyAsync instead.
template <>
struct CopyOnWrite<Eigen::GpuDevice> {
  Status operator()(OpKernelContext* context, const char* op, ::tensorflow::Var* variable) {
    Tensor* tensor = variable->tensor();
    if (!variable->copy_on_read_mode.load() && tensor->RefCountIsOne()) {
      return ::tensorflow::OkStatus();
    }
    ::tensorflow::AllocatorAttributes attr;
    attr.set_gpu_compatible(true);
    attr.set_nic_compatible(true);
    Tensor copy;
    TF_RETURN_IF_ERROR(context->allocate_temp(tensor->dtype(), tensor->shape(), &copy, attr));
    const cudaError_t error =
        tfbert_lamb_copy_f32(copy.flat<float>().data(), tensor->flat<float>().data(),
                             tensor->NumElements(),
                             context->eigen_device<Eigen::GpuDevice>().stream());
    if (error != cudaSuccess) {
      // "FusedLambUpdate's copy-on-write", "FusedLambShardMoments' copy-on-write".
      const std::string what = ::tensorflow::strings::StrCat(
          op, absl::EndsWith(op, "s") ? "'" : "'s", " copy-on-write");
      return CudaStatus(error, what.c_str());
    }
    *tensor = copy;
    return ::tensorflow::OkStatus();
  }
};
#endif  // GOOGLE_CUDA

// The resource variable at input `input` of `op`, checked to be initialised and float32.
inline Status LookupFloatVariable(OpKernelContext* context, const char* op, int input,
                                  const char* name,
                                  ::tensorflow::core::RefCountPtr<::tensorflow::Var>* variable) {
  TF_RETURN_IF_ERROR(::tensorflow::LookupResource(
      context, ::tensorflow::HandleFromInput(context, input), variable));
  const Tensor& tensor = *(*variable)->tensor();
  if (!tensor.IsInitialized()) {
    return errors::FailedPrecondition(op, ": variable ", name, " is not initialized");
  }
  if (tensor.dtype() != ::tensorflow::DT_FLOAT) {
    return errors::InvalidArgument(op, ": variable ", name, " must be float32, got ",
                                   ::tensorflow::DataTypeString(tensor.dtype()));
  }
  return ::tensorflow::OkStatus();
}

// The variable's tensor, sharing its buffer. With for_update, first made ready to be written in
// place (copy-on-write). REQUIRES: the variable's mutex is held.
template <typename Device>
Status SharedTensor(OpKernelContext* context, const char* op, ::tensorflow::Var* variable,
                    bool for_update, Tensor* out) {
  if (for_update) TF_RETURN_IF_ERROR(CopyOnWrite<Device>()(context, op, variable));
  *out = *variable->tensor();  // shares the variable's buffer
  return ::tensorflow::OkStatus();
}

// LookupFloatVariable, then SharedTensor. REQUIRES: the variable's mutex is held.
template <typename Device>
Status VariableTensor(OpKernelContext* context, const char* op, int input, const char* name,
                      bool for_update, Tensor* out) {
  ::tensorflow::core::RefCountPtr<::tensorflow::Var> variable;
  TF_RETURN_IF_ERROR(LookupFloatVariable(context, op, input, name, &variable));
  return SharedTensor<Device>(context, op, variable.get(), for_update, out);
}

}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_VARIABLES_H_
