// What every tfbert kernel file (cc/kernels/*_kernels.cc) starts with: Eigen's device switches,
// TensorFlow's kernel headers and the names the kernels use. Include it first.

#ifndef TFBERT_CC_KERNELS_KERNEL_COMMON_H_
#define TFBERT_CC_KERNELS_KERNEL_COMMON_H_

#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

#if GOOGLE_CUDA
#include <cuda_runtime.h>
#endif

namespace tfbert {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

using CPUDevice = Eigen::ThreadPoolDevice;

// The CPU kernels' deterministic column sums over rows (dbias, dgamma, dbeta): the rows are cut
// into a fixed number of blocks, independent of the number of threads, and the blocks' partial
// sums are added in block order, so the result is bit-identical from run to run and from machine
// to machine. 128 blocks keep a large host busy while the partials stay small (128 * width).
constexpr int64_t kMaxSumRowBlocks = 128;

// Runs block_fn(row_begin, row_end, partial) over that partition of `rows` on the intra-op thread
// pool, partial being the block's float32 [width] accumulator (zeros on entry), and returns the
// partials summed in block order (zeros if no rows). A wide row (a vocabulary) asks for fewer
// blocks: the partials and their final sum grow with max_blocks * width.
template <typename BlockFn>
std::vector<float> SumOverRowBlocks(OpKernelContext* context, int64_t rows, int64_t width,
                                    int64_t cost_per_row, const BlockFn& block_fn,
                                    int64_t max_blocks = kMaxSumRowBlocks) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, max_blocks));
  std::vector<float> partials(blocks * width, 0.0f);  // [blocks, width]
  const int64_t cost_per_block = (rows / blocks + 1) * cost_per_row;
  workers->ParallelFor(blocks, cost_per_block, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      block_fn(b * rows / blocks, (b + 1) * rows / blocks, partials.data() + b * width);
    }
  });
  // The second reduction, in block order: blocks * width additions, small next to the rows.
  for (int64_t b = 1; b < blocks; ++b) {
    const float* partial = partials.data() + b * width;
    for (int64_t j = 0; j < width; ++j) partials[j] += partial[j];
  }
  partials.resize(width);
  return partials;
}

// ---------------------------------------------------------------------------------------------
// Vectorisable float32 math for the CPU kernels' hot loops.
//
// A portable build of this library targets baseline x86-64 (SSE2), TensorFlow's own kernels
// AVX; and Eigen's exp/erfc (libm's, lane by lane) are slow there: with Eigen expressions alone a
// fused element-wise op lost to TensorFlow's composite of the same math despite moving half the
// memory. So the hot loops are plain scalar C++ over rows that GCC vectorises (no libm calls, no
// branches, hence Select), each a function marked TFBERT_CPU_CLONES: GCC compiles it for
// AVX-512, AVX2 and the build's baseline, and the loader picks the best one the CPU has, so one
// binary is fast and portable. Contraction into FMA is off in every clone, so all of them do the
// same IEEE operations per element and the results are bit-identical on every host. Other
// compilers and architectures get the baseline function.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFBERT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"), optimize("fp-contract=off")))
#else
#define TFBERT_CPU_CLONES
#endif
// For the helpers called in those loops: inlined, so they are compiled for each clone's ISA.
#define TFBERT_INLINE inline __attribute__((always_inline))

namespace cpu_math {

TFBERT_INLINE uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

TFBERT_INLINE float FloatFromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// cond ? a : b with bit masks: GCC keeps a ?: whose condition compares floats as a branch (the
// comparison may trap under -ftrapping-math), and a branch stops the loop's vectorisation.
TFBERT_INLINE uint32_t SelectBits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

TFBERT_INLINE float Select(bool cond, float a, float b) {
  return FloatFromBits(SelectBits(cond, FloatBits(a), FloatBits(b)));
}

// exp(x) for x <= 0 (a small positive x is fine too), NaN for NaN, and 0 where exp(x) is below
// the smallest normal float (x < -87.3). Eigen's float exp (Cephes' range reduction and degree-6
// polynomial, the same coefficients, ~1 ulp), but the rounding x / ln 2 -> m and the scaling by
// 2^m are done with float tricks instead of Eigen's pfloor and pldexp, which handle the whole
// float range and cost 3x the polynomial in an SSE2 build.
TFBERT_INLINE float ExpNonPositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: v + kRound - kRound rounds v to an integer
  const float m = (x * 1.44269504088896341f + kRound) - kRound;  // round(x / ln 2)
  // r = x - m ln 2, ln 2 in two parts so that m * 0.693359375 is exact.
  float r = m * -0.693359375f + x;
  r = m * 2.12194440e-4f + r;
  const float r2 = r * r;
  float p_even = r2 * 1.37449637986719608306884765625e-3f + 4.166965186595916748046875e-2f;
  const float p_odd = r2 * 8.36894474923610687255859375e-3f + 0.16666518151760101318359375f;
  p_even = r2 * p_even + 0.49999988079071044921875f;
  float y = r * p_odd + p_even;
  y = r2 * y + (r + 1.0f);  // exp(r), |r| <= ln(2) / 2
  // 2^m from its exponent bits, m clamped first so that the conversion is defined for any x.
  const float m_clamped = Select(m > -127.0f, Select(m < 127.0f, m, 127.0f), -127.0f);
  y *= FloatFromBits(static_cast<uint32_t>(static_cast<int32_t>(m_clamped) + 127) << 23);
  return Select(m < -126.0f, 0.0f, y);
}

// Eigen::bfloat16 <-> float32 exactly as Eigen converts (bfloat16_to_float and
// float_to_bfloat16_rtne<false>), as bit operations that vectorise: Eigen's conversion functions
// branch, which keeps a loop that calls them scalar.
TFBERT_INLINE float BfloatToFloat(uint16_t bits) {
  return FloatFromBits(static_cast<uint32_t>(bits) << 16);  // the top half of a float32
}

TFBERT_INLINE uint16_t FloatToBfloat(float value) {
  const uint32_t bits = FloatBits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
  const uint32_t nan = 0x7fc0u | ((bits >> 16) & 0x8000u);  // a quiet NaN of the same sign
  return static_cast<uint16_t>(SelectBits(value != value, nan, rounded));
}

// Eigen::half <-> float32 exactly as Eigen converts without F16C (half_to_float and
// float_to_half_rtne; F16C gives the same but for NaN payloads), branch-free: every case is
// computed and selected.
TFBERT_INLINE float HalfToFloat(uint16_t h) {
  constexpr uint32_t kExponent = 0x7c00u << 13;  // the half exponent bits, shifted
  const uint32_t magnitude = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & kExponent;
  const uint32_t normal = magnitude + ((127u - 15u) << 23);  // rebiased exponent
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  // Zero and subnormals: one more exponent step, then subtract the implicit bit (exact).
  const uint32_t subnormal =
      FloatBits(FloatFromBits(normal + (1u << 23)) - FloatFromBits(113u << 23));
  const uint32_t bits = SelectBits(exponent == kExponent, inf_nan,
                                   SelectBits(exponent == 0, subnormal, normal));
  return FloatFromBits(bits | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

TFBERT_INLINE uint16_t FloatToHalf(float value) {
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sign = FloatBits(value) & 0x80000000u;
  const uint32_t f = FloatBits(value) ^ sign;  // |value|
  const uint32_t inf_nan = SelectBits(f > (255u << 23), 0x7e00u, 0x7c00u);  // NaN -> quiet NaN
  // Subnormal halves and zero: the float addition rounds the mantissa into place.
  const uint32_t subnormal =
      FloatBits(FloatFromBits(f) + FloatFromBits(kDenormMagic)) - kDenormMagic;
  // Normal halves: rebias the exponent and round the mantissa to nearest even.
  const uint32_t normal = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t h = SelectBits(f >= ((127u + 16u) << 23), inf_nan,
                                SelectBits(f < (113u << 23), subnormal, normal));
  return static_cast<uint16_t>((h & 0xffffu) | (sign >> 16));
}

// Element j of a float / half / bfloat16 array as float32, and the store back (rounding to
// nearest even), for the CPU kernels' loops, which compute in float32 whatever T is.
TFBERT_INLINE float Load(const float* row, int64_t j) { return row[j]; }
TFBERT_INLINE float Load(const Eigen::half* row, int64_t j) {
  return HalfToFloat(reinterpret_cast<const uint16_t*>(row)[j]);
}
TFBERT_INLINE float Load(const Eigen::bfloat16* row, int64_t j) {
  return BfloatToFloat(reinterpret_cast<const uint16_t*>(row)[j]);
}

TFBERT_INLINE void Store(float* row, int64_t j, float value) { row[j] = value; }
TFBERT_INLINE void Store(Eigen::half* row, int64_t j, float value) {
  reinterpret_cast<uint16_t*>(row)[j] = FloatToHalf(value);
}
TFBERT_INLINE void Store(Eigen::bfloat16* row, int64_t j, float value) {
  reinterpret_cast<uint16_t*>(row)[j] = FloatToBfloat(value);
}

// A row's sums in the vectorised loops are kept in kSumLanes independent partial sums, element
// j in lane j % kSumLanes (a row's tail in lane 0), added in lane order at the end: that
// vectorises for every ISA without reassociating anything, so the result does not depend on
// which clone runs.
constexpr int kSumLanes = 16;

template <typename Real>  // float, or double for sums over millions of elements
TFBERT_INLINE Real SumOfLanes(const Real (&lanes)[kSumLanes]) {
  Real sum = lanes[0];
  for (int l = 1; l < kSumLanes; ++l) sum += lanes[l];
  return sum;
}

}  // namespace cpu_math

#if GOOGLE_CUDA
// The C ABIs of cuda/*_launch.h take float16 and bfloat16 buffers as their raw bits (unsigned
// short), which is what Eigen::half and Eigen::bfloat16 hold.
inline const float* RawBits(const float* p) { return p; }
inline float* RawBits(float* p) { return p; }
inline const unsigned short* RawBits(const Eigen::half* p) {
  return reinterpret_cast<const unsigned short*>(p);
}
inline unsigned short* RawBits(Eigen::half* p) { return reinterpret_cast<unsigned short*>(p); }
inline const unsigned short* RawBits(const Eigen::bfloat16* p) {
  return reinterpret_cast<const unsigned short*>(p);
}
inline unsigned short* RawBits(Eigen::bfloat16* p) {
  return reinterpret_cast<unsigned short*>(p);
}

// A launch function's cudaError_t as the op's Status.
inline Status CudaLaunchStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return ::tensorflow::OkStatus();
  return errors::Internal(what, " failed to launch: ", cudaGetErrorString(error));
}
#endif  // GOOGLE_CUDA

}  // namespace tfbert

#endif  // TFBERT_CC_KERNELS_KERNEL_COMMON_H_
