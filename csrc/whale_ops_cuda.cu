// CUDA implementation of whale::pack / whale::unpack: builds the segment table of a bucket,
// uploads it once, and calls the fused kernel of whale_ops_cuda_kernels.cu (one launch).
#include "whale_ops.h"
#include "whale_ops_cuda_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
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
    const char* op, const at::Tensor& flat, at::TensorList tensors, double scale, bool pack) {
  check_bucket(op, flat, pack ? "out" : "flat", tensors, /*written=*/!pack);
  const c10::DeviceGuard guard(flat.device());
  // The kernel reads/writes dense rows: strided tensors go through a contiguous stand-in
  // (gradients almost never need one).
  std::vector<at::Tensor> staged(tensors.size());
  std::vector<whale_cuda::Segment> segments;
  segments.reserve(tensors.size());
  int64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() > 0) {
      if (!t.is_contiguous()) {
        staged[i] = pack ? t.contiguous() : at::empty_like(t, at::MemoryFormat::Contiguous);
      }
      const at::Tensor& dense = staged[i].defined() ? staged[i] : t;
      void* data = pack ? const_cast<void*>(dense.const_data_ptr()) : dense.mutable_data_ptr();
      segments.push_back({data, offset, t.numel(), kernel_dtype(t.scalar_type()), 0});
    }
    offset += t.numel();
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

}  // namespace
}  // namespace whale

TORCH_LIBRARY_IMPL(whale, CUDA, m) {
  m.impl("pack", &whale::pack_cuda);
  m.impl("unpack", &whale::unpack_cuda);
}
