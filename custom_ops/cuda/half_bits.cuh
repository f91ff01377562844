// The C ABIs pass float16 and bfloat16 buffers as unsigned short (the raw bits), so that no
// caller needs CUDA's half types; these views turn them back into __half / __nv_bfloat16.
// Also the conversions to and from float32 that the kernels share.

#ifndef TFBERT_CUDA_HALF_BITS_CUH_
#define TFBERT_CUDA_HALF_BITS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

static_assert(sizeof(__half) == sizeof(unsigned short), "__half is 16 bits");
static_assert(sizeof(__nv_bfloat16) == sizeof(unsigned short), "__nv_bfloat16 is 16 bits");

inline const __half* AsHalf(const unsigned short* p) { return reinterpret_cast<const __half*>(p); }
inline __half* AsHalf(unsigned short* p) { return reinterpret_cast<__half*>(p); }
inline const __nv_bfloat16* AsBf16(const unsigned short* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}
inline __nv_bfloat16* AsBf16(unsigned short* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// float32 <-> the kernels' storage types, rounding to nearest even: the kernels compute in
// float32 whatever they read or write.
__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

#endif  // TFBERT_CUDA_HALF_BITS_CUH_
