// Kernels of TfBert>FusedBiasSplitHeads and its gradient (ops in cc/ops/split_heads_ops.cc): on
// the CPU the [B, S] rows split over the intra-op thread pool, each row's 3n runs of H
// elements copied (with the bias added, or summed into dbias) by a vectorised loop; under
// GOOGLE_CUDA the GPU registrations, which call cuda/split_heads.cu through
// cuda/split_heads_launch.h. Legend: B batch, S sequence, n heads, H head size, D = n * H.

#include "kernel_common.h"  // first: it sets Eigen's device switches

#if GOOGLE_CUDA
#include "split_heads_launch.h"
#endif

namespace tfbert {

#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
using GPUDevice = Eigen::GpuDevice;
#endif

namespace {

using cpu_math::Load;
using cpu_math::Store;

struct SplitDims {
  int64_t batch, seq, heads, head_size;
  int64_t width() const { return heads * head_size; }  // D
  int64_t cols() const { return 3 * width(); }         // x's last dimension
  // Offset of row (b, s)'s head j in a [B, n, S, H] part.
  int64_t PartOffset(int64_t row, int64_t head) const {
    const int64_t b = row / seq, s = row % seq;
    return ((b * heads + head) * seq + s) * head_size;
  }
};

// out = x + bias over one run of n elements (float32, rounded once).
template <typename T>
TFBERT_CPU_CLONES void AddBiasRun(const T* __restrict x, const float* __restrict bias, int64_t n,
                                  T* __restrict out) {
  for (int64_t h = 0; h < n; ++h) Store(out, h, Load(x, h) + bias[h]);
}

// dx = d over one run of n elements, and sums += d.
template <typename T>
TFBERT_CPU_CLONES void CopyAndSumRun(const T* __restrict d, int64_t n, T* __restrict dx,
                                     float* __restrict sums) {
  for (int64_t h = 0; h < n; ++h) {
    dx[h] = d[h];
    sums[h] += Load(d, h);
  }
}

template <typename Device, typename T>
struct SplitHeadsFunctors;

template <typename T>
struct SplitHeadsFunctors<CPUDevice, T> {
  static Status Forward(OpKernelContext* context, const T* x, const T* bias,
                        const SplitDims& dims, T* const parts[3]) {
    std::vector<float> b(dims.cols());
    for (int64_t j = 0; j < dims.cols(); ++j) b[j] = static_cast<float>(bias[j]);
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(dims.batch * dims.seq, /*cost_per_unit=*/3 * dims.cols(),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t row = begin; row < end; ++row) {
                             for (int p = 0; p < 3; ++p) {
                               for (int64_t j = 0; j < dims.heads; ++j) {
                                 const int64_t col = p * dims.width() + j * dims.head_size;
                                 AddBiasRun(x + row * dims.cols() + col, b.data() + col,
                                            dims.head_size, parts[p] + dims.PartOffset(row, j));
                               }
                             }
                           }
                         });
    return ::tensorflow::OkStatus();
  }

  static Status Backward(OpKernelContext* context, const T* const dparts[3],
                         const SplitDims& dims, T* dx, T* dbias) {
    const std::vector<float> sums = SumOverRowBlocks(
        context, dims.batch * dims.seq, dims.cols(), /*cost_per_row=*/3 * dims.cols(),
        [&](int64_t begin, int64_t end, float* partial) {
          for (int64_t row = begin; row < end; ++row) {
            for (int p = 0; p < 3; ++p) {
              for (int64_t j = 0; j < dims.heads; ++j) {
                const int64_t col = p * dims.width() + j * dims.head_size;
                CopyAndSumRun(dparts[p] + dims.PartOffset(row, j), dims.head_size,
                              dx + row * dims.cols() + col, partial + col);
              }
            }
          }
        });
    for (int64_t j = 0; j < dims.cols(); ++j) dbias[j] = static_cast<T>(sums[j]);
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
#define TFBERT_SPLIT_HEADS_GPU_FUNCTORS(T, SUFFIX)                                            \
  template <>                                                                                \
  struct SplitHeadsFunctors<GPUDevice, T> {                                                  \
    static Status Forward(OpKernelContext* context, const T* x, const T* bias,               \
                          const SplitDims& dims, T* const parts[3]) {                        \
      return CudaLaunchStatus(                                                               \
          tfbert_bias_split_heads_forward_##SUFFIX(                                          \
              RawBits(x), RawBits(bias), dims.batch, dims.seq,                               \
              static_cast<int>(dims.heads), static_cast<int>(dims.head_size),                \
              RawBits(parts[0]), RawBits(parts[1]), RawBits(parts[2]),                       \
              context->eigen_device<GPUDevice>().stream()),                                  \
          "tfbert_bias_split_heads_forward_" #SUFFIX);                                       \
    }                                                                                        \
    static Status Backward(OpKernelContext* context, const T* const dparts[3],               \
                           const SplitDims& dims, T* dx, T* dbias) {                         \
      Tensor workspace;                                                                      \
      TF_RETURN_IF_ERROR(context->allocate_temp(                                             \
          ::tensorflow::DT_FLOAT,                                                            \
          TensorShape({tfbert_split_heads_grad_workspace_floats(dims.batch * dims.seq,       \
                                                                dims.cols())}),              \
          &workspace));                                                                      \
      return CudaLaunchStatus(                                                               \
          tfbert_bias_split_heads_backward_##SUFFIX(                                         \
              RawBits(dparts[0]), RawBits(dparts[1]), RawBits(dparts[2]), dims.batch,        \
              dims.seq, static_cast<int>(dims.heads), static_cast<int>(dims.head_size),      \
              RawBits(dx), RawBits(dbias), workspace.flat<float>().data(),                   \
              context->eigen_device<GPUDevice>().stream()),                                  \
          "tfbert_bias_split_heads_backward_" #SUFFIX);                                      \
    }                                                                                        \
  };
TFBERT_SPLIT_HEADS_GPU_FUNCTORS(float, f32)
TFBERT_SPLIT_HEADS_GPU_FUNCTORS(Eigen::half, f16)
TFBERT_SPLIT_HEADS_GPU_FUNCTORS(Eigen::bfloat16, bf16)
#undef TFBERT_SPLIT_HEADS_GPU_FUNCTORS
#endif  // GOOGLE_CUDA

}  // namespace

template <typename Device, typename T>
class FusedBiasSplitHeadsOp : public OpKernel {
 public:
  explicit FusedBiasSplitHeadsOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("heads", &heads_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& bias = context->input(1);
    OP_REQUIRES(context, x.dims() == 3 && x.dim_size(2) % (3 * heads_) == 0,
                errors::InvalidArgument("FusedBiasSplitHeads: x must be [B, S, 3 * heads * "
                                        "head_size] with heads = ", heads_, ", got shape ",
                                        x.shape().DebugString()));
    OP_REQUIRES(context, bias.dims() == 1 && bias.dim_size(0) == x.dim_size(2),
                errors::InvalidArgument("FusedBiasSplitHeads: bias must be [", x.dim_size(2),
                                        "], got shape ", bias.shape().DebugString()));
    const SplitDims dims{x.dim_size(0), x.dim_size(1), heads_, x.dim_size(2) / (3 * heads_)};
    const TensorShape part_shape({dims.batch, dims.heads, dims.seq, dims.head_size});
    T* parts[3];
    for (int p = 0; p < 3; ++p) {
      Tensor* out = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(p, part_shape, &out));
      parts[p] = out->flat<T>().data();
    }
    if (x.NumElements() == 0) return;
    OP_REQUIRES_OK(context, SplitHeadsFunctors<Device, T>::Forward(
                                context, x.flat<T>().data(), bias.flat<T>().data(), dims, parts));
  }

 private:
  int64_t heads_;
};

template <typename Device, typename T>
class FusedBiasSplitHeadsGradOp : public OpKernel {
 public:
  explicit FusedBiasSplitHeadsGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& dquery = context->input(0);
    OP_REQUIRES(context,
                dquery.dims() == 4 && context->input(1).shape() == dquery.shape() &&
                    context->input(2).shape() == dquery.shape(),
                errors::InvalidArgument("FusedBiasSplitHeadsGrad: dquery, dkey and dvalue must "
                                        "be [B, n, S, H] of one shape, got ",
                                        dquery.shape().DebugString(), ", ",
                                        context->input(1).shape().DebugString(), " and ",
                                        context->input(2).shape().DebugString()));
    const SplitDims dims{dquery.dim_size(0), dquery.dim_size(2), dquery.dim_size(1),
                         dquery.dim_size(3)};
    Tensor *dx = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({dims.batch, dims.seq, dims.cols()}), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({dims.cols()}), &dbias));
    // With no rows the functor still runs: dbias is zeros, the empty sums.
    if (dims.cols() == 0) return;
    const T* dparts[3] = {dquery.flat<T>().data(), context->input(1).flat<T>().data(),
                          context->input(2).flat<T>().data()};
    OP_REQUIRES_OK(context, SplitHeadsFunctors<Device, T>::Backward(
                                context, dparts, dims, dx->flat<T>().data(),
                                dbias->flat<T>().data()));
  }
};

#define TFBERT_REGISTER(DEVICE_TYPE, DEVICE, T)                                                \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("TfBert>FusedBiasSplitHeads").Device(DEVICE_TYPE).TypeConstraint<T>("T"),           \
      FusedBiasSplitHeadsOp<DEVICE, T>);                                                       \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("TfBert>FusedBiasSplitHeadsGrad").Device(DEVICE_TYPE).TypeConstraint<T>("T"),       \
      FusedBiasSplitHeadsGradOp<DEVICE, T>);
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
