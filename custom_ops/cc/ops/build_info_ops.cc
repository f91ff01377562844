// TfBert>BuiltWithCuda: whether this library was compiled with its CUDA kernels, so Python can
// refuse a GPU run that would silently fall back to the CPU kernels.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

REGISTER_OP("TfBert>BuiltWithCuda")
    .Output("built: bool")
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc("True when the library holds CUDA kernels (built with WITH_CUDA=1).");

class BuiltWithCudaOp : public OpKernel {
 public:
  explicit BuiltWithCudaOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &output));
#if GOOGLE_CUDA
    output->scalar<bool>()() = true;
#else
    output->scalar<bool>()() = false;
#endif
  }
};

REGISTER_KERNEL_BUILDER(Name("TfBert>BuiltWithCuda").Device(DEVICE_CPU), BuiltWithCudaOp);

}  // namespace tfbert
