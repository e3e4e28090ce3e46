// whale_ops: fused gradient-bucket kernels registered as torch.ops.whale.*.
//
// Shared by the CPU implementation (whale_ops.cpp) and the CUDA glue (whale_ops_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace whale {

// Checks one bucket and raises ValueError/TypeError naming what is wrong and how to fix it:
// `flat` is 1-D, contiguous and floating; every tensor is floating, on flat's device, and
// their numel() add up to flat.numel() (to `shards_total` when given: the sharded ops).
// `written` says the tensors are written in place (unpack), so none may have overlapping memory.
void check_bucket(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    at::TensorList tensors,
    bool written,
    std::optional<int64_t> shards_total = std::nullopt);

// The padded-shard layout's checks: shard sizes >= 0 and not empty; `flat` holds
// len(shard_sizes) slots of at least max(shard_sizes); then check_bucket against their sum.
void check_shards(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    at::TensorList tensors,
    at::IntArrayRef shard_sizes,
    bool written);

// The CPU ops on tensors given by address (the Python entry, whale_ops_py.cpp, which reads
// them straight out of a list): the same checks, copies and errors as the registered kernels.
enum class BucketOp { kPack = 0, kUnpack = 1, kPackShards = 2, kUnpackShards = 3 };
void bucket_cpu(
    BucketOp op,
    const at::Tensor& flat,
    c10::ArrayRef<const at::Tensor*> tensors,
    at::IntArrayRef shard_sizes,
    double scale);

// Zeroes out[r * slot + shard_sizes[r] : (r + 1) * slot] for every rank r.
void zero_padding(const at::Tensor& out, at::IntArrayRef shard_sizes);

}  // namespace whale
