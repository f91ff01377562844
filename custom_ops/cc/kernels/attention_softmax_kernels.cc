// Kernels of TfBert>FusedAttentionSoftmax, TfBert>FusedAttentionSoftmaxGrad and
// TfBert>DropoutKeepMask (ops in cc/ops/attention_softmax_ops.cc): the CPU functors, rows split
// over TensorFlow's intra-op thread pool, and under GOOGLE_CUDA the GPU registrations, which
// call the CUDA kernels through the C ABI of cuda/attention_softmax_launch.h. Both devices draw
// the dropout mask from the same counter-based generator (cuda/dropout_rng.h), so for a given
// seed they drop the same elements.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include <cmath>
#include <limits>

#include "attention_softmax.h"
#include "dropout.h"
#include "Eigen/Core"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/tensor_util.h"
#include "tensorflow/core/util/work_sharder.h"

#if GOOGLE_CUDA
#include "attention_softmax_launch.h"
#endif

namespace tfbert {

using ::tensorflow::TensorShapeUtils;

#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
using GPUDevice = Eigen::GpuDevice;
#endif

namespace functor {
namespace {

using cpu_math::ExpNonPositive;
using cpu_math::Load;
using cpu_math::Select;
using cpu_math::Store;

// Splits `rows` rows of `cols` elements each over the intra-op thread pool.
template <typename Fn>
void ParallelRows(OpKernelContext* context, int64_t rows, int64_t cols, const Fn& fn) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  // About 10 cycles per element (an exp or a hash, a few loads and stores).
  workers->ParallelFor(rows, /*cost_per_unit=*/10 * cols, fn);
}

// ---- The row loops, vectorised (see TFBERT_CPU_CLONES in kernel_common.h), on float32 rows ----
//
// A row has three passes: logits, exp and sum, normalisation (and dropout). The row's sum (and
// the backward's dot product) is kept in lanes (kSumLanes in kernel_common.h), so the result
// does not depend on which clone runs.
using cpu_math::kSumLanes;
using cpu_math::SumOfLanes;

// x = s * scale + m (the reference's order) over one row, in float32.
template <typename T>
TFBERT_CPU_CLONES void ScaleAndMask(const T* __restrict s, const T* __restrict m, int64_t n,
                                    float scale, float* __restrict x) {
  for (int64_t k = 0; k < n; ++k) x[k] = Load(s, k) * scale + Load(m, k);
}

// max(x) over one row, ignoring NaN as std::max does (-inf if there is nothing else; NaN if
// all are NaN). Eigen's vectorised reduction: GCC does not vectorise a float max without
// -ffast-math. A maximum does not depend on the order of the comparisons.
float RowMax(const float* x, int64_t n) {
  return Eigen::Map<const Eigen::ArrayXf>(x, n).maxCoeff<Eigen::PropagateNumbers>();
}

// x = exp(x - row_max) in place; returns sum(x). Every exponent is <= 0.
TFBERT_CPU_CLONES float ExpAndSum(float* __restrict x, int64_t n, float row_max) {
  float lane_sum[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      x[k + l] = ExpNonPositive(x[k + l] - row_max);
      lane_sum[l] += x[k + l];
    }
  }
  for (; k < n; ++k) {
    x[k] = ExpNonPositive(x[k] - row_max);
    lane_sum[0] += x[k];
  }
  return SumOfLanes(lane_sum);
}

// probs = e * inv_sum.
template <typename T>
TFBERT_CPU_CLONES void Normalize(const float* __restrict e, int64_t n, float inv_sum,
                                 T* __restrict probs) {
  for (int64_t k = 0; k < n; ++k) Store(probs, k, e[k] * inv_sum);
}

// softmax = e * inv_sum and probs = its dropout: softmax * keep_scale where kept, else 0. The
// row's elements have flat indices base + k.
template <typename T>
TFBERT_CPU_CLONES void NormalizeAndDrop(const float* __restrict e, int64_t n, float inv_sum,
                                        uint64_t key, uint64_t base, uint64_t threshold,
                                        float keep_scale, T* __restrict softmax,
                                        T* __restrict probs) {
  for (int64_t k = 0; k < n; ++k) {
    const float p = e[k] * inv_sum;
    Store(softmax, k, p);
    Store(probs, k, Select(DropoutKeep(key, base + k, threshold), p * keep_scale, 0.0f));
  }
}

// The softmax gradient of one row without dropout: dscores = scale * p * (d - sum(d * p)),
// d = dprobs, p = softmax.
template <typename T>
TFBERT_CPU_CLONES void SoftmaxGrad(const T* __restrict dprobs, const T* __restrict p, int64_t n,
                                   float scale, T* __restrict dscores) {
  float lane_sum[kSumLanes] = {};  // sum(d * p) in lanes
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) lane_sum[l] += Load(dprobs, k + l) * Load(p, k + l);
  }
  for (; k < n; ++k) lane_sum[0] += Load(dprobs, k) * Load(p, k);
  const float dot = SumOfLanes(lane_sum);
  for (k = 0; k < n; ++k) Store(dscores, k, scale * Load(p, k) * (Load(dprobs, k) - dot));
}

// The same with dropout: d, the gradient of the pre-dropout softmax, is dprobs * keep_scale
// where kept and 0 elsewhere (the forward's mask, regenerated); it goes through d_buffer.
template <typename T>
TFBERT_CPU_CLONES void DropoutSoftmaxGrad(const T* __restrict dprobs, const T* __restrict p,
                                          int64_t n, float scale, uint64_t key, uint64_t base,
                                          uint64_t threshold, float keep_scale,
                                          float* __restrict d, T* __restrict dscores) {
  float lane_sum[kSumLanes] = {};  // sum(d * p) in lanes
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      d[k + l] = Select(DropoutKeep(key, base + k + l, threshold),
                        Load(dprobs, k + l) * keep_scale, 0.0f);
      lane_sum[l] += d[k + l] * Load(p, k + l);
    }
  }
  for (; k < n; ++k) {
    d[k] = Select(DropoutKeep(key, base + k, threshold), Load(dprobs, k) * keep_scale, 0.0f);
    lane_sum[0] += d[k] * Load(p, k);
  }
  const float dot = SumOfLanes(lane_sum);
  for (k = 0; k < n; ++k) Store(dscores, k, scale * Load(p, k) * (d[k] - dot));
}

}  // namespace

template <typename T>
struct FusedAttentionSoftmaxForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* scores, const T* mask_bias,
                    const AttentionSoftmaxDims& dims, float scale, float dropout_rate,
                    int64_t seed0, int64_t seed1, T* probs, T* softmax) {
    const int64_t cols = dims.cols;
    const uint64_t key = tfbert_dropout_key(seed0, seed1);
    const uint64_t threshold = tfbert_dropout_keep_threshold(dropout_rate);
    const float keep_scale = 1.0f / (1.0f - dropout_rate);  // inverted dropout
    ParallelRows(context, dims.rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> x(cols);  // the row's float32 logits, then its exponentials
      for (int64_t r = begin; r < end; ++r) {
        const int64_t mask_row = (r / dims.heads_queries) * dims.mask_rows +
                                 (dims.mask_rows == 1 ? 0 : r % dims.queries);
        ScaleAndMask(scores + r * cols, mask_bias + mask_row * cols, cols, scale, x.data());
        const float row_max = RowMax(x.data(), cols);
        float inv_sum;
        if (!(row_max > -std::numeric_limits<float>::infinity())) {
          // Every key masked with -inf (or NaN): a uniform row rather than 0/0 = NaN. (The
          // usual -10000 bias never gets here: equal biases cancel in the softmax.)
          std::fill(x.begin(), x.end(), 1.0f);
          inv_sum = 1.0f / static_cast<float>(cols);
        } else {
          inv_sum = 1.0f / ExpAndSum(x.data(), cols, row_max);  // sum >= 1: exp(max - max)
        }
        if (dropout_rate > 0.0f) {
          NormalizeAndDrop(x.data(), cols, inv_sum, key, static_cast<uint64_t>(r * cols),
                           threshold, keep_scale, softmax + r * cols, probs + r * cols);
        } else {
          Normalize(x.data(), cols, inv_sum, probs + r * cols);
        }
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedAttentionSoftmaxBackward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dprobs, const T* softmax, int64_t rows,
                    int64_t cols, float scale, float dropout_rate, int64_t seed0, int64_t seed1,
                    T* dscores) {
    const uint64_t key = tfbert_dropout_key(seed0, seed1);
    const uint64_t threshold = tfbert_dropout_keep_threshold(dropout_rate);
    const float keep_scale = 1.0f / (1.0f - dropout_rate);
    ParallelRows(context, rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> d(dropout_rate > 0.0f ? cols : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t offset = r * cols;
        if (dropout_rate > 0.0f) {
          DropoutSoftmaxGrad(dprobs + offset, softmax + offset, cols, scale, key,
                             static_cast<uint64_t>(offset), threshold, keep_scale, d.data(),
                             dscores + offset);
        } else {
          SoftmaxGrad(dprobs + offset, softmax + offset, cols, scale, dscores + offset);
        }
      }
    });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA

#define TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS(T, SUFFIX)                                      \
  template <>                                                                                \
  struct FusedAttentionSoftmaxForward<GPUDevice, T> {                                        \
    Status operator()(OpKernelContext* context, const T* scores, const T* mask_bias,         \
                      const AttentionSoftmaxDims& dims, float scale, float dropout_rate,     \
                      int64_t seed0, int64_t seed1, T* probs, T* softmax) {                  \
      return CudaLaunchStatus(                                                               \
          tfbert_attention_softmax_forward_##SUFFIX(                                         \
              RawBits(scores), RawBits(mask_bias), dims.rows, dims.cols,                     \
              dims.heads_queries, dims.queries, dims.mask_rows, scale, dropout_rate, seed0,  \
              seed1, RawBits(probs), RawBits(softmax),                                       \
              context->eigen_device<GPUDevice>().stream()),                                  \
          "tfbert_attention_softmax_forward_" #SUFFIX);                                      \
    }                                                                                        \
  };                                                                                         \
  template <>                                                                                \
  struct FusedAttentionSoftmaxBackward<GPUDevice, T> {                                       \
    Status operator()(OpKernelContext* context, const T* dprobs, const T* softmax,           \
                      int64_t rows, int64_t cols, float scale, float dropout_rate,           \
                      int64_t seed0, int64_t seed1, T* dscores) {                            \
      return CudaLaunchStatus(                                                               \
          tfbert_attention_softmax_backward_##SUFFIX(                                        \
              RawBits(dprobs), RawBits(softmax), rows, cols, scale, dropout_rate, seed0,     \
              seed1, RawBits(dscores), context->eigen_device<GPUDevice>().stream()),         \
          "tfbert_attention_softmax_backward_" #SUFFIX);                                     \
    }                                                                                        \
  };

TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS(float, f32)
TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS(Eigen::half, f16)
TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS(Eigen::bfloat16, bf16)
#undef TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS

#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

Status ReadAttrs(OpKernelConstruction* context, float* scale, float* dropout_rate) {
  TF_RETURN_IF_ERROR(context->GetAttr("scale", scale));
  TF_RETURN_IF_ERROR(context->GetAttr("dropout_rate", dropout_rate));
  if (!(*dropout_rate >= 0.0f && *dropout_rate < 1.0f)) {
    return errors::InvalidArgument("dropout_rate must be in [0, 1), got ", *dropout_rate);
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

template <typename Device, typename T>
class FusedAttentionSoftmaxOp : public OpKernel {
 public:
  explicit FusedAttentionSoftmaxOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadAttrs(context, &scale_, &dropout_rate_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& scores = context->input(0);
    const Tensor& mask_bias = context->input(1);
    OP_REQUIRES(context, scores.dims() == 4,
                errors::InvalidArgument("scores must be [B, N, Sq, Sk], got shape ",
                                        scores.shape().DebugString()));
    const int64_t batch = scores.dim_size(0), heads = scores.dim_size(1);
    const int64_t queries = scores.dim_size(2), keys = scores.dim_size(3);
    OP_REQUIRES(context,
                mask_bias.dims() == 4 && mask_bias.dim_size(0) == batch &&
                    mask_bias.dim_size(1) == 1 &&
                    (mask_bias.dim_size(2) == 1 || mask_bias.dim_size(2) == queries) &&
                    mask_bias.dim_size(3) == keys,
                errors::InvalidArgument("mask_bias must be [B, 1, 1, Sk] or [B, 1, Sq, Sk] for "
                                        "scores of shape ", scores.shape().DebugString(),
                                        ", got shape ", mask_bias.shape().DebugString()));
    int64_t seed0 = 0, seed1 = 0;  // set by ReadDropoutSeed (GCC cannot see through OP_REQUIRES_OK)
    OP_REQUIRES_OK(context, ReadDropoutSeed(context->input(2), &seed0, &seed1));

    Tensor* probs = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, scores.shape(), &probs));
    Tensor* softmax = probs;
    if (dropout_rate_ > 0.0f) {
      OP_REQUIRES_OK(context, context->allocate_output(1, scores.shape(), &softmax));
    } else {
      // Without dropout the softmax is probs: one buffer for both outputs.
      context->set_output(1, *probs);
    }
    if (scores.NumElements() == 0) return;

    functor::AttentionSoftmaxDims dims;
    dims.rows = batch * heads * queries;
    dims.cols = keys;
    dims.heads_queries = heads * queries;
    dims.queries = queries;
    dims.mask_rows = mask_bias.dim_size(2);
    OP_REQUIRES_OK(context, functor::FusedAttentionSoftmaxForward<Device, T>()(
                                context, scores.flat<T>().data(), mask_bias.flat<T>().data(),
                                dims, scale_, dropout_rate_, seed0, seed1,
                                probs->flat<T>().data(), softmax->flat<T>().data()));
  }

 private:
  float scale_;
  float dropout_rate_;
};

template <typename Device, typename T>
class FusedAttentionSoftmaxGradOp : public OpKernel {
 public:
  explicit FusedAttentionSoftmaxGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadAttrs(context, &scale_, &dropout_rate_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dprobs = context->input(0);
    const Tensor& softmax = context->input(1);
    OP_REQUIRES(context, dprobs.dims() == 4 && dprobs.shape() == softmax.shape(),
                errors::InvalidArgument("dprobs and softmax must both be [B, N, Sq, Sk], got "
                                        "shapes ", dprobs.shape().DebugString(), " and ",
                                        softmax.shape().DebugString()));
    int64_t seed0 = 0, seed1 = 0;  // set by ReadDropoutSeed (GCC cannot see through OP_REQUIRES_OK)
    OP_REQUIRES_OK(context, ReadDropoutSeed(context->input(2), &seed0, &seed1));
    Tensor* dscores = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, dprobs.shape(), &dscores));
    if (dprobs.NumElements() == 0) return;
    const int64_t cols = dprobs.dim_size(3);
    OP_REQUIRES_OK(context, functor::FusedAttentionSoftmaxBackward<Device, T>()(
                                context, dprobs.flat<T>().data(), softmax.flat<T>().data(),
                                dprobs.NumElements() / cols, cols, scale_, dropout_rate_, seed0,
                                seed1, dscores->flat<T>().data()));
  }

 private:
  float scale_;
  float dropout_rate_;
};

template <typename Device>
class DropoutKeepMaskOp : public OpKernel {
 public:
  explicit DropoutKeepMaskOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("rate", &rate_));
    OP_REQUIRES(context, rate_ >= 0.0f && rate_ < 1.0f,
                errors::InvalidArgument("rate must be in [0, 1), got ", rate_));
  }

  void Compute(OpKernelContext* context) override {
    TensorShape shape;
    OP_REQUIRES_OK(context, ::tensorflow::tensor::MakeShape(context->input(0), &shape));
    int64_t seed0 = 0, seed1 = 0;  // set by ReadDropoutSeed (GCC cannot see through OP_REQUIRES_OK)
    OP_REQUIRES_OK(context, ReadDropoutSeed(context->input(1), &seed0, &seed1));
    Tensor* keep = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, shape, &keep));
    const int64_t size = shape.num_elements();
    if (size == 0) return;
    Fill(context, size, seed0, seed1, keep->flat<bool>().data());
  }

 private:
  void Fill(OpKernelContext* context, int64_t size, int64_t seed0, int64_t seed1, bool* keep);
  float rate_;
};

template <>
void DropoutKeepMaskOp<CPUDevice>::Fill(OpKernelContext* context, int64_t size, int64_t seed0,
                                        int64_t seed1, bool* keep) {
  const uint64_t key = tfbert_dropout_key(seed0, seed1);
  const float rate = rate_;
  context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      size, /*cost_per_unit=*/10, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) keep[i] = tfbert_dropout_keep(key, i, rate);
      });
}

#define TFBERT_REGISTER_CPU(T)                                                         \
  REGISTER_KERNEL_BUILDER(                                                             \
      Name("TfBert>FusedAttentionSoftmax").Device(DEVICE_CPU).TypeConstraint<T>("T"),  \
      FusedAttentionSoftmaxOp<CPUDevice, T>);                                          \
  REGISTER_KERNEL_BUILDER(                                                             \
      Name("TfBert>FusedAttentionSoftmaxGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      FusedAttentionSoftmaxGradOp<CPUDevice, T>);
TFBERT_REGISTER_CPU(float)
TFBERT_REGISTER_CPU(Eigen::half)
TFBERT_REGISTER_CPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_CPU

REGISTER_KERNEL_BUILDER(Name("TfBert>DropoutKeepMask").Device(DEVICE_CPU),
                        DropoutKeepMaskOp<CPUDevice>);

#if GOOGLE_CUDA

template <>
void DropoutKeepMaskOp<GPUDevice>::Fill(OpKernelContext* context, int64_t size, int64_t seed0,
                                        int64_t seed1, bool* keep) {
  static_assert(sizeof(bool) == 1, "the C ABI writes one byte per bool");
  OP_REQUIRES_OK(context, CudaLaunchStatus(
                              tfbert_dropout_keep_mask(
                                  size, rate_, seed0, seed1,
                                  reinterpret_cast<unsigned char*>(keep),
                                  context->eigen_device<GPUDevice>().stream()),
                              "tfbert_dropout_keep_mask"));
}

// The seed's values are kernel arguments, so it stays in host memory.
#define TFBERT_REGISTER_GPU(T)                                                         \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedAttentionSoftmax")                         \
                              .Device(DEVICE_GPU)                                      \
                              .TypeConstraint<T>("T")                                  \
                              .HostMemory("seed"),                                     \
                          FusedAttentionSoftmaxOp<GPUDevice, T>);                      \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedAttentionSoftmaxGrad")                     \
                              .Device(DEVICE_GPU)                                      \
                              .TypeConstraint<T>("T")                                  \
                              .HostMemory("seed"),                                     \
                          FusedAttentionSoftmaxGradOp<GPUDevice, T>);
TFBERT_REGISTER_GPU(float)
TFBERT_REGISTER_GPU(Eigen::half)
TFBERT_REGISTER_GPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_GPU

REGISTER_KERNEL_BUILDER(
    Name("TfBert>DropoutKeepMask").Device(DEVICE_GPU).HostMemory("shape").HostMemory("seed"),
    DropoutKeepMaskOp<GPUDevice>);

#endif  // GOOGLE_CUDA

}  // namespace tfbert
