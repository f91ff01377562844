// Kernels of TfBert>FusedLambUpdate and TfBert>FusedLambMultiUpdate (cc/ops/lamb_ops.cc): the
// input checks, the CPU functor and, in a WITH_CUDA=1 build, the GPU registration that calls the
// CUDA kernels of cuda/lamb.cu through the C ABI in cuda/lamb_launch.h. The scalar inputs and
// the resource-variable handling (copy-on-write) are shared with the shard ops, in
// lamb_variables.h.
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

// The norms' sums per chunk are kept in lanes (kSumLanes in kernel_common.h), so every clone
// gives the same sums.
using cpu_math::kSumLanes;
using cpu_math::SumOfLanes;

// The step's scalars, passed by value into the loops: a reference could alias the float
// buffers they write, and would keep GCC from vectorising them.
struct LambScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float bias_correction1, bias_correction2, epsilon, weight_decay, grad_scale;
};

LambScalars ScalarsOf(const LambHyperparams& hp) {
  return {hp.beta1, 1.0f - hp.beta1, hp.beta2, 1.0f - hp.beta2, hp.bias_correction1,
          hp.bias_correction2, hp.epsilon, hp.weight_decay, hp.grad_scale};
}

// u in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * var). One function for both
// passes, so the u whose norm is taken is exactly the u that is applied.
template <bool kDecay>
TFBERT_INLINE float Direction(const LambScalars& s, float m, float v, float var) {
  float u = (m / s.bias_correction1) / (std::sqrt(v / s.bias_correction2) + s.epsilon);
  if (kDecay) u += s.weight_decay * var;
  return u;
}

// m and v of element i in place, as tfa writes them (beta * m + (g * (1 - beta))), g being
// the gradient times grad_scale (the clipped gradient; grad itself when the scale is 1);
// returns u.
template <bool kDecay>
TFBERT_INLINE float MomentsAndDirection(const LambScalars& s, float grad, float* m, float* v,
                                        float var) {
  const float g = grad * s.grad_scale;
  const float m_new = *m * s.beta1 + g * s.one_minus_beta1;
  const float v_new = *v * s.beta2 + (g * g) * s.one_minus_beta2;
  *m = m_new;
  *v = v_new;
  return Direction<kDecay>(s, m_new, v_new, var);
}

// The whole step of a chunk without layer adaptation (trust ratio 1): var -= lr * u.
template <bool kDecay>
TFBERT_CPU_CLONES void StepChunk(LambScalars s, float lr, const float* __restrict grad,
                                      float* __restrict m, float* __restrict v,
                                      float* __restrict var, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    var[i] -= lr * MomentsAndDirection<kDecay>(s, grad[i], m + i, v + i, var[i]);
  }
}

// Pass 1 of a chunk with layer adaptation: the moments, and the chunk's sums of var^2 and u^2
// in double (the sums run over up to millions of elements) into sums[0], sums[1].
template <bool kDecay>
TFBERT_CPU_CLONES void MomentsAndSumsChunk(LambScalars s, const float* __restrict grad,
                                                float* __restrict m, float* __restrict v,
                                                const float* __restrict var, int64_t n,
                                                double* __restrict sums) {
  double var_sq[kSumLanes] = {}, update_sq[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const float u = MomentsAndDirection<kDecay>(s, grad[i + l], m + i + l, v + i + l,
                                                  var[i + l]);
      var_sq[l] += static_cast<double>(var[i + l]) * var[i + l];
      update_sq[l] += static_cast<double>(u) * u;
    }
  }
  for (; i < n; ++i) {
    const float u = MomentsAndDirection<kDecay>(s, grad[i], m + i, v + i, var[i]);
    var_sq[0] += static_cast<double>(var[i]) * var[i];
    update_sq[0] += static_cast<double>(u) * u;
  }
  sums[0] = SumOfLanes(var_sq);
  sums[1] = SumOfLanes(update_sq);
}

// Pass 2 of a chunk with layer adaptation: var -= (ratio * lr) * u, u again from m, v and var.
template <bool kDecay>
TFBERT_CPU_CLONES void ApplyChunk(LambScalars s, float scale, const float* __restrict m,
                                       const float* __restrict v, float* __restrict var,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) var[i] -= scale * Direction<kDecay>(s, m[i], v[i], var[i]);
}

// One chunk of one tensor: the unit of work of every pass.
struct Chunk {
  int tensor;
  int64_t begin, end;
};

}  // namespace

template <>
struct FusedLambMultiUpdate<CPUDevice> {
  Status operator()(OpKernelContext* context, const std::vector<LambTensor>& tensors,
                    const LambHyperparams& hp) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const LambScalars scalars = ScalarsOf(hp);
    const int64_t cost_per_chunk = kChunkElements * kCostPerElement;

    // Every tensor cut at multiples of kChunkElements (as if alone), all chunks in one list, so
    // one ParallelFor spreads the small tensors (biases, LayerNorm) and the large ones over the
    // threads together. adapted_chunks: the chunks of the tensors with layer adaptation, which
    // need the second pass; first_partial[t]: where tensor t's chunks start in `partials`.
    std::vector<Chunk> chunks, adapted_chunks;
    std::vector<int64_t> first_partial(tensors.size(), 0);
    int64_t num_partials = 0;
    for (int t = 0; t < static_cast<int>(tensors.size()); ++t) {
      const LambTensor& tensor = tensors[t];
      first_partial[t] = num_partials;
      for (int64_t begin = 0; begin < tensor.n; begin += kChunkElements) {
        const Chunk chunk{t, begin, std::min(tensor.n, begin + kChunkElements)};
        chunks.push_back(chunk);
        if (tensor.use_layer_adaptation) {
          adapted_chunks.push_back(chunk);
          ++num_partials;
        }
      }
    }

    // Pass 1: the moments and, with layer adaptation, per-chunk sums of var^2 and u^2 (double:
    // the sums run over up to millions of elements); u is not stored, pass 2 recomputes it from
    // m, v and var. Without layer adaptation the ratio is 1 and this pass is the whole step.
    std::vector<double> partials(2 * num_partials, 0.0);
    workers->ParallelFor(
        chunks.size(), cost_per_chunk, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t c = chunk_begin; c < chunk_end; ++c) {
            const Chunk& chunk = chunks[c];
            const LambTensor& t = tensors[chunk.tensor];
            const int64_t n = chunk.end - chunk.begin;
            const float* grad = t.grad + chunk.begin;
            float* m = t.m + chunk.begin;
            float* v = t.v + chunk.begin;
            float* var = t.var + chunk.begin;
            if (!t.use_layer_adaptation) {
              if (t.apply_weight_decay) {
                StepChunk<true>(scalars, hp.lr, grad, m, v, var, n);
              } else {
                StepChunk<false>(scalars, hp.lr, grad, m, v, var, n);
              }
              continue;
            }
            const int64_t p = first_partial[chunk.tensor] + chunk.begin / kChunkElements;
            if (t.apply_weight_decay) {
              MomentsAndSumsChunk<true>(scalars, grad, m, v, var, n, &partials[2 * p]);
            } else {
              MomentsAndSumsChunk<false>(scalars, grad, m, v, var, n, &partials[2 * p]);
            }
          }
        });
    if (adapted_chunks.empty()) return ::tensorflow::OkStatus();

    // Per tensor, its partials added in chunk order (deterministic), and the step's scale. tfa
    // multiplies the scalars first: var - (ratio * lr) * u.
    std::vector<float> scale(tensors.size(), 0.0f);
    for (int t = 0; t < static_cast<int>(tensors.size()); ++t) {
      if (!tensors[t].use_layer_adaptation) continue;
      double var_sq = 0.0, update_sq = 0.0;
      const int64_t num_chunks = (tensors[t].n + kChunkElements - 1) / kChunkElements;
      for (int64_t p = first_partial[t]; p < first_partial[t] + num_chunks; ++p) {
        var_sq += partials[2 * p];
        update_sq += partials[2 * p + 1];
      }
      scale[t] = LambTrustRatio(var_sq, update_sq) * hp.lr;
    }

    // Pass 2: var -= ratio * lr * u.
    workers->ParallelFor(
        adapted_chunks.size(), cost_per_chunk, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t c = chunk_begin; c < chunk_end; ++c) {
            const Chunk& chunk = adapted_chunks[c];
            const LambTensor& t = tensors[chunk.tensor];
            const int64_t n = chunk.end - chunk.begin;
            if (t.apply_weight_decay) {
              ApplyChunk<true>(scalars, scale[chunk.tensor], t.m + chunk.begin,
                               t.v + chunk.begin, t.var + chunk.begin, n);
            } else {
              ApplyChunk<false>(scalars, scale[chunk.tensor], t.m + chunk.begin,
                                t.v + chunk.begin, t.var + chunk.begin, n);
            }
          }
        });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

template <>
struct FusedLambMultiUpdate<GPUDevice> {
  Status operator()(OpKernelContext* context, const std::vector<LambTensor>& tensors,
                    const LambHyperparams& hp) {
    std::vector<TfbertLambTensor> launch_tensors;
    launch_tensors.reserve(tensors.size());
    for (const LambTensor& t : tensors) {
      launch_tensors.push_back(TfbertLambTensor{t.var, t.m, t.v, t.grad, t.n,
                                                t.use_layer_adaptation ? 1 : 0,
                                                t.apply_weight_decay ? 1 : 0});
    }
    const int count = static_cast<int>(launch_tensors.size());
    const long long workspace_floats =
        tfbert_lamb_multi_workspace_floats(launch_tensors.data(), count);
    Tensor workspace;
    if (workspace_floats > 0) {
      TF_RETURN_IF_ERROR(context->allocate_temp(
          ::tensorflow::DT_FLOAT, TensorShape({workspace_floats}), &workspace));
    }
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        tfbert_lamb_multi_update_f32(
            launch_tensors.data(), count, hp.lr, hp.beta1, hp.beta2, hp.epsilon, hp.weight_decay,
            hp.bias_correction1, hp.bias_correction2, hp.grad_scale,
            workspace_floats > 0 ? workspace.flat<float>().data() : nullptr, stream),
        "FusedLambMultiUpdate");
  }
};
#endif  // GOOGLE_CUDA

}  // namespace functor

// The resource variables at inputs 0 .. 3 * count - 1 (var[count], m[count], v[count]), checked
// to be float32 and distinct: a variable given twice (or as its own moment) would be stepped
// twice with one gradient.
inline Status LookupLambVariables(
    OpKernelContext* context, const char* op, int count,
    std::vector<::tensorflow::core::RefCountPtr<::tensorflow::Var>>* variables) {
  static const char* const kRoles[] = {"var", "m", "v"};
  variables->resize(3 * count);
  for (int i = 0; i < 3 * count; ++i) {
    TF_RETURN_IF_ERROR(LookupFloatVariable(context, op, i, kRoles[i / count], &(*variables)[i]));
  }
  std::vector<const ::tensorflow::Var*> distinct;
  for (const auto& variable : *variables) distinct.push_back(variable.get());
  std::sort(distinct.begin(), distinct.end());
  if (std::adjacent_find(distinct.begin(), distinct.end()) != distinct.end()) {
    return errors::InvalidArgument(op, ": a variable appears twice among var, m and v");
  }
  return ::tensorflow::OkStatus();
}

// Tensor `index` of `count`: its var, m and v (variables[index + {0, count, 2 * count}]) made
// ready to be written in place, and its gradient (input 3 * count + index), shapes checked.
// `held` keeps the tensors (and so the buffers) alive. REQUIRES: the variables' mutexes are held.
template <typename Device>
Status GatherLambTensor(
    OpKernelContext* context, const char* op, int index, int count,
    const std::vector<::tensorflow::core::RefCountPtr<::tensorflow::Var>>& variables,
    bool use_layer_adaptation, bool apply_weight_decay, std::vector<Tensor>* held,
    functor::LambTensor* out) {
  Tensor var, m, v;
  TF_RETURN_IF_ERROR(SharedTensor<Device>(context, op, variables[index].get(), true, &var));
  TF_RETURN_IF_ERROR(
      SharedTensor<Device>(context, op, variables[count + index].get(), true, &m));
  TF_RETURN_IF_ERROR(
      SharedTensor<Device>(context, op, variables[2 * count + index].get(), true, &v));
  const Tensor& grad = context->input(3 * count + index);
  if (var.shape() != grad.shape()) {
    return errors::InvalidArgument(op, ": grad ", index, " must have var's shape ",
                                   var.shape().DebugString(), ", got ",
                                   grad.shape().DebugString());
  }
  if (m.shape() != var.shape() || v.shape() != var.shape()) {
    return errors::InvalidArgument(op, ": m and v ", index, " must have var's shape ",
                                   var.shape().DebugString(), ", got ", m.shape().DebugString(),
                                   " and ", v.shape().DebugString());
  }
  *out = functor::LambTensor{grad.flat<float>().data(), var.NumElements(),
                             var.flat<float>().data(), m.flat<float>().data(),
                             v.flat<float>().data(), use_layer_adaptation, apply_weight_decay};
  held->insert(held->end(), {var, m, v});
  return ::tensorflow::OkStatus();
}

// TfBert>FusedLambUpdate (count 1, flags from scalar attributes) and TfBert>FusedLambMultiUpdate
// (count N, flags from list attributes). Inputs: var[count], m[count], v[count], grad[count],
// then lr, beta1, beta2, epsilon, weight_decay, step, grad_scale, apply_update.
template <typename Device>
class FusedLambOp : public OpKernel {
 public:
  explicit FusedLambOp(OpKernelConstruction* context) : OpKernel(context) {
    if (context->HasAttr("N")) {  // TfBert>FusedLambMultiUpdate
      op_name_ = "FusedLambMultiUpdate";
      OP_REQUIRES_OK(context, context->GetAttr("N", &count_));
      std::vector<bool> adaptation, decay;
      OP_REQUIRES_OK(context, context->GetAttr("use_layer_adaptation", &adaptation));
      OP_REQUIRES_OK(context, context->GetAttr("apply_weight_decay", &decay));
      OP_REQUIRES(context, adaptation.size() == count_ && decay.size() == count_,
                  errors::InvalidArgument(op_name_, ": use_layer_adaptation and "
                                          "apply_weight_decay need N = ", count_, " entries, got ",
                                          adaptation.size(), " and ", decay.size()));
      use_layer_adaptation_.assign(adaptation.begin(), adaptation.end());
      apply_weight_decay_.assign(decay.begin(), decay.end());
    } else {
      op_name_ = "FusedLambUpdate";
      count_ = 1;
      bool adaptation, decay;
      OP_REQUIRES_OK(context, context->GetAttr("use_layer_adaptation", &adaptation));
      OP_REQUIRES_OK(context, context->GetAttr("apply_weight_decay", &decay));
      use_layer_adaptation_ = {adaptation};
      apply_weight_decay_ = {decay};
    }
  }

  void Compute(OpKernelContext* context) override {
    const char* op = op_name_;
    const int scalars = 4 * count_;
    functor::LambHyperparams hp;
    OP_REQUIRES_OK(context, ScalarInput(context, op, scalars, "lr", &hp.lr));
    OP_REQUIRES_OK(context, HyperparamInputs(context, op, scalars + 1, &hp));
    OP_REQUIRES_OK(context, ScalarInput(context, op, scalars + 6, "grad_scale", &hp.grad_scale));
    const Tensor& apply_update = context->input(scalars + 7);
    OP_REQUIRES(context, ::tensorflow::TensorShapeUtils::IsScalar(apply_update.shape()),
                errors::InvalidArgument(op, ": apply_update must be a scalar, got shape ",
                                        apply_update.shape().DebugString()));

    // Exclusive locks on every var, m and v, taken in address order (so two steps over
    // overlapping variables cannot deadlock). The helper's Device parameter only selects the
    // copy for sparse (copy-on-read) access, which sparse=false never makes, so the CPU
    // instantiation serves the GPU kernel too.
    std::vector<int> variable_inputs(3 * count_);
    for (int i = 0; i < 3 * count_; ++i) variable_inputs[i] = i;
    auto locks = ::tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, variable_inputs);
    std::vector<::tensorflow::core::RefCountPtr<::tensorflow::Var>> variables;
    OP_REQUIRES_OK(context, LookupLambVariables(context, op, count_, &variables));
    std::vector<Tensor> held;
    held.reserve(3 * count_);
    std::vector<functor::LambTensor> tensors(count_);
    for (int i = 0; i < count_; ++i) {
      OP_REQUIRES_OK(context, GatherLambTensor<Device>(context, op, i, count_, variables,
                                                       use_layer_adaptation_[i],
                                                       apply_weight_decay_[i], &held,
                                                       &tensors[i]));
    }
    // Skipped only now, so a skipped step still checks its inputs as a taken one does.
    if (!apply_update.scalar<bool>()()) return;
    OP_REQUIRES_OK(context, functor::FusedLambMultiUpdate<Device>()(context, tensors, hp));
  }

 private:
  const char* op_name_;
  int count_;
  std::vector<bool> use_layer_adaptation_;
  std::vector<bool> apply_weight_decay_;
};

REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambUpdate").Device(DEVICE_CPU),
                        FusedLambOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambMultiUpdate").Device(DEVICE_CPU),
                        FusedLambOp<CPUDevice>);

#if GOOGLE_CUDA
// The scalars stay on the host: the launch takes them by value. (grad_scale and apply_update
// come from the gradients' global norm, computed on the device: their copy to the host is the
// one the predicate of a tf.cond around the update would need.)
#define TFBERT_REGISTER_LAMB_GPU_KERNEL(op_name)             \
  REGISTER_KERNEL_BUILDER(Name(op_name)                      \
                              .Device(::tensorflow::DEVICE_GPU) \
                              .HostMemory("lr")              \
                              .HostMemory("beta1")           \
                              .HostMemory("beta2")           \
                              .HostMemory("epsilon")         \
                              .HostMemory("weight_decay")    \
                              .HostMemory("step")            \
                              .HostMemory("grad_scale")      \
                              .HostMemory("apply_update"),   \
                          FusedLambOp<functor::GPUDevice>)
TFBERT_REGISTER_LAMB_GPU_KERNEL("TfBert>FusedLambUpdate");
TFBERT_REGISTER_LAMB_GPU_KERNEL("TfBert>FusedLambMultiUpdate");
#undef TFBERT_REGISTER_LAMB_GPU_KERNEL
#endif  // GOOGLE_CUDA

}  // namespace tfbert
