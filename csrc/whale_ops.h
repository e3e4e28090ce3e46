// whale_ops: fused gradient-bucket kernels registered as torch.ops.whale.*.
//
// Shared by the CPU implementation (whale_ops.cpp) and the CUDA glue (whale_ops_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace whale {

// Checks one bucket and raises ValueError/TypeError naming what is wrong and how to fix it:
// `flat` is 1-D, contiguous and floating; every tensor is floating, on flat's device, and
// their numel() add up to flat.numel(). `written` says the tensors are written in place
// (unpack), so none may have overlapping memory.
void check_bucket(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    at::TensorList tensors,
    bool written);

}  // namespace whale
