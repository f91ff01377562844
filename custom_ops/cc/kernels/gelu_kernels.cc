// Kernels of TfBert>FusedBiasGelu, TfBert>FusedBiasGeglu and their gradients
// (cc/ops/gelu_ops.cc): the CPU functors and, in a WITH_CUDA=1 build, the GPU registration that
// calls the CUDA kernels of cuda/gelu.cu through the C ABI in cuda/gelu_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = N = x's last dimension (2M for
// GeGLU, whose y and dy are [rows, M]); see gelu.h.
//
// CPU: rows are split over TensorFlow's intra-op thread pool, and each row goes through one
// vectorised loop (see TFBERT_CPU_CLONES in kernel_common.h) that reads x (float, half or
// bfloat16) and the bias, computes in float32 and writes y, or dx and the row's dbias share,
// with no temporaries.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "gelu.h"

#include <limits>

#if GOOGLE_CUDA
#include "gelu_launch.h"
#endif

namespace tfbert {

namespace functor {

namespace {

using cpu_math::ExpNonPositive;
using cpu_math::Load;
using cpu_math::Select;
using cpu_math::Store;
using gelu_math::kInvSqrt2Pi;
using gelu_math::kSqrt2OverPi;
using gelu_math::kSqrtHalf;
using gelu_math::kTanhCubic;

// Rough cycles per element, for the thread pool's sharding.
constexpr int64_t kForwardCostPerElement = 10;
constexpr int64_t kBackwardCostPerElement = 20;

// ---- Scalar GELU math that GCC vectorises (the formulas in gelu.h) ----

// Phi(u), the standard normal CDF, = 0.5 erfc(-u / sqrt 2). libm's erfcf (the scalar reference
// in gelu.h, and what Eigen's erfc calls lane by lane) does not vectorise, and 1 + erf(u / sqrt
// 2), which does, cancels for u << 0 (tf.nn.gelu's form: its GELU is 0 below u = -5.5). So erfc
// is Numerical Recipes' Chebyshev fit (Press et al., 2nd ed., section 6.2, erfcc): for z >= 0
//   erfc(z) = t exp(-z^2 + P(t)),  t = 1 / (1 + z / 2),  P of degree 9,
// with a fractional error below 1.2e-7 for every z, so the tail keeps its relative precision.
// Then Phi(-|u|) = 0.5 erfc(|u| / sqrt 2), Phi(|u|) = 1 - Phi(-|u|). Measured in float32 against
// erfc in double, the relative error is within 2x of libm's erfcf(-u / sqrt 2) for every u (both
// ~1e-5 at u = -12, where rounding u / sqrt 2 alone costs that much).
constexpr float kErfcP[] = {-1.26551223f, 1.00002368f,  0.37409196f,  0.09678418f,
                            -0.18628806f, 0.27886807f,  -1.13520398f, 1.48851587f,
                            -0.82215223f, 0.17087277f};  // P's coefficients from t^0 up

TFBERT_INLINE float NormalCdf(float u) {
  const float t = 1.0f / (1.0f + (0.5f * kSqrtHalf) * std::fabs(u));
  float p = kErfcP[9];
  for (int i = 8; i >= 0; --i) p = p * t + kErfcP[i];
  // -z^2 = -u^2 / 2: one rounding, not two as (|u| / sqrt 2)^2.
  const float lower_tail = 0.5f * t * ExpNonPositive(p - 0.5f * u * u);  // Phi(-|u|)
  return Select(u <= 0.0f, lower_tail, 1.0f - lower_tail);
}

// tanh(x) as Eigen computes it for float (generic_fast_tanh_float without FMA: the input clamped
// to +-7.905, where tanh rounds to +-1, then a 13/6 odd/even rational function; x itself below
// 4e-4), so the approximate GELU gives what the Eigen version of this kernel gave.
TFBERT_INLINE float Tanh(float x) {
  constexpr float kClamp = 7.90531110763549805f;
  const float c = Select(x > kClamp, kClamp, Select(x < -kClamp, -kClamp, x));
  const float c2 = c * c;
  float p = c2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = c2 * p + -8.60467152213735e-11f;
  p = c2 * p + 5.12229709037114e-08f;
  p = c2 * p + 1.48572235717979e-05f;
  p = c2 * p + 6.37261928875436e-04f;
  p = c2 * p + 4.89352455891786e-03f;
  p = c * p;
  float q = c2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = c2 * q + 2.26843463243900e-03f;
  q = c2 * q + 4.89352518554385e-03f;
  return Select(std::fabs(x) < 0.0004f, c, p / q);
}

// The two GELU forms: gelu(u), and gelu(u) with gelu'(u) for the gradients.
struct ExactGelu {
  static TFBERT_INLINE float Value(float u) { return u * NormalCdf(u); }
  static TFBERT_INLINE float ValueAndDerivative(float u, float* derivative) {
    const float cdf = NormalCdf(u);
    *derivative = cdf + u * kInvSqrt2Pi * ExpNonPositive(-0.5f * u * u);
    return u * cdf;
  }
};

struct TanhGelu {
  static TFBERT_INLINE float Value(float u) {
    return 0.5f * u * (1.0f + Tanh(kSqrt2OverPi * (u + kTanhCubic * (u * u * u))));
  }
  static TFBERT_INLINE float ValueAndDerivative(float u, float* derivative) {
    const float u2 = u * u;
    const float t = Tanh(kSqrt2OverPi * (u + kTanhCubic * (u2 * u)));
    *derivative = 0.5f * (1.0f + t) +
                  0.5f * u * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * u2);
    return 0.5f * u * (1.0f + t);
  }
};

// ---- The row loops: one vectorised function per kernel and storage type T ----
//
// Each loop reads its row in T, computes in float32 and writes T (cpu_math::Load / Store); the
// bias is float32. Outputs never alias inputs (__restrict lets GCC vectorise without run-time
// overlap checks).

template <typename Form, typename T>
TFBERT_INLINE void BiasGeluLoop(const T* x, const float* bias, int64_t n, T* y) {
  for (int64_t j = 0; j < n; ++j) Store(y, j, Form::Value(Load(x, j) + bias[j]));
}

// y = gelu(x + bias) over one row of n elements.
template <typename T>
TFBERT_CPU_CLONES void BiasGeluRow(const T* __restrict x, const float* __restrict bias,
                                   int64_t n, bool approximate, T* __restrict y) {
  if (approximate) {
    BiasGeluLoop<TanhGelu>(x, bias, n, y);
  } else {
    BiasGeluLoop<ExactGelu>(x, bias, n, y);
  }
}

template <typename Form, typename T>
TFBERT_INLINE void BiasGeluGradLoop(const T* dy, const T* x, const float* bias, int64_t n, T* dx,
                                    float* dbias) {
  for (int64_t j = 0; j < n; ++j) {
    float derivative;
    Form::ValueAndDerivative(Load(x, j) + bias[j], &derivative);
    const float grad = Load(dy, j) * derivative;
    Store(dx, j, grad);
    dbias[j] += grad;  // dbias from the float32 gradient, not from dx rounded to T
  }
}

// dx = dy * gelu'(x + bias) over one row of n elements, and dbias += dx.
template <typename T>
TFBERT_CPU_CLONES void BiasGeluGradRow(const T* __restrict dy, const T* __restrict x,
                                       const float* __restrict bias, int64_t n, bool approximate,
                                       T* __restrict dx, float* __restrict dbias) {
  if (approximate) {
    BiasGeluGradLoop<TanhGelu>(dy, x, bias, n, dx, dbias);
  } else {
    BiasGeluGradLoop<ExactGelu>(dy, x, bias, n, dx, dbias);
  }
}

template <typename Form, typename T>
TFBERT_INLINE void BiasGeluSaveLoop(const T* x, const float* bias, int64_t n, T* y,
                                    T* derivative) {
  for (int64_t j = 0; j < n; ++j) {
    float d;
    Store(y, j, Form::ValueAndDerivative(Load(x, j) + bias[j], &d));
    Store(derivative, j, d);
  }
}

// y = gelu(x + bias) and derivative = gelu'(x + bias) over one row of n elements.
template <typename T>
TFBERT_CPU_CLONES void BiasGeluSaveRow(const T* __restrict x, const float* __restrict bias,
                                       int64_t n, bool approximate, T* __restrict y,
                                       T* __restrict derivative) {
  if (approximate) {
    BiasGeluSaveLoop<TanhGelu>(x, bias, n, y, derivative);
  } else {
    BiasGeluSaveLoop<ExactGelu>(x, bias, n, y, derivative);
  }
}

// dx = dy * derivative over one row of n elements, and dbias += dx: the float32 product the
// recomputing gradient forms (bit-identical in float32, where the derivative is not rounded).
template <typename T>
TFBERT_CPU_CLONES void GradFromDerivativeRow(const T* __restrict dy,
                                             const T* __restrict derivative, int64_t n,
                                             T* __restrict dx, float* __restrict dbias) {
  for (int64_t j = 0; j < n; ++j) {
    const float grad = Load(dy, j) * Load(derivative, j);
    Store(dx, j, grad);
    dbias[j] += grad;
  }
}

template <typename Form, typename T>
TFBERT_INLINE void BiasGegluLoop(const T* gate, const T* value, const float* bias, int64_t m,
                                 T* y) {
  for (int64_t j = 0; j < m; ++j) {
    Store(y, j, Form::Value(Load(gate, j) + bias[j]) * (Load(value, j) + bias[m + j]));
  }
}

// y = gelu(gate + bias[:m]) * (value + bias[m:]) over one row of m outputs.
template <typename T>
TFBERT_CPU_CLONES void BiasGegluRow(const T* __restrict gate, const T* __restrict value,
                                    const float* __restrict bias, int64_t m, bool approximate,
                                    T* __restrict y) {
  if (approximate) {
    BiasGegluLoop<TanhGelu>(gate, value, bias, m, y);
  } else {
    BiasGegluLoop<ExactGelu>(gate, value, bias, m, y);
  }
}

template <typename Form, typename T>
TFBERT_INLINE void BiasGegluGradLoop(const T* dy, const T* gate, const T* value,
                                     const float* bias, int64_t m, T* dgate, T* dvalue,
                                     float* dbias) {
  for (int64_t j = 0; j < m; ++j) {
    float derivative;
    const float gelu_g = Form::ValueAndDerivative(Load(gate, j) + bias[j], &derivative);
    const float v = Load(value, j) + bias[m + j];
    const float dgate_j = Load(dy, j) * v * derivative;
    const float dvalue_j = Load(dy, j) * gelu_g;
    Store(dgate, j, dgate_j);
    Store(dvalue, j, dvalue_j);
    dbias[j] += dgate_j;
    dbias[m + j] += dvalue_j;
  }
}

// [dgate | dvalue] = [dy * v * gelu'(g) | dy * gelu(g)] over one row of m outputs (g and v the
// biased gate and value), and dbias += [dgate | dvalue].
template <typename T>
TFBERT_CPU_CLONES void BiasGegluGradRow(const T* __restrict dy, const T* __restrict gate,
                                        const T* __restrict value, const float* __restrict bias,
                                        int64_t m, bool approximate, T* __restrict dgate,
                                        T* __restrict dvalue, float* __restrict dbias) {
  if (approximate) {
    BiasGegluGradLoop<TanhGelu>(dy, gate, value, bias, m, dgate, dvalue, dbias);
  } else {
    BiasGegluGradLoop<ExactGelu>(dy, gate, value, bias, m, dgate, dvalue, dbias);
  }
}

// ---- Row drivers ----

// dbias = block_fn's partials summed over all rows (SumOverRowBlocks), stored as T.
template <typename T, typename BlockFn>
void ForRowBlocksWithBiasGrad(OpKernelContext* context, int64_t rows, int64_t cols,
                              int64_t cost_per_row, const BlockFn& block_fn, T* dbias) {
  const std::vector<float> sum = SumOverRowBlocks(context, rows, cols, cost_per_row, block_fn);
  for (int64_t j = 0; j < cols; ++j) dbias[j] = static_cast<T>(sum[j]);
}

template <typename T>
std::vector<float> ToFloatVector(const T* values, int64_t size) {
  std::vector<float> out(size);
  for (int64_t j = 0; j < size; ++j) out[j] = static_cast<float>(values[j]);
  return out;
}

}  // namespace

template <typename T>
struct FusedBiasGeluForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t cols, bool approximate, T* y) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const std::vector<float> b = ToFloatVector(bias, cols);
    workers->ParallelFor(rows, cols * kForwardCostPerElement, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        BiasGeluRow(x + r * cols, b.data(), cols, approximate, y + r * cols);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedBiasGeluBackward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const T* bias,
                    int64_t rows, int64_t cols, bool approximate, T* dx, T* dbias) {
    const std::vector<float> b = ToFloatVector(bias, cols);
    auto block_fn = [&](int64_t row_begin, int64_t row_end, float* partial) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        BiasGeluGradRow(dy + r * cols, x + r * cols, b.data(), cols, approximate, dx + r * cols,
                        partial);
      }
    };
    ForRowBlocksWithBiasGrad(context, rows, cols, cols * kBackwardCostPerElement, block_fn,
                             dbias);
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedBiasGeluSaveForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t cols, bool approximate, T* y, T* derivative) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const std::vector<float> b = ToFloatVector(bias, cols);
    workers->ParallelFor(rows, cols * kBackwardCostPerElement, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        BiasGeluSaveRow(x + r * cols, b.data(), cols, approximate, y + r * cols,
                        derivative + r * cols);
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedBiasGeluGradFromDerivative<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* derivative, int64_t rows,
                    int64_t cols, T* dx, T* dbias) {
    auto block_fn = [&](int64_t row_begin, int64_t row_end, float* partial) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        GradFromDerivativeRow(dy + r * cols, derivative + r * cols, cols, dx + r * cols,
                              partial);
      }
    };
    // A multiply and an add per element: memory-bound, like the bias adds.
    ForRowBlocksWithBiasGrad(context, rows, cols, cols * 2, block_fn, dbias);
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedBiasGegluForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t half_cols, bool approximate, T* y) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t cols = 2 * half_cols;
    const std::vector<float> b = ToFloatVector(bias, cols);
    workers->ParallelFor(
        rows, half_cols * kForwardCostPerElement, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const T* gate = x + r * cols;
            BiasGegluRow(gate, gate + half_cols, b.data(), half_cols, approximate,
                         y + r * half_cols);
          }
        });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct FusedBiasGegluBackward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const T* bias,
                    int64_t rows, int64_t half_cols, bool approximate, T* dx, T* dbias) {
    const int64_t cols = 2 * half_cols;
    const std::vector<float> b = ToFloatVector(bias, cols);
    auto block_fn = [&](int64_t row_begin, int64_t row_end, float* partial) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const T* gate = x + r * cols;
        T* dgate = dx + r * cols;
        BiasGegluGradRow(dy + r * half_cols, gate, gate + half_cols, b.data(), half_cols,
                         approximate, dgate, dgate + half_cols, partial);
      }
    };
    ForRowBlocksWithBiasGrad(context, rows, cols, cols * kBackwardCostPerElement, block_fn,
                             dbias);
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

namespace {

// The C ABI's element type per T: float, or the raw bits of Eigen::half / Eigen::bfloat16
// (laid out as __half / __nv_bfloat16) as unsigned short; and the launch functions for it.
template <typename T>
struct Launch;

template <>
struct Launch<float> {
  using Bits = float;
  static constexpr auto kGeluForward = tfbert_bias_gelu_forward_f32;
  static constexpr auto kGeluBackward = tfbert_bias_gelu_backward_f32;
  static constexpr auto kGegluForward = tfbert_bias_geglu_forward_f32;
  static constexpr auto kGegluBackward = tfbert_bias_geglu_backward_f32;
  static constexpr auto kGeluSaveForward = tfbert_bias_gelu_forward_save_f32;
  static constexpr auto kGeluSavedBackward = tfbert_bias_gelu_backward_saved_f32;
};

template <>
struct Launch<Eigen::half> {
  using Bits = unsigned short;
  static constexpr auto kGeluForward = tfbert_bias_gelu_forward_f16;
  static constexpr auto kGeluBackward = tfbert_bias_gelu_backward_f16;
  static constexpr auto kGegluForward = tfbert_bias_geglu_forward_f16;
  static constexpr auto kGegluBackward = tfbert_bias_geglu_backward_f16;
  static constexpr auto kGeluSaveForward = tfbert_bias_gelu_forward_save_f16;
  static constexpr auto kGeluSavedBackward = tfbert_bias_gelu_backward_saved_f16;
};

template <>
struct Launch<Eigen::bfloat16> {
  using Bits = unsigned short;
  static constexpr auto kGeluForward = tfbert_bias_gelu_forward_bf16;
  static constexpr auto kGeluBackward = tfbert_bias_gelu_backward_bf16;
  static constexpr auto kGegluForward = tfbert_bias_geglu_forward_bf16;
  static constexpr auto kGegluBackward = tfbert_bias_geglu_backward_bf16;
  static constexpr auto kGeluSaveForward = tfbert_bias_gelu_forward_save_bf16;
  static constexpr auto kGeluSavedBackward = tfbert_bias_gelu_backward_saved_bf16;
};

template <typename T>
const typename Launch<T>::Bits* Raw(const T* p) {
  static_assert(sizeof(T) == sizeof(typename Launch<T>::Bits), "same width");
  return reinterpret_cast<const typename Launch<T>::Bits*>(p);
}
template <typename T>
typename Launch<T>::Bits* Raw(T* p) {
  static_assert(sizeof(T) == sizeof(typename Launch<T>::Bits), "same width");
  return reinterpret_cast<typename Launch<T>::Bits*>(p);
}

Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}

// The CUDA kernels index a row's columns with int.
Status CheckCudaCols(const char* op, int64_t cols) {
  if (cols > std::numeric_limits<int>::max()) {
    return errors::InvalidArgument(op, "'s CUDA kernels take a last dimension below ",
                                   std::numeric_limits<int>::max(), ", got ", cols);
  }
  return ::tensorflow::OkStatus();
}

Status AllocateWorkspace(OpKernelContext* context, int64_t rows, int64_t cols,
                         Tensor* workspace) {
  return context->allocate_temp(
      ::tensorflow::DT_FLOAT,
      TensorShape({tfbert_bias_gelu_grad_workspace_floats(rows, cols)}), workspace);
}

}  // namespace

template <typename T>
struct FusedBiasGeluForward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t cols, bool approximate, T* y) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGelu", cols));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(Launch<T>::kGeluForward(Raw(x), Raw(bias), rows, static_cast<int>(cols),
                                              approximate ? 1 : 0, Raw(y), stream),
                      "FusedBiasGelu");
  }
};

template <typename T>
struct FusedBiasGeluBackward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const T* bias,
                    int64_t rows, int64_t cols, bool approximate, T* dx, T* dbias) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGeluGrad", cols));
    Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(context, rows, cols, &workspace));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        Launch<T>::kGeluBackward(Raw(dy), Raw(x), Raw(bias), rows, static_cast<int>(cols),
                                 approximate ? 1 : 0, Raw(dx), Raw(dbias),
                                 workspace.flat<float>().data(), stream),
        "FusedBiasGeluGrad");
  }
};

template <typename T>
struct FusedBiasGeluSaveForward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t cols, bool approximate, T* y, T* derivative) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGeluSave", cols));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        Launch<T>::kGeluSaveForward(Raw(x), Raw(bias), rows, static_cast<int>(cols),
                                    approximate ? 1 : 0, Raw(y), Raw(derivative), stream),
        "FusedBiasGeluSave");
  }
};

template <typename T>
struct FusedBiasGeluGradFromDerivative<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* derivative, int64_t rows,
                    int64_t cols, T* dx, T* dbias) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGeluGradFromDerivative", cols));
    Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(context, rows, cols, &workspace));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        Launch<T>::kGeluSavedBackward(Raw(dy), Raw(derivative), rows, static_cast<int>(cols),
                                      Raw(dx), Raw(dbias), workspace.flat<float>().data(),
                                      stream),
        "FusedBiasGeluGradFromDerivative");
  }
};

template <typename T>
struct FusedBiasGegluForward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t half_cols, bool approximate, T* y) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGeglu", 2 * half_cols));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        Launch<T>::kGegluForward(Raw(x), Raw(bias), rows, static_cast<int>(half_cols),
                                 approximate ? 1 : 0, Raw(y), stream),
        "FusedBiasGeglu");
  }
};

template <typename T>
struct FusedBiasGegluBackward<GPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* dy, const T* x, const T* bias,
                    int64_t rows, int64_t half_cols, bool approximate, T* dx, T* dbias) {
    TF_RETURN_IF_ERROR(CheckCudaCols("FusedBiasGegluGrad", 2 * half_cols));
    Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(context, rows, 2 * half_cols, &workspace));
    const cudaStream_t stream = context->eigen_device<GPUDevice>().stream();
    return CudaStatus(
        Launch<T>::kGegluBackward(Raw(dy), Raw(x), Raw(bias), rows, static_cast<int>(half_cols),
                                  approximate ? 1 : 0, Raw(dx), Raw(dbias),
                                  workspace.flat<float>().data(), stream),
        "FusedBiasGegluGrad");
  }
};
#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

// x's shape as [rows, cols] (cols = the last dimension), or an error naming the op.
Status RowsAndCols(const char* op, const Tensor& x, int64_t* rows, int64_t* cols) {
  if (x.dims() < 1) {
    return errors::InvalidArgument(op, ": x must have rank >= 1 (the bias is added along its "
                                   "last axis), got shape ", x.shape().DebugString());
  }
  *cols = x.dim_size(x.dims() - 1);
  *rows = 1;
  for (int i = 0; i < x.dims() - 1; ++i) *rows *= x.dim_size(i);
  return ::tensorflow::OkStatus();
}

Status CheckBias(const char* op, const Tensor& bias, int64_t cols) {
  if (bias.dims() != 1 || bias.dim_size(0) != cols) {
    return errors::InvalidArgument(op, ": bias must have shape [", cols,
                                   "] (x's last dimension), got ", bias.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

Status CheckEven(const char* op, const Tensor& x, int64_t cols) {
  if (cols % 2 != 0) {
    return errors::InvalidArgument(op, ": x's last dimension holds [gate, value] halves and "
                                   "must be even, got shape ", x.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

// x's shape with the last dimension replaced by `last`.
TensorShape WithLastDim(const TensorShape& shape, int64_t last) {
  TensorShape out = shape;
  out.set_dim(out.dims() - 1, last);
  return out;
}

}  // namespace

// GELU and GeGLU share the op classes: kGated selects the GeGLU functors and shapes.
template <typename Device, typename T, bool kGated>
class FusedBiasGeluOp : public OpKernel {
 public:
  explicit FusedBiasGeluOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("approximate", &approximate_));
  }

  void Compute(OpKernelContext* context) override {
    const char* op = kGated ? "FusedBiasGeglu" : "FusedBiasGelu";
    const Tensor& x = context->input(0);
    const Tensor& bias = context->input(1);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols(op, x, &rows, &cols));
    OP_REQUIRES_OK(context, CheckBias(op, bias, cols));
    if (kGated) OP_REQUIRES_OK(context, CheckEven(op, x, cols));
    const int64_t out_cols = kGated ? cols / 2 : cols;

    Tensor* y = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, WithLastDim(x.shape(), out_cols), &y));
    if (rows == 0 || out_cols == 0) return;
    if (kGated) {
      OP_REQUIRES_OK(context, functor::FusedBiasGegluForward<Device, T>()(
                                  context, x.flat<T>().data(), bias.flat<T>().data(), rows,
                                  out_cols, approximate_, y->flat<T>().data()));
    } else {
      OP_REQUIRES_OK(context, functor::FusedBiasGeluForward<Device, T>()(
                                  context, x.flat<T>().data(), bias.flat<T>().data(), rows,
                                  cols, approximate_, y->flat<T>().data()));
    }
  }

 private:
  bool approximate_;
};

template <typename Device, typename T, bool kGated>
class FusedBiasGeluGradOp : public OpKernel {
 public:
  explicit FusedBiasGeluGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("approximate", &approximate_));
  }

  void Compute(OpKernelContext* context) override {
    const char* op = kGated ? "FusedBiasGegluGrad" : "FusedBiasGeluGrad";
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    const Tensor& bias = context->input(2);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols(op, x, &rows, &cols));
    OP_REQUIRES_OK(context, CheckBias(op, bias, cols));
    if (kGated) OP_REQUIRES_OK(context, CheckEven(op, x, cols));
    const int64_t out_cols = kGated ? cols / 2 : cols;
    const TensorShape y_shape = WithLastDim(x.shape(), out_cols);
    OP_REQUIRES(context, dy.shape() == y_shape,
                errors::InvalidArgument(op, ": dy must have the forward output's shape ",
                                        y_shape.DebugString(), ", got ",
                                        dy.shape().DebugString()));

    Tensor* dx = nullptr;
    Tensor* dbias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({cols}), &dbias));
    // With no rows the functor still runs: dbias is N zeros, the empty sums.
    if (cols == 0) return;
    if (kGated) {
      OP_REQUIRES_OK(context, functor::FusedBiasGegluBackward<Device, T>()(
                                  context, dy.flat<T>().data(), x.flat<T>().data(),
                                  bias.flat<T>().data(), rows, out_cols, approximate_,
                                  dx->flat<T>().data(), dbias->flat<T>().data()));
    } else {
      OP_REQUIRES_OK(context, functor::FusedBiasGeluBackward<Device, T>()(
                                  context, dy.flat<T>().data(), x.flat<T>().data(),
                                  bias.flat<T>().data(), rows, cols, approximate_,
                                  dx->flat<T>().data(), dbias->flat<T>().data()));
    }
  }

 private:
  bool approximate_;
};

template <typename Device, typename T>
class FusedBiasGeluSaveOp : public OpKernel {
 public:
  explicit FusedBiasGeluSaveOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("approximate", &approximate_));
  }

  void Compute(OpKernelContext* context) override {
    const char* op = "FusedBiasGeluSave";
    const Tensor& x = context->input(0);
    const Tensor& bias = context->input(1);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols(op, x, &rows, &cols));
    OP_REQUIRES_OK(context, CheckBias(op, bias, cols));
    Tensor *y = nullptr, *derivative = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, x.shape(), &derivative));
    if (rows == 0 || cols == 0) return;
    OP_REQUIRES_OK(context, functor::FusedBiasGeluSaveForward<Device, T>()(
                                context, x.flat<T>().data(), bias.flat<T>().data(), rows, cols,
                                approximate_, y->flat<T>().data(),
                                derivative->flat<T>().data()));
  }

 private:
  bool approximate_;
};

template <typename Device, typename T>
class FusedBiasGeluGradFromDerivativeOp : public OpKernel {
 public:
  explicit FusedBiasGeluGradFromDerivativeOp(OpKernelConstruction* context)
      : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const char* op = "FusedBiasGeluGradFromDerivative";
    const Tensor& dy = context->input(0);
    const Tensor& derivative = context->input(1);
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, RowsAndCols(op, dy, &rows, &cols));
    OP_REQUIRES(context, derivative.shape() == dy.shape(),
                errors::InvalidArgument(op, ": derivative must have dy's shape ",
                                        dy.shape().DebugString(), ", got ",
                                        derivative.shape().DebugString()));
    Tensor *dx = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, dy.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({cols}), &dbias));
    // With no rows the functor still runs: dbias is N zeros, the empty sums.
    if (cols == 0) return;
    OP_REQUIRES_OK(context, functor::FusedBiasGeluGradFromDerivative<Device, T>()(
                                context, dy.flat<T>().data(), derivative.flat<T>().data(), rows,
                                cols, dx->flat<T>().data(), dbias->flat<T>().data()));
  }
};

#define REGISTER_KERNELS(DEVICE_TYPE, DEVICE, T)                                                \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfBert>FusedBiasGelu").Device(DEVICE_TYPE).TypeConstraint<T>("T"),                  \
      FusedBiasGeluOp<DEVICE, T, false>);                                                       \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfBert>FusedBiasGeluGrad").Device(DEVICE_TYPE).TypeConstraint<T>("T"),              \
      FusedBiasGeluGradOp<DEVICE, T, false>);                                                   \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfBert>FusedBiasGeglu").Device(DEVICE_TYPE).TypeConstraint<T>("T"),                 \
      FusedBiasGeluOp<DEVICE, T, true>);                                                        \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfBert>FusedBiasGegluGrad").Device(DEVICE_TYPE).TypeConstraint<T>("T"),             \
      FusedBiasGeluGradOp<DEVICE, T, true>);                                                    \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfBert>FusedBiasGeluSave").Device(DEVICE_TYPE).TypeConstraint<T>("T"),              \
      FusedBiasGeluSaveOp<DEVICE, T>);                                                          \
  REGISTER_KERNEL_BUILDER(Name("TfBert>FusedBiasGeluGradFromDerivative")                        \
                              .Device(DEVICE_TYPE)                                              \
                              .TypeConstraint<T>("T"),                                          \
                          FusedBiasGeluGradFromDerivativeOp<DEVICE, T>);

REGISTER_KERNELS(DEVICE_CPU, CPUDevice, float);
REGISTER_KERNELS(DEVICE_CPU, CPUDevice, Eigen::half);
REGISTER_KERNELS(DEVICE_CPU, CPUDevice, Eigen::bfloat16);

#if GOOGLE_CUDA
REGISTER_KERNELS(::tensorflow::DEVICE_GPU, functor::GPUDevice, float);
REGISTER_KERNELS(::tensorflow::DEVICE_GPU, functor::GPUDevice, Eigen::half);
REGISTER_KERNELS(::tensorflow::DEVICE_GPU, functor::GPUDevice, Eigen::bfloat16);
#endif  // GOOGLE_CUDA
#undef REGISTER_KERNELS

}  // namespace tfbert
