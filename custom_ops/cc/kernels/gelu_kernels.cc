// Kernels of TfBert>FusedBiasGelu, TfBert>FusedBiasGeglu and their gradients
// (cc/ops/gelu_ops.cc): the CPU functors and, in a WITH_CUDA=1 build, the GPU registration that
// calls the CUDA kernels of cuda/gelu.cu through the C ABI in cuda/gelu_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = N = x's last dimension (2M for
// GeGLU, whose y and dy are [rows, M]); see gelu.h.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "gelu.h"

#include <limits>

#include "Eigen/Core"
#include "unsupported/Eigen/SpecialFunctions"

#if GOOGLE_CUDA
#include "gelu_launch.h"
#endif

namespace tfbert {

namespace functor {

namespace {

// The rows are cut into a fixed number of blocks for the dbias partial sums (independent of the
// number of threads), and the partials are added in block order, so dbias is bit-identical from
// run to run and from machine to machine. 128 blocks keep a large host busy while the partials
// stay small (128 * N floats).
constexpr int64_t kMaxGradRowBlocks = 128;

// Rough cycles per element (erfc/tanh dominate), for the thread pool's sharding.
constexpr int64_t kForwardCostPerElement = 40;
constexpr int64_t kBackwardCostPerElement = 60;

template <typename T>
std::vector<float> ToFloatVector(const T* values, int64_t size) {
  std::vector<float> out(size);
  for (int64_t j = 0; j < size; ++j) out[j] = static_cast<float>(values[j]);
  return out;
}

// Below this pre-activation the exact GELU takes erfc instead of 1 + erf (see GeluRow).
constexpr float kErfcBelow = -2.0f;

// GELU over one row of float32 pre-activations u[0:n] with Eigen's vectorised erf/tanh/exp
// (the packet math TensorFlow's own GELU uses): scalar libm calls per element made the fused
// op several times slower than TF's composite. Writes gelu(u) to out and, when derivative is
// not null, gelu'(u) to derivative; out is also the scratch space, so nothing is allocated.
// Same formulas as gelu_math (gelu.h).
void GeluRow(const float* u, int64_t n, bool approximate, float* out, float* derivative) {
  using gelu_math::kInvSqrt2Pi;
  using gelu_math::kSqrt2OverPi;
  using gelu_math::kSqrtHalf;
  using gelu_math::kTanhCubic;
  Eigen::Map<const Eigen::ArrayXf> x(u, n);
  Eigen::Map<Eigen::ArrayXf> y(out, n);
  if (approximate) {
    y = (kSqrt2OverPi * (x + kTanhCubic * x.cube())).tanh();  // t
    if (derivative != nullptr) {
      Eigen::Map<Eigen::ArrayXf>(derivative, n) =
          0.5f * (1.0f + y) +
          0.5f * x * (1.0f - y.square()) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x.square());
    }
    y = 0.5f * x * (1.0f + y);
    return;
  }
  // Phi(u) = (1 + erf(u / sqrt 2)) / 2 first, in out. Eigen's erf is vectorised, its erfc is
  // scalar (20x slower here, as TensorFlow's Erfc op). For u << 0, 1 + erf cancels (at u = -2
  // it keeps ~5 significant digits of Phi), so the few elements below kErfcBelow take the
  // scalar erfc, which keeps full precision in the tail as gelu_math::Gelu does.
  y = 0.5f * (1.0f + (kSqrtHalf * x).erf());
  for (int64_t j = 0; j < n; ++j) {
    if (u[j] < kErfcBelow) out[j] = 0.5f * std::erfc(-kSqrtHalf * u[j]);
  }
  if (derivative != nullptr) {
    Eigen::Map<Eigen::ArrayXf>(derivative, n) = y + x * kInvSqrt2Pi * (-0.5f * x.square()).exp();
  }
  y = x * y;
}

// Runs row_fn(row, partial) for every row, where partial is the float32 [cols] accumulator of
// the row's block, then writes dbias = the partials summed in block order (zeros if no rows).
template <typename T, typename RowFn>
void ForRowsWithBiasGrad(OpKernelContext* context, int64_t rows, int64_t cols,
                         int64_t cost_per_row, RowFn row_fn, T* dbias) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, kMaxGradRowBlocks));
  std::vector<float> partials(blocks * cols, 0.0f);  // [blocks, cols]
  const int64_t cost_per_block = (rows / blocks + 1) * cost_per_row;
  workers->ParallelFor(blocks, cost_per_block, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      float* partial = partials.data() + b * cols;
      const int64_t row_end = (b + 1) * rows / blocks;
      for (int64_t r = b * rows / blocks; r < row_end; ++r) row_fn(r, partial);
    }
  });
  // The second reduction, in block order: blocks * cols additions, small next to the rows.
  for (int64_t j = 0; j < cols; ++j) {
    float sum = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) sum += partials[b * cols + j];
    dbias[j] = static_cast<T>(sum);
  }
}

}  // namespace

// Rows of T and float32 as Eigen arrays: the casts, bias adds and products around GeluRow are
// vectorised too.
using FloatRow = Eigen::Map<Eigen::ArrayXf>;
using ConstFloatRow = Eigen::Map<const Eigen::ArrayXf>;
template <typename T>
using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

template <typename T>
struct FusedBiasGeluForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* x, const T* bias, int64_t rows,
                    int64_t cols, bool approximate, T* y) {
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    const std::vector<float> b = ToFloatVector(bias, cols);
    workers->ParallelFor(rows, cols * kForwardCostPerElement, [&](int64_t begin, int64_t end) {
      std::vector<float> u(cols), out(cols);
      for (int64_t r = begin; r < end; ++r) {
        FloatRow(u.data(), cols) =
            ConstRow<T>(x + r * cols, cols).template cast<float>() + ConstFloatRow(b.data(), cols);
        GeluRow(u.data(), cols, approximate, out.data(), nullptr);
        Row<T>(y + r * cols, cols) = FloatRow(out.data(), cols).template cast<T>();
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
    auto row_fn = [&](int64_t r, float* partial) {
      thread_local std::vector<float> u, out, derivative;
      u.resize(cols);
      out.resize(cols);
      derivative.resize(cols);
      FloatRow(u.data(), cols) =
          ConstRow<T>(x + r * cols, cols).template cast<float>() + ConstFloatRow(b.data(), cols);
      GeluRow(u.data(), cols, approximate, out.data(), derivative.data());
      FloatRow grad(derivative.data(), cols);
      grad *= ConstRow<T>(dy + r * cols, cols).template cast<float>();
      Row<T>(dx + r * cols, cols) = grad.template cast<T>();
      FloatRow(partial, cols) += grad;  // dbias from the float32 gradient, not the rounded dx
    };
    ForRowsWithBiasGrad(context, rows, cols, cols * kBackwardCostPerElement, row_fn, dbias);
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
    const ConstFloatRow gate_bias(b.data(), half_cols), value_bias(b.data() + half_cols, half_cols);
    workers->ParallelFor(
        rows, half_cols * kForwardCostPerElement, [&](int64_t begin, int64_t end) {
          std::vector<float> g(half_cols), gelu_g(half_cols);
          for (int64_t r = begin; r < end; ++r) {
            const T* gate = x + r * cols;
            FloatRow(g.data(), half_cols) =
                ConstRow<T>(gate, half_cols).template cast<float>() + gate_bias;
            GeluRow(g.data(), half_cols, approximate, gelu_g.data(), nullptr);
            Row<T>(y + r * half_cols, half_cols) =
                (FloatRow(gelu_g.data(), half_cols) *
                 (ConstRow<T>(gate + half_cols, half_cols).template cast<float>() + value_bias))
                    .template cast<T>();
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
    const ConstFloatRow gate_bias(b.data(), half_cols), value_bias(b.data() + half_cols, half_cols);
    auto row_fn = [&](int64_t r, float* partial) {
      const T* gate = x + r * cols;
      thread_local std::vector<float> g, gelu_g, derivative;
      g.resize(half_cols);
      gelu_g.resize(half_cols);
      derivative.resize(half_cols);
      FloatRow(g.data(), half_cols) =
          ConstRow<T>(gate, half_cols).template cast<float>() + gate_bias;
      GeluRow(g.data(), half_cols, approximate, gelu_g.data(), derivative.data());
      const auto dy_row = ConstRow<T>(dy + r * half_cols, half_cols).template cast<float>();
      // d gate = dy * value * gelu'(gate), d value = dy * gelu(gate).
      FloatRow dgate(derivative.data(), half_cols), dvalue(gelu_g.data(), half_cols);
      dgate *= dy_row *
               (ConstRow<T>(gate + half_cols, half_cols).template cast<float>() + value_bias);
      dvalue *= dy_row;
      Row<T>(dx + r * cols, half_cols) = dgate.template cast<T>();
      Row<T>(dx + r * cols + half_cols, half_cols) = dvalue.template cast<T>();
      FloatRow(partial, half_cols) += dgate;
      FloatRow(partial + half_cols, half_cols) += dvalue;
    };
    ForRowsWithBiasGrad(context, rows, cols, cols * kBackwardCostPerElement, row_fn, dbias);
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
};

template <>
struct Launch<Eigen::half> {
  using Bits = unsigned short;
  static constexpr auto kGeluForward = tfbert_bias_gelu_forward_f16;
  static constexpr auto kGeluBackward = tfbert_bias_gelu_backward_f16;
  static constexpr auto kGegluForward = tfbert_bias_geglu_forward_f16;
  static constexpr auto kGegluBackward = tfbert_bias_geglu_backward_f16;
};

template <>
struct Launch<Eigen::bfloat16> {
  using Bits = unsigned short;
  static constexpr auto kGeluForward = tfbert_bias_gelu_forward_bf16;
  static constexpr auto kGeluBackward = tfbert_bias_gelu_backward_bf16;
  static constexpr auto kGegluForward = tfbert_bias_geglu_forward_bf16;
  static constexpr auto kGegluBackward = tfbert_bias_geglu_backward_bf16;
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
      FusedBiasGeluGradOp<DEVICE, T, true>);

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
