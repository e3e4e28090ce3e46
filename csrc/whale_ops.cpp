// whale_ops: op schemas and the CPU implementation of the gradient-bucket kernels.
//
//   whale::pack(Tensor[] tensors, Tensor(a!) out, float scale=1.0) -> ()
//       out[offset_i : offset_i + numel_i] = scale * tensors[i].flatten()   (cast to out's dtype)
//   whale::unpack(Tensor flat, Tensor(a!)[] tensors, float scale=1.0) -> ()
//       tensors[i] = scale * flat[offset_i : offset_i + numel_i].view_as(tensors[i])   (cast)
//   whale::pack_shards(Tensor[] tensors, Tensor(a!) out, int[] shard_sizes, float scale=1.0) -> ()
//   whale::unpack_shards(Tensor flat, Tensor(a!)[] tensors, int[] shard_sizes, float scale=1.0) -> ()
//       The same with a padded-shard layout (a reduce-scatter input / all-gather output): the
//       logical flat of pack is cut into shards of shard_sizes[r] elements, shard r sits at
//       out[r * slot : r * slot + shard_sizes[r]] with slot = out.numel() / len(shard_sizes),
//       and pack_shards zeroes the rest of each slot.
//
// Every op also has a Meta kernel (the checks, no data), so they run under FakeTensorMode and
// trace with torch.compile.
//
// Arithmetic: each element is computed once as opmath(x) * opmath(scale) and rounded once to
// the destination dtype; opmath is float64 if either side is float64, else float32 (as torch's
// own half/bfloat16 kernels). whale/runtime/comm_ops.py's pure path gives the same bits.

#include "whale_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace whale {
namespace {

bool is_bucket_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Python's spelling ("torch.float32"), so both backends raise the same messages.
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// kGrainSize, without including TensorIterator.h (compile time).
constexpr int64_t kGrainSize = 32768;

constexpr const char* kBucketDtypes =
    "torch.float16, torch.bfloat16, torch.float32 or torch.float64";

template <typename A, typename B>
using opmath_t = std::conditional_t<
    std::is_same_v<A, double> || std::is_same_v<B, double>,
    double,
    float>;

template <typename Src, typename Dst>
inline Dst scaled(Src x, opmath_t<Src, Dst> s) {
  return static_cast<Dst>(static_cast<opmath_t<Src, Dst>>(x) * s);
}

// Calls f with a value of the C++ type of a bucket dtype (checked before).
template <typename F>
void visit_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "whale: unchecked dtype ", t);
  }
}

// Elements [begin, end) (logical row-major order) of `tensor`, moved to or from
// `flat` (which points at the flat element of `begin`).
template <typename T, typename FlatT, bool kPack>
void copy_strided(const at::Tensor& tensor, T* base, FlatT* flat, int64_t begin, int64_t end, double scale) {
  using Op = opmath_t<T, FlatT>;
  const Op s = static_cast<Op>(scale);
  // Strided: an odometer over the tensor's index, one innermost row at a time.
  const auto sizes = tensor.sizes();
  const auto strides = tensor.strides();
  const int64_t last = static_cast<int64_t>(sizes.size()) - 1;
  c10::SmallVector<int64_t, 8> index(sizes.size(), 0);
  int64_t offset = 0;
  for (int64_t d = last, rest = begin; d >= 0; --d) {
    index[d] = rest % sizes[d];
    rest /= sizes[d];
    offset += index[d] * strides[d];
  }
  for (int64_t i = begin; i < end;) {
    const int64_t run = std::min(sizes[last] - index[last], end - i);
    for (int64_t j = 0; j < run; ++j, ++flat) {
      T* p = base + offset + j * strides[last];
      if constexpr (kPack) *flat = scaled<T, FlatT>(*p, s);
      else *p = scaled<FlatT, T>(*flat, s);
    }
    i += run;
    index[last] += run;
    offset += run * strides[last];
    for (int64_t d = last; d > 0 && index[d] == sizes[d]; --d) {
      offset += strides[d - 1] - index[d] * strides[d];
      index[d] = 0;
      ++index[d - 1];
    }
  }
}

// One tensor of a bucket, resolved once before the parallel pass: where its elements are,
// where they go in the logical flat, and the copy loop for its (dtype, flat dtype) pair.
struct Piece;
using CopyFn = void (*)(const Piece&, void* flat, int64_t begin, int64_t end, double scale);

struct Piece {
  void* data;                  // the tensor's element 0 (read only when packing)
  int64_t start;               // its first element's index in the logical flat
  int64_t numel;
  const at::Tensor* strided;   // the tensor when it is not contiguous, else nullptr
  CopyFn copy;
};

template <typename T, typename FlatT, bool kPack>
void copy_piece(const Piece& piece, void* flat_at, int64_t begin, int64_t end, double scale) {
  auto* flat = static_cast<FlatT*>(flat_at);
  T* base = static_cast<T*>(piece.data);
  if (piece.strided != nullptr) {
    copy_strided<T, FlatT, kPack>(*piece.strided, base, flat, begin, end, scale);
    return;
  }
  const int64_t n = end - begin;
  if constexpr (std::is_same_v<T, FlatT>) {
    if (scale == 1.0) {  // a plain copy: x * 1 rounds to x (memmove: a tensor may be out itself)
      if constexpr (kPack) std::memmove(flat, base + begin, n * sizeof(T));
      else std::memmove(base + begin, flat, n * sizeof(T));
      return;
    }
  }
  using Op = opmath_t<T, FlatT>;
  const Op s = static_cast<Op>(scale);
  // No __restrict: a caller may pack a bucket's own views into it (the same addresses); the
  // compiler checks for overlap at run time and takes its vectorized loop otherwise.
  if constexpr (kPack) {
    const T* src = base + begin;
    for (int64_t i = 0; i < n; ++i) flat[i] = scaled<T, FlatT>(src[i], s);
  } else {
    T* dst = base + begin;
    for (int64_t i = 0; i < n; ++i) dst[i] = scaled<FlatT, T>(flat[i], s);
  }
}

template <bool kPack>
CopyFn copy_fn(at::ScalarType tensor_dtype, at::ScalarType flat_dtype) {
  CopyFn fn = nullptr;
  visit_dtype(flat_dtype, [&](auto flat_tag) {
    visit_dtype(tensor_dtype, [&](auto tensor_tag) {
      fn = &copy_piece<decltype(tensor_tag), decltype(flat_tag), kPack>;
    });
  });
  return fn;
}

// Where the logical flat (the tensors back to back) sits in the buffer: shard r's elements
// [starts[r], starts[r + 1]) begin at r * slot. No shards: the identity.
struct ShardMap {
  std::vector<int64_t> starts;  // world + 1 prefix sums
  int64_t slot = 0;

  // Last shard starting at or before `i` (empty shards are skipped).
  int64_t shard_of(int64_t i) const {
    return std::upper_bound(starts.begin(), starts.end(), i) - starts.begin() - 1;
  }
};

ShardMap make_shard_map(at::IntArrayRef sizes, int64_t flat_numel) {
  ShardMap map;
  map.starts.push_back(0);
  for (int64_t n : sizes) map.starts.push_back(map.starts.back() + n);
  map.slot = flat_numel / static_cast<int64_t>(sizes.size());
  return map;
}

// One parallel pass over the logical index space, cut in equal element ranges whatever the
// tensors' sizes, so thousands of small tensors share the threads as well as a few big ones.
// `tensor(i)` returns the i-th of `n` tensors (checked before).
template <typename Get>
void bucket_copy_cpu(
    const at::Tensor& flat,
    size_t n,
    Get&& tensor,
    double scale,
    bool pack,
    const ShardMap* shards = nullptr) {
  std::vector<Piece> pieces;
  pieces.reserve(n);
  const at::ScalarType flat_dtype = flat.scalar_type();
  at::ScalarType last_dtype = at::ScalarType::Undefined;
  CopyFn last_fn = nullptr;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensor(i);
    const int64_t numel = t.numel();
    if (numel == 0) continue;
    const at::ScalarType dtype = t.scalar_type();
    if (dtype != last_dtype) {  // buckets are mostly one dtype: resolve the loop once
      last_fn = pack ? copy_fn<true>(dtype, flat_dtype) : copy_fn<false>(dtype, flat_dtype);
      last_dtype = dtype;
    }
    // Reads go through const_data_ptr so a copy-on-write input is not materialized.
    void* data = pack ? const_cast<void*>(t.const_data_ptr()) : t.mutable_data_ptr();
    pieces.push_back(Piece{data, total, numel, t.is_contiguous() ? nullptr : &t, last_fn});
    total += numel;
  }
  if (total == 0) return;
  char* flat_base = pack ? static_cast<char*>(flat.mutable_data_ptr())
                         : const_cast<char*>(static_cast<const char*>(flat.const_data_ptr()));
  const int64_t flat_itemsize = static_cast<int64_t>(flat.element_size());
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    auto it = std::upper_bound(
        pieces.begin(), pieces.end(), begin,
        [](int64_t i, const Piece& p) { return i < p.start; });
    for (size_t s = (it - pieces.begin()) - 1; s < pieces.size() && pieces[s].start < end; ++s) {
      const Piece& piece = pieces[s];
      int64_t lo = std::max(begin, piece.start);
      const int64_t hi = std::min(end, piece.start + piece.numel);
      while (lo < hi) {  // one run per shard the piece crosses
        int64_t run_end = hi;
        int64_t at = lo;
        if (shards != nullptr) {
          const int64_t r = shards->shard_of(lo);
          run_end = std::min(hi, shards->starts[r + 1]);
          at = r * shards->slot + (lo - shards->starts[r]);
        }
        piece.copy(piece, flat_base + at * flat_itemsize, lo - piece.start, run_end - piece.start, scale);
        lo = run_end;
      }
    }
  });
}

void bucket_copy_cpu(
    const at::Tensor& flat,
    at::TensorList tensors,
    double scale,
    bool pack,
    const ShardMap* shards = nullptr) {
  bucket_copy_cpu(
      flat, tensors.size(), [&](size_t i) -> const at::Tensor& { return tensors[i]; }, scale, pack,
      shards);
}

void pack_cpu(at::TensorList tensors, const at::Tensor& out, double scale) {
  check_bucket("whale.pack", out, "out", tensors, /*written=*/false);
  bucket_copy_cpu(out, tensors, scale, /*pack=*/true);
}

void unpack_cpu(const at::Tensor& flat, at::TensorList tensors, double scale) {
  check_bucket("whale.unpack", flat, "flat", tensors, /*written=*/true);
  bucket_copy_cpu(flat, tensors, scale, /*pack=*/false);
}

void pack_shards_cpu(
    at::TensorList tensors, const at::Tensor& out, at::IntArrayRef shard_sizes, double scale) {
  check_shards("whale.pack_shards", out, "out", tensors, shard_sizes, /*written=*/false);
  const ShardMap map = make_shard_map(shard_sizes, out.numel());
  bucket_copy_cpu(out, tensors, scale, /*pack=*/true, &map);
  zero_padding(out, shard_sizes);
}

void unpack_shards_cpu(
    const at::Tensor& flat, at::TensorList tensors, at::IntArrayRef shard_sizes, double scale) {
  check_shards("whale.unpack_shards", flat, "flat", tensors, shard_sizes, /*written=*/true);
  const ShardMap map = make_shard_map(shard_sizes, flat.numel());
  bucket_copy_cpu(flat, tensors, scale, /*pack=*/false, &map);
}

// The Meta kernels: the same checks, no data (FakeTensorMode, torch.compile).
void pack_meta(at::TensorList tensors, const at::Tensor& out, double) {
  check_bucket("whale.pack", out, "out", tensors, /*written=*/false);
}

void unpack_meta(const at::Tensor& flat, at::TensorList tensors, double) {
  check_bucket("whale.unpack", flat, "flat", tensors, /*written=*/true);
}

void pack_shards_meta(
    at::TensorList tensors, const at::Tensor& out, at::IntArrayRef shard_sizes, double) {
  check_shards("whale.pack_shards", out, "out", tensors, shard_sizes, /*written=*/false);
}

void unpack_shards_meta(
    const at::Tensor& flat, at::TensorList tensors, at::IntArrayRef shard_sizes, double) {
  check_shards("whale.unpack_shards", flat, "flat", tensors, shard_sizes, /*written=*/true);
}

void check_flat(const char* op, const at::Tensor& flat, const char* flat_name) {
  TORCH_CHECK_VALUE(
      flat.dim() == 1 && flat.is_contiguous(), op, ": ", flat_name,
      " must be a 1-D contiguous tensor, got shape ", flat.sizes(),
      " (contiguous=", flat.is_contiguous() ? "True" : "False",
      "); allocate it with torch.empty(total_numel, dtype=..., device=...)");
  TORCH_CHECK_TYPE(
      is_bucket_dtype(flat.scalar_type()), op, ": ", flat_name, " has dtype ",
      dtype_name(flat.scalar_type()), "; buckets hold ", kBucketDtypes);
}

template <typename Get>
void check_bucket_impl(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    size_t n,
    Get&& tensor,
    bool written,
    std::optional<int64_t> shards_total) {
  check_flat(op, flat, flat_name);
  int64_t total = 0;
  const at::Device device = flat.device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensor(i);
    const at::ScalarType dtype = t.scalar_type();
    if (C10_UNLIKELY(!is_bucket_dtype(dtype))) {
      TORCH_CHECK_TYPE(false, op, ": tensors[", i, "] has dtype ", dtype_name(dtype), "; buckets hold ",
                       kBucketDtypes);
    }
    if (C10_UNLIKELY(t.device() != device)) {
      TORCH_CHECK_VALUE(false, op, ": tensors[", i, "] is on ", t.device(), " but ", flat_name,
                        " is on ", device, "; a bucket lives on one device");
    }
    if (written && C10_UNLIKELY(at::has_internal_overlap(t) == at::MemOverlap::Yes)) {
      TORCH_CHECK_VALUE(false, op, ": tensors[", i,
                        "] has overlapping memory (e.g. an expand()ed view) and cannot be written in place");
    }
    total += t.numel();
  }
  if (shards_total.has_value()) {
    TORCH_CHECK_VALUE(
        total == *shards_total, op, ": the tensors hold ", total,
        " elements in total but shard_sizes sum to ", *shards_total,
        "; the shard sizes must add up to sum(t.numel() for t in tensors)");
    return;
  }
  TORCH_CHECK_VALUE(
      total == flat.numel(), op, ": the tensors hold ", total, " elements in total but ",
      flat_name, " has ", flat.numel(), "; size ", flat_name,
      " to sum(t.numel() for t in tensors)");
}

// len(shard_sizes) slots of at least max(shard_sizes) elements; returns sum(shard_sizes).
int64_t check_slots(
    const char* op, const at::Tensor& flat, const char* flat_name, at::IntArrayRef shard_sizes) {
  TORCH_CHECK_VALUE(!shard_sizes.empty(), op, ": shard_sizes is empty; give one size per rank");
  int64_t sum = 0;
  int64_t largest = 0;
  for (size_t r = 0; r < shard_sizes.size(); ++r) {
    TORCH_CHECK_VALUE(
        shard_sizes[r] >= 0, op, ": shard_sizes[", r, "] is ", shard_sizes[r],
        "; shard sizes are >= 0");
    sum += shard_sizes[r];
    largest = std::max(largest, shard_sizes[r]);
  }
  check_flat(op, flat, flat_name);
  const auto world = static_cast<int64_t>(shard_sizes.size());
  TORCH_CHECK_VALUE(
      flat.numel() % world == 0 && flat.numel() / world >= largest, op, ": ", flat_name, " has ",
      flat.numel(), " elements, which is not ", world, " slots of at least ", largest,
      " (the largest shard); size ", flat_name, " to len(shard_sizes) * max(shard_sizes) = ",
      world * largest, " (padded_numel)");
  return sum;
}

}  // namespace

void check_bucket(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    at::TensorList tensors,
    bool written,
    std::optional<int64_t> shards_total) {
  check_bucket_impl(
      op, flat, flat_name, tensors.size(), [&](size_t i) -> const at::Tensor& { return tensors[i]; },
      written, shards_total);
}

void check_shards(
    const char* op,
    const at::Tensor& flat,
    const char* flat_name,
    at::TensorList tensors,
    at::IntArrayRef shard_sizes,
    bool written) {
  const int64_t sum = check_slots(op, flat, flat_name, shard_sizes);
  check_bucket(op, flat, flat_name, tensors, written, sum);
}

void bucket_cpu(
    BucketOp op,
    const at::Tensor& flat,
    c10::ArrayRef<const at::Tensor*> tensors,
    at::IntArrayRef shard_sizes,
    double scale) {
  static constexpr const char* kNames[] = {
      "whale.pack", "whale.unpack", "whale.pack_shards", "whale.unpack_shards"};
  const char* name = kNames[static_cast<int>(op)];
  const bool pack = op == BucketOp::kPack || op == BucketOp::kPackShards;
  const bool sharded = op == BucketOp::kPackShards || op == BucketOp::kUnpackShards;
  const char* flat_name = pack ? "out" : "flat";
  auto get = [&](size_t i) -> const at::Tensor& { return *tensors[i]; };
  std::optional<int64_t> shards_total;
  if (sharded) shards_total = check_slots(name, flat, flat_name, shard_sizes);
  check_bucket_impl(name, flat, flat_name, tensors.size(), get, /*written=*/!pack, shards_total);
  TORCH_CHECK_VALUE(flat.is_cpu(), name, ": bucket_cpu runs CPU buckets, got ", flat.device());
  ShardMap map;
  if (sharded) map = make_shard_map(shard_sizes, flat.numel());
  bucket_copy_cpu(flat, tensors.size(), get, scale, pack, sharded ? &map : nullptr);
  if (op == BucketOp::kPackShards) zero_padding(flat, shard_sizes);
}

void zero_padding(const at::Tensor& out, at::IntArrayRef shard_sizes) {
  const auto world = static_cast<int64_t>(shard_sizes.size());
  const int64_t slot = out.numel() / world;
  for (int64_t r = 0; r < world; ++r) {
    if (shard_sizes[r] < slot) out.narrow(0, r * slot + shard_sizes[r], slot - shard_sizes[r]).zero_();
  }
}

}  // namespace whale

TORCH_LIBRARY(whale, m) {
  m.def("pack(Tensor[] tensors, Tensor(a!) out, float scale=1.0) -> ()");
  m.def("unpack(Tensor flat, Tensor(a!)[] tensors, float scale=1.0) -> ()");
  m.def("pack_shards(Tensor[] tensors, Tensor(a!) out, int[] shard_sizes, float scale=1.0) -> ()");
  m.def(
      "unpack_shards(Tensor flat, Tensor(a!)[] tensors, int[] shard_sizes, float scale=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(whale, CPU, m) {
  m.impl("pack", &whale::pack_cpu);
  m.impl("unpack", &whale::unpack_cpu);
  m.impl("pack_shards", &whale::pack_shards_cpu);
  m.impl("unpack_shards", &whale::unpack_shards_cpu);
}

TORCH_LIBRARY_IMPL(whale, Meta, m) {
  m.impl("pack", &whale::pack_meta);
  m.impl("unpack", &whale::unpack_meta);
  m.impl("pack_shards", &whale::pack_shards_meta);
  m.impl("unpack_shards", &whale::unpack_shards_meta);
}
