// Kernel of TfBert>FusedLambUpdate (cc/ops/lamb_ops.cc): the resource-variable handling, the CPU
// functor and, in a WITH_CUDA=1 build, the GPU registration that calls the CUDA kernels of
// cuda/lamb.cu through the C ABI in cuda/lamb_launch.h.
//
// Legend: n = the number of elements of the parameter (see lamb.h).

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "lamb.h"

#include <cmath>

#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

#if GOOGLE_CUDA
#include "lamb_launch.h"
#endif

namespace tfbert {

using ::tensorflow::Var;

namespace functor {

namespace {

// The CPU partition for the norms' partial sums is fixed by n alone (not by the thread count),
// and the partials are added in chunk order, so the ratio is bit-identical from run to run and
// from machine to machine. 16K elements per chunk: large enough to amortise a task, small
// enough that a BERT-large matrix (1M elements) spreads over every core.
constexpr int64_t kChunkElements = 1 << 14;

// Rough cycles per element (a division, a square root, three reads and writes), for sharding.
constexpr int64_t kCostPerElement = 30;

struct CpuStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  const LambHyperparams& hp;

  // m and v in place, as tfa writes them: beta * m + (g * (1 - beta)).
  void Moments(float g, float* m, float* v) const {
    *m = *m * beta1 + g * one_minus_beta1;
    *v = *v * beta2 + (g * g) * one_minus_beta2;
  }
  // u in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * var). One function for both
  // passes, so the u whose norm is taken is exactly the u that is applied.
  float Direction(float m, float v, float var) const {
    const float m_hat = m / hp.bias_correction1;
    const float v_hat = v / hp.bias_correction2;
    float u = m_hat / (std::sqrt(v_hat) + hp.epsilon);
    if (hp.apply_weight_decay) u += hp.weight_decay * var;
    return u;
  }
};

}  // namespace

template <>
struct FusedLambUpdate<CPUDevice> {
  Status operator()(OpKernelContext* context, const float* grad, int64_t n,
                    const LambHyperparams& hp, float* var, float* m, float* v) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const CpuStep step{hp.beta1, 1.0f - hp.beta1, hp.beta2, 1.0f - hp.beta2, hp};
    const int64_t chunks = (n + kChunkElements - 1) / kChunkElements;
    const int64_t cost_per_chunk = kChunkElements * kCostPerElement;

    if (!hp.use_layer_adaptation) {
      // The ratio is 1: one pass does the whole step.
      workers->ParallelFor(chunks, cost_per_chunk, [&](int64_t chunk_begin, int64_t chunk_end) {
        const int64_t end = std::min(n, chunk_end * kChunkElements);
        for (int64_t i = chunk_begin * kChunkElements; i < end; ++i) {
          step.Moments(grad[i], &m[i], &v[i]);
          var[i] -= hp.lr * step.Direction(m[i], v[i], var[i]);
        }
      });
      return ::tensorflow::OkStatus();
    }

    // Pass 1: the moments, and per-chunk sums of var^2 and u^2 (double: the sums run over up to
    // millions of elements). u is not stored; pass 2 recomputes it from m, v and var.
    std::vector<double> partials(2 * chunks, 0.0);
    workers->ParallelFor(chunks, cost_per_chunk, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        double var_sq = 0.0, update_sq = 0.0;
        const int64_t end = std::min(n, (c + 1) * kChunkElements);
        for (int64_t i = c * kChunkElements; i < end; ++i) {
          step.Moments(grad[i], &m[i], &v[i]);
          const float u = step.Direction(m[i], v[i], var[i]);
          var_sq += static_cast<double>(var[i]) * var[i];
          update_sq += static_cast<double>(u) * u;
        }
        partials[2 * c] = var_sq;
        partials[2 * c + 1] = update_sq;
      }
    });
    double var_sq = 0.0, update_sq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {  // in chunk order: deterministic
      var_sq += partials[2 * c];
      update_sq += partials[2 * c + 1];
    }
    // tfa multiplies the scalars first: var - (ratio * lr) * u.
    const float scale = LambTrustRatio(var_sq, update_sq) * hp.lr;

    // Pass 2: var -= ratio * lr * u.
    workers->ParallelFor(chunks, cost_per_chunk, [&](int64_t chunk_begin, int64_t chunk_end) {
      const int64_t end = std::min(n, chunk_end * kChunkElements);
      for (int64_t i = chunk_begin * kChunkElements; i < end; ++i) {
        var[i] -= scale * step.Direction(m[i], v[i], var[i]);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

namespace {

Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}

}  // namespace

template <>
struct FusedLambUpdate<GPUDevice> {
  Status operator()(OpKernelContext* context, const float* grad, int64_t n,
                    const LambHyperparams& hp, float* var, float* m, float* v) {
    Tensor workspace;
    if (hp.use_layer_adaptation) {
      TF_RETURN_IF_ERROR(context->allocate_temp(
          ::tensorflow::DT_FLOAT, TensorShape({tfbert_lamb_workspace_floats(n)}), &workspace));
    }
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        tfbert_lamb_update_f32(var, m, v, grad, n, hp.lr, hp.beta1, hp.beta2, hp.epsilon,
                               hp.weight_decay, hp.bias_correction1, hp.bias_correction2,
                               hp.use_layer_adaptation ? 1 : 0, hp.apply_weight_decay ? 1 : 0,
                               hp.use_layer_adaptation ? workspace.flat<float>().data() : nullptr,
                               stream),
        "FusedLambUpdate");
  }
};
#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

// Copies a variable's buffer that a pending read still shares, so the in-place update does not
// change what that read sees (copy-on-write, as PrepareToUpdateVariable does).
template <typename Device>
struct CopyOnWrite;

template <>
struct CopyOnWrite<CPUDevice> {
  Status operator()(OpKernelContext* context, Var* variable) {
    return ::tensorflow::PrepareToUpdateVariable<CPUDevice, float>(
        context, variable->tensor(), variable->copy_on_read_mode.load());
  }
};

#if GOOGLE_CUDA
// training_op_helpers' PrepareToUpdateVariable<GpuDevice> would call DenseUpdate<GpuDevice>,
// whose definition lives in TensorFlow's main library and is not exported to custom ops: the
// WITH_CUDA=1 library would not load. The same logic with a cudaMemcpyAsync instead.
template <>
struct CopyOnWrite<functor::GPUDevice> {
  Status operator()(OpKernelContext* context, Var* variable) {
    Tensor* tensor = variable->tensor();
    if (!variable->copy_on_read_mode.load() && tensor->RefCountIsOne()) {
      return ::tensorflow::OkStatus();
    }
    ::tensorflow::AllocatorAttributes attr;
    attr.set_gpu_compatible(true);
    attr.set_nic_compatible(true);
    Tensor copy;
    TF_RETURN_IF_ERROR(context->allocate_temp(tensor->dtype(), tensor->shape(), &copy, attr));
    TF_RETURN_IF_ERROR(functor::CudaStatus(
        tfbert_lamb_copy_f32(copy.flat<float>().data(), tensor->flat<float>().data(),
                             tensor->NumElements(),
                             context->eigen_device<functor::GPUDevice>().stream()),
        "FusedLambUpdate's copy-on-write"));
    *tensor = copy;
    return ::tensorflow::OkStatus();
  }
};
#endif  // GOOGLE_CUDA

// The float32 tensor of the resource variable at `input`, ready to be written in place.
// REQUIRES: the variable's mutex is held.
template <typename Device>
Status TensorForUpdate(OpKernelContext* context, int input, const char* name, Tensor* out) {
  ::tensorflow::core::RefCountPtr<Var> variable;
  TF_RETURN_IF_ERROR(::tensorflow::LookupResource(
      context, ::tensorflow::HandleFromInput(context, input), &variable));
  const Tensor& tensor = *variable->tensor();
  if (!tensor.IsInitialized()) {
    return errors::FailedPrecondition("FusedLambUpdate: variable ", name,
                                      " is not initialized");
  }
  if (tensor.dtype() != ::tensorflow::DT_FLOAT) {
    return errors::InvalidArgument("FusedLambUpdate: variable ", name, " must be float32, got ",
                                   ::tensorflow::DataTypeString(tensor.dtype()));
  }
  TF_RETURN_IF_ERROR(CopyOnWrite<Device>()(context, variable.get()));
  *out = *variable->tensor();  // shares the variable's buffer
  return ::tensorflow::OkStatus();
}

Status ScalarInput(OpKernelContext* context, int input, const char* name, float* value) {
  const Tensor& t = context->input(input);
  if (!::tensorflow::TensorShapeUtils::IsScalar(t.shape())) {
    return errors::InvalidArgument("FusedLambUpdate: ", name, " must be a scalar, got shape ",
                                   t.shape().DebugString());
  }
  *value = t.scalar<float>()();
  return ::tensorflow::OkStatus();
}

}  // namespace

template <typename Device>
class FusedLambUpdateOp : public OpKernel {
 public:
  explicit FusedLambUpdateOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("use_layer_adaptation", &use_layer_adaptation_));
    OP_REQUIRES_OK(context, context->GetAttr("apply_weight_decay", &apply_weight_decay_));
  }

  void Compute(OpKernelContext* context) override {
    functor::LambHyperparams hp;
    float step = 0.0f;
    OP_REQUIRES_OK(context, ScalarInput(context, 4, "lr", &hp.lr));
    OP_REQUIRES_OK(context, ScalarInput(context, 5, "beta1", &hp.beta1));
    OP_REQUIRES_OK(context, ScalarInput(context, 6, "beta2", &hp.beta2));
    OP_REQUIRES_OK(context, ScalarInput(context, 7, "epsilon", &hp.epsilon));
    OP_REQUIRES_OK(context, ScalarInput(context, 8, "weight_decay", &hp.weight_decay));
    OP_REQUIRES_OK(context, ScalarInput(context, 9, "step", &step));
    // tfa: 1 - pow(beta, t) in float32.
    hp.bias_correction1 = 1.0f - std::pow(hp.beta1, step);
    hp.bias_correction2 = 1.0f - std::pow(hp.beta2, step);
    OP_REQUIRES(context, hp.bias_correction1 != 0.0f && hp.bias_correction2 != 0.0f,
                errors::InvalidArgument("FusedLambUpdate: the bias corrections 1 - beta^step "
                                        "are 0 (step ", step, ", beta1 ", hp.beta1, ", beta2 ",
                                        hp.beta2, "); step is 1-based"));
    hp.use_layer_adaptation = use_layer_adaptation_;
    hp.apply_weight_decay = apply_weight_decay_;

    // Exclusive locks on var, m and v, taken in address order. The helper's Device parameter
    // only selects the copy for sparse (copy-on-read) access, which sparse=false never makes,
    // so the CPU instantiation serves the GPU kernel too.
    auto locks = ::tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(context, TensorForUpdate<Device>(context, 0, "var", &var));
    OP_REQUIRES_OK(context, TensorForUpdate<Device>(context, 1, "m", &m));
    OP_REQUIRES_OK(context, TensorForUpdate<Device>(context, 2, "v", &v));
    const Tensor& grad = context->input(3);
    OP_REQUIRES(context, var.shape() == grad.shape(),
                errors::InvalidArgument("FusedLambUpdate: grad must have var's shape ",
                                        var.shape().DebugString(), ", got ",
                                        grad.shape().DebugString()));
    OP_REQUIRES(context, m.shape() == var.shape() && v.shape() == var.shape(),
                errors::InvalidArgument("FusedLambUpdate: m and v must have var's shape ",
                                        var.shape().DebugString(), ", got ",
                                        m.shape().DebugString(), " and ",
                                        v.shape().DebugString()));
    const int64_t n = var.NumElements();
    if (n == 0) return;
    OP_REQUIRES_OK(context, functor::FusedLambUpdate<Device>()(
                                context, grad.flat<float>().data(), n, hp,
                                var.flat<float>().data(), m.flat<float>().data(),
                                v.flat<float>().data()));
  }

 private:
  bool use_layer_adaptation_;
  bool apply_weight_decay_;
};

REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambUpdate").Device(DEVICE_CPU),
                        FusedLambUpdateOp<CPUDevice>);

#if GOOGLE_CUDA
// The scalars stay on the host: the launch takes them by value.
REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambUpdate")
                            .Device(::tensorflow::DEVICE_GPU)
                            .HostMemory("lr")
                            .HostMemory("beta1")
                            .HostMemory("beta2")
                            .HostMemory("epsilon")
                            .HostMemory("weight_decay")
                            .HostMemory("step"),
                        FusedLambUpdateOp<functor::GPUDevice>);
#endif  // GOOGLE_CUDA

}  // namespace tfbert
