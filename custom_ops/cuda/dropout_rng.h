// The counter-based dropout generator shared by the CPU kernels (C++) and the CUDA kernels
// (nvcc): the keep decision of element i is a pure function of (seed, i), so no mask is stored
// and the backward pass regenerates exactly the forward's mask, on either device.
//
// Generator: SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", OOPSLA 2014; the finaliser is Stafford's "Mix13" of MurmurHash3's fmix64).
//   key     = mix64(seed[1] + mix64(seed[0] + G))            the stream of this seed
//   bits(i) = mix64(key + (i + 1) * G)                       the i-th output of that stream
//   u(i)    = (bits(i) >> 40) * 2^-24                        uniform in [0, 1), exact in float32
//   keep(i) = u(i) >= rate
// with G = 0x9E3779B97F4A7C15 (2^64 / golden ratio) and all arithmetic modulo 2^64. u(i) is a
// 24-bit integer times a power of two, so it and the comparison with the float32 rate are exact
// on every device: the CPU and the GPU agree bit for bit. i is the element's flat (row-major)
// index in the [B, N, Sq, Sk] tensor.
//
// Only <stdint.h>: this header is included by nvcc (no TensorFlow) and by the TensorFlow kernels.

#ifndef TFBERT_CUSTOM_OPS_CUDA_DROPOUT_RNG_H_
#define TFBERT_CUSTOM_OPS_CUDA_DROPOUT_RNG_H_

#include <stdint.h>

#ifdef __CUDACC__
#define TFBERT_DROPOUT_RNG_FN __host__ __device__ __forceinline__
#else
#define TFBERT_DROPOUT_RNG_FN inline
#endif

#define TFBERT_DROPOUT_RNG_GAMMA 0x9E3779B97F4A7C15ULL

TFBERT_DROPOUT_RNG_FN uint64_t tfbert_dropout_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The stream key of an int64 [2] seed (as from tf.random.Generator.make_seeds).
TFBERT_DROPOUT_RNG_FN uint64_t tfbert_dropout_key(long long seed0, long long seed1) {
  return tfbert_dropout_mix64(
      (uint64_t)seed1 + tfbert_dropout_mix64((uint64_t)seed0 + TFBERT_DROPOUT_RNG_GAMMA));
}

// u(i), uniform in [0, 1) with 24 random bits.
TFBERT_DROPOUT_RNG_FN float tfbert_dropout_uniform(uint64_t key, uint64_t index) {
  const uint64_t bits = tfbert_dropout_mix64(key + (index + 1) * TFBERT_DROPOUT_RNG_GAMMA);
  return (float)(uint32_t)(bits >> 40) * (1.0f / 16777216.0f);
}

// Whether element `index` is kept by dropout with probability `rate` of dropping.
TFBERT_DROPOUT_RNG_FN bool tfbert_dropout_keep(uint64_t key, uint64_t index, float rate) {
  return tfbert_dropout_uniform(key, index) >= rate;
}

// The same decision as an integer comparison, which vectorises on a CPU and needs no float on a
// GPU: keep(i) = (bits(i) >> 40) >= tfbert_dropout_keep_threshold(rate). (bits >> 40) is an
// integer k < 2^24, and k * 2^-24 >= rate exactly when k >= rate * 2^24 (exact in double: a
// power-of-two scaling), i.e. when k >= ceil(rate * 2^24).
TFBERT_DROPOUT_RNG_FN uint64_t tfbert_dropout_keep_threshold(float rate) {
  const double scaled = (double)rate * 16777216.0;
  const uint64_t k = (uint64_t)scaled;  // floor: rate >= 0
  return (double)k < scaled ? k + 1 : k;
}

#endif  // TFBERT_CUSTOM_OPS_CUDA_DROPOUT_RNG_H_
