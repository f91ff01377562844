// Functors of LAMB over a ZeRO shard (ops in cc/ops/lamb_shard_ops.cc): one specialisation per
// device in lamb_shard_kernels.cc; the GPU ones call the CUDA kernels through
// cuda/lamb_shard_launch.h.
//
// Legend: n = elements of the shard; S = segments. m, v, grad, param, new_param: float32 [n];
// sums: float32 [S, 2]; scale: float32 [S]. Scalars and the segment table are host values.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_SHARD_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_SHARD_H_

#include <cstdint>

#include "lamb_variables.h"  // LambStepHyperparams
#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

// The step's scalars (bias corrections taken on the host). No learning rate: it is part of the
// apply op's per-segment scale.
using LambShardHyperparams = LambStepHyperparams;

// The segments, validated: ends non-decreasing, ends[S - 1] == n (S == 0 only when n == 0).
// Segment s is [ends[s - 1], ends[s]) (ends[-1] = 0). Host arrays of S elements.
struct ShardSegments {
  const int64_t* ends;
  const bool* apply_weight_decay;
  const bool* active;
  int64_t num_segments;
  // The GPU functors' device copies: ends (int64 [S]) and the flags (uint8 [S], the bits of
  // cuda/lamb_shard_launch.h). Null for the CPU functors.
  const int64_t* device_ends = nullptr;
  const uint8_t* device_flags = nullptr;

  int64_t begin(int64_t s) const { return s == 0 ? 0 : ends[s - 1]; }
};

template <typename Device>
struct FusedLambShardMoments {
  // m and v in place in active segments; sums[2 * s], sums[2 * s + 1] = the sums of param^2
  // and update^2 over segment s (0 if inactive or empty), accumulated in float64 over a
  // partition fixed by n and the segments alone: bit-identical from run to run. n >= 0.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context,
                                  const ShardSegments& segments, const LambShardHyperparams& hp,
                                  const float* grad, const float* param, int64_t n, float* m,
                                  float* v, float* sums);
};

template <typename Device>
struct FusedLambShardApply {
  // new_param = param - scale[s] * update in active segments (update computed exactly as
  // FusedLambShardMoments computes it), param in inactive ones. n >= 0. scale is on the
  // device (a GPU tensor for the GPU functor).
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context,
                                  const ShardSegments& segments, const LambShardHyperparams& hp,
                                  const float* param, const float* m, const float* v,
                                  const float* scale, int64_t n, float* new_param);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_SHARD_H_
