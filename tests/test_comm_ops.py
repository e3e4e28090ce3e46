"""Gradient-bucket pack/unpack: the pure path against a reference, and the C++/CUDA extension.

The spec (csrc/whale_ops.cpp): each element becomes ``round_to_dst(opmath(x) * opmath(scale))``,
opmath being float64 if either side is float64 and float32 otherwise; one rounding, so the pure
path and the extension agree bit for bit and ``torch.equal`` is the right comparison.

The tests marked ``slow`` compile: the CPU extension once per session (about 10 s on 2 cores),
the CUDA sources with nvcc (about 20 s). Deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from whale import csrc_build
from whale.runtime import comm_ops

REPO = Path(__file__).resolve().parent.parent
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)
SCALES = (1.0, 0.37, 3.0)


@pytest.fixture
def pure(monkeypatch):
    """Force the pure-PyTorch path, whatever the session has loaded."""
    monkeypatch.setenv("WHALE_DISABLE_EXT", "1")


def _opmath(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return F64 if F64 in (a, b) else F32


def reference_pack(tensors, dtype, scale):
    """``torch.cat([t.flatten() for t in ts]) * scale`` cast, with the product made in opmath."""
    if not tensors:
        return torch.empty(0, dtype=dtype)
    return torch.cat(
        [(t.flatten().to(_opmath(t.dtype, dtype)) * scale).to(dtype) for t in tensors]
    )


def reference_unpack(flat, tensors, scale):
    out, offset = [], 0
    for t in tensors:
        piece = flat[offset : offset + t.numel()].view(t.shape)
        out.append((piece.to(_opmath(flat.dtype, t.dtype)) * scale).to(t.dtype))
        offset += t.numel()
    return out


def make(shape, dtype, layout="contiguous", seed=0):
    """A tensor of ``shape`` with the given memory layout (same values for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(shape[::-1], generator=gen).to(dtype).permute(
            *reversed(range(len(shape)))
        )
    if layout == "strided" and len(shape) >= 1:
        wide = torch.randn(*shape[:-1], shape[-1] * 2 + 1, generator=gen).to(dtype)
        return wide[..., 1::2]
    return torch.randn(shape, generator=gen).to(dtype)


def mixed_bucket(dtype):
    """Gradients as a reducer sees them, plus every layout the ops must accept."""
    return [
        make((3, 4), dtype, seed=1),
        make((5, 6), dtype, "transposed", seed=2),  # non-contiguous
        make((), dtype, seed=3),
        make((0, 3), dtype, seed=4),  # empty
        make((4, 5, 6), dtype, "strided", seed=5),  # non-contiguous
        make((2, 3, 4, 5), dtype, seed=6).to(memory_format=torch.channels_last),
        make((40_000,), dtype, seed=7),  # crosses the CPU kernel's parallel grain
    ]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1)).view(torch.uint8)


def assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


# --- the pure path -------------------------------------------------------------------------------

COMBOS = [
    (F32, F32), (F32, BF16), (BF16, F32), (F32, F16), (F16, F32),
    (BF16, BF16), (F16, F16), (F16, BF16), (F64, F32), (F32, F64),
]  # fmt: skip


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("src", "dst"), COMBOS, ids=lambda d: str(d).replace("torch.", ""))
def test_pure_pack_unpack_match_reference(pure, src, dst, scale):
    tensors = mixed_bucket(src)
    out = torch.full((sum(t.numel() for t in tensors),), float("nan"), dtype=dst)
    assert comm_ops.pack(tensors, out, scale) is out
    assert_same_bits(out, reference_pack(tensors, dst, scale))

    targets = [t.fill_(float("nan")) for t in mixed_bucket(src)]  # same layouts as `tensors`
    assert comm_ops.unpack(out, targets, scale) == targets
    for got, want, t in zip(targets, reference_unpack(out, targets, scale), tensors):
        assert got.stride() == t.stride()  # written in place, layout kept
        assert_same_bits(got, want)


@pytest.mark.parametrize(
    ("src", "dst"), [(F32, F32), (F32, BF16), (BF16, F32)], ids=["f32-f32", "f32-bf16", "bf16-f32"]
)
def test_pure_pack_matches_cat_reference(pure, src, dst):
    tensors = mixed_bucket(src)
    out = torch.empty(sum(t.numel() for t in tensors), dtype=dst)
    comm_ops.pack(tensors, out, 0.37)
    literal = (torch.cat([t.flatten() for t in tensors]) * 0.37).to(dst)
    if src == BF16:
        # The literal formula rounds the product to bfloat16 before the exact cast to float32;
        # pack rounds once, in float32, so they differ by at most half a bfloat16 ulp.
        torch.testing.assert_close(out, literal, rtol=2**-8, atol=0)
    else:
        assert_same_bits(out, literal)


def test_pure_roundtrip_is_identity(pure):
    tensors = mixed_bucket(F32)
    out = comm_ops.pack(tensors, torch.empty(sum(t.numel() for t in tensors)), 1.0)
    targets = comm_ops.unpack(out, [torch.zeros_like(t) for t in tensors])
    for got, want in zip(targets, tensors):
        assert_same_bits(got, want)


def test_pure_pack_reads_expanded_and_empty_lists(pure):
    base = torch.arange(3.0)
    out = comm_ops.pack([base.expand(2, 3)], torch.empty(6), 2.0)
    assert out.tolist() == [0.0, 2.0, 4.0, 0.0, 2.0, 4.0]
    assert comm_ops.pack([], torch.empty(0)).numel() == 0
    assert comm_ops.unpack(torch.empty(0), []) == []


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), max_size=6),
    layouts=st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=6),
    src=st.sampled_from(DTYPES),
    dst=st.sampled_from(DTYPES),
    scale=st.sampled_from((1.0, 0.5, 0.37, 3.0, 1 / 3)),
    seed=st.integers(0, 2**16),
)
def test_pure_property_random_buckets(shapes, layouts, src, dst, scale, seed):
    os.environ["WHALE_DISABLE_EXT"] = "1"  # a fixture would be shared across examples
    try:
        tensors = [make(s, src, lay, seed + i) for i, (s, lay) in enumerate(zip(shapes, layouts))]
        out = torch.empty(sum(t.numel() for t in tensors), dtype=dst)
        assert_same_bits(comm_ops.pack(tensors, out, scale), reference_pack(tensors, dst, scale))
        # Told the tensors' one dtype (as the reducers call it), the pure path skips its dtype
        # pass and gives the same bits.
        known = torch.full_like(out, float("nan"))
        assert_same_bits(comm_ops.pack(tensors, known, scale, dtype=src), out)
        targets = [make(s, src, lay, seed + 99) for s, lay in zip(shapes, layouts)]
        comm_ops.unpack(out, targets, scale)
        for got, want in zip(targets, reference_unpack(out, targets, scale)):
            assert_same_bits(got, want)
    finally:
        del os.environ["WHALE_DISABLE_EXT"]


# --- the padded-shard layout (reduce-scatter input / all-gather output) --------------------------


def reference_pack_shards(tensors, dtype, scale, sizes, slot):
    """Each rank's piece of the reference logical flat at the start of its slot, zeros after."""
    logical = reference_pack(tensors, dtype, scale)
    out = torch.zeros(len(sizes) * slot, dtype=dtype)
    start = 0
    for r, size in enumerate(sizes):
        out[r * slot : r * slot + size] = logical[start : start + size]
        start += size
    return out


def logical_of(flat, sizes):
    slot = flat.numel() // len(sizes)
    return torch.cat([flat[r * slot : r * slot + n] for r, n in enumerate(sizes)])


def test_shard_sizes_even_weighted_and_ranges():
    assert comm_ops.shard_sizes(10, 4) == [3, 3, 2, 2]
    assert comm_ops.shard_sizes(3, 5) == [1, 1, 1, 0, 0]
    assert comm_ops.shard_sizes(10, 2, [3.0, 1.0]) == [8, 2]  # 7.5 / 2.5: the tie goes to rank 0
    assert comm_ops.shard_sizes(0, 3) == [0, 0, 0]
    assert comm_ops.padded_numel([3, 3, 2, 2]) == 12
    assert [comm_ops.shard_range([3, 3, 2, 2], r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


@settings(max_examples=80, deadline=None)
@given(
    total=st.integers(0, 10_000),
    weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=9).filter(
        lambda w: sum(w) > 0
    ),
)
def test_shard_sizes_property(total, weights):
    sizes = comm_ops.shard_sizes(total, len(weights), weights)
    assert sum(sizes) == total and all(n >= 0 for n in sizes)
    for n, w in zip(sizes, weights):  # largest remainder: within one element of the exact share
        assert abs(n - total * w / sum(weights)) < 1
    even = comm_ops.shard_sizes(total, len(weights))
    assert sum(even) == total and max(even) - min(even) <= 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: comm_ops.shard_sizes(-1, 2), r"total must be an int >= 0"),
        (lambda: comm_ops.shard_sizes(5, 0), r"world_size must be an int >= 1"),
        (lambda: comm_ops.shard_sizes(5, 2, [1.0]), r"1 weights for world_size 2"),
        (lambda: comm_ops.shard_sizes(5, 2, [0.0, 0.0]), r"not all zero"),
        (lambda: comm_ops.shard_sizes(5, 2, [1.0, float("nan")]), r"must be finite"),
        (lambda: comm_ops.shard_range([2, 2], 2), r"rank 2 is not in \[0, 2\)"),
        (lambda: comm_ops.padded_numel([]), r"shard_sizes is empty"),
    ],
)
def test_shard_helpers_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), max_size=6),
    layouts=st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=6),
    src=st.sampled_from(DTYPES),
    dst=st.sampled_from(DTYPES),
    scale=st.sampled_from((1.0, 0.37, 3.0)),
    weights=st.lists(st.floats(0, 4, allow_nan=False), min_size=1, max_size=5).filter(
        lambda w: sum(w) > 0
    ),
    extra_slot=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_pure_shards_property(shapes, layouts, src, dst, scale, weights, extra_slot, seed):
    os.environ["WHALE_DISABLE_EXT"] = "1"
    try:
        tensors = [make(s, src, lay, seed + i) for i, (s, lay) in enumerate(zip(shapes, layouts))]
        sizes = comm_ops.shard_sizes(sum(t.numel() for t in tensors), len(weights), weights)
        slot = max(sizes) + extra_slot
        out = torch.full((len(sizes) * slot,), float("nan"), dtype=dst)
        assert comm_ops.pack_shards(tensors, out, sizes, scale) is out
        assert_same_bits(out, reference_pack_shards(tensors, dst, scale, sizes, slot))
        known = torch.full_like(out, float("nan"))
        assert_same_bits(comm_ops.pack_shards(tensors, known, sizes, scale, dtype=src), out)
        targets = [make(s, src, lay, seed + 99) for s, lay in zip(shapes, layouts)]
        assert comm_ops.unpack_shards(out, targets, sizes, scale) == targets
        for got, want in zip(targets, reference_unpack(logical_of(out, sizes), targets, scale)):
            assert_same_bits(got, want)
    finally:
        del os.environ["WHALE_DISABLE_EXT"]


def test_pure_shards_uneven_layout_by_hand(pure):
    # 7 elements over 3 ranks [3, 3, 1], slot 3: rank 2's slot is padded with two zeros.
    tensors = [torch.arange(1.0, 5.0).view(2, 2), torch.arange(5.0, 8.0)]
    out = comm_ops.pack_shards(tensors, torch.full((9,), float("nan")), [3, 3, 1], 2.0)
    assert out.tolist() == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 0.0, 0.0]
    back = comm_ops.unpack_shards(out, [torch.zeros(2, 2), torch.zeros(3)], [3, 3, 1], 0.5)
    assert torch.equal(back[0], tensors[0]) and torch.equal(back[1], tensors[1])


def _shard_error_cases():
    ok = [torch.ones(2, 3), torch.ones(4)]
    return [
        ("pack_shards", (ok, torch.empty(12), [3, 3, 3]), ValueError,
         r"the tensors hold 10 elements in total but shard_sizes sum to 9"),
        ("pack_shards", (ok, torch.empty(10), [5, 3, 2]), ValueError,
         r"out has 10 elements, which is not 3 slots of at least 5 .* = 15 \(padded_numel\)"),
        ("pack_shards", (ok, torch.empty(8), [5, 5]), ValueError, r"not 2 slots of at least 5"),
        ("pack_shards", (ok, torch.empty(12), [6, -1, 5]), ValueError,
         r"shard_sizes\[1\] is -1; shard sizes are >= 0"),
        ("pack_shards", (ok, torch.empty(12), []), ValueError, r"shard_sizes is empty"),
        ("pack_shards", (ok, torch.empty(12), "abc"), TypeError, r"shard_sizes must be a sequence"),
        ("pack_shards", (ok, torch.empty(12), [5.5, 4.5]), TypeError, r"shard_sizes must be ints"),
        ("pack_shards", (ok, torch.empty(3, 4), [5, 5]), ValueError, r"out must be a 1-D contiguous"),
        ("unpack_shards", (torch.empty(10), ok, [4, 4]), ValueError,
         r"the tensors hold 10 elements in total but shard_sizes sum to 8"),
        ("unpack_shards", (torch.empty(12, dtype=torch.int32), ok, [5, 5]), TypeError,
         r"flat has dtype torch\.int32"),
        ("unpack_shards", (torch.empty(12), [torch.ones(6), torch.zeros(1).expand(4)], [5, 5]),
         ValueError, r"tensors\[1\] has overlapping memory"),
    ]  # fmt: skip


SHARD_ERROR_CASES = _shard_error_cases()


@pytest.mark.parametrize(("op", "args", "error", "message"), SHARD_ERROR_CASES)
def test_pure_shard_argument_errors(pure, op, args, error, message):
    with pytest.raises(error, match=message):
        getattr(comm_ops, op)(*args)


def test_pure_unpack_rejects_targets_on_another_device(pure):
    with pytest.raises(ValueError, match=r"tensors\[0\] is on meta but flat is on cpu"):
        comm_ops.unpack(torch.ones(3), [torch.empty(3, device="meta")])


def test_pure_ops_trace_with_fake_tensors(pure):
    """The pure path is plain aten ops: it runs under FakeTensorMode and make_fx records it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(a, b, out):
        comm_ops.pack_shards([a, b], out, [4, 3], 0.5)
        comm_ops.unpack_shards(out, [a, b], [4, 3], 2.0)
        return a, b, out

    with FakeTensorMode():
        a, b, out = torch.empty(2, 2), torch.empty(3), torch.empty(8)
        step(a, b, out)
    graph = make_fx(step)(torch.ones(2, 2), torch.ones(3), torch.empty(8))
    assert "cat" in str(graph.graph) and "mul" in str(graph.graph)


def _error_cases():
    ok = [torch.ones(2, 3), torch.ones(4)]
    return [
        ("pack", (ok, torch.empty(9)), ValueError, r"hold 10 elements in total but out has 9"),
        ("pack", (ok, torch.empty(2, 5)), ValueError, r"out must be a 1-D contiguous tensor"),
        ("pack", (ok, torch.empty(20)[::2]), ValueError, r"contiguous=False"),
        ("pack", (ok, torch.empty(10, dtype=torch.int32)), TypeError, r"out has dtype torch.int32"),
        (
            "pack",
            ([torch.ones(6), torch.ones(4, dtype=torch.int64)], torch.empty(10)),
            TypeError,
            r"tensors\[1\] has dtype torch\.int64",
        ),
        ("pack", (ok, torch.empty(10), "0.5"), TypeError, r"scale must be a real number"),
        ("pack", (ok, torch.empty(10), True), TypeError, r"scale must be a real number"),
        ("unpack", (torch.empty(11), ok), ValueError, r"hold 10 elements in total but flat has 11"),
        (
            "unpack",
            (torch.empty(10), [torch.ones(2, 3), torch.zeros(1).expand(4)]),
            ValueError,
            r"tensors\[1\] has overlapping memory",
        ),
        (
            "unpack",
            (torch.empty(10, dtype=torch.uint8), ok),
            TypeError,
            r"flat has dtype torch\.uint8",
        ),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize(("op", "args", "error", "message"), ERROR_CASES)
def test_pure_argument_errors(pure, op, args, error, message):
    with pytest.raises(error, match=message):
        getattr(comm_ops, op)(*args)


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_pure_pack_into_a_bucket_slice_never_spills(pure, dtype):
    """The pure pack cats straight into ``out``: too many elements must neither write past a
    slice of a bigger buffer nor move the buffer's storage; too few raise the size error."""
    buffer = torch.full((20,), 5.0, dtype=dtype)
    ptr = buffer.data_ptr()
    with pytest.raises(ValueError, match="the tensors hold 12 elements in total but out has 10"):
        comm_ops.pack([torch.ones(6), torch.ones(6)], buffer[:10], 0.5)
    assert buffer.data_ptr() == ptr and torch.equal(buffer[10:], torch.full((10,), 5.0, dtype=dtype))
    with pytest.raises(ValueError, match="the tensors hold 8 elements in total but out has 10"):
        comm_ops.pack([torch.ones(4), torch.ones(4)], buffer[:10], 0.5)
    assert buffer.data_ptr() == ptr and buffer[:10].shape == (10,)
    out = comm_ops.pack([torch.ones(4), torch.full((6,), 2.0)], buffer[:10], 0.5)
    assert torch.equal(out, reference_pack([torch.ones(4), torch.full((6,), 2.0)], dtype, 0.5))
    assert torch.equal(buffer[10:], torch.full((10,), 5.0, dtype=dtype))


def test_pure_pack_told_the_dtype_never_spills(pure):
    """``dtype=`` skips only the dtype pass: the size checks of the direct path stay."""
    buffer = torch.full((20,), 5.0)
    with pytest.raises(ValueError, match="the tensors hold 12 elements in total but out has 10"):
        comm_ops.pack([torch.ones(6), torch.ones(6)], buffer[:10], 0.5, dtype=F32)
    with pytest.raises(ValueError, match="the tensors hold 8 elements in total but out has 10"):
        comm_ops.pack([torch.ones(4), torch.ones(4)], buffer[:10], 0.5, dtype=F32)
    assert torch.equal(buffer[10:], torch.full((10,), 5.0))


@pytest.mark.parametrize("op", ("pack", "pack_shards"))
@pytest.mark.parametrize("backend", ("pure", "extension-or-pure"))
def test_pack_dtype_must_be_a_bucket_dtype(monkeypatch, op, backend):
    if backend == "pure":
        monkeypatch.setenv("WHALE_DISABLE_EXT", "1")
    call = {
        "pack": lambda d: comm_ops.pack([torch.ones(3)], torch.empty(3), dtype=d),
        "pack_shards": lambda d: comm_ops.pack_shards([torch.ones(3)], torch.empty(4), [2, 1], dtype=d),
    }[op]
    for bad in (torch.int64, "float32"):
        with pytest.raises(TypeError, match=rf"whale.{op}: dtype must be None or one of torch.float16"):
            call(bad)


def test_pure_device_mismatch(pure):
    with pytest.raises(ValueError, match=r"tensors\[0\] is on meta but out is on cpu"):
        comm_ops.pack([torch.empty(3, device="meta")], torch.empty(3))


def test_backend_switches(monkeypatch):
    monkeypatch.setenv("WHALE_DISABLE_EXT", "1")
    assert comm_ops.backend() == "pure"
    monkeypatch.delenv("WHALE_DISABLE_EXT")
    # Only CPU kernels loaded: CUDA buckets take the pure path and say why.
    monkeypatch.setattr(comm_ops, "_extension_kernels", lambda: frozenset({"cpu"}))
    assert comm_ops.backend("cpu") == "extension"
    assert comm_ops.backend("cuda") == "pure"
    with pytest.warns(UserWarning, match="built without CUDA kernels"):
        assert not comm_ops._use_extension(torch.device("cuda"))


def test_build_directory_follows_cache_root_and_sources(monkeypatch, tmp_path):
    # The package ships the sources as whale/csrc (a link to the checkout's csrc/).
    assert csrc_build.source_dir().resolve() == (REPO / "csrc").resolve()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = csrc_build.build_directory(with_cuda=False)
    assert first.parent == tmp_path and first == csrc_build.build_directory(with_cuda=False)
    assert first != csrc_build.build_directory(with_cuda=True)
    assert csrc_build.load_prebuilt() is None or csrc_build.ops_registered()


def test_ninja_from_an_unactivated_venv_is_found(monkeypatch):
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    monkeypatch.setenv("PATH", os.pathsep.join(["/nowhere", "/usr/bin"]))
    with csrc_build._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[-1] == scripts
    assert os.environ["PATH"] == os.pathsep.join(["/nowhere", "/usr/bin"])


# --- the C++ extension (slow: compiles once per session) ---------------------------------------


@pytest.fixture(scope="session")
def extension(tmp_path_factory):
    """Build the CPU extension in a fresh cache (a subprocess: a clean build whatever this process
    has loaded), then load it here from that cache, as a later process would."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH: the extension cannot be built here")
    cache = tmp_path_factory.mktemp("torch_extensions")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "PYTHONPATH": str(REPO)}
    env.pop("WHALE_DISABLE_EXT", None)
    code = "from whale.runtime import comm_ops; print(comm_ops.build_extension())"
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"extension build failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    library = Path(proc.stdout.strip().splitlines()[-1])
    assert library.is_file() and library.parent.parent == cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(cache))
        mp.delenv("WHALE_DISABLE_EXT", raising=False)
        comm_ops._extension_kernels.cache_clear()
        assert comm_ops.extension_available(), "built, but not found in the cache"
    return library


def _both_backends(monkeypatch, fn):
    monkeypatch.setenv("WHALE_DISABLE_EXT", "1")
    expected = fn()
    monkeypatch.delenv("WHALE_DISABLE_EXT")
    assert comm_ops.backend("cpu") == "extension"
    return fn(), expected


@pytest.mark.slow
@pytest.mark.parametrize("scale", (1.0, 0.37))
@pytest.mark.parametrize("dst", DTYPES, ids=str)
@pytest.mark.parametrize("src", DTYPES, ids=str)
def test_extension_matches_pure_bitwise(extension, monkeypatch, src, dst, scale):
    tensors = mixed_bucket(src)
    numel = sum(t.numel() for t in tensors)

    def run():
        out = comm_ops.pack(tensors, torch.full((numel,), float("nan"), dtype=dst), scale)
        targets = [t.fill_(float("nan")) for t in mixed_bucket(src)]
        return out, comm_ops.unpack(out, targets, scale)

    (out, targets), (out_pure, targets_pure) = _both_backends(monkeypatch, run)
    assert_same_bits(out, out_pure)
    for got, want in zip(targets, targets_pure):
        assert got.stride() == want.stride()
        assert_same_bits(got, want)


@pytest.mark.slow
def test_extension_many_small_tensors(extension, monkeypatch):
    # A bucket as the reducer builds it: hundreds of biases and a few matrices, bf16 traffic.
    tensors = [make((64,), F32, seed=i) for i in range(300)]
    tensors += [make((96, 80), F32, "transposed", seed=1000 + i) for i in range(4)]
    numel = sum(t.numel() for t in tensors)

    def run():
        out = comm_ops.pack(tensors, torch.empty(numel, dtype=BF16), 1 / 3)
        return out, comm_ops.unpack(out, [torch.empty_like(t) for t in tensors], 3.0)

    (out, targets), (out_pure, targets_pure) = _both_backends(monkeypatch, run)
    assert_same_bits(out, out_pure)
    for got, want in zip(targets, targets_pure):
        assert_same_bits(got, want)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=4).map(tuple), max_size=8),
    layouts=st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=8),
    src=st.sampled_from(DTYPES),
    dst=st.sampled_from(DTYPES),
    scale=st.sampled_from((1.0, 0.37, 3.0)),
)
def test_extension_property_random_buckets(extension, shapes, layouts, src, dst, scale):
    tensors = [make(s, src, lay, i) for i, (s, lay) in enumerate(zip(shapes, layouts))]
    out = torch.empty(sum(t.numel() for t in tensors), dtype=dst)
    torch.ops.whale.pack(tensors, out, scale)
    assert_same_bits(out, reference_pack(tensors, dst, scale))
    targets = [make(s, src, lay, 99) for s, lay in zip(shapes, layouts)]
    torch.ops.whale.unpack(out, targets, scale)
    for got, want in zip(targets, reference_unpack(out, targets, scale)):
        assert_same_bits(got, want)


@pytest.mark.slow
@pytest.mark.parametrize(("op", "args", "error", "message"), ERROR_CASES)
def test_extension_argument_errors_match_pure(extension, monkeypatch, op, args, error, message):
    monkeypatch.delenv("WHALE_DISABLE_EXT", raising=False)
    with pytest.raises(error, match=message) as ext_error:
        getattr(comm_ops, op)(*args)
    monkeypatch.setenv("WHALE_DISABLE_EXT", "1")
    with pytest.raises(error) as pure_error:
        getattr(comm_ops, op)(*args)
    assert str(ext_error.value).splitlines()[0] == str(pure_error.value)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=4).map(tuple), max_size=8),
    layouts=st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=8),
    src=st.sampled_from(DTYPES),
    dst=st.sampled_from(DTYPES),
    scale=st.sampled_from((1.0, 0.37, 3.0)),
    weights=st.lists(st.floats(0, 4, allow_nan=False), min_size=1, max_size=5).filter(
        lambda w: sum(w) > 0
    ),
    extra_slot=st.integers(0, 2),
)
def test_extension_shards_match_pure(extension, shapes, layouts, src, dst, scale, weights, extra_slot):
    tensors = [make(s, src, lay, i) for i, (s, lay) in enumerate(zip(shapes, layouts))]
    sizes = comm_ops.shard_sizes(sum(t.numel() for t in tensors), len(weights), weights)
    numel = len(sizes) * (max(sizes) + extra_slot)
    outs, backs = [], []
    for disable in ("0", "1"):  # extension, then pure
        os.environ["WHALE_DISABLE_EXT"] = disable
        try:
            out = comm_ops.pack_shards(tensors, torch.full((numel,), float("nan"), dtype=dst), sizes, scale)
            targets = [make(s, src, lay, 99) for s, lay in zip(shapes, layouts)]
            outs.append(out)
            backs.append(comm_ops.unpack_shards(out, targets, sizes, scale))
        finally:
            del os.environ["WHALE_DISABLE_EXT"]
    assert_same_bits(outs[0], outs[1])
    for got, want in zip(*backs):
        assert_same_bits(got, want)


@pytest.mark.slow
def test_extension_shards_cross_the_parallel_grain(extension, monkeypatch):
    # 40,000-element tensors over 3 uneven shards: the CPU kernel's chunks cross shard edges.
    tensors = [make((40_000,), F32, seed=1), make((300, 70), F32, "transposed", seed=2), make((7,), F32)]
    sizes = comm_ops.shard_sizes(sum(t.numel() for t in tensors), 3, [1.0, 2.0, 0.5])

    def run():
        out = comm_ops.pack_shards(tensors, torch.empty(comm_ops.padded_numel(sizes) + 3, dtype=BF16)[:-3], sizes, 0.5)
        return out, comm_ops.unpack_shards(out, [torch.empty_like(t) for t in tensors], sizes, 2.0)

    (out, back), (out_pure, back_pure) = _both_backends(monkeypatch, run)
    assert_same_bits(out, out_pure)
    for got, want in zip(back, back_pure):
        assert_same_bits(got, want)


@pytest.mark.slow
@pytest.mark.parametrize(("op", "args", "error", "message"), SHARD_ERROR_CASES)
def test_extension_shard_errors_match_pure(extension, monkeypatch, op, args, error, message):
    monkeypatch.delenv("WHALE_DISABLE_EXT", raising=False)
    with pytest.raises(error, match=message) as ext_error:
        getattr(comm_ops, op)(*args)
    monkeypatch.setenv("WHALE_DISABLE_EXT", "1")
    with pytest.raises(error) as pure_error:
        getattr(comm_ops, op)(*args)
    assert str(ext_error.value).splitlines()[0] == str(pure_error.value)


@pytest.mark.slow
def test_extension_ops_check_bad_sizes_themselves(extension):
    """Called directly (not through comm_ops), the ops check what the wrappers check."""
    with pytest.raises(ValueError, match=r"shard_sizes\[0\] is -2; shard sizes are >= 0"):
        torch.ops.whale.pack_shards([torch.ones(3)], torch.empty(10), [-2, 5], 1.0)
    with pytest.raises(ValueError, match=r"shard_sizes is empty"):
        torch.ops.whale.unpack_shards(torch.empty(3), [torch.ones(3)], [], 1.0)


@pytest.mark.slow
def test_extension_ops_trace(extension, monkeypatch):
    """Meta kernels: the ops run under FakeTensorMode (with their checks), make_fx records them
    as single nodes, and torch.compile(fullgraph=True) compiles a step that calls them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.delenv("WHALE_DISABLE_EXT", raising=False)

    def step(a, b, out):
        torch.ops.whale.pack_shards([a, b], out, [4, 3], 0.5)
        torch.ops.whale.unpack_shards(out, [a, b], [4, 3], 2.0)
        torch.ops.whale.pack([a, b], out[:7], 1.0)
        torch.ops.whale.unpack(out[:7], [a, b], 1.0)
        return out

    with FakeTensorMode():
        step(torch.empty(2, 2), torch.empty(3), torch.empty(8))
        with pytest.raises(ValueError, match=r"shard_sizes sum to 6"):
            torch.ops.whale.pack_shards([torch.empty(7)], torch.empty(8), [3, 3], 1.0)
    graph = str(make_fx(step)(torch.ones(2, 2), torch.ones(3), torch.empty(8)).graph)
    for name in ("whale.pack_shards", "whale.unpack_shards", "whale.pack", "whale.unpack"):
        assert name in graph
    a, b = torch.arange(4.0).view(2, 2), torch.arange(4.0, 7.0)
    want = step(a.clone(), b.clone(), torch.empty(8))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(a.clone(), b.clone(), torch.empty(8))
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("dst", (F32, BF16, F16), ids=str)
def test_direct_entry_matches_the_dispatched_ops_bitwise(extension, dst):
    """csrc/whale_ops_py.cpp's entry runs the same kernel as torch.ops.whale.*: every op, every
    layout of mixed_bucket (uneven sizes, empty, non-contiguous), fp32/bf16/fp16 buckets."""
    entry = csrc_build.python_entry()
    assert entry is not None, "the extension is loaded but its Python entry is not"
    tensors = mixed_bucket(F32) + mixed_bucket(BF16)[:3] + mixed_bucket(F16)[:3]
    numel = sum(t.numel() for t in tensors)
    sizes = comm_ops.shard_sizes(numel, 3, [1.0, 2.0, 0.5])
    for op, flat_numel, shard in ((0, numel, []), (2, comm_ops.padded_numel(sizes), sizes)):
        direct = torch.full((flat_numel,), float("nan"), dtype=dst)
        dispatched = direct.clone()
        assert entry(op, direct, tensors, shard, 0.37) is True
        if shard:
            torch.ops.whale.pack_shards(tensors, dispatched, shard, 0.37)
        else:
            torch.ops.whale.pack(tensors, dispatched, 0.37)
        assert_same_bits(direct, dispatched)
        targets = [torch.empty_like(t) for t in tensors]
        assert entry(op + 1, direct, targets, shard, 3.0) is True
        want = [torch.empty_like(t) for t in tensors]
        if shard:
            torch.ops.whale.unpack_shards(dispatched, want, shard, 3.0)
        else:
            torch.ops.whale.unpack(dispatched, want, 3.0)
        for got, expected in zip(targets, want):
            assert got.stride() == expected.stride()
            assert_same_bits(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("scale", (1.0, 0.5))
def test_extension_packs_a_buckets_own_views(extension, monkeypatch, scale):
    """Tensors that are views of ``out`` at their own offsets (a bucket packed into itself):
    every element is read before it is written, as the pure path's cat does."""
    monkeypatch.delenv("WHALE_DISABLE_EXT", raising=False)
    buf = make((50_000,), F32, seed=3)
    want = reference_pack([buf], F32, scale)
    comm_ops.pack([buf[:300], buf[300:40_000], buf[40_000:]], buf, scale)
    assert_same_bits(buf, want)


class _Marked(torch.Tensor):
    """A tensor subclass: its calls must reach __torch_function__ through torch.ops."""


@pytest.mark.slow
def test_direct_entry_declines_what_the_dispatcher_must_see(extension, monkeypatch):
    """Negative views, subclasses, fake tensors, torch function modes and bad arguments go
    through torch.ops (False, nothing written); comm_ops then gives the dispatcher's result or
    error. Inference tensors are plain CPU tensors and are taken."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    monkeypatch.delenv("WHALE_DISABLE_EXT", raising=False)
    entry = csrc_build.python_entry()
    a, b = make((3, 4), F32, seed=1), make((5,), F32, seed=2)
    want = reference_pack([a, b], F32, 0.5)
    out = torch.full((17,), 7.0)

    def declined(tensors, flat=None):
        flat = out if flat is None else flat
        before = flat.clone()
        taken = entry(0, flat, tensors, [], 0.5)
        return taken is False and torch.equal(flat, before)

    assert declined([torch._neg_view(a), b])
    assert torch.equal(comm_ops.pack([torch._neg_view(a), b], out, 0.5), reference_pack([-a, b], F32, 0.5))
    assert declined([a.as_subclass(_Marked), b])
    assert declined([a, b], torch.full((16,), 7.0))  # 17 elements into 16
    with pytest.raises(ValueError, match="the tensors hold 17 elements in total but out has 16"):
        comm_ops.pack([a, b], torch.empty(16), 0.5)
    assert declined([a.to(torch.int32), b])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int32"):
        comm_ops.pack([a.to(torch.int32), b], out, 0.5)

    class Counting(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        assert declined([a, b])
        comm_ops.pack([a, b], out, 0.5)
    assert Counting.calls > 0 and torch.equal(out, want)
    with FakeTensorMode():
        fake_out = torch.empty(17)
        comm_ops.pack([torch.empty(3, 4), torch.empty(5)], fake_out, 0.5)  # the Meta kernel
    with torch.inference_mode():
        a_inf, b_inf, out_inf = a.clone(), b.clone(), torch.empty(17)
    assert entry(0, out_inf, [a_inf, b_inf], [], 0.5) is True and torch.equal(out_inf, want)
    assert entry(0, out, [a, b], [], 0.5) is True and torch.equal(out, want)


# --- the CUDA sources (slow: nvcc, no GPU needed) ------------------------------------------------


def _nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc") or (CUDA_HOME and shutil.which(str(Path(CUDA_HOME) / "bin/nvcc")))
    if not found:
        pytest.skip("nvcc not found (no CUDA toolkit): the CUDA sources are not compile-checked")
    return found


def _cuda_includes() -> list[str]:
    """The CUDA toolkit's include directories, as nvcc itself reports them (nvcc may be a
    wrapper script outside the toolkit)."""
    probe = subprocess.run([_nvcc(), "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                           check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    found = re.search(r'INCLUDES="([^"]*)"', probe.stdout + probe.stderr)
    assert found, f"nvcc --dryrun names no include directory:\n{probe.stderr[-2000:]}"
    return [flag[2:] for flag in found.group(1).split() if flag.startswith("-I")]


def _nvcc_flags() -> list[str]:
    # The flags torch.utils.cpp_extension gives nvcc on Linux.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-std=c++20", "-O3"]


@pytest.fixture(scope="module")
def cuda_kernels(tmp_path_factory) -> tuple[Path, str]:
    """whale_ops_cuda_kernels.cu compiled once with nvcc: the object and ptxas's report."""
    obj = tmp_path_factory.mktemp("cuda") / "kernels.o"
    proc = subprocess.run(
        [_nvcc(), "-c", str(REPO / "csrc/whale_ops_cuda_kernels.cu"), "-o", str(obj),
         *_nvcc_flags(), "-Xptxas", "-v"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    return obj, proc.stderr


@pytest.mark.slow
def test_cuda_kernels_compile_with_nvcc(cuda_kernels):
    """The torch-free kernel + launcher: one fused kernel per flat dtype and direction."""
    obj, report = cuda_kernels
    assert obj.stat().st_size > 0
    kernels = set(re.findall(r"Compiling entry function '(\w*bucket_copy_kernel\w*)'", report))
    assert len(kernels) == 8, kernels  # {float, half, bfloat16, double} x {pack, unpack}
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-C", str(obj)], check=False, capture_output=True, text=True).stdout
        assert re.search(r" T whale_cuda::launch_bucket_copy\(", symbols)


@pytest.mark.slow
def test_cuda_glue_compiles_against_torch_headers(tmp_path, cuda_kernels):
    """whale_ops_cuda.cpp: the CUDA dispatch registration, host code only, so the build gives it
    to the host compiler with the CUDA headers (as torch.utils.cpp_extension does for a .cpp
    of a CUDA build), with the extension's own flags; it calls the launcher by the signature
    whale_ops_cuda_kernels.cu defines."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler on PATH: the CUDA glue is not compile-checked")
    includes = [arg for path in [*include_paths(), *_cuda_includes()] for arg in ("-isystem", path)]
    cflags, _ = csrc_build._host_flags()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    glue = tmp_path / "glue.o"
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; this define is torch's
    # own switch to skip it (it only matters for Windows DLL exports).
    proc = subprocess.run(
        [compiler, "-c", str(REPO / "csrc/whale_ops_cuda.cpp"), "-o", str(glue), "-fPIC", "-std=c++20", abi,
         *cflags, f"-I{REPO / 'csrc'}", *includes, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert glue.stat().st_size > 0
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-C", str(glue)], check=False, capture_output=True, text=True).stdout
        launcher = re.search(r" U (whale_cuda::launch_bucket_copy\(.*\))$", symbols, re.MULTILINE)
        assert launcher, "the glue does not call whale_cuda::launch_bucket_copy"
        defined = subprocess.run(["nm", "-C", str(cuda_kernels[0])], check=False, capture_output=True,
                                 text=True).stdout  # fmt: skip
        assert f" T {launcher.group(1)}" in defined, (launcher.group(1), defined)
