// Kernel of TfBert>FusedLambUpdate (cc/ops/lamb_ops.cc): the input checks, the CPU functor and,
// in a WITH_CUDA=1 build, the GPU registration that calls the CUDA kernels of cuda/lamb.cu
// through the C ABI in cuda/lamb_launch.h. The scalar inputs and the resource-variable handling
// (copy-on-write) are shared with the shard ops, in lamb_variables.h.
//
// Legend: n = the number of elements of the parameter (see lamb.h).

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "lamb.h"
#include "lamb_variables.h"

#include <cmath>

#if GOOGLE_CUDA
#include "lamb_launch.h"
#endif

namespace tfbert {
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

template <typename Device>
class FusedLambUpdateOp : public OpKernel {
 public:
  explicit FusedLambUpdateOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("use_layer_adaptation", &use_layer_adaptation_));
    OP_REQUIRES_OK(context, context->GetAttr("apply_weight_decay", &apply_weight_decay_));
  }

  void Compute(OpKernelContext* context) override {
    constexpr const char* kOp = "FusedLambUpdate";
    functor::LambHyperparams hp;
    OP_REQUIRES_OK(context, ScalarInput(context, kOp, 4, "lr", &hp.lr));
    OP_REQUIRES_OK(context, HyperparamInputs(context, kOp, 5, &hp));
    hp.use_layer_adaptation = use_layer_adaptation_;
    hp.apply_weight_decay = apply_weight_decay_;

    // Exclusive locks on var, m and v, taken in address order. The helper's Device parameter
    // only selects the copy for sparse (copy-on-read) access, which sparse=false never makes,
    // so the CPU instantiation serves the GPU kernel too.
    auto locks = ::tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(context, VariableTensor<Device>(context, kOp, 0, "var", true, &var));
    OP_REQUIRES_OK(context, VariableTensor<Device>(context, kOp, 1, "m", true, &m));
    OP_REQUIRES_OK(context, VariableTensor<Device>(context, kOp, 2, "v", true, &v));
    const Tensor& grad = context->input(3);
    OP_REQUIRES(context, var.shape() == grad.shape(),
                errors::InvalidArgument(kOp, ": grad must have var's shape ",
                                        var.shape().DebugString(), ", got ",
                                        grad.shape().DebugString()));
    OP_REQUIRES(context, m.shape() == var.shape() && v.shape() == var.shape(),
                errors::InvalidArgument(kOp, ": m and v must have var's shape ",
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
