// C ABI of the CUDA kernels of LAMB over a ZeRO shard (lamb_shard.cu): raw device pointers,
// sizes, host scalars and a stream, so nvcc never sees TensorFlow's headers and the kernels can
// be driven on their own. The math is in cc/ops/lamb_shard_ops.cc.
//
// Legend: n = elements of the shard; S = segments (num_segments).
// m, v, grad, param, new_param: float32 [n] device arrays. segment_ends: int64 [S] device array,
// non-decreasing, the last equal to n (segment s is [segment_ends[s-1], segment_ends[s])).
// segment_flags: uint8 [S] device array, per segment TFBERT_LAMB_SHARD_ACTIVE |
// TFBERT_LAMB_SHARD_DECAY. The segments are not validated here (the op does it on the host).
// Each function only enqueues work on `stream` and returns the launch error (cudaSuccess if
// none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_LAMB_SHARD_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_LAMB_SHARD_LAUNCH_H_

#include <cuda_runtime.h>

// segment_flags bits.
#define TFBERT_LAMB_SHARD_ACTIVE 1  // update the segment (else m, v, param are left as they are)
#define TFBERT_LAMB_SHARD_DECAY 2   // add weight_decay * param to the update direction

#ifdef __cplusplus
extern "C" {
#endif

// The shard is cut into tiles of 4096 elements (a block's work item), and each tile into its
// pieces, one per segment it meets. Each piece's partial sums go to workspace slot tile + segment
// (unique, as each next piece moves to the next tile or segment or both), so a segment's sums
// add its pieces' partials in tile order: the partition and the order are fixed by n and the
// segments alone, and the sums are bit-identical on every run and every GPU.
static inline long long tfbert_lamb_shard_tiles(long long n) { return (n + 4095) / 4096; }

// The float64 workspace of tfbert_lamb_shard_moments_f32: 2 partial sums per slot.
static inline long long tfbert_lamb_shard_workspace_doubles(long long n, long long num_segments) {
  return 2 * (tfbert_lamb_shard_tiles(n) + num_segments);
}

// The first half of the step: m and v in place in active segments, and sums: float32 [S, 2] of
// each segment's sums of param^2 and update^2 (float64 accumulation; 0 for an inactive or empty
// segment). bias_correction1/2: 1 - beta1^t and 1 - beta2^t. workspace:
// tfbert_lamb_shard_workspace_doubles(n, num_segments) doubles.
cudaError_t tfbert_lamb_shard_moments_f32(float* m, float* v, const float* grad,
                                          const float* param, long long n,
                                          const long long* segment_ends,
                                          const unsigned char* segment_flags,
                                          long long num_segments, float beta1, float beta2,
                                          float epsilon, float weight_decay,
                                          float bias_correction1, float bias_correction2,
                                          double* workspace, float* sums, cudaStream_t stream);

// The second half: new_param = param - scale[s] * update in active segments (update from m, v
// and param exactly as tfbert_lamb_shard_moments_f32 computes it), param in the others.
// scale: float32 [S] device array.
cudaError_t tfbert_lamb_shard_apply_f32(const float* param, const float* m, const float* v,
                                        long long n, const long long* segment_ends,
                                        const unsigned char* segment_flags,
                                        long long num_segments, const float* scale, float beta1,
                                        float beta2, float epsilon, float weight_decay,
                                        float bias_correction1, float bias_correction2,
                                        float* new_param, cudaStream_t stream);

// dst (device) = src (pageable host memory, e.g. a std::vector), `bytes` bytes, ordered on
// `stream`. A copy from pageable memory is staged before cudaMemcpyAsync returns, so src may
// be freed as soon as this returns.
cudaError_t tfbert_lamb_shard_upload(void* dst, const void* src, long long bytes,
                                     cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_LAMB_SHARD_LAUNCH_H_
