// Kernels of TfBert>FusedLambShardMoments and TfBert>FusedLambShardApply
// (cc/ops/lamb_shard_ops.cc): the input validation, the CPU functors and, in a WITH_CUDA=1
// build, the GPU registrations that call the CUDA kernels of cuda/lamb_shard.cu through the C
// ABI in cuda/lamb_shard_launch.h. The scalar inputs and the resource-variable handling
// (copy-on-write) are shared with TfBert>FusedLambUpdate, in lamb_variables.h.
//
// Legend: n = elements of the shard; S = segments (see lamb_shard.h).
//
// CPU: the shard is cut into chunks of 16K elements, and each chunk into its pieces, one per
// segment it meets. Chunks go to TensorFlow's intra-op thread pool; the moments op writes each
// piece's float64 partial sums to slot chunk + segment (unique: each next piece moves to the next
// chunk or segment or both), and a segment's sums add its pieces' partials in chunk order. The
// partition is fixed by n and the segments, not by the thread count, so the sums are
// bit-identical from run to run and from machine to machine (the GPU uses the same scheme with
// 4096-element tiles).

#include "kernel_common.h"  // first: it sets Eigen's device switches

#include "lamb_shard.h"
#include "lamb_variables.h"

#include <cmath>

#include "tensorflow/core/platform/mutex.h"
#include "tensorflow/core/platform/strcat.h"

#if GOOGLE_CUDA
#include "lamb_shard_launch.h"
#endif

namespace tfbert {
namespace functor {

namespace {

// 16K elements per chunk, as the per-tensor LAMB kernel: large enough to amortise a task, small
// enough that a BERT-large matrix (1M elements) spreads over every core.
constexpr int64_t kChunkElements = 1 << 14;

// Rough cycles per element (a division, a square root, four reads and two writes), for sharding.
constexpr int64_t kCostPerElement = 30;

struct CpuStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, epsilon, weight_decay;
  float bias_correction1, bias_correction2;

  explicit CpuStep(const LambShardHyperparams& hp)
      : beta1(hp.beta1),
        one_minus_beta1(1.0f - hp.beta1),
        beta2(hp.beta2),
        one_minus_beta2(1.0f - hp.beta2),
        epsilon(hp.epsilon),
        weight_decay(hp.weight_decay),
        bias_correction1(hp.bias_correction1),
        bias_correction2(hp.bias_correction2) {}
};

// m and v in place, as tfa writes them: beta * m + (g * (1 - beta)).
TFBERT_INLINE void Moments(const CpuStep& h, float g, float* m, float* v) {
  *m = *m * h.beta1 + g * h.one_minus_beta1;
  *v = *v * h.beta2 + (g * g) * h.one_minus_beta2;
}

// u in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * param). The one function of both
// ops (compiled without FMA contraction, TFBERT_CPU_CLONES), so the u whose norm the moments op
// sums is bit for bit the u that the apply op applies.
TFBERT_INLINE float Direction(const CpuStep& h, bool decay, float m, float v, float param) {
  const float m_hat = m / h.bias_correction1;
  const float v_hat = v / h.bias_correction2;
  float u = m_hat / (std::sqrt(v_hat) + h.epsilon);
  if (decay) u += h.weight_decay * param;
  return u;
}

// One piece of the moments op: m and v in place; partial[0], partial[1] = the sums of param^2
// and u^2 (float64: a segment may hold millions of elements).
TFBERT_CPU_CLONES void MomentsPiece(const CpuStep& h, bool decay, const float* __restrict grad,
                                    const float* __restrict param, int64_t count,
                                    float* __restrict m, float* __restrict v,
                                    double* __restrict partial) {
  double param_sq = 0.0, update_sq = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    float m_i = m[i], v_i = v[i];
    Moments(h, grad[i], &m_i, &v_i);
    m[i] = m_i;
    v[i] = v_i;
    const float w = param[i];
    const float u = Direction(h, decay, m_i, v_i, w);
    param_sq += static_cast<double>(w) * w;
    update_sq += static_cast<double>(u) * u;
  }
  partial[0] = param_sq;
  partial[1] = update_sq;
}

// One piece of the apply op: new_param = param - scale * u (tfa multiplies the scalars first).
TFBERT_CPU_CLONES void ApplyPiece(const CpuStep& h, bool decay, float scale,
                                  const float* __restrict param, const float* __restrict m,
                                  const float* __restrict v, int64_t count,
                                  float* __restrict new_param) {
  for (int64_t i = 0; i < count; ++i) {
    new_param[i] = param[i] - scale * Direction(h, decay, m[i], v[i], param[i]);
  }
}

// Calls fn(segment, begin, end) for each non-empty piece of `chunk`, in order.
template <typename Fn>
void ForEachPiece(const ShardSegments& segments, int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t chunk_begin = chunk * kChunkElements;
  const int64_t chunk_end = std::min(n, chunk_begin + kChunkElements);
  const int64_t* ends = segments.ends;
  // The segment of element chunk_begin: the first whose end is past it.
  int64_t s = std::upper_bound(ends, ends + segments.num_segments, chunk_begin) - ends;
  for (; s < segments.num_segments && segments.begin(s) < chunk_end; ++s) {
    const int64_t begin = std::max(segments.begin(s), chunk_begin);
    const int64_t end = std::min(ends[s], chunk_end);
    if (begin < end) fn(s, begin, end);
  }
}

}  // namespace

template <>
struct FusedLambShardMoments<CPUDevice> {
  Status operator()(OpKernelContext* context, const ShardSegments& segments,
                    const LambShardHyperparams& hp, const float* grad, const float* param,
                    int64_t n, float* m, float* v, float* sums) {
    const CpuStep step(hp);
    const int64_t num_segments = segments.num_segments;
    const int64_t chunks = (n + kChunkElements - 1) / kChunkElements;
    std::vector<double> partials(2 * (chunks + num_segments), 0.0);
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(
        chunks, kChunkElements * kCostPerElement, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t c = chunk_begin; c < chunk_end; ++c) {
            ForEachPiece(segments, n, c, [&](int64_t s, int64_t begin, int64_t end) {
              if (!segments.active[s]) return;
              MomentsPiece(step, segments.apply_weight_decay[s], grad + begin, param + begin,
                           end - begin, m + begin, v + begin, &partials[2 * (c + s)]);
            });
          }
        });
    for (int64_t s = 0; s < num_segments; ++s) {
      double param_sq = 0.0, update_sq = 0.0;
      const int64_t begin = segments.begin(s), end = segments.ends[s];
      if (segments.active[s] && begin < end) {
        for (int64_t c = begin / kChunkElements; c <= (end - 1) / kChunkElements; ++c) {
          param_sq += partials[2 * (c + s)];
          update_sq += partials[2 * (c + s) + 1];
        }
      }
      sums[2 * s] = static_cast<float>(param_sq);
      sums[2 * s + 1] = static_cast<float>(update_sq);
    }
    return ::tensorflow::OkStatus();
  }
};

template <>
struct FusedLambShardApply<CPUDevice> {
  Status operator()(OpKernelContext* context, const ShardSegments& segments,
                    const LambShardHyperparams& hp, const float* param, const float* m,
                    const float* v, const float* scale, int64_t n, float* new_param) {
    const CpuStep step(hp);
    const int64_t chunks = (n + kChunkElements - 1) / kChunkElements;
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(
        chunks, kChunkElements * kCostPerElement, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t c = chunk_begin; c < chunk_end; ++c) {
            ForEachPiece(segments, n, c, [&](int64_t s, int64_t begin, int64_t end) {
              if (segments.active[s]) {
                ApplyPiece(step, segments.apply_weight_decay[s], scale[s], param + begin,
                           m + begin, v + begin, end - begin, new_param + begin);
              } else {
                std::memcpy(new_param + begin, param + begin, (end - begin) * sizeof(float));
              }
            });
          }
        });
    return ::tensorflow::OkStatus();
  }
};

#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

namespace {

const long long* DeviceEnds(const ShardSegments& segments) {
  return reinterpret_cast<const long long*>(segments.device_ends);
}

}  // namespace

template <>
struct FusedLambShardMoments<GPUDevice> {
  Status operator()(OpKernelContext* context, const ShardSegments& segments,
                    const LambShardHyperparams& hp, const float* grad, const float* param,
                    int64_t n, float* m, float* v, float* sums) {
    Tensor workspace;
    TF_RETURN_IF_ERROR(context->allocate_temp(
        ::tensorflow::DT_DOUBLE,
        TensorShape({tfbert_lamb_shard_workspace_doubles(n, segments.num_segments)}),
        &workspace));
    return CudaStatus(
        tfbert_lamb_shard_moments_f32(
            m, v, grad, param, n, DeviceEnds(segments), segments.device_flags,
            segments.num_segments, hp.beta1, hp.beta2, hp.epsilon, hp.weight_decay,
            hp.bias_correction1, hp.bias_correction2, workspace.flat<double>().data(), sums,
            context->eigen_device<GPUDevice>().stream()),
        "FusedLambShardMoments");
  }
};

template <>
struct FusedLambShardApply<GPUDevice> {
  Status operator()(OpKernelContext* context, const ShardSegments& segments,
                    const LambShardHyperparams& hp, const float* param, const float* m,
                    const float* v, const float* scale, int64_t n, float* new_param) {
    return CudaStatus(
        tfbert_lamb_shard_apply_f32(param, m, v, n, DeviceEnds(segments), segments.device_flags,
                                    segments.num_segments, scale, hp.beta1, hp.beta2,
                                    hp.epsilon, hp.weight_decay, hp.bias_correction1,
                                    hp.bias_correction2, new_param,
                                    context->eigen_device<GPUDevice>().stream()),
        "FusedLambShardApply");
  }
};
#endif  // GOOGLE_CUDA

}  // namespace functor

namespace {

// --- The segment table on the device. -------------------------------------------------------
//
// The [S] segment inputs (segment_ends, apply_weight_decay, active) live in host memory (the
// GPU kernels' HostMemory), because the kernel validates them on the host before anything is
// enqueued: a bad segmentation is an InvalidArgument, not an out-of-bounds access on the GPU.
// The CUDA kernels then need them on the device. A training run passes the same segments every
// step, so the GPU op keeps its device copy and uploads again only when the contents change
// (once per run, instead of a host-to-device copy per step that may wait for the stream).

template <typename Device>
class SegmentTable {
 public:
  // The CPU functors read the host arrays.
  Status Prepare(OpKernelContext*, functor::ShardSegments*) { return ::tensorflow::OkStatus(); }
};

#if GOOGLE_CUDA
template <>
class SegmentTable<functor::GPUDevice> {
 public:
  // Points segments->device_ends and ->device_flags at a device copy of the table, valid for
  // the work this call enqueues on the context's stream.
  Status Prepare(OpKernelContext* context, functor::ShardSegments* segments) {
    const int64_t num_segments = segments->num_segments;
    if (num_segments == 0) return ::tensorflow::OkStatus();  // nothing is launched
    // Packed: int64 ends [S], then uint8 flags [S].
    const int64_t flags_offset = num_segments * sizeof(int64_t);
    std::vector<uint8_t> packed(flags_offset + num_segments);
    std::memcpy(packed.data(), segments->ends, flags_offset);
    for (int64_t s = 0; s < num_segments; ++s) {
      packed[flags_offset + s] = (segments->active[s] ? TFBERT_LAMB_SHARD_ACTIVE : 0) |
                                 (segments->apply_weight_decay[s] ? TFBERT_LAMB_SHARD_DECAY : 0);
    }
    Tensor device;
    {
      ::tensorflow::mutex_lock lock(mu_);
      if (packed != packed_) {
        // A new buffer rather than overwriting the old one, which kernels still queued on the
        // stream may read; the old one is freed in stream order when its last user lets go.
        TF_RETURN_IF_ERROR(context->allocate_temp(
            ::tensorflow::DT_UINT8, TensorShape({static_cast<int64_t>(packed.size())}),
            &device));
        // From pageable memory (the vector): staged before the call returns.
        TF_RETURN_IF_ERROR(CudaStatus(
            tfbert_lamb_shard_upload(device.flat<uint8_t>().data(), packed.data(),
                                     static_cast<long long>(packed.size()),
                                     context->eigen_device<functor::GPUDevice>().stream()),
            "FusedLambShard's segment table upload"));
        device_ = device;
        packed_ = std::move(packed);
      }
      device = device_;  // this call's reference keeps the buffer alive while it enqueues
    }
    const uint8_t* base = device.flat<uint8_t>().data();
    segments->device_ends = reinterpret_cast<const int64_t*>(base);  // the allocator aligns
    segments->device_flags = base + flags_offset;
    return ::tensorflow::OkStatus();
  }

 private:
  ::tensorflow::mutex mu_;
  std::vector<uint8_t> packed_ TF_GUARDED_BY(mu_);  // the host image of device_
  Tensor device_ TF_GUARDED_BY(mu_);
};
#endif  // GOOGLE_CUDA

// --- Inputs. --------------------------------------------------------------------------------

// The float32 vector of the resource variable at `input`. With for_update, made ready to be
// written in place (copy-on-write). REQUIRES: the variable's mutex is held.
template <typename Device>
Status ShardTensor(OpKernelContext* context, const char* op, int input, const char* name,
                   bool for_update, Tensor* out) {
  ::tensorflow::core::RefCountPtr<::tensorflow::Var> variable;
  TF_RETURN_IF_ERROR(LookupFloatVariable(context, op, input, name, &variable));
  const Tensor& tensor = *variable->tensor();
  if (!::tensorflow::TensorShapeUtils::IsVector(tensor.shape())) {
    return errors::InvalidArgument(op, ": variable ", name,
                                   " must be a vector (float32 [n], the flat shard), got shape ",
                                   tensor.shape().DebugString());
  }
  return SharedTensor<Device>(context, op, variable.get(), for_update, out);
}

// The [S] inputs at segment_ends_input, + 1 (apply_weight_decay), + 2 (active), checked against
// each other and against the shard's n.
Status SegmentInputs(OpKernelContext* context, const char* op, int segment_ends_input, int64_t n,
                     functor::ShardSegments* segments) {
  const Tensor& ends = context->input(segment_ends_input);
  const Tensor& apply_weight_decay = context->input(segment_ends_input + 1);
  const Tensor& active = context->input(segment_ends_input + 2);
  if (!::tensorflow::TensorShapeUtils::IsVector(ends.shape())) {
    return errors::InvalidArgument(op, ": segment_ends must be a vector (int64 [S]), got shape ",
                                   ends.shape().DebugString());
  }
  const int64_t num_segments = ends.NumElements();
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"apply_weight_decay",
                                                                       &apply_weight_decay},
                                {"active", &active}}) {
    if (t->shape() != ends.shape()) {
      return errors::InvalidArgument(op, ": ", name, " must have segment_ends' shape ",
                                     ends.shape().DebugString(), " (one entry per segment), got ",
                                     t->shape().DebugString());
    }
  }
  const int64_t* e = ends.flat<int64_t>().data();
  if (num_segments == 0 && n != 0) {
    return errors::InvalidArgument(op, ": segment_ends is empty but the shard has n = ", n,
                                   " elements; the segments must cover it");
  }
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t begin = s == 0 ? 0 : e[s - 1];
    if (e[s] < begin) {
      return errors::InvalidArgument(
          op, ": segment_ends must be non-decreasing and start at >= 0 (segment s is "
          "[segment_ends[s-1], segment_ends[s])), got segment_ends[", s, "] = ", e[s],
          s == 0 ? std::string(" < 0") : ::tensorflow::strings::StrCat(" < segment_ends[",
                                                                       s - 1, "] = ", begin));
    }
  }
  if (num_segments > 0 && e[num_segments - 1] != n) {
    return errors::InvalidArgument(op, ": the last segment_ends entry must be n = ", n,
                                   " (the shard's size), got segment_ends[", num_segments - 1,
                                   "] = ", e[num_segments - 1]);
  }
  segments->ends = e;
  segments->apply_weight_decay = apply_weight_decay.flat<bool>().data();
  segments->active = active.flat<bool>().data();
  segments->num_segments = num_segments;
  return ::tensorflow::OkStatus();
}

Status SameShape(const char* op, const char* name, const Tensor& t, const char* like_name,
                 const Tensor& like) {
  if (t.shape() == like.shape()) return ::tensorflow::OkStatus();
  return errors::InvalidArgument(op, ": ", name, " must have ", like_name, "'s shape ",
                                 like.shape().DebugString(), ", got ", t.shape().DebugString());
}

}  // namespace

// --- The ops. -------------------------------------------------------------------------------

template <typename Device>
class FusedLambShardMomentsOp : public OpKernel {
 public:
  explicit FusedLambShardMomentsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    constexpr const char* kOp = "FusedLambShardMoments";
    functor::LambShardHyperparams hp;
    OP_REQUIRES_OK(context, HyperparamInputs(context, kOp, 7, &hp));

    // Exclusive locks on m and v, in address order. The helper's Device parameter only selects
    // the copy for sparse access, which sparse=false never makes, so the CPU instantiation
    // serves the GPU kernel too.
    auto locks = ::tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {0, 1});
    Tensor m, v;
    OP_REQUIRES_OK(context, ShardTensor<Device>(context, kOp, 0, "m", true, &m));
    OP_REQUIRES_OK(context, ShardTensor<Device>(context, kOp, 1, "v", true, &v));
    const Tensor& grad = context->input(2);
    const Tensor& param = context->input(3);
    OP_REQUIRES_OK(context, SameShape(kOp, "v", v, "m", m));
    OP_REQUIRES_OK(context, SameShape(kOp, "grad", grad, "m", m));
    OP_REQUIRES_OK(context, SameShape(kOp, "param", param, "m", m));
    const int64_t n = m.NumElements();

    functor::ShardSegments segments;
    OP_REQUIRES_OK(context, SegmentInputs(context, kOp, 4, n, &segments));
    Tensor* sums = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({segments.num_segments, 2}), &sums));
    if (segments.num_segments == 0) return;  // an empty shard
    OP_REQUIRES_OK(context, table_.Prepare(context, &segments));
    OP_REQUIRES_OK(context, functor::FusedLambShardMoments<Device>()(
                                context, segments, hp, grad.flat<float>().data(),
                                param.flat<float>().data(), n, m.flat<float>().data(),
                                v.flat<float>().data(), sums->flat<float>().data()));
  }

 private:
  SegmentTable<Device> table_;
};

template <typename Device>
class FusedLambShardApplyOp : public OpKernel {
 public:
  explicit FusedLambShardApplyOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    constexpr const char* kOp = "FusedLambShardApply";
    functor::LambShardHyperparams hp;
    OP_REQUIRES_OK(context, HyperparamInputs(context, kOp, 7, &hp));

    // Exclusive although m and v are only read: a variable in copy-on-read mode is written in
    // place under a shared lock (sparse updates), which a shared lock here would not keep out.
    auto locks = ::tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {1, 2});
    Tensor m, v;
    OP_REQUIRES_OK(context, ShardTensor<Device>(context, kOp, 1, "m", false, &m));
    OP_REQUIRES_OK(context, ShardTensor<Device>(context, kOp, 2, "v", false, &v));
    const Tensor& param = context->input(0);
    OP_REQUIRES_OK(context, SameShape(kOp, "param", param, "m", m));
    OP_REQUIRES_OK(context, SameShape(kOp, "v", v, "m", m));
    const int64_t n = m.NumElements();

    functor::ShardSegments segments;
    OP_REQUIRES_OK(context, SegmentInputs(context, kOp, 3, n, &segments));
    const Tensor& scale = context->input(6);
    OP_REQUIRES(context, scale.shape() == context->input(3).shape(),
                errors::InvalidArgument(kOp, ": scale must have segment_ends' shape ",
                                        context->input(3).shape().DebugString(),
                                        " (one entry per segment), got ",
                                        scale.shape().DebugString()));
    Tensor* new_param = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, param.shape(), &new_param));
    if (n == 0) return;
    OP_REQUIRES_OK(context, table_.Prepare(context, &segments));
    OP_REQUIRES_OK(context, functor::FusedLambShardApply<Device>()(
                                context, segments, hp, param.flat<float>().data(),
                                m.flat<float>().data(), v.flat<float>().data(),
                                scale.flat<float>().data(), n,
                                new_param->flat<float>().data()));
  }

 private:
  SegmentTable<Device> table_;
};

REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambShardMoments").Device(DEVICE_CPU),
                        FusedLambShardMomentsOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambShardApply").Device(DEVICE_CPU),
                        FusedLambShardApplyOp<CPUDevice>);

#if GOOGLE_CUDA
// Scalars and the segment table in host memory (see SegmentTable); scale, a per-step result of
// the all-reduced norms, stays on the device, where the kernels read it.
REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambShardMoments")
                            .Device(::tensorflow::DEVICE_GPU)
                            .HostMemory("segment_ends")
                            .HostMemory("apply_weight_decay")
                            .HostMemory("active")
                            .HostMemory("beta1")
                            .HostMemory("beta2")
                            .HostMemory("epsilon")
                            .HostMemory("weight_decay")
                            .HostMemory("step"),
                        FusedLambShardMomentsOp<functor::GPUDevice>);
REGISTER_KERNEL_BUILDER(Name("TfBert>FusedLambShardApply")
                            .Device(::tensorflow::DEVICE_GPU)
                            .HostMemory("segment_ends")
                            .HostMemory("apply_weight_decay")
                            .HostMemory("active")
                            .HostMemory("beta1")
                            .HostMemory("beta2")
                            .HostMemory("epsilon")
                            .HostMemory("weight_decay")
                            .HostMemory("step"),
                        FusedLambShardApplyOp<functor::GPUDevice>);
#endif  // GOOGLE_CUDA

}  // namespace tfbert
