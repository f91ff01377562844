// Kernels of TfBert>FusedLayerNorm and TfBert>FusedLayerNormGrad (cc/ops/layer_norm_ops.cc):
// the CPU functors and, in a WITH_CUDA=1 build, the GPU registration that calls the CUDA kernels
// of cuda/layer_norm.cu through the C ABI in cuda/layer_norm_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = H (see layer_norm.h).

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "layer_norm.h"

#include <cmath>
#include <limits>

#if GOOGLE_CUDA
#include "layer_norm_launch.h"
#endif

namespace tfbert {

namespace functor {

namespace {

using cpu_math::kSumLanes;
using cpu_math::Load;
using cpu_math::Store;
using cpu_math::SumOfLanes;

// Rough cycles per element, for the thread pool's sharding.
constexpr int64_t kForwardCostPerElement = 12;
constexpr int64_t kBackwardCostPerElement = 20;

// ---- One row of each pass, vectorised (TFBERT_CPU_CLONES in kernel_common.h) ----

// y = (x - mean) * rstd * gamma + beta over one row of n elements; writes the row's mean and
// rstd. `row` is float32 scratch of n elements: the row is read from memory once and the
// statistics sweep this copy.
template <typename T>
TFBERT_CPU_CLONES void LayerNormRow(const T* __restrict x, const float* __restrict gamma,
                                    const float* __restrict beta, int64_t n, float epsilon,
                                    float* __restrict row, T* __restrict y, float* mean,
                                    float* rstd) {
  const float inv_n = 1.0f / static_cast<float>(n);
  // Mean of (x - x[0]) plus x[0]: for a row like x + 1000 the shifted values are small, so the
  // float32 sum keeps their low bits that a sum of the raw values would round off.
  const float shift = Load(x, 0);
  float lanes[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      row[j + l] = Load(x, j + l);
      lanes[l] += row[j + l] - shift;
    }
  }
  for (; j < n; ++j) {
    row[j] = Load(x, j);
    lanes[0] += row[j] - shift;
  }
  const float row_mean = shift + SumOfLanes(lanes) * inv_n;
  // Variance of the centred values, not E[x^2] - mean^2: that difference of two large numbers
  // cancels catastrophically in float32 once |mean| >> std (x + 1000: x^2 ~ 1e6, whose float32
  // spacing 0.06 is as large as the variance we want).
  float squares[kSumLanes] = {};
  for (j = 0; j + kSumLanes <= n; j += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const float d = row[j + l] - row_mean;
      squares[l] += d * d;
    }
  }
  for (; j < n; ++j) squares[0] += (row[j] - row_mean) * (row[j] - row_mean);
  const float row_rstd = 1.0f / std::sqrt(SumOfLanes(squares) * inv_n + epsilon);
  for (j = 0; j < n; ++j) Store(y, j, (row[j] - row_mean) * row_rstd * gamma[j] + beta[j]);
  *mean = row_mean;
  *rstd = row_rstd;
}

// Element j of LayerNormGradRow's first sweep: xhat[j], g[j], the two row sums' lane terms and
// the parameter gradients' partial sums.
template <typename T>
TFBERT_INLINE void LayerNormGradElement(const T* dy, const T* x, float row_mean, float row_rstd,
                                        const float* gamma, int64_t j, float* xhat, float* g,
                                        float* dgamma, float* dbeta, float* g_sum,
                                        float* g_xhat_sum) {
  const float dy_j = Load(dy, j);
  xhat[j] = (Load(x, j) - row_mean) * row_rstd;
  g[j] = gamma[j] * dy_j;  // stored once: both sums and dx see the same rounded product
  *g_sum += g[j];
  *g_xhat_sum += g[j] * xhat[j];
  dgamma[j] += dy_j * xhat[j];
  dbeta[j] += dy_j;
}

// With xhat = (x - mean) * rstd and g = gamma * dy, over one row of n elements:
//   dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)),
// and dgamma += dy * xhat, dbeta += dy. xhat and g are float32 scratch of n elements.
template <typename T>
TFBERT_CPU_CLONES void LayerNormGradRow(const T* __restrict dy, const T* __restrict x,
                                        float row_mean, float row_rstd,
                                        const float* __restrict gamma, int64_t n,
                                        float* __restrict xhat, float* __restrict g,
                                        T* __restrict dx, float* __restrict dgamma,
                                        float* __restrict dbeta) {
  float g_lanes[kSumLanes] = {}, g_xhat_lanes[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      LayerNormGradElement(dy, x, row_mean, row_rstd, gamma, j + l, xhat, g, dgamma, dbeta,
                           &g_lanes[l], &g_xhat_lanes[l]);
    }
  }
  for (; j < n; ++j) {
    LayerNormGradElement(dy, x, row_mean, row_rstd, gamma, j, xhat, g, dgamma, dbeta,
                         &g_lanes[0], &g_xhat_lanes[0]);
  }
  const float inv_n = 1.0f / static_cast<float>(n);
  const float mean_g = SumOfLanes(g_lanes) * inv_n;
  const float mean_g_xhat = SumOfLanes(g_xhat_lanes) * inv_n;
  for (j = 0; j < n; ++j) Store(dx, j, row_rstd * (g[j] - mean_g - xhat[j] * mean_g_xhat));
}

}  // namespace

template <typename T>
struct FusedLayerNormForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const float* gamma, const float* beta,
                    int64_t rows, int64_t cols, float epsilon, T* y, float* mean, float* rstd) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(rows, cols * kForwardCostPerElement, [&](int64_t begin, int64_t end) {
      std::vector<float> row(cols);
      for (int64_t r = begin; r < end; ++r) {
        LayerNormRow(x + r * cols, gamma, beta, cols, epsilon, row.data(), y + r * cols,
                     mean + r, rstd + r);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedLayerNormBackward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const float* mean,
                    const float* rstd, const float* gamma, int64_t rows, int64_t cols, T* dx,
                    float* dgamma, float* dbeta) {
    // partial = [dgamma partial (cols), dbeta partial (cols)] of a block of rows.
    auto block_fn = [&](int64_t row_begin, int64_t row_end, float* partial) {
      std::vector<float> xhat(cols), g(cols);
      for (int64_t r = row_begin; r < row_end; ++r) {
        LayerNormGradRow(dy + r * cols, x + r * cols, mean[r], rstd[r], gamma, cols,
                         xhat.data(), g.data(), dx + r * cols, partial, partial + cols);
      }
    };
    const std::vector<float> sums =
        SumOverRowBlocks(context, rows, 2 * cols, cols * kBackwardCostPerElement, block_fn);
    std::copy(sums.begin(), sums.begin() + cols, dgamma);
    std::copy(sums.begin() + cols, sums.end(), dbeta);
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

namespace {

// Eigen::half and Eigen::bfloat16 hold the same 16 bits as __half and __nv_bfloat16; the C ABI
// passes them as unsigned short.
template <typename T>
const unsigned short* Bits16(const T* p) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  return reinterpret_cast<const unsigned short*>(p);
}
template <typename T>
unsigned short* Bits16(T* p) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  return reinterpret_cast<unsigned short*>(p);
}

cudaError_t LaunchForward(const float* x, const float* gamma, const float* beta, long long rows,
                          int cols, float epsilon, float* y, float* mean, float* rstd,
                          cudaStream_t stream) {
  return tfbert_layer_norm_forward_f32(x, gamma, beta, rows, cols, epsilon, y, mean, rstd,
                                       stream);
}
cudaError_t LaunchForward(const Eigen::half* x, const float* gamma, const float* beta,
                          long long rows, int cols, float epsilon, Eigen::half* y, float* mean,
                          float* rstd, cudaStream_t stream) {
  return tfbert_layer_norm_forward_f16(Bits16(x), gamma, beta, rows, cols, epsilon, Bits16(y),
                                       mean, rstd, stream);
}
cudaError_t LaunchForward(const Eigen::bfloat16* x, const float* gamma, const float* beta,
                          long long rows, int cols, float epsilon, Eigen::bfloat16* y,
                          float* mean, float* rstd, cudaStream_t stream) {
  return tfbert_layer_norm_forward_bf16(Bits16(x), gamma, beta, rows, cols, epsilon, Bits16(y),
                                        mean, rstd, stream);
}

cudaError_t LaunchBackward(const float* dy, const float* x, const float* mean, const float* rstd,
                           const float* gamma, long long rows, int cols, float* dx,
                           float* dgamma, float* dbeta, float* workspace, cudaStream_t stream) {
  return tfbert_layer_norm_backward_f32(dy, x, mean, rstd, gamma, rows, cols, dx, dgamma, dbeta,
                                        workspace, stream);
}
cudaError_t LaunchBackward(const Eigen::half* dy, const Eigen::half* x, const float* mean,
                           const float* rstd, const float* gamma, long long rows, int cols,
                           Eigen::half* dx, float* dgamma, float* dbeta, float* workspace,
                           cudaStream_t stream) {
  return tfbert_layer_norm_backward_f16(Bits16(dy), Bits16(x), mean, rstd, gamma, rows, cols,
                                        Bits16(dx), dgamma, dbeta, workspace, stream);
}
cudaError_t LaunchBackward(const Eigen::bfloat16* dy, const Eigen::bfloat16* x,
                           const float* mean, const float* rstd, const float* gamma,
                           long long rows, int cols, Eigen::bfloat16* dx, float* dgamma,
                           float* dbeta, float* workspace, cudaStream_t stream) {
  return tfbert_layer_norm_backward_bf16(Bits16(dy), Bits16(x), mean, rstd, gamma, rows, cols,
                                         Bits16(dx), dgamma, dbeta, workspace, stream);
}

Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}

Status CheckCudaCols(int64_t cols) {
  if (cols > std::numeric_limits<int>::max()) {
    return errors::InvalidArgument("FusedLayerNorm's CUDA kernels take a last dimension below ",
                                   std::numeric_limits<int>::max(), ", got ", cols);
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

template <typename T>
struct FusedLayerNormForward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const float* gamma, const float* beta,
                    int64_t rows, int64_t cols, float epsilon, T* y, float* mean, float* rstd) {
    TF_RETURN_IF_ERROR(CheckCudaCols(cols));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(LaunchForward(x, gamma, beta, rows, static_cast<int>(cols), epsilon, y,
                                    mean, rstd, stream),
                      "FusedLayerNorm");
  }
};

template <typename T>
struct FusedLayerNormBackward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const float* mean,
                    const float* rstd, const float* gamma, int64_t rows, int64_t cols, T* dx,
                    float* dgamma, float* dbeta) {
    TF_RETURN_IF_ERROR(CheckCudaCols(cols));
    Tensor workspace;
    TF_RETURN_IF_ERROR(context->allocate_temp(
        ::tensorflow::DT_FLOAT, TensorShape({tfbert_layer_norm_grad_workspace_floats(rows, cols)}),
        &workspace));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(LaunchBackward(dy, x, mean, rstd, gamma, rows, static_cast<int>(cols), dx,
                                     dgamma, dbeta, workspace.flat<float>().data(), stream),
                      "FusedLayerNormGrad");
  }
};
#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

// x's shape as [rows, cols] (cols = the last dimension), or an error naming the op.
Status RowsAndCols(const char* op, const Tensor& x, int64_t* rows, int64_t* cols) {
  if (x.dims() < 1) {
    return errors::InvalidArgument(op, ": x must have rank >= 1 (normalised over its last axis), "
                                   "got shape ", x.shape().DebugString());
  }
  *cols = x.dim_size(x.dims() - 1);
  *rows = 1;
  for (int i = 0; i < x.dims() - 1; ++i) *rows *= x.dim_size(i);
  if (*cols == 0 && *rows > 0) {
    return errors::InvalidArgument(op, ": x's last dimension (the normalised axis) is 0, shape ",
                                   x.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

Status CheckVector(const char* op, const char* name, const Tensor& t, int64_t size) {
  if (t.dims() != 1 || t.dim_size(0) != size) {
    return errors::InvalidArgument(op, ": ", name, " must have shape [", size,
                                   "] (x's last dimension), got ", t.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

template <typename Device, typename T>
class FusedLayerNormOp : public OpKernel {
 public:
  explicit FusedLayerNormOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(context, epsilon_ >= 0.0f,
                errors::InvalidArgument("FusedLayerNorm: epsilon must be >= 0, got ", epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& gamma = context->input(1);
    const Tensor& beta = context->input(2);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols("FusedLayerNorm", x, &rows, &cols));
    OP_REQUIRES_OK(context, CheckVector("FusedLayerNorm", "gamma", gamma, cols));
    OP_REQUIRES_OK(context, CheckVector("FusedLayerNorm", "beta", beta, cols));

    Tensor* y = nullptr;
    Tensor* mean = nullptr;
    Tensor* rstd = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({rows}), &mean));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({rows}), &rstd));
    if (rows == 0) return;

    OP_REQUIRES_OK(context, functor::FusedLayerNormForward<Device, T>()(
                                context, x.flat<T>().data(), gamma.flat<float>().data(),
                                beta.flat<float>().data(), rows, cols, epsilon_,
                                y->flat<T>().data(), mean->flat<float>().data(),
                                rstd->flat<float>().data()));
  }

 private:
  float epsilon_;
};

template <typename Device, typename T>
class FusedLayerNormGradOp : public OpKernel {
 public:
  explicit FusedLayerNormGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    const Tensor& mean = context->input(2);
    const Tensor& rstd = context->input(3);
    const Tensor& gamma = context->input(4);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols("FusedLayerNormGrad", x, &rows, &cols));
    OP_REQUIRES(context, dy.shape() == x.shape(),
                errors::InvalidArgument("FusedLayerNormGrad: dy must have x's shape ",
                                        x.shape().DebugString(), ", got ",
                                        dy.shape().DebugString()));
    OP_REQUIRES_OK(context, CheckVector("FusedLayerNormGrad", "mean", mean, rows));
    OP_REQUIRES_OK(context, CheckVector("FusedLayerNormGrad", "rstd", rstd, rows));
    OP_REQUIRES_OK(context, CheckVector("FusedLayerNormGrad", "gamma", gamma, cols));

    Tensor* dx = nullptr;
    Tensor* dgamma = nullptr;
    Tensor* dbeta = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({cols}), &dgamma));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({cols}), &dbeta));
    // With no rows the functor still runs: dgamma and dbeta are H zeros, the empty sums.
    if (cols == 0) return;

    OP_REQUIRES_OK(context, functor::FusedLayerNormBackward<Device, T>()(
                                context, dy.flat<T>().data(), x.flat<T>().data(),
                                mean.flat<float>().data(), rstd.flat<float>().data(),
                                gamma.flat<float>().data(), rows, cols, dx->flat<T>().data(),
                                dgamma->flat<float>().data(), dbeta->flat<float>().data()));
  }
};

#define REGISTER_CPU(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfBert>FusedLayerNorm").Device(DEVICE_CPU).TypeConstraint<T>("T"),               \
      FusedLayerNormOp<CPUDevice, T>);                                                       \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfBert>FusedLayerNormGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),           \
      FusedLayerNormGradOp<CPUDevice, T>);
REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);
#undef REGISTER_CPU

#if GOOGLE_CUDA
#define REGISTER_GPU(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfBert>FusedLayerNorm").Device(::tensorflow::DEVICE_GPU).TypeConstraint<T>("T"), \
      FusedLayerNormOp<functor::GPUDevice, T>);                                              \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLayerNormGrad")                                  \
                              .Device(::tensorflow::DEVICE_GPU)                              \
                              .TypeConstraint<T>("T"),                                       \
                          FusedLayerNormGradOp<functor::GPUDevice, T>);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);
#undef REGISTER_GPU
#endif  // GOOGLE_CUDA

}  // namespace tfbert
