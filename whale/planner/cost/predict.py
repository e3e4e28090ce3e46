"""Scoring a candidate plan: predicted step time and memory of every rank under the cost model.

A :class:`Candidate` fixes every choice the search makes: tensor-parallel groups, how they form
data-parallel replicas of a pipeline (``RankLayout``), stages and where they are cut, schedule,
micro-batches and rows per replica. :class:`CostModel` turns it into a :class:`Prediction` from
the layers of a :class:`~.layers.ModelProfile`, the device profiles and links of a
:class:`~.cluster.Cluster`, and the formulas of :mod:`whale.planner.cost.formulas`:

* a stage's forward on a tensor-parallel group is the per-node roofline of its layers on the
  slowest member's share, at the efficiency each node's size reaches on the device and with the
  device's cost per operation added (both measured by ``whale profile``), plus Megatron-LM's
  all-reduces (Shoeybi et al. 2019, section 3: two in the forward and two in the backward of a
  transformer layer); the backward computes twice the forward and communicates as much;
* a replica runs its schedule (:mod:`~.flow_shop`, equal to the simulator), then synchronises
  gradients with a ring all-reduce per pipeline position that overlaps only the last backward
  (the runtime starts gradient buckets at the final micro-batch; CPU ranks of one host sum
  them through shared memory instead, ``host_sum_time``), and then steps the optimizer over
  its shard (``optimizer_step_time``);
* memory is ZeRO's count of weights, gradients and optimizer states (``training_memory``) plus
  the activations the schedule holds at its peak.

Replicas only meet in the gradient all-reduce, so the step is the slowest replica's time:
``max_d max_p (finish(d, p) + max(0, allreduce(p) - last_backward(d, p)) + optimizer(d, p))``. Rows per replica
are thus a min-max over independent, monotone functions (see :mod:`~.balance`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ...ir.cluster_spec import Cluster, Link
from ...ir.devices import DeviceProfile, normalize_dtype
from ...ir.topology import LOOPBACK
from ..schedules.flow_shop import (
    flow_shop,
    peak_held,
    peak_held_bound,
    pipeline_estimate,
)
from .candidate import Candidate, Prediction, RankLayout, ReplicaCost
from .formulas import (
    BACKWARD_FLOPS_FACTOR,
    SyncTimes,
    efficiency_at,
    exposed_sync,
    tensor_parallel_time,
    training_memory,
)
from .layers import ModelProfile
from .stage_times import StageTimes
from .step_view import StepView
from .stragglers import straggler_wait
from .sync_cost import SyncCost

__all__ = ["Candidate", "CostModel", "CostOptions", "Prediction", "RankLayout", "ReplicaCost", "SyncTimes", "achievable_peak",
           "cost_options", "dtype_peak"]

# A device without the requested 16-bit or 8-bit rate runs the next wider type it has.
_FALLBACK = {"bf16": ("bf16", "fp16", "fp32"), "fp16": ("fp16", "bf16", "fp32"),
             "fp8": ("fp8", "bf16", "fp16", "fp32"), "tf32": ("tf32", "fp32"), "fp32": ("fp32",)}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostOptions:
    """How the model trains, as far as time and memory go.

    Example::

        CostOptions(dtype="bf16", precision="mixed", optimizer="adamw")
    """

    dtype: str = "fp32"
    """Compute dtype choosing each device's peak rate (a device without it uses the next wider)."""
    precision: str | None = None
    """``training_memory`` precision; None: ``"fp32"`` for 32-bit dtypes, else ``"mixed"``."""
    optimizer: str = "adamw"
    """``"adamw"``, ``"sgd"`` or ``"sgd_momentum"``: optimizer states per parameter."""
    memory_fraction: float = 0.9
    """Share of device memory a plan may use (nominal: CUDA context, allocator fragmentation)."""
    efficiency: float | None = None
    """Share of peak FLOP/s every operation reaches; None: each device's efficiency curve at the
    operation's size (:func:`~.formulas.efficiency_at`)."""
    bucket_bytes: float = 25 * 2**20
    """Gradient bucket size (``Config.bucket_cap_mb``): the last bucket is reduced after backward."""
    first_bucket_bytes: float = 2**20
    """Size of the first gradient bucket (``Config.first_bucket_cap_mb``)."""
    shared_memory: bool = True
    """``Config.shared_memory``: CPU ranks of one host sum their gradients through shared memory
    (:func:`~.formulas.host_sum_time`), not over the link."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.precision is None:
            object.__setattr__(self, "precision", "fp32" if self.dtype in ("fp32", "tf32") else "mixed")
        training_memory(1, optimizer=self.optimizer, precision=self.precision)  # validates both
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"CostOptions(memory_fraction={self.memory_fraction!r}) must be in (0, 1]")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise ValueError(f"CostOptions(efficiency={self.efficiency!r}) must be in (0, 1]")
        for name in ("bucket_bytes", "first_bucket_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostOptions({name}={getattr(self, name)!r}) must be > 0 bytes")


def cost_options(config) -> CostOptions:
    """The cost model's options for a job's :class:`~whale.config.Config`: its gradient buckets
    (the first capped by the others' size, as the runtime caps it) and whether CPU ranks of one
    host sum gradients in shared memory; fp32 and AdamW otherwise (the defaults).

    Example::

        predict_plan(plan, profile, cluster, rows, cost_options(wh.Config(bucket_cap_mb=50)))
    """
    mib = 2**20
    return CostOptions(bucket_bytes=config.bucket_cap_mb * mib,
                       first_bucket_bytes=min(config.bucket_cap_mb, config.first_bucket_cap_mb) * mib,
                       shared_memory=config.shared_memory)  # fmt: skip


def achievable_peak(device: DeviceProfile, options: CostOptions = CostOptions()) -> float:
    """FLOP/s ``device`` reaches in ``options.dtype`` on large operations: its peak times the
    efficiency (the top of its curve unless ``options`` fixes one).

    The speed the cost model splits sharded work by (:meth:`CostModel.shard_shares`).
    """
    eff = options.efficiency
    if eff is None:
        eff = device.efficiency_curve()[-1][1]
    return dtype_peak(device, options) * eff


def dtype_peak(device: DeviceProfile, options: CostOptions = CostOptions()) -> float:
    """Peak FLOP/s of ``device`` in ``options.dtype``, or the next wider dtype it has."""
    return next(device.peak(d) for d in _FALLBACK[options.dtype] if d in device.dtypes)


class CostModel(StageTimes, SyncCost, StepView):
    """Times and bytes of layers, stages and replicas for one model on one cluster.

    Pure in what it returns; it memoises per-layer roofline times by (device, rows, share).

    Example::

        costs = CostModel(profile, parse_cluster("2xA100-80GB,2xV100-32GB"), CostOptions())
        costs.predict(candidate).step_time
    """

    def __init__(self, profile: ModelProfile, cluster: Cluster, options: CostOptions = CostOptions()) -> None:
        self.profile, self.cluster, self.options = profile, cluster, options
        devices = cluster.devices()
        self.device_of = tuple(d.profile for d in devices)
        self.varies = any(d.jitter for d in self.device_of)  # some device's time varies step to step
        self.node_of = tuple(k for k, node in enumerate(cluster.nodes) for _ in range(node.num_devices))
        self._links: dict[tuple[int, int], Link] = {}
        self._shares: dict[tuple[str, ...], tuple[float, ...]] = {}
        self._group_links: dict[tuple, Link] = {}
        layers = profile.layers
        self.num_layers = len(layers)
        sixteen = options.precision in ("mixed", "half")
        self.act_scale = (2 / profile.act_dtype_bytes) if sixteen else 1.0
        self.weight_scale = (2 / profile.param_dtype_bytes) if sixteen else 1.0
        per_param = training_memory(1, optimizer=options.optimizer, precision=options.precision)
        self.state_bytes_per_param = per_param.total / profile.param_dtype_bytes  # per captured byte
        self.grad_bytes_per_param = per_param.gradients / profile.param_dtype_bytes
        flops, row, fixed, sharded, owner = [], [], [], [], []
        for k, layer in enumerate(layers):
            flops += layer.flops
            row += layer.row_bytes
            fixed += layer.fixed_bytes
            sharded += [i < layer.num_sharded for i in range(len(layer.flops))]
            owner += [k] * len(layer.flops)
        self._flops = np.array(flops, dtype=float)
        self._row = np.array(row, dtype=float) * self.act_scale
        self._fixed = np.array(fixed, dtype=float) * self.weight_scale
        self._sharded = np.array(sharded, dtype=bool)
        self._owner = np.array(owner)
        # Operations per node: one where a kernel runs; views and getitems dispatch (and record
        # autograd) but run none, about half an op in eager PyTorch (torch.profiler, small GPT).
        self._is_op = np.where((self._flops > 0) | (self._row > 0) | (self._fixed > 0), 1.0, 0.5)
        # Node classes (ir.profile_fields.OP_CLASSES): FLOPs on parameters (linear), FLOPs on
        # activations (attention), data moved without FLOPs (elementwise), nothing moved (view).
        has_flops = self._flops > 0
        self._class = np.select([has_flops & (self._fixed > 0), has_flops, self._is_op == 1], [0, 1, 2], default=3)
        self._class_weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._times: dict = {}
        self._optimizer: dict = {}
        # Memos keyed by ranks and layer indices (cheap keys for the search's many calls).
        self._rank_shares: dict[tuple[int, ...], tuple[float, ...]] = {}
        self._block_params: dict[tuple[int, int], float] = {}
        self._rank_optimizer: dict = {}
        self._p2p: dict = {}
        self._member_memory: dict = {}  # replica_memory's (held bytes per row, state bytes) per member
        self._stage_lists, self._stage_forward = {}, {}  # stage_lists per replica; a stage's forward
        self._position_fit: dict = {}  # replica_memory's bytes, fit and row limit per position
        self._sync: dict = {}  # sync_time per (layout, position, its stages' layers, host sums)
        # Gradients of CPU ranks on one host meet in shared memory (a subclass whose sync takes
        # the process group, ZeRO 2 and 3, turns it off).
        self.host_sums = self.options.shared_memory
        self._forward_times: dict = {}  # _prefix_forward per (device, rows, share), where it differs
        self._class_shares: dict = {}  # device name -> per node forward share, or None
        self._tied: dict = {}  # tied_sync_time's all-reduce per (layout, positions, bytes)
        self._floor_terms: dict = {}  # floor_terms per (group, rows per micro-batch, its stages' layers)
        self._group_kinds: dict = {}  # group -> its members' device profiles (by id): what optimizer steps read
        self._replica_kinds: dict = {}  # pipeline -> (predict's key of alike replicas, its groups' kinds)
        self._kind_ids: dict = {}  # replica_key -> a small int
        self._replica_keys: dict = {}  # pipeline -> replica_key
        self._capacities: tuple[int, ...] | None = None
        self._state_params: dict = {}  # state_bytes' parameter bytes per (member share, blocks)

        def prefix(values) -> np.ndarray:
            return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])

        self.params = prefix([x.param_bytes for x in layers])
        self.repl_params = prefix([x.replicated_param_bytes for x in layers])
        self.act = prefix([x.act_bytes * self.act_scale for x in layers])
        self.repl_act = prefix([x.replicated_act_bytes * self.act_scale for x in layers])
        self.tp_count = prefix([x.tp_all_reduces for x in layers])
        self.tp_bytes = prefix([x.tp_all_reduces * x.hidden_bytes * self.act_scale for x in layers])
        self.cut_bytes = np.array(profile.cut_bytes, dtype=float) * self.act_scale
        self.param_tensors = prefix([len(x.param_names) for x in layers])

    # --- devices ----------------------------------------------------------------------------

    def peak(self, device: DeviceProfile) -> float:
        """Achievable FLOP/s of ``device`` in the compute dtype (efficiency applied)."""
        return achievable_peak(device, self.options)

    def capacity(self, rank: int) -> int:
        """Bytes a plan may use on ``rank``."""
        return int(self.device_of[rank].memory_bytes * self.options.memory_fraction)

    def capacities(self) -> tuple[int, ...]:
        """:meth:`capacity` of every rank (memoised on first use)."""
        if self._capacities is None:
            self._capacities = tuple(self.capacity(r) for r in range(self.cluster.world_size))
        return self._capacities

    def speed(self, device: DeviceProfile, rows: float = 1.0) -> float:
        """Rows per second of the whole model's forward and backward on one ``device``."""
        return rows / (3 * float(self.layer_times(device, rows).sum()) or 1e-30)

    # --- layers and stages ------------------------------------------------------------------

    def layer_times(self, device: DeviceProfile, rows: float, share: float = 1.0) -> np.ndarray:
        """Forward time per layer for a micro-batch of ``rows`` rows, ``share`` of it sharded.

        Per node roofline (Williams et al. 2009) on ``device`` at the efficiency of the node's
        size, plus the device's cost per operation; under tensor parallelism a member computes
        ``share`` of the sharded nodes and all of the replicated ones.
        """
        return np.diff(self._prefix_time(device, rows, share))

    def _prefix_time(self, device: DeviceProfile, rows: float, share: float) -> list[float]:
        """Cumulative time of layers (``n + 1`` entries), a third of their forward and backward
        (the forward, where the backward takes twice it), memoised."""
        key = (device.name, rows, share)
        cached = self._times.get(key)
        if cached is None:
            cached = self._times[key] = self._prefix_of(self._node_times(device, rows, share))
        return cached

    def _prefix_forward(self, device: DeviceProfile, rows: float, share: float) -> list[float]:
        """Cumulative forward time of layers: of their forward and backward (three times
        :meth:`_prefix_time`), the share each node's class takes in its forward where the
        device's profile measured how long each class's backward takes
        (``DeviceProfile.op_classes``: ``1 / (1 + backward / forward)``). Else the very list of
        :meth:`_prefix_time` (backward twice the forward, as the FLOPs), memoised."""
        shares = self._forward_shares(device)
        if shares is None:
            return self._prefix_time(device, rows, share)
        key = (device.name, rows, share)
        cached = self._forward_times.get(key)
        if cached is None:
            cached = self._forward_times[key] = self._prefix_of(3 * shares * self._node_times(device, rows, share))
        return cached

    def _prefix_of(self, node: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(np.bincount(self._owner, weights=node, minlength=self.num_layers))])

    def _node_times(self, device: DeviceProfile, rows: float, share: float) -> np.ndarray:
        """Per node, a third of its forward and backward time for ``rows`` rows (``share`` of
        it where sharded): the roofline at the efficiency of its size times its class's factor,
        plus the device's cost per operation."""
        scale = np.where(self._sharded, share, 1.0)
        flops = rows * self._flops * scale
        eff = self.options.efficiency or efficiency_at(device, flops)
        factor, ops = self._weights(device)
        return np.maximum(
            flops / (dtype_peak(device, self.options) * eff),
            (rows * self._row + self._fixed) * scale / device.memory_bandwidth,
        ) * factor + device.overhead() * ops

    def _forward_shares(self, device: DeviceProfile) -> np.ndarray | None:
        """Per node, its forward's share of its forward and backward on ``device`` (None: a
        third for every node, the profile measured no class)."""
        if device.name not in self._class_shares:
            ratios = device.class_backward_ratios()
            self._class_shares[device.name] = None if ratios is None else (1 / (1 + np.array(ratios)))[self._class]
        return self._class_shares[device.name]

    def _weights(self, device: DeviceProfile) -> tuple[np.ndarray, np.ndarray]:
        """Per node: its class's time factor on ``device`` and its operations (a view: half one,
        times the view class's factor)."""
        if device.name not in self._class_weights:
            factors = np.array(device.class_factors())
            ops = self._is_op * np.where(self._class == 3, factors[3], 1.0)
            self._class_weights[device.name] = (factors[self._class], ops)
        return self._class_weights[device.name]

    def block_param_bytes(self, start: int, stop: int) -> float:
        """Captured bytes of the parameters layers ``start..stop-1`` read (tied ones once)."""
        cached = self._block_params.get((start, stop))
        if cached is None:
            total = self.params[stop] - self.params[start]
            for _, size, users in self.profile.shared_params:
                inside = sum(start <= u < stop for u in users)
                if inside > 1:
                    total -= (inside - 1) * size
            cached = self._block_params[(start, stop)] = float(total)
        return cached

    def group_times(self, group: Sequence[int], shares: Sequence[float], rows: float, start: int, stop: int) -> tuple[float, float]:
        """Forward and backward time of layers ``start..stop-1`` on a tensor-parallel group: the
        backward computes ``BACKWARD_FLOPS_FACTOR`` times the forward and all-reduces as often
        (Megatron-LM's f and g, ``rewrite.collectives``: a split GPT block issues 2 + 2). Where
        a member's time varies from step to step (``DeviceProfile.jitter``), each all-reduce
        also waits for the group's slowest member."""
        t = len(group)
        if t == 1:
            return self._split(self.device_of[group[0]], rows, shares[0], start, stop)
        kinds = {(self.device_of[r], w) for r, w in zip(group, shares)}  # members alike compute alike
        forward, backward = max((self._split(d, rows, w, start, stop) for d, w in kinds), key=sum)
        link = self.group_link(group)
        count = self.tp_count[stop] - self.tp_count[start]
        volume = rows * (self.tp_bytes[stop] - self.tp_bytes[start])
        comm = tensor_parallel_time(count, volume, t, link)
        spread = max(self.device_of[r].jitter or 0.0 for r in group) if self.varies and count else 0.0
        if spread:
            # Each all-reduce waits for the group's last member (stragglers): the expected
            # largest of t members' compute since the one before. With spreads in proportion to
            # time, the waits of a forward's all-reduces add up to that of its whole compute.
            forward += straggler_wait([(forward, spread * forward, t)])
            backward += straggler_wait([(backward, spread * backward, t)])
        return forward + comm, backward + comm

    def _split(self, device: DeviceProfile, rows: float, share: float, start: int, stop: int) -> tuple[float, float]:
        """Forward and backward compute of layers ``start..stop-1`` on one device."""
        prefix = self._prefix_time(device, rows, share)
        third = float(prefix[stop] - prefix[start])
        forward_prefix = self._prefix_forward(device, rows, share)
        if forward_prefix is prefix:
            return third, BACKWARD_FLOPS_FACTOR * third
        forward = float(forward_prefix[stop] - forward_prefix[start])
        return forward, 3 * third - forward

    def state_bytes(self, member_share: float, blocks: Sequence[tuple[int, int]]) -> int:
        """Weights, gradients and optimizer states one group member keeps for ``blocks``."""
        key = (member_share, blocks if type(blocks) is tuple else tuple(map(tuple, blocks)))
        params = self._state_params.get(key)
        if params is None:  # the parameter bytes it holds: memoised (memory options share them)
            repl = [self.repl_params[b] - self.repl_params[a] for a, b in blocks]
            params = sum((self.block_param_bytes(a, b) - r) * member_share + r for (a, b), r in zip(blocks, repl))
            self._state_params = {} if len(self._state_params) > 200_000 else self._state_params
            self._state_params[key] = params
        return int(params * self.state_bytes_per_param)

    def member_act(self, share: float, start: int, stop: int) -> float:
        """Activation bytes per row a member keeps for layers ``start..stop-1``."""
        repl = self.repl_act[stop] - self.repl_act[start]
        return (self.act[stop] - self.act[start] - repl) * share + repl

    # --- links ------------------------------------------------------------------------------

    def link(self, rank_a: int, rank_b: int) -> Link:
        """``Cluster.link``, memoised by node pair."""
        if rank_a == rank_b:
            return LOOPBACK
        key = (self.node_of[rank_a], self.node_of[rank_b])
        found = self._links.get(key)
        return found if found is not None else self._links.setdefault(key, self.cluster.link(rank_a, rank_b))

    def group_link(self, ranks: Sequence[int]) -> Link:
        """The slowest link among ``ranks`` (equal to ``Cluster.group_link``, in O(len(ranks)))."""
        key = tuple(ranks)
        found = self._group_links.get(key)
        return found if found is not None else self._group_links.setdefault(key, self._group_link(key))

    def _group_link(self, ranks: Sequence[int]) -> Link:
        nodes: dict[int, int] = {}
        for r in ranks:
            nodes[self.node_of[r]] = nodes.get(self.node_of[r], 0) + 1
        if sum(nodes.values()) < 2:
            return LOOPBACK
        links = [self.cluster.nodes[n].device_link for n, c in nodes.items() if c > 1]
        if len(nodes) > 1:
            nets = [self.cluster._network(self.cluster.nodes[n]) for n in nodes]
            links.append(Link(kind="network", bandwidth=min(x.bandwidth for x in nets),
                              latency=max(x.latency for x in nets)))  # fmt: skip
        slowest = min(links, key=lambda x: x.bandwidth)
        return Link(kind=slowest.kind, bandwidth=slowest.bandwidth, latency=max(x.latency for x in links))

    def shard_shares(self, group: Sequence[int]) -> tuple[float, ...]:
        """Each member's share of sharded widths: in proportion to its device's speed."""
        cached = self._rank_shares.get(tuple(group))
        if cached is not None:
            return cached
        key = tuple(self.device_of[r].name for r in group)
        if key not in self._shares:
            speeds = [self.peak(self.device_of[r]) for r in group]
            self._shares[key] = tuple(s / sum(speeds) for s in speeds)
        self._rank_shares[tuple(group)] = self._shares[key]
        return self._shares[key]

    def group_kind(self, group: tuple[int, ...]) -> tuple[int, ...]:
        """The device profiles (their ids) of a group's members: what its optimizer step reads."""
        found = self._group_kinds.get(group)
        if found is None:
            found = self._group_kinds[group] = tuple(id(self.device_of[r]) for r in group)
        return found

    def _replica_kind(self, pipeline) -> tuple[int, tuple]:
        """:meth:`predict`'s name for the replicas that cost alike (devices by name and links
        between positions, as an int), and its groups' :meth:`group_kind` (memoised)."""
        found = self._replica_kinds.get(pipeline)
        if found is None:
            kinds = self._kind_ids
            found = self._replica_kinds[pipeline] = (
                kinds.setdefault(self.replica_key(pipeline), len(kinds)), tuple(self.group_kind(tuple(g)) for g in pipeline))
        return found

    def replica_key(self, pipeline) -> tuple:
        """A replica's devices by name, position by position, then the links between its
        positions (the last back to the first): replicas with one key cost alike (memoised)."""
        found = self._replica_keys.get(pipeline)
        if found is None:
            found = tuple(tuple(self.device_of[r].name for r in g) for g in pipeline)
            found += tuple(self.link(pipeline[k][0], pipeline[(k + 1) % len(pipeline)][0]) for k in range(len(pipeline)))
            self._replica_keys[pipeline] = found
        return found

    # --- replicas ---------------------------------------------------------------------------

    def replica_cost(
        self,
        pipeline: Sequence[Sequence[int]],
        num_stages: int,
        schedule: str,
        num_micro_batch: int,
        cuts: Sequence[int],
        rows: int,
        sync: Sequence[float],
        *,
        exact: bool = True,
    ) -> ReplicaCost:
        """Time and memory of one replica (``pipeline``: its groups by position) with ``rows``.

        ``exact`` runs the schedule (:func:`~.flow_shop.flow_shop`); otherwise the closed form
        :func:`~.flow_shop.pipeline_estimate` is used, for screening. Memory is exact either way.
        The time is ``inf`` when some member's memory exceeds its capacity."""
        p, m = len(pipeline), num_micro_batch
        memory, fits, limit = self.replica_memory(pipeline, num_stages, schedule, m, cuts, rows, exact=exact)
        forward, backward, p2p = self.stage_lists(pipeline, num_stages, m, cuts, rows)
        opt = self.optimizer_times(pipeline, num_stages, cuts)
        busy = tuple(m * sum(forward[s] + backward[s] for s in range(pos, num_stages, p)) for pos in range(p))
        stage_times = tuple(f + b for f, b in zip(forward, backward))
        if not fits:
            time = math.inf  # the schedule need not run
        elif exact:
            run = flow_shop(schedule, p, m, forward, backward, p2p)
            time = max(run.finish[k] + exposed_sync(sync, k, run.last_compute[k]) + opt[k] for k in range(p))
        else:
            # The final compute of position k is the backward of its first stage, k.
            finish = pipeline_estimate(p, m, forward, backward, p2p)
            time = max(finish[k] + exposed_sync(sync, k, backward[k]) + opt[k] for k in range(p))
        return ReplicaCost(time, busy, tuple(memory), stage_times, limit)

    def replica_memory(
        self,
        pipeline: Sequence[Sequence[int]],
        num_stages: int,
        schedule: str,
        num_micro_batch: int,
        cuts: Sequence[int],
        rows: int,
        *,
        exact: bool = True,
    ) -> tuple[tuple[tuple[int, ...], ...], bool, float]:
        """The memory half of :meth:`replica_cost`: bytes per position and member, whether every
        member fits, and the most rows whose micro-batches fit (no times computed)."""
        p, m = len(pipeline), num_micro_batch
        bounds, q_max = (0, *cuts, self.num_layers), -(-rows // m)
        memory: list[tuple[int, ...]] = []
        fits, limit = True, math.inf
        for pos, group in enumerate(pipeline):
            # A position's bytes and room read only its own group and blocks: memoised on them
            # (the blocks as their starts and ends: no pairs built to look up).
            starts, ends = bounds[pos::p], bounds[pos + 1 :: p]
            key = (group if type(group) is tuple else tuple(group), pos, p, num_stages, schedule, m, exact, starts, ends, rows)
            at = self._position_fit.get(key)
            if at is None:
                blocks = tuple(zip(starts, ends))
                found = self.position_memory(pipeline, pos, num_stages, schedule, m, blocks, exact=exact)
                need = tuple(state + int(held * q_max) for held, state in found)  # the largest micro-batch held
                at_fits, at_limit = True, math.inf
                for rank, (held, state), x in zip(group, found, need):
                    cap = self.capacity(rank)
                    at_fits &= x <= cap
                    room = cap - state
                    at_limit = min(at_limit, -1 if room < 0 else m * (room // held) if held > 0 else math.inf)
                self._position_fit = {} if len(self._position_fit) > 200_000 else self._position_fit
                at = self._position_fit[key] = (need, at_fits, at_limit)
            memory.append(at[0])
            fits, limit = fits and at[1], min(limit, at[2])
        return tuple(memory), fits, limit

    def position_memory(
        self, pipeline: Sequence[Sequence[int]], pos: int, num_stages: int, schedule: str, num_micro_batch: int,
        blocks: tuple[tuple[int, int], ...], *, exact: bool = True,
    ) -> tuple[tuple[float, int], ...]:  # fmt: skip
        """Per member of position ``pos`` (its stages: layer ranges ``blocks``): the activation
        bytes it holds at its peak per row of a micro-batch, and its state bytes.

        A rank's peak reads only its own stages (``peak_held`` per rank), so this depends on
        the position's blocks alone and is memoised on them: moving a cut changes the blocks
        of one or two positions and leaves the others'.
        """
        p, m = len(pipeline), num_micro_batch
        # The exact peak needs the schedule's orders; screening bounds it when they are long.
        bound = not exact and num_stages * m > 512
        shares = self.shard_shares(pipeline[pos])
        out = []
        for share in shares:
            # The group's size fixes the dp degree a subclass's state bytes may read (ZeRO).
            key = (schedule, p, m, num_stages, bound, pos, len(pipeline[pos]), share, blocks)
            found = self._member_memory.get(key)
            if found is None:
                acts = [0.0] * num_stages
                for s, (a, b) in zip(range(pos, num_stages, p), blocks):
                    acts[s] = self.member_act(share, a, b)
                held = (peak_held_bound if bound else peak_held)(schedule, p, m, acts)[pos]
                if len(self._member_memory) > 200_000:
                    self._member_memory.clear()
                found = self._member_memory[key] = (held, self.state_bytes(share, blocks))
            out.append(found)
        return tuple(out)
