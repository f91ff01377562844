// CUDA kernels of LAMB over a ZeRO shard, behind the C ABI of lamb_shard_launch.h.
//
// Legend: n = elements of the shard; S = segments; m, v, grad, param, new_param: float32 [n].
//
// The moments half is two kernels on the caller's stream:
//   1. LambShardMomentsKernel: one block per 4096-element tile (grid-stride). For each piece of
//      the tile (its part of one segment) it updates m and v, computes the update direction u,
//      and writes the piece's float64 sums of param^2 and u^2 to workspace slot tile + segment;
//   2. LambShardSumsKernel: one block per segment adds its pieces' partials in tile order.
// The apply half is one kernel with the same tiling: new_param = param - scale[s] * u.
// No atomics, a partition fixed by n and the segments, and fixed reduction trees: the sums are
// bit-identical from run to run and from GPU to GPU. The arithmetic uses the _rn intrinsics so
// nvcc cannot contract it into FMAs differently in the moments and apply kernels: the u whose
// norm is taken is exactly the u that is applied (and equals the CPU kernel's, which is compiled
// without contraction).

#include "lamb_shard_launch.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr long long kTile = 4096;  // tfbert_lamb_shard_tiles
// Blocks beyond this many grid-stride over the tiles (the results do not depend on the grid).
constexpr long long kMaxBlocks = 1 << 16;

struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, epsilon, weight_decay;
  float bias_correction1, bias_correction2;
};

// m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g^2, as tfa writes them.
__device__ __forceinline__ void Moments(float g, const Hyper& h, float* m, float* v) {
  *m = __fadd_rn(__fmul_rn(*m, h.beta1), __fmul_rn(g, h.one_minus_beta1));
  *v = __fadd_rn(__fmul_rn(*v, h.beta2), __fmul_rn(__fmul_rn(g, g), h.one_minus_beta2));
}

// u from the updated moments, in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * param).
// The one function of both halves.
__device__ __forceinline__ float Direction(float m, float v, float param, bool decay,
                                           const Hyper& h) {
  const float m_hat = __fdiv_rn(m, h.bias_correction1);
  const float v_hat = __fdiv_rn(v, h.bias_correction2);
  float u = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), h.epsilon));
  if (decay) u = __fadd_rn(u, __fmul_rn(h.weight_decay, param));
  return u;
}

// The segment of element `position`: the first whose end is past it (ends non-decreasing).
__device__ __forceinline__ long long SegmentOf(const long long* __restrict__ ends,
                                               long long num_segments, long long position) {
  long long lo = 0, hi = num_segments;
  while (lo < hi) {
    const long long mid = lo + (hi - lo) / 2;
    if (ends[mid] <= position) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ __forceinline__ long long SegmentBegin(const long long* __restrict__ ends,
                                                  long long s) {
  return s == 0 ? 0 : ends[s - 1];
}

// Sums a and b over the block in a fixed order (warp shuffles, then the warps' sums in warp 0);
// the results are valid in thread 0. Every thread of the block must call it.
__device__ __forceinline__ void BlockSum2(double* a, double* b, double* shared /* [2 * kWarps] */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double x = *a, y = *b;
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset);
    y += __shfl_down_sync(0xffffffffu, y, offset);
  }
  if (lane == 0) {
    shared[warp] = x;
    shared[kWarps + warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? shared[lane] : 0.0;
    y = lane < kWarps ? shared[kWarps + lane] : 0.0;
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
      x += __shfl_down_sync(0xffffffffu, x, offset);
      y += __shfl_down_sync(0xffffffffu, y, offset);
    }
  }
  __syncthreads();  // shared is reused by the next call
  *a = x;
  *b = y;
}

__global__ void LambShardMomentsKernel(float* __restrict__ m, float* __restrict__ v,
                                       const float* __restrict__ grad,
                                       const float* __restrict__ param, long long n,
                                       const long long* __restrict__ ends,
                                       const unsigned char* __restrict__ flags,
                                       long long num_segments, Hyper h,
                                       double* __restrict__ partials) {
  __shared__ double shared[2 * kWarps];
  const long long tiles = (n + kTile - 1) / kTile;
  for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
    const long long tile_begin = t * kTile;
    const long long tile_end = min(n, tile_begin + kTile);
    // The loops' bounds and branches depend on the tile and segments only: block-uniform, so
    // every thread reaches BlockSum2's barriers.
    for (long long s = SegmentOf(ends, num_segments, tile_begin);
         s < num_segments && SegmentBegin(ends, s) < tile_end; ++s) {
      const long long begin = max(SegmentBegin(ends, s), tile_begin);
      const long long end = min(ends[s], tile_end);
      const unsigned char f = flags[s];
      if (!(f & TFBERT_LAMB_SHARD_ACTIVE) || begin >= end) continue;
      const bool decay = (f & TFBERT_LAMB_SHARD_DECAY) != 0;
      double param_sq = 0.0, update_sq = 0.0;
      for (long long i = begin + threadIdx.x; i < end; i += kThreads) {
        float m_i = m[i], v_i = v[i];
        Moments(grad[i], h, &m_i, &v_i);
        m[i] = m_i;
        v[i] = v_i;
        const float w = param[i];
        const float u = Direction(m_i, v_i, w, decay, h);
        // The float products are exact in float64, so a contraction changes nothing.
        param_sq += static_cast<double>(w) * w;
        update_sq += static_cast<double>(u) * u;
      }
      BlockSum2(&param_sq, &update_sq, shared);
      if (threadIdx.x == 0) {
        partials[2 * (t + s)] = param_sq;
        partials[2 * (t + s) + 1] = update_sq;
      }
    }
  }
}

// sums[s] = the partials of segment s's pieces (tiles first..last), added in a fixed tree; 0
// for an inactive or empty segment.
__global__ void LambShardSumsKernel(const double* __restrict__ partials,
                                    const long long* __restrict__ ends,
                                    const unsigned char* __restrict__ flags,
                                    long long num_segments, float* __restrict__ sums) {
  __shared__ double shared[2 * kWarps];
  for (long long s = blockIdx.x; s < num_segments; s += gridDim.x) {
    const long long begin = SegmentBegin(ends, s), end = ends[s];
    double param_sq = 0.0, update_sq = 0.0;
    if ((flags[s] & TFBERT_LAMB_SHARD_ACTIVE) && begin < end) {
      const long long first = begin / kTile, last = (end - 1) / kTile;
      for (long long t = first + threadIdx.x; t <= last; t += kThreads) {
        param_sq += partials[2 * (t + s)];
        update_sq += partials[2 * (t + s) + 1];
      }
    }
    BlockSum2(&param_sq, &update_sq, shared);
    if (threadIdx.x == 0) {
      sums[2 * s] = static_cast<float>(param_sq);
      sums[2 * s + 1] = static_cast<float>(update_sq);
    }
  }
}

__global__ void LambShardApplyKernel(const float* __restrict__ param,
                                     const float* __restrict__ m, const float* __restrict__ v,
                                     long long n, const long long* __restrict__ ends,
                                     const unsigned char* __restrict__ flags,
                                     long long num_segments, const float* __restrict__ scale,
                                     Hyper h, float* __restrict__ new_param) {
  const long long tiles = (n + kTile - 1) / kTile;
  for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
    const long long tile_begin = t * kTile;
    const long long tile_end = min(n, tile_begin + kTile);
    for (long long s = SegmentOf(ends, num_segments, tile_begin);
         s < num_segments && SegmentBegin(ends, s) < tile_end; ++s) {
      const long long begin = max(SegmentBegin(ends, s), tile_begin);
      const long long end = min(ends[s], tile_end);
      const unsigned char f = flags[s];
      if (!(f & TFBERT_LAMB_SHARD_ACTIVE)) {
        for (long long i = begin + threadIdx.x; i < end; i += kThreads) new_param[i] = param[i];
        continue;
      }
      const bool decay = (f & TFBERT_LAMB_SHARD_DECAY) != 0;
      const float segment_scale = scale[s];
      for (long long i = begin + threadIdx.x; i < end; i += kThreads) {
        const float w = param[i];
        new_param[i] = __fsub_rn(w, __fmul_rn(segment_scale, Direction(m[i], v[i], w, decay, h)));
      }
    }
  }
}

Hyper MakeHyper(float beta1, float beta2, float epsilon, float weight_decay,
                float bias_correction1, float bias_correction2) {
  Hyper h;
  h.beta1 = beta1;
  h.one_minus_beta1 = 1.0f - beta1;
  h.beta2 = beta2;
  h.one_minus_beta2 = 1.0f - beta2;
  h.epsilon = epsilon;
  h.weight_decay = weight_decay;
  h.bias_correction1 = bias_correction1;
  h.bias_correction2 = bias_correction2;
  return h;
}

int Blocks(long long work_items) {
  return static_cast<int>(work_items < kMaxBlocks ? work_items : kMaxBlocks);
}

}  // namespace

extern "C" cudaError_t tfbert_lamb_shard_moments_f32(
    float* m, float* v, const float* grad, const float* param, long long n,
    const long long* segment_ends, const unsigned char* segment_flags, long long num_segments,
    float beta1, float beta2, float epsilon, float weight_decay, float bias_correction1,
    float bias_correction2, double* workspace, float* sums, cudaStream_t stream) {
  if (num_segments <= 0) return cudaSuccess;  // then n == 0 too: nothing to write
  const Hyper h =
      MakeHyper(beta1, beta2, epsilon, weight_decay, bias_correction1, bias_correction2);
  const long long tiles = tfbert_lamb_shard_tiles(n);
  if (tiles > 0) {
    LambShardMomentsKernel<<<Blocks(tiles), kThreads, 0, stream>>>(
        m, v, grad, param, n, segment_ends, segment_flags, num_segments, h, workspace);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  // Also when n == 0: the (empty) segments' sums are written as 0.
  LambShardSumsKernel<<<Blocks(num_segments), kThreads, 0, stream>>>(
      workspace, segment_ends, segment_flags, num_segments, sums);
  return cudaGetLastError();
}

extern "C" cudaError_t tfbert_lamb_shard_apply_f32(
    const float* param, const float* m, const float* v, long long n,
    const long long* segment_ends, const unsigned char* segment_flags, long long num_segments,
    const float* scale, float beta1, float beta2, float epsilon, float weight_decay,
    float bias_correction1, float bias_correction2, float* new_param, cudaStream_t stream) {
  if (n <= 0 || num_segments <= 0) return cudaSuccess;
  const Hyper h =
      MakeHyper(beta1, beta2, epsilon, weight_decay, bias_correction1, bias_correction2);
  LambShardApplyKernel<<<Blocks(tfbert_lamb_shard_tiles(n)), kThreads, 0, stream>>>(
      param, m, v, n, segment_ends, segment_flags, num_segments, scale, h, new_param);
  return cudaGetLastError();
}

extern "C" cudaError_t tfbert_lamb_shard_upload(void* dst, const void* src, long long bytes,
                                                cudaStream_t stream) {
  if (bytes <= 0) return cudaSuccess;
  return cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream);
}
