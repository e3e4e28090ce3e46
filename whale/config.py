"""``wh.Config``: every knob of a parallelized program, validated when it is made."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .ir.schedule import SCHEDULE_NAMES

__all__ = ["Config"]

_STRATEGIES = ("replicate",)
_REDUCTIONS = ("mean", "sum")
_COMM_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
_ZERO_STAGES = (0, 1, 2, 3)
_CHECKPOINTING = ("none", "auto")
_OFFLOAD = ("none", "optimizer", "params")


class _FrozenSizes(Mapping):
    """``Config.shard_sizes`` once validated: a read-only, hashable mapping of module path to a
    tuple of per-rank counts, so that a Config stays hashable. Equal to a dict of the same items."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Sequence[int]]) -> None:
        object.__setattr__(self, "_items", {k: tuple(v) for k, v in items.items()})

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config.shard_sizes is read-only; make a new Config instead")

    def __reduce__(self):  # pickle and copy through the constructor (slots are read-only)
        return (type(self), (dict(self._items),))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Options of :func:`whale.parallelize`. Unknown keys are rejected.

    Example::

        cfg = wh.Config(num_micro_batch=4, bucket_cap_mb=25)
    """

    num_micro_batch: int = 1
    """Micro-batches per step. Gradients accumulate over them and are synchronized once."""

    default_strategy: str = "replicate"
    """Strategy for every part of the model that carries no annotation."""

    auto_parallel: bool = False
    """Let the planner choose the strategy for the whole model (ignores no annotation)."""

    bucket_cap_mb: float = 25.0
    """Gradient bucket size in MiB; a bucket is reduced as soon as all its gradients are ready."""

    first_bucket_cap_mb: float = 1.0
    """Size of the first bucket (the last layers' gradients), small so communication starts early."""

    grad_comm_dtype: torch.dtype | None = None
    """Dtype gradients travel in (e.g. ``torch.bfloat16`` halves traffic); None keeps theirs."""

    shared_memory: bool = True
    """CPU ranks on one host sum gradients through shared memory (``/dev/shm``) instead of the
    process group's sockets; off, or where a rank's group spans hosts, the process group does."""

    loss_reduction: str = "mean"
    """How ``loss_fn`` reduces over rows: ``"mean"`` (replicas weighted by their rows) or ``"sum"``."""

    row_weights: Sequence[float] | None = None
    """Relative share of batch rows per data-parallel replica (e.g. device speeds); None is even."""

    batch_dim: int = 0
    """The dimension of inputs and targets that holds the batch rows."""

    broadcast_buffers: bool = True
    """Send the first replica's buffers (e.g. BatchNorm statistics, counters updated in forward)
    to every replica after each step, so all ranks hold the same state (DDP sends them before)."""

    sync_batch_norm: bool = False
    """Data parallel: BatchNorm1d/2d/3d layers normalize by the statistics of the global batch
    (all replicas' rows, uneven rows included) and update their running statistics as the local
    model does on it; one small all-reduce per layer forward and one backward, over the
    data-parallel ranks (gloo or NCCL). Off, each replica normalizes its own rows (as DDP) and
    whale warns. The user's model is not modified: the program holds copies of the modules on
    the path to each BatchNorm, sharing every parameter and buffer. With ``num_micro_batch > 1``
    each micro-batch is normalized over the replicas' micro-batches of that index (the local
    model accumulating gradients over those micro-batches, not one pass over the whole batch).
    In training mode a forward communicates: call ``program.eval()`` before inference on one
    rank. Not with pipeline stages or ``split`` parts (refused)."""

    schedule: str = "1f1b"
    """Pipeline schedule: ``"1f1b"`` (Whale's backward-first), ``"gpipe"`` or ``"interleaved_1f1b"``."""

    pipeline_degree: int | None = None
    """Ranks per pipeline; None is one rank per stage. Interleaving puts several stages on a rank."""

    stage_boundaries: Sequence[str] | None = None
    """Module paths at which pipeline stages 1, 2, ... begin, instead of ``stage()`` annotations."""

    cluster: Any = None
    """The devices, as a spec string (``"node0=8xA100-80GB,node1=8xV100-32GB"``, a mixed node
    ``"node0=1xA100-80GB+1xT4"``) or a parsed ``whale.ir.cluster_spec.Cluster``; None is this
    host's device type. ``auto_parallel`` plans on it; ``split`` shards by its device speeds.
    ``"auto"``: the ranks measure themselves at ``parallelize`` (a short matrix-multiply profile
    and their memory, or ``profiles``), exchange it with which ranks share a host, and plan for
    that cluster: rows per replica by measured speed under memory (also without
    ``auto_parallel``), ``split`` shard widths by measured speed, and under ``auto_parallel``
    the search's layers per stage (needs ``wh.init()`` before ``parallelize``; the measured
    cluster is ``program.config.cluster``)."""

    shard_sizes: Mapping[str, Sequence[int]] | None = None
    """Per split region (a module path in it), the heads/columns/classes/experts of each rank.
    None: even, or in proportion to device speed where a tensor group of ``cluster`` mixes types.
    Stored as a read-only, hashable mapping of tuples (``dict(config.shard_sizes)`` copies it)."""

    profiles: str | os.PathLike | None = None
    """With ``cluster="auto"``: a ``whale profile`` file; each rank takes its device's profile
    from it (its memory as measured, an emulated slowdown applied) instead of measuring. A file
    that describes no device of some rank is refused on every rank."""

    plan: Any = None
    """A saved plan to execute as written: the path of a file ``whale plan --out`` (or
    :func:`whale.planner.saved_plan.save_plan`) wrote, or a ``Plan``. ``parallelize`` checks it
    against the model (parameter names and shapes), the world size and each rank's device kind,
    and refuses a mismatch by name. Not with ``auto_parallel``, ``cluster="auto"`` or the fields
    a plan fixes (``row_weights``, ``stage_boundaries``, ``pipeline_degree``, ``shard_sizes``,
    ``num_micro_batch``, ``schedule``)."""

    quiet: bool = False
    """Rank 0 does not print the plan it runs (printed for ``cluster="auto"``, ``auto_parallel``
    and saved plans)."""

    zero_stage: int = 0
    """ZeRO over each data-parallel group (ranks holding the same parameters): 0 keeps full
    parameters, gradients and optimizer state on every replica; 1 shards the optimizer state
    (``program.parameters()`` are this rank's 1/dp shards; updated shards are all-gathered into
    the full parameters before the next forward); 2 also shards gradients (reduce-scatter in
    buckets, overlapped with backward); 3 also parameters (gathered one layer ahead of use,
    freed after). Build the optimizer on ``program.parameters()``. With one replica there is
    nothing to shard (the parameters stay whole); weights tied across pipeline stages stay
    whole too (their tied group sums them)."""

    adaptive_rows: bool = False
    """Data parallel: measure each replica's compute time per step and move batch rows toward
    faster replicas every ``adaptive_every`` steps (rows in proportion to measured speed, at
    least one per micro-batch), so a replica that slows down mid-run sheds rows. Every step
    still equals the local model on the global batch (gradients weighted by rows). The split
    starts from ``row_weights``; ``program.plan`` holds the current one (``local_slice`` follows
    it: with ``batch="local"`` cut each step's rows anew). Not with pipeline stages, nor with
    ``sync_batch_norm`` (its all-reduces inside forward and backward make the replicas wait for
    each other, hiding their speeds): both refused."""

    adaptive_every: int = 2
    """With ``adaptive_rows``: steps between exchanges of the measured times (one small
    all-reduce) and decisions on the rows."""

    adaptive_window: int = 5
    """With ``adaptive_rows``: steps whose median per-row time estimates a replica's speed (one
    step slowed by a noisy neighbour moves nothing; a lasting change wins the median after
    ``adaptive_window // 2 + 1`` steps). The first move waits for a full window."""

    adaptive_threshold: float = 0.05
    """With ``adaptive_rows``: rows move only when the predicted step time drops by more than
    this fraction (hysteresis: noise near balance leaves the split alone)."""

    batch: str = "global"
    """What ``program.step`` takes by default (``step(..., batch=...)`` overrides it):
    ``"global"``, the whole global batch on every rank (checked: shapes and a checksum of the
    values must agree on every rank), or ``"local"``, each rank its own rows as
    ``program.local_slice`` cuts them (the DistributedDataParallel habit; only the ranks of one
    replica, its stages and shards, must then pass the same rows)."""

    check_batch_values: bool = True
    """Compare a checksum of the batch's values across ranks at every step, not only shapes
    (one multiply-add pass over the batch); off, a rank passing other rows of the same shape
    trains on the wrong data unseen."""

    activation_checkpointing: str | Sequence[str] = "none"
    """Recompute activations in backward instead of keeping them: ``"none"``; a list of module
    paths (``["transformer.h.0", "transformer.h.1"]``) whose activations are recomputed (each
    keeps only its inputs; ``torch.utils.checkpoint``, non-reentrant, RNG state kept so dropout
    matches); ``"auto"``: the planner picks the fewest layers that make the plan fit device
    memory (none where it fits already). A path the model lacks is refused with close names.
    Stored as a tuple of paths, or ``"none"``/``"auto"``."""

    offload: str = "none"
    """Granular offload (Pseudo-to-Real): ``"optimizer"`` keeps each layer's optimizer state in a
    slower tier and runs ``optimizer.step()`` layer by layer, fetching a layer's state one layer
    ahead and writing it back behind; ``"params"`` also keeps the parameters there between uses
    (CPU devices). The tier is a memory-mapped file in ``offload_dir`` on CPU devices (resident
    memory saved) and pinned host memory on GPUs. Build the optimizer on
    ``program.parameters()`` as usual; ``program.offload`` is the offload (``close()`` ends it)."""

    offload_dir: str | os.PathLike | None = None
    """Directory of the offload's memory-mapped files (unlinked as soon as made: nothing is left
    behind). None is the system's temporary directory. Checked writable at ``parallelize``."""

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Config({name}={value!r}) must be an int >= 1")

        positive_int("num_micro_batch")
        if self.default_strategy not in _STRATEGIES:
            raise ValueError(
                f"Config(default_strategy={self.default_strategy!r}): choose one of {_STRATEGIES}"
            )
        if not isinstance(self.auto_parallel, bool):
            raise TypeError(f"Config(auto_parallel=...) is a bool, got {self.auto_parallel!r}")
        for name in ("bucket_cap_mb", "first_bucket_cap_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Config({name}={value!r}) must be a number > 0 (MiB)")
        if self.grad_comm_dtype not in _COMM_DTYPES:
            raise ValueError(
                f"Config(grad_comm_dtype={self.grad_comm_dtype!r}): choose one of {_COMM_DTYPES}"
            )
        if self.loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"Config(loss_reduction={self.loss_reduction!r}): choose one of {_REDUCTIONS}"
            )
        if self.row_weights is not None:
            weights = tuple(self.row_weights)
            if not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in weights
            ):
                raise ValueError(
                    f"Config(row_weights={self.row_weights!r}) must be positive numbers, finite, "
                    "one per data-parallel replica (e.g. device speeds, [3, 1])"
                )
            object.__setattr__(self, "row_weights", weights)
        if isinstance(self.batch_dim, bool) or not isinstance(self.batch_dim, int):
            raise TypeError(f"Config(batch_dim=...) is an int, got {self.batch_dim!r}")
        if not isinstance(self.schedule, str):
            raise TypeError(f"Config(schedule=...) is a schedule name, got {self.schedule!r}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"Config(schedule={self.schedule!r}) is not a pipeline schedule; "
                f"choose one of {list(SCHEDULE_NAMES)}"
            )
        if self.pipeline_degree is not None:
            positive_int("pipeline_degree")
        if self.stage_boundaries is not None:
            self._module_paths("stage_boundaries", "a list of module paths, e.g. ['blocks.2', 'blocks.4']")
        if self.cluster is not None:
            from .ir.cluster_spec import parse_cluster
            from .ir.topology import Cluster

            if isinstance(self.cluster, str) and self.cluster != "auto":
                object.__setattr__(self, "cluster", parse_cluster(self.cluster))
            elif self.cluster == "auto":
                pass  # measured at parallelize (whale.planner.self_profile)
            elif not isinstance(self.cluster, Cluster):
                raise TypeError(
                    f"Config(cluster=...) is a cluster spec such as 'node0=8xA100-80GB' or a "
                    f"Cluster, got {type(self.cluster).__name__}"
                )
        if self.shard_sizes is not None:
            if not isinstance(self.shard_sizes, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Sequence) and all(isinstance(n, int) for n in v)
                for k, v in self.shard_sizes.items()
            ):
                raise TypeError(
                    f"Config(shard_sizes={self.shard_sizes!r}) maps a module path to per-rank counts, "
                    "e.g. {'lm_head': [3, 1]}"
                )
            object.__setattr__(self, "shard_sizes", _FrozenSizes(self.shard_sizes))
        for name in ("broadcast_buffers", "shared_memory", "sync_batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Config({name}=...) is a bool, got {getattr(self, name)!r}")
        if type(self.zero_stage) is not int or self.zero_stage not in _ZERO_STAGES:
            raise ValueError(
                f"Config(zero_stage={self.zero_stage!r}): choose one of {list(_ZERO_STAGES)} "
                "(0 none, 1 optimizer state, 2 + gradients, 3 + parameters)"
            )
        if self.batch not in ("global", "local"):
            raise ValueError(
                f"Config(batch={self.batch!r}): use 'global' (every rank passes the whole batch) "
                "or 'local' (each rank its own rows, cut by program.local_slice)"
            )
        if not isinstance(self.check_batch_values, bool):
            raise TypeError(f"Config(check_batch_values=...) is a bool, got {self.check_batch_values!r}")
        self._check_adaptive()
        self._check_auto_and_plan()
        if self.offload not in _OFFLOAD:
            raise ValueError(f"Config(offload={self.offload!r}) is not an offload mode; choose one of {list(_OFFLOAD)}")
        if self.offload_dir is not None and not isinstance(self.offload_dir, (str, os.PathLike)):
            raise TypeError(f"Config(offload_dir=...) is a directory path, got {self.offload_dir!r}")
        self._check_activation_checkpointing()

    def _check_adaptive(self) -> None:
        """``adaptive_rows`` and its knobs."""
        if not isinstance(self.adaptive_rows, bool):
            raise TypeError(f"Config(adaptive_rows=...) is a bool, got {self.adaptive_rows!r}")
        for name in ("adaptive_every", "adaptive_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Config({name}={value!r}) must be an int >= 1 (steps)")
        threshold = self.adaptive_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(
                f"Config(adaptive_threshold={threshold!r}) must be a number in [0, 1): the least "
                "relative drop of the predicted step time that moves rows (e.g. 0.05)"
            )
        if self.adaptive_rows and self.sync_batch_norm:
            raise ValueError(
                "Config(adaptive_rows=True) with sync_batch_norm=True: every synchronized BatchNorm "
                "makes each replica wait for the slowest inside forward and backward, so the "
                "replicas' measured compute cannot tell their speeds apart and rows would never "
                "move; drop one of the two (row_weights= sets uneven rows by hand)"
            )
        if self.adaptive_rows and self.stage_boundaries is not None:
            raise ValueError(
                f"Config(adaptive_rows=True) balances the rows of data-parallel replicas, not "
                f"pipeline stages (stage_boundaries={list(self.stage_boundaries)}); drop one of the two"
            )

    def _check_auto_and_plan(self) -> None:
        """``profiles``, ``plan`` and ``quiet`` (cluster="auto" and saved plans)."""
        from .ir.plan import Plan

        if not isinstance(self.quiet, bool):
            raise TypeError(f"Config(quiet=...) is a bool, got {self.quiet!r}")
        if self.profiles is not None:
            if not isinstance(self.profiles, (str, os.PathLike)):
                raise TypeError(f"Config(profiles=...) is the path of a whale profile file, got {self.profiles!r}")
            if self.cluster != "auto":
                raise ValueError(
                    f"Config(profiles={os.fspath(self.profiles)!r}) gives the device profiles of "
                    "cluster='auto'; add cluster='auto' (or describe the cluster without profiles)"
                )
        if self.plan is None:
            return
        if not isinstance(self.plan, (str, os.PathLike, Plan)):
            raise TypeError(
                f"Config(plan=...) is the path of a plan file (whale plan --out) or a Plan, "
                f"got {type(self.plan).__name__}"
            )
        fixed = [
            f"{name}={getattr(self, name)!r}" for name, default in (
                ("auto_parallel", False), ("row_weights", None), ("stage_boundaries", None),
                ("pipeline_degree", None), ("shard_sizes", None), ("num_micro_batch", 1), ("schedule", "1f1b"),
            ) if getattr(self, name) != default
        ]  # fmt: skip
        if self.cluster == "auto":
            fixed.insert(0, "cluster='auto'")
        if fixed:
            raise ValueError(
                f"Config(plan=...) executes the saved plan as written, which fixes what "
                f"Config({', '.join(fixed)}) asks for; drop those fields, or re-plan without plan="
            )

    def _check_activation_checkpointing(self) -> None:
        value = self.activation_checkpointing
        if isinstance(value, str):
            if value not in _CHECKPOINTING:
                raise ValueError(
                    f"Config(activation_checkpointing={value!r}): choose one of {list(_CHECKPOINTING)} "
                    "or give a list of module paths, e.g. ['transformer.h.0']"
                )
            return
        self._module_paths("activation_checkpointing", "'none', 'auto' or a list of module paths, e.g. ['transformer.h.0']")

    def _module_paths(self, field: str, shape: str) -> None:
        """Check that ``field`` is a list of distinct, non-empty module paths; store it as a tuple."""
        value = getattr(self, field)
        paths = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if paths is None or not all(isinstance(p, str) and p for p in paths):
            raise TypeError(f"Config({field}={value!r}) is {shape}")
        if len(set(paths)) != len(paths):
            raise ValueError(f"Config({field}={list(paths)}) names a module twice")
        object.__setattr__(self, field, paths)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build from a mapping (e.g. parsed JSON), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)
