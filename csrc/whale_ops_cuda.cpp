// CUDA implementation of whale::pack / unpack / pack_shards / unpack_shards: builds the segment
// table of a bucket (a tensor crossing a shard boundary becomes one segment per shard, padding a
// zero segment), uploads it once, and calls the fused kernel of whale_ops_cuda_kernels.cu (one
// launch). Host code only, so the host compiler builds it: nvcc compiles just the torch-free
// kernels, and torch's headers are parsed once instead of by nvcc's device and host passes.
#include "whale_ops.h"
#include "whale_ops_cuda_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace whale {
namespace {

whale_cuda::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return whale_cuda::Dtype::kFloat32;
    case at::kHalf: return whale_cuda::Dtype::kFloat16;
    case at::kBFloat16: return whale_cuda::Dtype::kBFloat16;
    case at::kDouble: return whale_cuda::Dtype::kFloat64;
    default: TORCH_INTERNAL_ASSERT(false, "whale: unchecked dtype ", t);
  }
}

void bucket_copy_cuda(
    const char* op,
    const at::Tensor& flat,
    at::TensorList tensors,
    double scale,
    bool pack,
    std::optional<at::IntArrayRef> shard_sizes = std::nullopt) {
  if (shard_sizes.has_value()) {
    check_shards(op, flat, pack ? "out" : "flat", tensors, *shard_sizes, /*written=*/!pack);
  } else {
    check_bucket(op, flat, pack ? "out" : "flat", tensors, /*written=*/!pack);
  }
  const c10::DeviceGuard guard(flat.device());
  // Shard r's logical elements [shard_starts[r], shard_starts[r + 1]) begin at r * slot.
  std::vector<int64_t> shard_starts{0};
  int64_t slot = 0;
  if (shard_sizes.has_value()) {
    for (int64_t n : *shard_sizes) shard_starts.push_back(shard_starts.back() + n);
    slot = flat.numel() / static_cast<int64_t>(shard_sizes->size());
  }
  // The kernel reads/writes dense rows: strided tensors go through a contiguous stand-in
  // (gradients almost never need one).
  std::vector<at::Tensor> staged(tensors.size());
  std::vector<whale_cuda::Segment> segments;
  segments.reserve(tensors.size() + shard_starts.size());
  int64_t offset = 0;  // logical
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() > 0) {
      if (!t.is_contiguous()) {
        staged[i] = pack ? t.contiguous() : at::empty_like(t, at::MemoryFormat::Contiguous);
      }
      const at::Tensor& dense = staged[i].defined() ? staged[i] : t;
      char* data = static_cast<char*>(
          pack ? const_cast<void*>(dense.const_data_ptr()) : dense.mutable_data_ptr());
      const auto dtype = kernel_dtype(t.scalar_type());
      if (!shard_sizes.has_value()) {
        segments.push_back({data, offset, t.numel(), dtype, 0});
      } else {
        for (int64_t lo = offset, hi = offset + t.numel(); lo < hi;) {  // one per shard crossed
          const int64_t r =
              std::upper_bound(shard_starts.begin(), shard_starts.end(), lo) - shard_starts.begin() - 1;
          const int64_t run_end = std::min(hi, shard_starts[r + 1]);
          segments.push_back({data + (lo - offset) * t.element_size(),
                              r * slot + (lo - shard_starts[r]), run_end - lo, dtype, 0});
          lo = run_end;
        }
      }
    }
    offset += t.numel();
  }
  if (pack && shard_sizes.has_value()) {
    // Padding after each shard: zero segments, kept in offset order.
    std::vector<whale_cuda::Segment> with_padding;
    with_padding.reserve(segments.size() + shard_sizes->size());
    size_t next = 0;
    for (size_t r = 0; r < shard_sizes->size(); ++r) {
      const int64_t pad_at = static_cast<int64_t>(r) * slot + (*shard_sizes)[r];
      for (; next < segments.size() && segments[next].offset < pad_at; ++next) {
        with_padding.push_back(segments[next]);
      }
      if (pad_at < static_cast<int64_t>(r + 1) * slot) {
        with_padding.push_back(
            {nullptr, pad_at, static_cast<int64_t>(r + 1) * slot - pad_at,
             whale_cuda::Dtype::kZero, 0});
      }
    }
    segments.swap(with_padding);
  }
  if (segments.empty()) return;

  // Pinned staging makes the upload asynchronous; the host allocator keeps the block alive
  // until the copy has run.
  const int64_t table_bytes = static_cast<int64_t>(segments.size() * sizeof(whale_cuda::Segment));
  at::Tensor host_table =
      at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_table.mutable_data_ptr(), segments.data(), table_bytes);
  at::Tensor device_table =
      at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).device(flat.device()));
  device_table.copy_(host_table, /*non_blocking=*/true);

  const cudaError_t err = whale_cuda::launch_bucket_copy(
      pack ? flat.mutable_data_ptr() : const_cast<void*>(flat.const_data_ptr()),
      kernel_dtype(flat.scalar_type()),
      static_cast<const whale_cuda::Segment*>(device_table.const_data_ptr()),
      static_cast<int>(segments.size()),
      flat.numel(),
      scale,
      pack,
      c10::cuda::getCurrentCUDAStream(flat.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  if (!pack) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (staged[i].defined()) tensors[i].copy_(staged[i]);
    }
  }
}

void pack_cuda(at::TensorList tensors, const at::Tensor& out, double scale) {
  bucket_copy_cuda("whale.pack", out, tensors, scale, /*pack=*/true);
}

void unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale) {
  bucket_copy_cuda("whale.unpack", flat, tensors, scale, /*pack=*/false);
}

void pack_shards_cuda(
    at::TensorList tensors, const at::Tensor& out, at::IntArrayRef shard_sizes, double scale) {
  bucket_copy_cuda("whale.pack_shards", out, tensors, scale, /*pack=*/true, shard_sizes);
}

void unpack_shards_cuda(
    const at::Tensor& flat, at::TensorList tensors, at::IntArrayRef shard_sizes, double scale) {
  bucket_copy_cuda("whale.unpack_shards", flat, tensors, scale, /*pack=*/false, shard_sizes);
}

}  // namespace
}  // namespace whale

TORCH_LIBRARY_IMPL(whale, CUDA, m) {
  m.impl("pack", &whale::pack_cuda);
  m.impl("unpack", &whale::unpack_cuda);
  m.impl("pack_shards", &whale::pack_shards_cuda);
  m.impl("unpack_shards", &whale::unpack_shards_cuda);
}
