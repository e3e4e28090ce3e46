"""Bucket ops: the C++ extension and whale's pure-PyTorch fallback against the best plain sequence.

For each bucket (200 tensors / 25 MB, 5,000 tensors of 1 KB, and a mixed bucket of 2-D weights
and 1-D biases) and each op (``pack``, ``unpack``, ``pack_shards`` / ``unpack_shards`` with 4
uneven shards), three contenders run in alternating rounds on the same tensors:

- ``best pure``: in each round, the fastest of the plain PyTorch sequences a user could write,
  with everything that does not depend on the values computed beforehand (sizes, views of the
  tensors and of preallocated buffers): pack: ``torch.cat(ts, out=out)`` then one in-place
  ``mul_``, or ``torch.cat`` into a temporary then ``mul(out=)`` (the only one when the dtype
  narrows: one rounding); unpack: one ``mul`` into a temporary, ``split_with_sizes``, one
  ``torch._foreach_copy_``, or the same into a preallocated temporary whose views were made
  once; pack_shards: ``cat`` then a ``mul(out=)`` per rank's slot, or each shard's pieces (the
  tensors cut at the shard edges, views made once) ``cat`` into its slot, then one ``mul_``;
  unpack_shards: the slots ``cat`` together, then as unpack. N-D tensors are flattened with
  ``view(-1)``. The last column names the fastest sequence;
- ``fallback``: ``whale.runtime.comm_ops`` with ``WHALE_DISABLE_EXT=1`` (what users without a
  compiler get), arguments checked as always;
- ``fb, dtype``: the same call of ``pack`` / ``pack_shards`` given the tensors' one dtype
  (``dtype=``), as whale's gradient reducers call them (a bucket holds one parameter dtype), so
  the fallback skips its pass over the tensors' dtypes;
- ``extension``: the same call with ``torch.ops.whale.*`` loaded (``whale build-ext`` first;
  skipped with a note when it is not built).

Each round times every contender (best of ``--repeat`` calls) and the printed ratios are medians
over rounds of per-round ratios: ``ext speedup`` = best pure / extension (goals: >= 1.3x for
200 / 25 MB, >= 2x for 5,000 x 1 KB, pack); ``fb/per call`` = fallback / the fastest sequence
that makes everything but the sizes per call, as a stateless op must; ``fb+dtype/pc`` = the
same for ``fb, dtype`` (goal <= 1.2x, the fallback as whale's reducers run it); ``fb/best`` =
fallback / best pure, views cached included.

Run::

    python -m whale.cli build-ext        # once, for the extension column
    python benchmarks/bench_comm_ops.py
    python benchmarks/bench_comm_ops.py --rounds 9 --threads 4 --dtype bfloat16
    python benchmarks/bench_comm_ops.py --threads 1 --clock cpu   # on a busy host
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from whale.runtime import comm_ops

SCALE = 0.37
NUM_SHARDS = 4
# Sequences that reuse views made once (of the tensors, of a preallocated temporary): a stateful
# caller's; whale's stateless ops are held to the others ("per call").
CACHED = ("prealloc views", "cat per slot+mul_")


def make_bucket(kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "200 x 125 KB":
        return [torch.randn(25 * 2**20 // 4 // 200, generator=gen) for _ in range(200)]
    if kind == "5000 x 1 KB":
        return [torch.randn(256, generator=gen) for _ in range(5000)]
    # A transformer-like bucket: matrices and their biases / norms, 2-D and 1-D mixed.
    bucket = []
    for _ in range(100):
        bucket += [torch.randn(64, 64, generator=gen), torch.randn(64, generator=gen)]
        bucket += [torch.randn(256, 64, generator=gen), torch.randn(256, generator=gen)]
    return bucket


def plain_sequences(ts: list[torch.Tensor], dtype: torch.dtype, op: str) -> dict[str, Callable[[], object]]:
    """The plain PyTorch sequences a user could write for ``op``, everything that does not
    depend on the values computed up front: the sizes for all of them, and for those marked
    ``cached`` (:data:`CACHED`) also views of the tensors and of preallocated buffers, which
    only a caller that keeps its buckets between calls can reuse. The anchor of each round is
    the fastest of them in that round."""
    numels = [t.numel() for t in ts]
    total = sum(numels)
    one_d = all(t.dim() == 1 for t in ts)
    flat_ts = ts if one_d else [t.view(-1) for t in ts]  # made once: for the cached sequences

    def flats() -> list[torch.Tensor]:  # made per call: N-D tensors viewed as 1-D
        return ts if one_d else [t.view(-1) for t in ts]
    sizes = comm_ops.shard_sizes(total, NUM_SHARDS, [1.0, 1.0, 1.0, 0.7])
    slot = max(sizes)
    sharded = op.endswith("_shards")
    out = torch.empty(slot * NUM_SHARDS if sharded else total, dtype=dtype)
    if op == "unpack_shards":
        comm_ops.pack_shards(ts, out, sizes)
    elif op == "unpack":
        comm_ops.pack(ts, out)
    same = dtype == ts[0].dtype
    slots = out.view(NUM_SHARDS, slot) if sharded else None
    joined = torch.empty(total, dtype=dtype)  # a preallocated temporary
    joined_pieces = [p.view(t.shape) for p, t in zip(joined.split_with_sizes(numels), ts)]
    # The tensors cut at the shard edges, each shard's pieces in order (views, made once).
    shard_pieces: list[list[torch.Tensor]] = [[] for _ in sizes]
    r, room = 0, sizes[0]
    for f in flat_ts:
        start = 0
        while start < f.numel():
            while room == 0:
                r += 1
                room = sizes[r]
            take = min(room, f.numel() - start)
            shard_pieces[r].append(f[start : start + take])
            start += take
            room -= take

    def pack_cat_out_mul_() -> None:  # cat into out, one in-place mul
        torch.cat(flats(), out=out)
        out.mul_(SCALE)

    def pack_cat_mul_out() -> None:  # cat into a temporary, mul(out=): one rounding
        torch.mul(torch.cat(flats()), SCALE, out=out)

    def unpack_mul_split_copy() -> None:
        pieces = torch.mul(out, SCALE).split_with_sizes(numels)
        torch._foreach_copy_(ts, pieces if one_d else [p.view(t.shape) for p, t in zip(pieces, ts)])

    def unpack_preallocated() -> None:  # mul into a preallocated temporary, its views made once
        torch.mul(out, SCALE, out=joined)
        torch._foreach_copy_(ts, joined_pieces)

    def pack_shards_cat_then_slots() -> None:
        cat = torch.cat(flats())
        start = 0
        for r, size in enumerate(sizes):
            torch.mul(cat[start : start + size], SCALE, out=slots[r, :size])
            slots[r, size:].zero_()
            start += size

    def pack_shards_cat_per_slot() -> None:  # each shard's pieces straight into its slot
        for r, size in enumerate(sizes):
            if size:
                torch.cat(shard_pieces[r], out=slots[r, :size])
            slots[r, size:].zero_()
        out.mul_(SCALE)

    def unpack_shards_cat_split_copy() -> None:
        cat = torch.cat([slots[r, :size] for r, size in enumerate(sizes)])
        pieces = torch.mul(cat, SCALE).split_with_sizes(numels)
        torch._foreach_copy_(ts, pieces if one_d else [p.view(t.shape) for p, t in zip(pieces, ts)])

    def unpack_shards_preallocated() -> None:
        torch.cat([slots[r, :size] for r, size in enumerate(sizes)], out=joined)
        joined.mul_(SCALE)
        torch._foreach_copy_(ts, joined_pieces)

    sequences = {
        "pack": {"cat(out)+mul_": pack_cat_out_mul_, "mul(cat,out)": pack_cat_mul_out},
        "unpack": {"mul+split+copy": unpack_mul_split_copy, "prealloc views": unpack_preallocated},
        "pack_shards": {"cat+mul per slot": pack_shards_cat_then_slots, "cat per slot+mul_": pack_shards_cat_per_slot},
        "unpack_shards": {"cat+mul+split+copy": unpack_shards_cat_split_copy, "prealloc views": unpack_shards_preallocated},
    }[op]
    if not same:  # a narrowing cast: the product must be rounded once, from the wide dtype
        sequences = {k: v for k, v in sequences.items() if k in ("mul(cat,out)", "mul+split+copy", "cat+mul per slot", "cat+mul+split+copy")}
    return sequences


def whale_call(
    ts: list[torch.Tensor], dtype: torch.dtype, op: str, disable_ext: bool, known: bool = False
) -> Callable[[], object]:
    """``comm_ops.<op>`` on ``ts``; ``known``: pack ops are given the tensors' one dtype."""
    total = sum(t.numel() for t in ts)
    hint = {"dtype": ts[0].dtype} if known else {}
    sizes = comm_ops.shard_sizes(total, NUM_SHARDS, [1.0, 1.0, 1.0, 0.7])
    out = torch.empty(total if op in ("pack", "unpack") else comm_ops.padded_numel(sizes), dtype=dtype)
    calls = {
        "pack": lambda: comm_ops.pack(ts, out, SCALE, **hint),
        "unpack": lambda: comm_ops.unpack(out, ts, SCALE),
        "pack_shards": lambda: comm_ops.pack_shards(ts, out, sizes, SCALE, **hint),
        "unpack_shards": lambda: comm_ops.unpack_shards(out, ts, sizes, SCALE),
    }

    def call() -> object:
        old = os.environ.get("WHALE_DISABLE_EXT")
        os.environ["WHALE_DISABLE_EXT"] = "1" if disable_ext else "0"
        try:
            return calls[op]()
        finally:
            if old is None:
                del os.environ["WHALE_DISABLE_EXT"]
            else:
                os.environ["WHALE_DISABLE_EXT"] = old

    return call


def best_of(fn: Callable[[], object], repeat: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="calls per contender per round (best taken)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bucket dtype")
    parser.add_argument("--ops", default="pack,unpack,pack_shards,unpack_shards")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="cpu: this thread's CPU time (use with --threads 1), steadier on a loaded host",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    has_ext = comm_ops.extension_available()
    print(f"torch {torch.__version__}, {args.threads} threads, bucket dtype {dtype}, scale {SCALE}, "
          f"{args.rounds} alternating rounds x best of {args.repeat}, {args.clock} clock")
    if not has_ext:
        print("extension not built: run `whale build-ext` for the extension column")
    print(f"{'bucket':<16} {'op':<14} {'best pure':>10} {'per call':>10} {'fallback':>10} {'extension':>10} "
          f"{'fb/per call':>12} {'fb+dtype/pc':>12} {'fb/best':>8} {'ext speedup':>12}  fastest plain sequence")
    for kind in ("200 x 125 KB", "5000 x 1 KB", "mixed 2-D/1-D"):
        ts = make_bucket(kind)
        for op in args.ops.split(","):
            plain = plain_sequences(ts, dtype, op)
            contenders = {f"plain {name}": fn for name, fn in plain.items()}
            contenders["fallback"] = whale_call(ts, dtype, op, True)
            if op.startswith("pack"):
                contenders["fb, dtype"] = whale_call(ts, dtype, op, True, known=True)
            if has_ext:
                contenders["extension"] = whale_call(ts, dtype, op, False)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    fn()  # warm: allocator, caches
                    times[name].append(best_of(fn, args.repeat, clock))
            # The anchors: the fastest plain sequence of each round, and the fastest of those
            # that make everything but the sizes per call (as a stateless op must).
            times["best"] = [min(times[f"plain {name}"][i] for name in plain) for i in range(args.rounds)]
            per_call = [name for name in plain if name not in CACHED]
            times["per call"] = [min(times[f"plain {name}"][i] for name in per_call) for i in range(args.rounds)]
            winner = min(plain, key=lambda name: statistics.median(times[f"plain {name}"]))
            med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            fallback_ratio = statistics.median(f / b for f, b in zip(times["fallback"], times["per call"]))
            fallback_best = statistics.median(f / b for f, b in zip(times["fallback"], times["best"]))
            known = (
                f"{statistics.median(f / b for f, b in zip(times['fb, dtype'], times['per call'])):>11.2f}x"
                if "fb, dtype" in times
                else f"{'-':>12}"
            )
            ext = f"{med['extension']:>8.2f}ms" if has_ext else f"{'-':>10}"
            speedup = (
                f"{statistics.median(b / e for b, e in zip(times['best'], times['extension'])):>11.2f}x"
                if has_ext
                else f"{'-':>12}"
            )
            print(f"{kind:<16} {op:<14} {med['best']:>8.2f}ms {med['per call']:>8.2f}ms {med['fallback']:>8.2f}ms "
                  f"{ext} {fallback_ratio:>11.2f}x {known} {fallback_best:>7.2f}x {speedup}  {winner}")


if __name__ == "__main__":
    main()
