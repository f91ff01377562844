// What every tfbert kernel file (cc/kernels/*_kernels.cc) starts with: Eigen's device switches,
// TensorFlow's kernel headers and the names the kernels use. Include it first.

#ifndef TFBERT_CC_KERNELS_KERNEL_COMMON_H_
#define TFBERT_CC_KERNELS_KERNEL_COMMON_H_

#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

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

}  // namespace tfbert

#endif  // TFBERT_CC_KERNELS_KERNEL_COMMON_H_
