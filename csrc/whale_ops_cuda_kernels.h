// The fused multi-tensor bucket kernel's launcher, free of torch headers so nvcc can compile
// whale_ops_cuda_kernels.cu on its own (a check that runs even against a CPU-only torch).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace whale_cuda {

// kZero marks padding of a sharded layout: pack writes zeros there (data is unused).
enum class Dtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kZero = 4 };

// One tensor of a bucket: its (contiguous) elements and where they sit in the flat buffer.
struct Segment {
  void* data;
  int64_t offset;  // index of its first element in the flat buffer
  int64_t numel;   // > 0: empty tensors are left out of the table
  Dtype dtype;
  int32_t reserved;
};

// One launch moves every segment between its tensor and `flat` (numel `total`, on the
// current device): pack writes flat[offset + i] = scale * data[i], unpack writes
// data[i] = scale * flat[offset + i], each computed in float (double if either side is
// double) and rounded once. `segments` is a device array of `num_segments`, sorted by offset
// and not overlapping; flat elements no segment covers are left alone (a sharded layout's
// padding, which pack zeroes through kZero segments).
cudaError_t launch_bucket_copy(
    void* flat,
    Dtype flat_dtype,
    const Segment* segments,
    int num_segments,
    int64_t total,
    double scale,
    bool pack,
    cudaStream_t stream);

}  // namespace whale_cuda
