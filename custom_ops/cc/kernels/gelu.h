// Functors of the fused bias + GELU and bias + GeGLU (ops in cc/ops/gelu_ops.cc): one
// specialisation per device in gelu_kernels.cc; the GPU one calls the CUDA kernels through
// cuda/gelu_launch.h.
//
// Legend: rows = the product of x's leading dimensions; cols = N, x's last dimension.
//   GELU:  x, y, dy, dx: [rows, cols] in T; bias, dbias: [cols] in T.
//   GeGLU: x, dx: [rows, 2M] = [gate | value]; y, dy: [rows, M]; bias, dbias: [2M] in T.
// All arithmetic is in float32 whatever T is, and dbias is accumulated in float32 before the
// final cast to T: a float16 sum over thousands of rows loses everything below its 11th bit.
//
// The pre-activation x + bias is recomputed in the backward pass instead of being saved: that
// is the point of the fusion (one [rows, cols] activation less held for the gradient).

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_GELU_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_GELU_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

// The formulas and their constants: gelu_kernels.cc computes them on the CPU (ExactGelu and
// TanhGelu, with libm-free erfc and tanh that vectorise) and cuda/gelu.cu on the GPU.
namespace gelu_math {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;

// gelu(u) and gelu'(u), in float32:
//   exact:       gelu(u) = u * Phi(u) = 0.5 u erfc(-u / sqrt 2); gelu'(u) = Phi(u) + u phi(u).
//   approximate: gelu(u) = 0.5 u (1 + tanh(k (u + c u^3))), k = sqrt(2 / pi), c = 0.044715;
//                gelu'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 c u^2).
// erfc(-u / sqrt 2), not 1 + erf(u / sqrt 2): for u << 0 the latter is 1 - 0.99999... and
// cancels to zero long before gelu(u) underflows (tf.nn.gelu uses 1 + erf and does).

}  // namespace gelu_math

template <typename Device, typename T>
struct FusedBiasGeluForward {
  // y = gelu(x + bias). rows >= 1, cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  const T* bias, int64_t rows, int64_t cols, bool approximate,
                                  T* y);
};

template <typename Device, typename T>
struct FusedBiasGeluBackward {
  // dx = dy * gelu'(x + bias); dbias = dx (in float32) summed over all rows, deterministically
  // (the same inputs give bit-identical sums on every run). rows >= 0 (no rows: zero dbias),
  // cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* dy,
                                  const T* x, const T* bias, int64_t rows, int64_t cols,
                                  bool approximate, T* dx, T* dbias);
};

template <typename Device, typename T>
struct FusedBiasGeluSaveForward {
  // y = gelu(x + bias) and derivative = gelu'(x + bias). rows >= 1, cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  const T* bias, int64_t rows, int64_t cols, bool approximate,
                                  T* y, T* derivative);
};

template <typename Device, typename T>
struct FusedBiasGeluGradFromDerivative {
  // dx = dy * derivative; dbias = dx (in float32) summed over all rows, deterministically.
  // rows >= 0 (no rows: zero dbias), cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* dy,
                                  const T* derivative, int64_t rows, int64_t cols, T* dx,
                                  T* dbias);
};

template <typename Device, typename T>
struct FusedBiasGegluForward {
  // y = gelu(gate + bias_gate) * (value + bias_value), gate = x[:, :M], value = x[:, M:].
  // half_cols = M. rows >= 1, half_cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  const T* bias, int64_t rows, int64_t half_cols,
                                  bool approximate, T* y);
};

template <typename Device, typename T>
struct FusedBiasGegluBackward {
  // dx = [dy * v * gelu'(g) | dy * gelu(g)] with g, v the biased gate and value; dbias = dx (in
  // float32) summed over rows, deterministically. rows >= 0, half_cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* dy,
                                  const T* x, const T* bias, int64_t rows, int64_t half_cols,
                                  bool approximate, T* dx, T* dbias);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_GELU_H_
