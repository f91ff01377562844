// Kernels of TfBert>FusedSoftmaxCrossEntropy and TfBert>FusedSoftmaxCrossEntropyGrad (ops in
// cc/ops/softmax_xent_ops.cc): the CPU functors, rows split over TensorFlow's intra-op thread
// pool, and under GOOGLE_CUDA the GPU registrations, which call the CUDA kernels through the C
// ABI of cuda/softmax_xent_launch.h.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include <cmath>
#include <limits>

#include "softmax_xent.h"

#if GOOGLE_CUDA
#include "softmax_xent_launch.h"
#endif

namespace tfbert {

#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
using GPUDevice = Eigen::GpuDevice;
#endif

namespace functor {
namespace {

using cpu_math::ExpNonPositive;
using cpu_math::kSumLanes;
using cpu_math::Load;
using cpu_math::Select;
using cpu_math::SelectBits;
using cpu_math::Store;
using cpu_math::SumOfLanes;

// The gradient's dbias: the rows in at most this many blocks (see SumOverRowBlocks). A vocabulary
// is wide, so the partials (blocks * cols floats) and their final sum are kept small.
constexpr int64_t kGradMaxRowBlocks = 32;

// ---- The row loops, vectorised (see TFBERT_CPU_CLONES in kernel_common.h) ----
//
// Each works on z = float32(logits) + bias, recomputed from the row instead of copied: the row
// of a 30k vocabulary stays in L2 between the passes, and the forward writes nothing of its size.

// max z over one row and its lowest index (*argmax; 0 when no element is a number). Each lane
// keeps its largest value and the first index where it saw it (strict >, so NaN never wins);
// the lanes are then combined: the largest value, and among equal values the lowest index.
template <typename T>
TFBERT_CPU_CLONES float MaxAndArgmax(const T* __restrict x, const float* __restrict bias,
                                     int64_t n, int32_t* argmax) {
  constexpr uint32_t kNone = 0xffffffffu;
  float best[kSumLanes];
  uint32_t index[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) {
    best[l] = -std::numeric_limits<float>::infinity();
    index[l] = kNone;
  }
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const float z = Load(x, k + l) + bias[k + l];
      const bool larger = z > best[l];
      best[l] = Select(larger, z, best[l]);
      index[l] = SelectBits(larger, static_cast<uint32_t>(k + l), index[l]);
    }
  }
  for (; k < n; ++k) {  // the tail in lane 0: its indices come after the lane's earlier ones
    const float z = Load(x, k) + bias[k];
    const bool larger = z > best[0];
    best[0] = Select(larger, z, best[0]);
    index[0] = SelectBits(larger, static_cast<uint32_t>(k), index[0]);
  }
  float row_max = best[0];
  for (int l = 1; l < kSumLanes; ++l) row_max = std::max(row_max, best[l]);
  uint32_t first = kNone;
  for (int l = 0; l < kSumLanes; ++l) {
    if (best[l] == row_max && index[l] < first) first = index[l];
  }
  *argmax = first == kNone ? 0 : static_cast<int32_t>(first);
  return row_max;
}

// sum_k exp(z_k - row_max), in lanes. Every exponent is <= 0.
template <typename T>
TFBERT_CPU_CLONES float SumExp(const T* __restrict x, const float* __restrict bias, int64_t n,
                               float row_max) {
  float lane_sum[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      lane_sum[l] += ExpNonPositive(Load(x, k + l) + bias[k + l] - row_max);
    }
  }
  for (; k < n; ++k) lane_sum[0] += ExpNonPositive(Load(x, k) + bias[k] - row_max);
  return SumOfLanes(lane_sum);
}

// One row of the gradient: g = dloss * (exp(z - log_sum_exp) - [k == label]), stored in T and
// added to the block's float32 column sums. z - log_sum_exp <= 0 up to rounding.
template <typename T>
TFBERT_CPU_CLONES void RowGrad(const T* __restrict x, const float* __restrict bias, int64_t n,
                               float log_sum_exp, float dloss, int64_t label, T* __restrict dx,
                               float* __restrict column_sums) {
  for (int64_t k = 0; k < n; ++k) {
    const float p = ExpNonPositive(Load(x, k) + bias[k] - log_sum_exp);
    const float g = dloss * (p - Select(k == label, 1.0f, 0.0f));
    Store(dx, k, g);
    column_sums[k] += g;
  }
}

}  // namespace

template <typename T>
struct SoftmaxXentForward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const T* logits, const float* bias,
                    const int32_t* labels, int64_t rows, int64_t cols, float* loss,
                    float* log_sum_exp, int32_t* predicted) {
    for (int64_t r = 0; r < rows; ++r) {
      if (labels[r] < 0 || labels[r] >= cols) {
        return errors::InvalidArgument("FusedSoftmaxCrossEntropy: labels[", r, "] = ",
                                       labels[r], " is not a class in [0, ", cols, ")");
      }
    }
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    // About 15 cycles per element: two passes, one of them an exp.
    workers->ParallelFor(rows, /*cost_per_unit=*/15 * cols, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* x = logits + r * cols;
        const float row_max = MaxAndArgmax(x, bias, cols, predicted + r);
        const float log_sum = std::log(SumExp(x, bias, cols, row_max));
        const float target = Load(x, labels[r]) + bias[labels[r]];
        loss[r] = log_sum - (target - row_max);
        log_sum_exp[r] = row_max + log_sum;
      }
    });
    return ::tensorflow::OkStatus();
  }
};

template <typename T>
struct SoftmaxXentBackward<CPUDevice, T> {
  Status operator()(OpKernelContext* context, const float* dloss, const T* logits,
                    const float* bias, const int32_t* labels, const float* log_sum_exp,
                    int64_t rows, int64_t cols, T* dlogits, float* dbias) {
    const std::vector<float> sums = SumOverRowBlocks(
        context, rows, cols, /*cost_per_row=*/12 * cols,
        [&](int64_t begin, int64_t end, float* partial) {
          for (int64_t r = begin; r < end; ++r) {
            RowGrad(logits + r * cols, bias, cols, log_sum_exp[r], dloss[r], labels[r],
                    dlogits + r * cols, partial);
          }
        },
        kGradMaxRowBlocks);
    std::copy(sums.begin(), sums.end(), dbias);
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA

#define TFBERT_SOFTMAX_XENT_GPU_FUNCTORS(T, SUFFIX)                                           \
  template <>                                                                                \
  struct SoftmaxXentForward<GPUDevice, T> {                                                  \
    Status operator()(OpKernelContext* context, const T* logits, const float* bias,          \
                      const int32_t* labels, int64_t rows, int64_t cols, float* loss,        \
                      float* log_sum_exp, int32_t* predicted) {                              \
      return CudaLaunchStatus(                                                               \
          tfbert_softmax_xent_forward_##SUFFIX(                                              \
              RawBits(logits), bias, labels, rows, static_cast<int>(cols), loss,             \
              log_sum_exp, predicted, context->eigen_device<GPUDevice>().stream()),          \
          "tfbert_softmax_xent_forward_" #SUFFIX);                                           \
    }                                                                                        \
  };                                                                                         \
  template <>                                                                                \
  struct SoftmaxXentBackward<GPUDevice, T> {                                                 \
    Status operator()(OpKernelContext* context, const float* dloss, const T* logits,         \
                      const float* bias, const int32_t* labels, const float* log_sum_exp,    \
                      int64_t rows, int64_t cols, T* dlogits, float* dbias) {                \
      Tensor workspace;                                                                      \
      TF_RETURN_IF_ERROR(context->allocate_temp(                                             \
          ::tensorflow::DT_FLOAT,                                                            \
          TensorShape({tfbert_softmax_xent_grad_workspace_floats(rows, cols)}), &workspace));\
      return CudaLaunchStatus(                                                               \
          tfbert_softmax_xent_backward_##SUFFIX(                                             \
              dloss, RawBits(logits), bias, labels, log_sum_exp, rows,                       \
              static_cast<int>(cols), RawBits(dlogits), dbias,                               \
              workspace.flat<float>().data(), context->eigen_device<GPUDevice>().stream()),  \
          "tfbert_softmax_xent_backward_" #SUFFIX);                                          \
    }                                                                                        \
  };

TFBERT_SOFTMAX_XENT_GPU_FUNCTORS(float, f32)
TFBERT_SOFTMAX_XENT_GPU_FUNCTORS(Eigen::half, f16)
TFBERT_SOFTMAX_XENT_GPU_FUNCTORS(Eigen::bfloat16, bf16)
#undef TFBERT_SOFTMAX_XENT_GPU_FUNCTORS

#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

// logits [rows, cols], bias [cols] and labels [rows] (inputs first, first + 1, first + 2).
Status ReadShapes(OpKernelContext* context, int first, int64_t* rows, int64_t* cols) {
  const Tensor& logits = context->input(first);
  const Tensor& bias = context->input(first + 1);
  const Tensor& labels = context->input(first + 2);
  if (logits.dims() != 2) {
    return errors::InvalidArgument("FusedSoftmaxCrossEntropy: logits must be [rows, cols], got "
                                   "shape ", logits.shape().DebugString());
  }
  *rows = logits.dim_size(0);
  *cols = logits.dim_size(1);
  if (bias.dims() != 1 || bias.dim_size(0) != *cols || labels.dims() != 1 ||
      labels.dim_size(0) != *rows) {
    return errors::InvalidArgument(
        "FusedSoftmaxCrossEntropy: for logits of shape ", logits.shape().DebugString(),
        " bias must be [", *cols, "] and labels [", *rows, "], got ",
        bias.shape().DebugString(), " and ", labels.shape().DebugString());
  }
  if (*cols > std::numeric_limits<int32_t>::max()) {
    return errors::InvalidArgument("FusedSoftmaxCrossEntropy: more than 2^31 classes");
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

template <typename Device, typename T>
class FusedSoftmaxCrossEntropyOp : public OpKernel {
 public:
  explicit FusedSoftmaxCrossEntropyOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, ReadShapes(context, 0, &rows, &cols));
    OP_REQUIRES(context, cols > 0 || rows == 0,
                errors::InvalidArgument("FusedSoftmaxCrossEntropy: no classes"));
    Tensor *loss = nullptr, *log_sum_exp = nullptr, *predicted = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({rows}), &loss));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({rows}), &log_sum_exp));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({rows}), &predicted));
    if (rows == 0) return;
    OP_REQUIRES_OK(context, functor::SoftmaxXentForward<Device, T>()(
                                context, context->input(0).flat<T>().data(),
                                context->input(1).flat<float>().data(),
                                context->input(2).flat<int32_t>().data(), rows, cols,
                                loss->flat<float>().data(), log_sum_exp->flat<float>().data(),
                                predicted->flat<int32_t>().data()));
  }
};

template <typename Device, typename T>
class FusedSoftmaxCrossEntropyGradOp : public OpKernel {
 public:
  explicit FusedSoftmaxCrossEntropyGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    int64_t rows = 0, cols = 0;
    OP_REQUIRES_OK(context, ReadShapes(context, 1, &rows, &cols));
    const Tensor& dloss = context->input(0);
    const Tensor& log_sum_exp = context->input(4);
    OP_REQUIRES(context,
                dloss.shape() == TensorShape({rows}) && log_sum_exp.shape() == TensorShape({rows}),
                errors::InvalidArgument("FusedSoftmaxCrossEntropyGrad: dloss and log_sum_exp "
                                        "must be [", rows, "], got ", dloss.shape().DebugString(),
                                        " and ", log_sum_exp.shape().DebugString()));
    Tensor *dlogits = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &dlogits));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({cols}), &dbias));
    if (cols == 0) return;
    // With no rows the functor still runs: dbias is cols zeros, the empty sums.
    OP_REQUIRES_OK(context, functor::SoftmaxXentBackward<Device, T>()(
                                context, dloss.flat<float>().data(),
                                context->input(1).flat<T>().data(),
                                context->input(2).flat<float>().data(),
                                context->input(3).flat<int32_t>().data(),
                                log_sum_exp.flat<float>().data(), rows, cols,
                                dlogits->flat<T>().data(), dbias->flat<float>().data()));
  }
};

#define TFBERT_REGISTER(DEVICE_TYPE, DEVICE, T)                                               \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("TfBert>FusedSoftmaxCrossEntropy").Device(DEVICE_TYPE).TypeConstraint<T>("T"),      \
      FusedSoftmaxCrossEntropyOp<DEVICE, T>);                                                 \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("TfBert>FusedSoftmaxCrossEntropyGrad").Device(DEVICE_TYPE).TypeConstraint<T>("T"),  \
      FusedSoftmaxCrossEntropyGradOp<DEVICE, T>);
TFBERT_REGISTER(DEVICE_CPU, CPUDevice, float)
TFBERT_REGISTER(DEVICE_CPU, CPUDevice, Eigen::half)
TFBERT_REGISTER(DEVICE_CPU, CPUDevice, Eigen::bfloat16)
#if GOOGLE_CUDA
TFBERT_REGISTER(DEVICE_GPU, GPUDevice, float)
TFBERT_REGISTER(DEVICE_GPU, GPUDevice, Eigen::half)
TFBERT_REGISTER(DEVICE_GPU, GPUDevice, Eigen::bfloat16)
#endif
#undef TFBERT_REGISTER

}  // namespace tfbert
