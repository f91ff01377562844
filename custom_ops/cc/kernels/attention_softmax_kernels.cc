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
#include "dropout_rng.h"
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

using FloatRow = Eigen::Map<Eigen::ArrayXf>;
template <typename T>
using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

// Splits `rows` rows of `cols` elements each over the intra-op thread pool.
template <typename Fn>
void ParallelRows(OpKernelContext* context, int64_t rows, int64_t cols, const Fn& fn) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  // About 20 cycles per element (an exp, a hash and a few loads and stores).
  workers->ParallelFor(rows, /*cost_per_unit=*/20 * cols, fn);
}

// keep[k] = keep_scale if element base + k survives dropout, else 0: the row's mask as
// multipliers, drawn from the shared generator (dropout_rng.h). The hash is the one scalar loop
// of these kernels; everything around it is Eigen's vectorised array math.
void DropoutMultipliers(uint64_t key, uint64_t base, int64_t cols, float rate, float keep_scale,
                        float* keep) {
  for (int64_t k = 0; k < cols; ++k) {
    keep[k] = tfbert_dropout_keep(key, base + k, rate) ? keep_scale : 0.0f;
  }
}

}  // namespace

template <typename T>
struct FusedAttentionSoftmaxForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* scores, const T* mask_bias,
                    const AttentionSoftmaxDims& dims, float scale, float dropout_rate,
                    int64_t seed0, int64_t seed1, T* probs, T* softmax) {
    const int64_t cols = dims.cols;
    const uint64_t key = tfbert_dropout_key(seed0, seed1);
    const float keep_scale = 1.0f / (1.0f - dropout_rate);  // inverted dropout
    ParallelRows(context, dims.rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> x_buffer(cols), keep_buffer(dropout_rate > 0.0f ? cols : 0);
      FloatRow x(x_buffer.data(), cols);  // the row's float32 logits, then its exponentials
      for (int64_t r = begin; r < end; ++r) {
        const int64_t mask_row = (r / dims.heads_queries) * dims.mask_rows +
                                 (dims.mask_rows == 1 ? 0 : r % dims.queries);
        // The reference's order: float32(score) * scale, then + float32(mask).
        x = ConstRow<T>(scores + r * cols, cols).template cast<float>() * scale +
            ConstRow<T>(mask_bias + mask_row * cols, cols).template cast<float>();
        const float row_max = x.maxCoeff();
        float inv_sum;
        if (row_max == -std::numeric_limits<float>::infinity()) {
          // Every key masked with -inf: a uniform row rather than 0/0 = NaN. (The usual
          // -10000 bias never gets here: equal biases cancel in the softmax.)
          x.setOnes();
          inv_sum = 1.0f / static_cast<float>(cols);
        } else {
          x = (x - row_max).exp();  // max subtracted: every exponent <= 0
          inv_sum = 1.0f / x.sum();  // sum >= 1: the maximum contributes exp(0)
        }
        x *= inv_sum;  // the softmax
        Row<T> out(probs + r * cols, cols);
        if (dropout_rate > 0.0f) {
          Row<T>(softmax + r * cols, cols) = x.template cast<T>();
          DropoutMultipliers(key, static_cast<uint64_t>(r * cols), cols, dropout_rate,
                             keep_scale, keep_buffer.data());
          out = (x * FloatRow(keep_buffer.data(), cols)).template cast<T>();
        } else {
          out = x.template cast<T>();
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
    const float keep_scale = 1.0f / (1.0f - dropout_rate);
    ParallelRows(context, rows, cols, [&](int64_t begin, int64_t end) {
      std::vector<float> d_buffer(cols), p_buffer(cols);
      FloatRow d(d_buffer.data(), cols);  // the gradient of the pre-dropout softmax
      FloatRow p(p_buffer.data(), cols);
      for (int64_t r = begin; r < end; ++r) {
        if (dropout_rate > 0.0f) {
          DropoutMultipliers(key, static_cast<uint64_t>(r * cols), cols, dropout_rate,
                             keep_scale, d_buffer.data());
          d *= ConstRow<T>(dprobs + r * cols, cols).template cast<float>();
        } else {
          d = ConstRow<T>(dprobs + r * cols, cols).template cast<float>();
        }
        p = ConstRow<T>(softmax + r * cols, cols).template cast<float>();
        const float dot = (d * p).sum();  // sum_k d_k * p_k, in float32
        Row<T>(dscores + r * cols, cols) = (scale * p * (d - dot)).template cast<T>();
      }
    });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA

namespace {

// Eigen::half / Eigen::bfloat16 hold the raw 16 bits, which is what the C ABI takes.
inline const float* Raw(const float* p) { return p; }
inline float* Raw(float* p) { return p; }
inline const unsigned short* Raw(const Eigen::half* p) {
  return reinterpret_cast<const unsigned short*>(p);
}
inline unsigned short* Raw(Eigen::half* p) { return reinterpret_cast<unsigned short*>(p); }
inline const unsigned short* Raw(const Eigen::bfloat16* p) {
  return reinterpret_cast<const unsigned short*>(p);
}
inline unsigned short* Raw(Eigen::bfloat16* p) { return reinterpret_cast<unsigned short*>(p); }

Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}

}  // namespace

#define TFBERT_ATTENTION_SOFTMAX_GPU_FUNCTORS(T, SUFFIX)                                      \
  template <>                                                                                \
  struct FusedAttentionSoftmaxForward<GPUDevice, T> {                                        \
    Status operator()(OpKernelContext* context, const T* scores, const T* mask_bias,         \
                      const AttentionSoftmaxDims& dims, float scale, float dropout_rate,     \
                      int64_t seed0, int64_t seed1, T* probs, T* softmax) {                  \
      return CudaStatus(                                                                     \
          tfbert_attention_softmax_forward_##SUFFIX(                                         \
              Raw(scores), Raw(mask_bias), dims.rows, dims.cols, dims.heads_queries,         \
              dims.queries, dims.mask_rows, scale, dropout_rate, seed0, seed1, Raw(probs),   \
              Raw(softmax), context->eigen_device<GPUDevice>().stream()),                    \
          "tfbert_attention_softmax_forward_" #SUFFIX);                                      \
    }                                                                                        \
  };                                                                                         \
  template <>                                                                                \
  struct FusedAttentionSoftmaxBackward<GPUDevice, T> {                                       \
    Status operator()(OpKernelContext* context, const T* dprobs, const T* softmax,           \
                      int64_t rows, int64_t cols, float scale, float dropout_rate,           \
                      int64_t seed0, int64_t seed1, T* dscores) {                            \
      return CudaStatus(tfbert_attention_softmax_backward_##SUFFIX(                          \
                            Raw(dprobs), Raw(softmax), rows, cols, scale, dropout_rate,      \
                            seed0, seed1, Raw(dscores),                                      \
                            context->eigen_device<GPUDevice>().stream()),                    \
                        "tfbert_attention_softmax_backward_" #SUFFIX);                       \
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

// The int64 [2] seed's values (seed is in host memory on every device).
Status ReadSeed(const Tensor& seed, int64_t* seed0, int64_t* seed1) {
  if (!TensorShapeUtils::IsVector(seed.shape()) || seed.NumElements() != 2) {
    return errors::InvalidArgument("seed must be an int64 vector of 2 elements, got shape ",
                                   seed.shape().DebugString());
  }
  auto values = seed.flat<int64_t>();
  *seed0 = values(0);
  *seed1 = values(1);
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
    int64_t seed0, seed1;
    OP_REQUIRES_OK(context, ReadSeed(context->input(2), &seed0, &seed1));

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
    int64_t seed0, seed1;
    OP_REQUIRES_OK(context, ReadSeed(context->input(2), &seed0, &seed1));
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
    int64_t seed0, seed1;
    OP_REQUIRES_OK(context, ReadSeed(context->input(1), &seed0, &seed1));
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
  OP_REQUIRES_OK(context, functor::CudaStatus(
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
