// The C ABIs pass float16 and bfloat16 buffers as unsigned short (the raw bits), so that no
// caller needs CUDA's half types; these views turn them back into __half / __nv_bfloat16.

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

#endif  // TFBERT_CUDA_HALF_BITS_CUH_
