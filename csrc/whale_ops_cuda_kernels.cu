// The fused multi-tensor bucket kernel: one launch packs or unpacks a whole bucket.
//
// The flat buffer is cut into chunks of kChunk elements; blocks take chunks in a grid-stride
// loop, find the first segment of their chunk by binary search in the segment table, and walk
// the segments the chunk overlaps. Every thread of a block reads the same table entries, so
// the search costs a few cached loads per chunk, and hundreds of small tensors cost one launch.
#include "whale_ops_cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

namespace whale_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;
constexpr int64_t kChunk = 16 * 1024;

template <typename A, typename B>
using opmath_t = std::conditional_t<
    std::is_same_v<A, double> || std::is_same_v<B, double>,
    double,
    float>;

template <typename Op>
__device__ __forceinline__ Op to_op(float x) { return static_cast<Op>(x); }
template <typename Op>
__device__ __forceinline__ Op to_op(double x) { return static_cast<Op>(x); }
template <typename Op>
__device__ __forceinline__ Op to_op(__half x) { return static_cast<Op>(__half2float(x)); }
template <typename Op>
__device__ __forceinline__ Op to_op(__nv_bfloat16 x) {
  return static_cast<Op>(__bfloat162float(x));
}

// Narrowing goes through float, as c10::Half / c10::BFloat16 do, so the bits match torch's casts.
template <typename T>
struct From;
template <>
struct From<float> {
  template <typename Op>
  __device__ __forceinline__ static float op(Op x) { return static_cast<float>(x); }
};
template <>
struct From<double> {
  template <typename Op>
  __device__ __forceinline__ static double op(Op x) { return static_cast<double>(x); }
};
template <>
struct From<__half> {
  template <typename Op>
  __device__ __forceinline__ static __half op(Op x) {
    return __float2half_rn(static_cast<float>(x));
  }
};
template <>
struct From<__nv_bfloat16> {
  template <typename Op>
  __device__ __forceinline__ static __nv_bfloat16 op(Op x) {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
};

// Flat elements [lo, hi) of one segment that starts at flat index `start`.
template <typename FlatT, typename T, bool kPack>
__device__ __forceinline__ void copy_range(
    FlatT* flat, void* data, int64_t start, int64_t lo, int64_t hi, double scale) {
  using Op = opmath_t<FlatT, T>;
  const Op s = static_cast<Op>(scale);
  T* elems = static_cast<T*>(data);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    if constexpr (kPack) {
      flat[i] = From<FlatT>::op(to_op<Op>(elems[i - start]) * s);
    } else {
      elems[i - start] = From<T>::op(to_op<Op>(flat[i]) * s);
    }
  }
}

template <typename FlatT, bool kPack>
__global__ void __launch_bounds__(kThreads) bucket_copy_kernel(
    FlatT* flat, const Segment* segments, int num_segments, int64_t total, double scale) {
  for (int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk; begin < total;
       begin += static_cast<int64_t>(gridDim.x) * kChunk) {
    const int64_t end = min(begin + kChunk, total);
    // Last segment starting at or before `begin`.
    int s = 0;
    for (int hi = num_segments - 1; s < hi;) {
      const int mid = (s + hi + 1) / 2;
      if (segments[mid].offset <= begin) s = mid;
      else hi = mid - 1;
    }
    for (; s < num_segments && segments[s].offset < end; ++s) {
      const Segment seg = segments[s];
      const int64_t lo = max(begin, seg.offset);
      const int64_t hi = min(end, seg.offset + seg.numel);
      switch (seg.dtype) {
        case Dtype::kFloat32:
          copy_range<FlatT, float, kPack>(flat, seg.data, seg.offset, lo, hi, scale);
          break;
        case Dtype::kFloat16:
          copy_range<FlatT, __half, kPack>(flat, seg.data, seg.offset, lo, hi, scale);
          break;
        case Dtype::kBFloat16:
          copy_range<FlatT, __nv_bfloat16, kPack>(flat, seg.data, seg.offset, lo, hi, scale);
          break;
        case Dtype::kFloat64:
          copy_range<FlatT, double, kPack>(flat, seg.data, seg.offset, lo, hi, scale);
          break;
        case Dtype::kZero:
          if constexpr (kPack) {
            for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
              flat[i] = From<FlatT>::op(0.0f);
            }
          }
          break;
      }
    }
  }
}

template <typename FlatT>
cudaError_t launch_typed(
    void* flat,
    const Segment* segments,
    int num_segments,
    int64_t total,
    double scale,
    bool pack,
    cudaStream_t stream) {
  int device = 0;
  int num_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t num_chunks = (total + kChunk - 1) / kChunk;
  const int blocks =
      static_cast<int>(std::min<int64_t>(num_chunks, static_cast<int64_t>(num_sms) * kBlocksPerSm));
  auto* typed = static_cast<FlatT*>(flat);
  if (pack) {
    bucket_copy_kernel<FlatT, true>
        <<<blocks, kThreads, 0, stream>>>(typed, segments, num_segments, total, scale);
  } else {
    bucket_copy_kernel<FlatT, false>
        <<<blocks, kThreads, 0, stream>>>(typed, segments, num_segments, total, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bucket_copy(
    void* flat,
    Dtype flat_dtype,
    const Segment* segments,
    int num_segments,
    int64_t total,
    double scale,
    bool pack,
    cudaStream_t stream) {
  if (total == 0 || num_segments == 0) return cudaSuccess;
  switch (flat_dtype) {
    case Dtype::kFloat32:
      return launch_typed<float>(flat, segments, num_segments, total, scale, pack, stream);
    case Dtype::kFloat16:
      return launch_typed<__half>(flat, segments, num_segments, total, scale, pack, stream);
    case Dtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(flat, segments, num_segments, total, scale, pack, stream);
    case Dtype::kFloat64:
      return launch_typed<double>(flat, segments, num_segments, total, scale, pack, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace whale_cuda
