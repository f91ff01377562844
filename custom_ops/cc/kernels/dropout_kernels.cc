// Kernels of TfBert>FusedDropout and TfBert>FusedBiasDropoutAdd (ops in cc/ops/dropout_ops.cc):
// the CPU functors, blocks of elements (rows for the bias) split over TensorFlow's intra-op
// thread pool, and under GOOGLE_CUDA the GPU registrations, which call the CUDA kernels through
// cuda/dropout_launch.h. Both devices draw the mask from cuda/dropout_rng.h, so for a given seed
// they drop the same elements, and both ops drop the same elements of a tensor of one shape.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "dropout.h"

#if GOOGLE_CUDA
#include "dropout_launch.h"
#endif

namespace tfbert {

#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
using GPUDevice = Eigen::GpuDevice;
#endif

namespace functor {
namespace {

using cpu_math::Load;
using cpu_math::Select;
using cpu_math::Store;

// Elements per unit of the thread pool's work.
constexpr int64_t kBlock = 1 << 14;

// y = x * keep_scale where kept, else 0, over elements base .. base + n - 1 (see
// TFBERT_CPU_CLONES in kernel_common.h: the hash and the select vectorise).
template <typename T>
TFBERT_CPU_CLONES void DropBlock(const T* __restrict x, int64_t n, uint64_t key, uint64_t base,
                                 uint64_t threshold, float keep_scale, T* __restrict y) {
  for (int64_t k = 0; k < n; ++k) {
    Store(y, k, Select(DropoutKeep(key, base + k, threshold), Load(x, k) * keep_scale, 0.0f));
  }
}

// y = dropout(x + bias) + residual over one row of n elements whose first flat index is base:
// the same float32 operations, in the same order, as TfBert>FusedDropout of x + bias followed by
// the residual add, without the two intermediate tensors.
template <typename T>
TFBERT_CPU_CLONES void BiasDropoutAddRow(const T* __restrict x, const T* __restrict bias,
                                         const T* __restrict residual, int64_t n, uint64_t key,
                                         uint64_t base, uint64_t threshold, float keep_scale,
                                         T* __restrict y) {
  for (int64_t j = 0; j < n; ++j) {
    const float biased = Load(x, j) + Load(bias, j);
    const float dropped = Select(DropoutKeep(key, base + j, threshold), biased * keep_scale, 0.0f);
    Store(y, j, dropped + Load(residual, j));
  }
}

}  // namespace

template <typename T>
struct FusedBiasDropoutAdd<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, const T* residual,
                    int64_t size, int64_t cols, float rate, int64_t seed0, int64_t seed1, T* y) {
    const uint64_t key = tfbert_dropout_key(seed0, seed1);
    const uint64_t threshold = tfbert_dropout_keep_threshold(rate);
    const float keep_scale = 1.0f / (1.0f - rate);  // as FusedDropout
    const int64_t rows = size / cols;
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    // About 12 cycles per element: FusedDropout's work and two more loads and adds.
    workers->ParallelFor(rows, /*cost_per_unit=*/12 * cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t offset = row * cols;
        BiasDropoutAddRow(x + offset, bias, residual + offset, cols, key,
                          static_cast<uint64_t>(offset), threshold, keep_scale, y + offset);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedDropout<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, int64_t size, float rate,
                    int64_t seed0, int64_t seed1, T* y) {
    const uint64_t key = tfbert_dropout_key(seed0, seed1);
    const uint64_t threshold = tfbert_dropout_keep_threshold(rate);
    const float keep_scale = 1.0f / (1.0f - rate);  // inverted dropout
    const int64_t blocks = (size + kBlock - 1) / kBlock;
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    // About 10 cycles per element: a 64-bit hash, a load, a select and a store.
    workers->ParallelFor(blocks, /*cost_per_unit=*/10 * kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * kBlock;
        DropBlock(x + offset, std::min(kBlock, size - offset), key,
                  static_cast<uint64_t>(offset), threshold, keep_scale, y + offset);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA

#define TFBERT_DROPOUT_GPU_FUNCTOR(T, SUFFIX)                                                 \
  template <>                                                                                \
  struct FusedDropout<GPUDevice, T> {                                                        \
    Status operator()(OpKernelContext* context, const T* x, int64_t size, float rate,        \
                      int64_t seed0, int64_t seed1, T* y) {                                  \
      return CudaLaunchStatus(                                                               \
          tfbert_dropout_##SUFFIX(RawBits(x), size, rate, seed0, seed1, RawBits(y),          \
                                  context->eigen_device<GPUDevice>().stream()),              \
          "tfbert_dropout_" #SUFFIX);                                                        \
    }                                                                                        \
  };

TFBERT_DROPOUT_GPU_FUNCTOR(float, f32)
TFBERT_DROPOUT_GPU_FUNCTOR(Eigen::half, f16)
TFBERT_DROPOUT_GPU_FUNCTOR(Eigen::bfloat16, bf16)
#undef TFBERT_DROPOUT_GPU_FUNCTOR

#define TFBERT_BIAS_DROPOUT_ADD_GPU_FUNCTOR(T, SUFFIX)                                          \
  template <>                                                                                  \
  struct FusedBiasDropoutAdd<GPUDevice, T> {                                                   \
    Status operator()(OpKernelContext* context, const T* x, const T* bias, const T* residual,  \
                      int64_t size, int64_t cols, float rate, int64_t seed0, int64_t seed1,    \
                      T* y) {                                                                  \
      return CudaLaunchStatus(                                                                 \
          tfbert_bias_dropout_add_##SUFFIX(RawBits(x), RawBits(bias), RawBits(residual), size, \
                                           cols, rate, seed0, seed1, RawBits(y),               \
                                           context->eigen_device<GPUDevice>().stream()),       \
          "tfbert_bias_dropout_add_" #SUFFIX);                                                 \
    }                                                                                          \
  };
TFBERT_BIAS_DROPOUT_ADD_GPU_FUNCTOR(float, f32)
TFBERT_BIAS_DROPOUT_ADD_GPU_FUNCTOR(Eigen::half, f16)
TFBERT_BIAS_DROPOUT_ADD_GPU_FUNCTOR(Eigen::bfloat16, bf16)
#undef TFBERT_BIAS_DROPOUT_ADD_GPU_FUNCTOR

#endif  // GOOGLE_CUDA

}  // namespace functor

template <typename Device, typename T>
class FusedDropoutOp : public OpKernel {
 public:
  explicit FusedDropoutOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadDropoutRate(context, &rate_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    int64_t seed0 = 0, seed1 = 0;  // set by ReadDropoutSeed (GCC cannot see through OP_REQUIRES_OK)
    OP_REQUIRES_OK(context, ReadDropoutSeed(context->input(1), &seed0, &seed1));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    if (x.NumElements() == 0) return;
    OP_REQUIRES_OK(context, functor::FusedDropout<Device, T>()(
                                context, x.flat<T>().data(), x.NumElements(), rate_, seed0,
                                seed1, y->flat<T>().data()));
  }

 private:
  float rate_;
};

template <typename Device, typename T>
class FusedBiasDropoutAddOp : public OpKernel {
 public:
  explicit FusedBiasDropoutAddOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadDropoutRate(context, &rate_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& bias = context->input(1);
    const Tensor& residual = context->input(2);
    OP_REQUIRES(context, x.dims() >= 1,
                errors::InvalidArgument("x must have rank >= 1, got a scalar"));
    const int64_t cols = x.dim_size(x.dims() - 1);
    OP_REQUIRES(context, bias.dims() == 1 && bias.dim_size(0) == cols,
                errors::InvalidArgument("bias must be [", cols, "] (x's last dimension), got ",
                                        bias.shape().DebugString()));
    OP_REQUIRES(context, residual.shape() == x.shape(),
                errors::InvalidArgument("residual must have x's shape ", x.shape().DebugString(),
                                        ", got ", residual.shape().DebugString()));
    int64_t seed0 = 0, seed1 = 0;
    OP_REQUIRES_OK(context, ReadDropoutSeed(context->input(3), &seed0, &seed1));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    if (x.NumElements() == 0) return;
    OP_REQUIRES_OK(context, functor::FusedBiasDropoutAdd<Device, T>()(
                                context, x.flat<T>().data(), bias.flat<T>().data(),
                                residual.flat<T>().data(), x.NumElements(), cols, rate_, seed0,
                                seed1, y->flat<T>().data()));
  }

 private:
  float rate_;
};

#define TFBERT_REGISTER_CPU(T)                                                          \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedDropout").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          FusedDropoutOp<CPUDevice, T>);
TFBERT_REGISTER_CPU(float)
TFBERT_REGISTER_CPU(Eigen::half)
TFBERT_REGISTER_CPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_CPU

#define TFBERT_REGISTER_CPU(T)                                                     \
  REGISTER_KERNEL_BUILDER(                                                         \
      Name("TfBert>FusedBiasDropoutAdd").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      FusedBiasDropoutAddOp<CPUDevice, T>);
TFBERT_REGISTER_CPU(float)
TFBERT_REGISTER_CPU(Eigen::half)
TFBERT_REGISTER_CPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_CPU

#if GOOGLE_CUDA
// The seed's values are kernel arguments, so it stays in host memory.
#define TFBERT_REGISTER_GPU(T)                                                                 \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("TfBert>FusedDropout").Device(DEVICE_GPU).TypeConstraint<T>("T").HostMemory("seed"), \
      FusedDropoutOp<GPUDevice, T>);
TFBERT_REGISTER_GPU(float)
TFBERT_REGISTER_GPU(Eigen::half)
TFBERT_REGISTER_GPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_GPU

#define TFBERT_REGISTER_GPU(T)                                           \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedBiasDropoutAdd")             \
                              .Device(DEVICE_GPU)                        \
                              .TypeConstraint<T>("T")                    \
                              .HostMemory("seed"),                       \
                          FusedBiasDropoutAddOp<GPUDevice, T>);
TFBERT_REGISTER_GPU(float)
TFBERT_REGISTER_GPU(Eigen::half)
TFBERT_REGISTER_GPU(Eigen::bfloat16)
#undef TFBERT_REGISTER_GPU
#endif  // GOOGLE_CUDA

}  // namespace tfbert
