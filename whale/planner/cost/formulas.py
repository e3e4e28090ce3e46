"""The cost model: pure functions from FLOPs, bytes, devices and links to seconds and bytes.

* compute: a roofline per graph node (Williams, Waterman, Patterson, "Roofline: an insightful
  visual performance model for multicore architectures", CACM 2009), with an efficiency on the
  compute roof that grows with the operation's size (the device profile's measured curve) and a
  fixed cost per operation (dispatch, kernel launch) on top;
* the optimizer step: memory bound over the parameters and states of a rank's shard, plus a
  cost per parameter tensor (measured by ``whale profile``, else from the memory bandwidth);
* memory: parameters, gradients and optimizer states per parameter as counted by ZeRO
  (Rajbhandari et al., "ZeRO: Memory optimizations toward training trillion parameter models",
  SC 2020), plus the activations a pipeline schedule holds at its peak;
* communication: the alpha-beta model with the ring and pairwise-exchange algorithms of Thakur,
  Rabenseifner, Gropp, "Optimization of collective communication operations in MPICH",
  IJHPCA 2005 (ring all-reduce: Patarasuk and Yuan, JPDC 2009), over the slowest link of the
  group;
* pipelines: step time and bubble from :mod:`whale.planner.schedules.simulator`.

Units: FLOPs, bytes, seconds.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Self

import numpy as np

from ...ir.cluster_spec import Cluster, Link
from ...ir.devices import DeviceProfile, normalize_dtype
from ..schedules.generate import make_schedule
from ..schedules.simulator import SimResult, simulate

if TYPE_CHECKING:  # only for annotations: the cost model itself needs no torch
    from ...capture.graph import NodeInfo

__all__ = [
    "BACKWARD_FLOPS_FACTOR",
    "COLLECTIVES",
    "DEFAULT_EFFICIENCY",
    "MemoryEstimate",
    "SyncTimes",
    "all_gather_time",
    "all_reduce_time",
    "all_to_all_time",
    "backward_flops",
    "collective_time",
    "compute_time",
    "efficiency_at",
    "exposed_sync",
    "host_sum_time",
    "node_compute_times",
    "op_time",
    "optimizer_step_time",
    "pipeline_step_time",
    "point_to_point_time",
    "reduce_scatter_time",
    "tensor_parallel_time",
    "training_memory",
]

# Narayanan et al., "Efficient large-scale language model training on GPU clusters using
# Megatron-LM", SC 2021: 163 of 312 TFLOP/s (52%) per A100 on GPT models.
DEFAULT_EFFICIENCY = 0.5
# Backward = input gradient + weight gradient, one matmul each per forward matmul
# (Kaplan et al. 2020 "Scaling laws for neural language models" §2.1; Narayanan et al. 2021).
BACKWARD_FLOPS_FACTOR = 2


def _amount(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def compute_time(
    flops: float,
    bytes_accessed: float,
    device: DeviceProfile,
    dtype: object = "fp32",
    efficiency: float = DEFAULT_EFFICIENCY,
) -> float:
    """Roofline time of one operation: ``max(flops / (peak * efficiency), bytes / bandwidth)``.

    Args:
        flops: floating-point operations (a multiply-add counts 2, as torch's FlopCounterMode).
        bytes_accessed: bytes read and written in device memory.
        device: the device profile.
        dtype: compute dtype choosing the peak rate (``"bf16"``, ``torch.float16``, ...).
        efficiency: achieved share of the peak FLOP/s, in (0, 1]; 1 for measured profiles.

    Example::

        >>> a100 = get_profile("A100-80GB")
        >>> compute_time(312e12, 0, a100, "bf16", efficiency=0.5)   # compute bound
        2.0
    """
    flops = _amount("compute_time", "flops", flops)
    bytes_accessed = _amount("compute_time", "bytes_accessed", bytes_accessed)
    if (
        isinstance(efficiency, bool)
        or not isinstance(efficiency, (int, float))
        or not 0 < efficiency <= 1
    ):
        raise ValueError(f"compute_time: efficiency must be in (0, 1], got {efficiency!r}")
    # Williams et al. 2009: attainable rate = min(peak, intensity * bandwidth), i.e. this max.
    return max(flops / (device.peak(dtype) * efficiency), bytes_accessed / device.memory_bandwidth)


def efficiency_at(device: DeviceProfile, flops: float | np.ndarray) -> float | np.ndarray:
    """Share of peak FLOP/s an operation of ``flops`` FLOPs reaches on ``device``.

    Interpolates the device's efficiency curve (:meth:`DeviceProfile.efficiency_curve`) linearly
    in ``log(flops)``, flat beyond its ends: small matmuls do not run at the peak rate.

    Example::

        >>> cpu = get_profile("cpu")
        >>> efficiency_at(cpu, 1e5) < efficiency_at(cpu, 1e9)
        True
    """
    curve = device.efficiency_curve()
    sizes = np.log([x for x, _ in curve])
    shares = np.array([e for _, e in curve])
    out = np.interp(np.log(np.maximum(flops, 1.0)), sizes, shares)
    return float(out) if np.ndim(out) == 0 else out


def op_time(
    flops: float,
    bytes_accessed: float,
    device: DeviceProfile,
    dtype: object = "fp32",
    efficiency: float | None = None,
) -> float:
    """Time of one graph operation: the device's per-operation overhead plus its roofline at the
    efficiency its size reaches (:func:`efficiency_at`; ``efficiency`` fixes it instead).

    Example::

        >>> cpu = get_profile("cpu")
        >>> op_time(0, 0, cpu) == cpu.overhead()   # an empty operation still costs its dispatch
        True
    """
    share = efficiency_at(device, flops) if efficiency is None else efficiency
    return device.overhead() + compute_time(flops, bytes_accessed, device, dtype, share)


def optimizer_step_time(
    num_params: float,
    num_tensors: int,
    device: DeviceProfile,
    *,
    optimizer: str = "adamw",
    precision: str = "fp32",
) -> float:
    """One optimizer step over ``num_params`` parameters in ``num_tensors`` tensors on ``device``.

    ``per tensor * num_tensors + per parameter * num_params`` (:meth:`DeviceProfile.optimizer_cost`,
    measured for fp32), the per-parameter part scaled by the bytes the precision touches: the
    step reads and writes weights and states and reads gradients (ZeRO's counts per parameter).

    Example::

        >>> a100 = get_profile("A100-80GB")
        >>> round(optimizer_step_time(1e9, 0, a100) * 1e3, 2)   # 28 GB at 2.04 TB/s, in ms
        13.73
    """
    num_params = _amount("optimizer_step_time", "num_params", num_params)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer_step_time: unknown optimizer {optimizer!r}; use one of {list(_OPTIMIZERS)}")
    if precision not in _PRECISIONS:
        raise ValueError(f"optimizer_step_time: unknown precision {precision!r}; use one of {list(_PRECISIONS)}")
    kind = _OPTIMIZERS[optimizer]
    per_tensor, per_param = device.optimizer_cost("adamw" if kind == "adam" else kind)
    scale = _touched(precision, kind) / _touched("fp32", kind)
    return per_tensor * num_tensors + per_param * scale * num_params


def _touched(precision: str, kind: str) -> int:
    """Bytes a step reads and writes per parameter: weights and states both ways, gradients once."""
    weights, grads, states = _BYTES_PER_PARAM[precision, kind]
    return 2 * (weights + states) + grads


def backward_flops(forward_flops: float) -> float:
    """FLOPs of the backward pass of an operation: ``BACKWARD_FLOPS_FACTOR`` times its forward."""
    return BACKWARD_FLOPS_FACTOR * _amount("backward_flops", "forward_flops", forward_flops)


def node_compute_times(
    node: NodeInfo,
    device: DeviceProfile,
    dtype: object = "fp32",
    efficiency: float = DEFAULT_EFFICIENCY,
) -> tuple[float, float]:
    """Forward and backward time of one captured graph node on ``device``.

    The backward does twice the forward's FLOPs and, reading the saved inputs and the output
    gradient and writing two gradients, about twice its memory traffic.

    Example::

        forward, backward = node_compute_times(captured.nodes[3], get_profile("T4"), "fp16")
    """
    forward = compute_time(node.flops, node.bytes_accessed, device, dtype, efficiency)
    backward = compute_time(
        backward_flops(node.flops),
        BACKWARD_FLOPS_FACTOR * node.bytes_accessed,
        device,
        dtype,
        efficiency,
    )
    return forward, backward


# --- memory -----------------------------------------------------------------------------------

# Bytes per parameter: (weights, gradients, optimizer states). ZeRO §3.1: mixed-precision Adam
# keeps fp16 weights (2) and gradients (2) plus fp32 weights, momentum and variance (4+4+4) = 16.
# fmt: off
_BYTES_PER_PARAM = {
    ("fp32", "adam"): (4, 4, 8),         # fp32 momentum and variance
    ("fp32", "sgd_momentum"): (4, 4, 4),  # fp32 momentum buffer
    ("fp32", "sgd"): (4, 4, 0),
    ("mixed", "adam"): (2, 2, 12),       # ZeRO's K = 12
    ("mixed", "sgd_momentum"): (2, 2, 8),  # fp32 master weights and momentum
    ("mixed", "sgd"): (2, 2, 4),         # fp32 master weights
    ("half", "adam"): (2, 2, 4),         # pure 16-bit training, 16-bit states
    ("half", "sgd_momentum"): (2, 2, 2),
    ("half", "sgd"): (2, 2, 0),
}
# fmt: on
_OPTIMIZERS = {"adam": "adam", "adamw": "adam", "sgd": "sgd", "sgd_momentum": "sgd_momentum"}
_PRECISIONS = ("fp32", "mixed", "half")
_DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes one device holds during a training step, by kind.

    Example::

        >>> training_memory(1_000_000, optimizer="adamw", precision="mixed").total
        16000000
    """

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MemoryEstimate: {field.name} must be an int >= 0, got {value!r}")

    @property
    def total(self) -> int:
        """All bytes held at the peak."""
        return self.parameters + self.gradients + self.optimizer_states + self.activations


def training_memory(
    num_params: int | None = None,
    *,
    param_bytes: int | None = None,
    param_dtype: object = "fp32",
    optimizer: str = "adamw",
    precision: str = "mixed",
    activation_bytes: int = 0,
    in_flight: int = 1,
) -> MemoryEstimate:
    """Memory of a training step on one device.

    Args:
        num_params: parameters on the device; or give ``param_bytes`` instead.
        param_bytes: bytes of those parameters as captured, stored in ``param_dtype``.
        param_dtype: dtype of ``param_bytes`` (captured models are usually fp32).
        optimizer: ``"adamw"``/``"adam"``, ``"sgd"`` (no momentum) or ``"sgd_momentum"``.
        precision: ``"fp32"`` (also ``torch.autocast``, whose weights and states stay fp32),
            ``"mixed"`` (16-bit weights and gradients, fp32 master weights and states, as ZeRO
            and Megatron-LM) or ``"half"`` (everything 16-bit).
        activation_bytes: activations one micro-batch leaves for its backward on this device
            (for a stage: the sum of its nodes' ``output_bytes``).
        in_flight: micro-batches whose activations are held at once: the simulator's
            ``peak_in_flight`` for this rank under the chosen schedule.

    Example::

        result = pipeline_step_time("1f1b", [1.0] * 4, [2.0] * 4, num_micro_batch=8)
        memory = training_memory(350_000_000, activation_bytes=2**30,
                                 in_flight=result.peak_in_flight[0])
    """
    if (num_params is None) == (param_bytes is None):
        raise ValueError("training_memory: give exactly one of num_params and param_bytes")
    if num_params is None:
        size = _DTYPE_BYTES[normalize_dtype(param_dtype)]
        if isinstance(param_bytes, bool) or not isinstance(param_bytes, int) or param_bytes % size:
            raise ValueError(
                f"training_memory: param_bytes={param_bytes!r} is not a whole number of "
                f"{size}-byte {normalize_dtype(param_dtype)} parameters; check param_dtype"
            )
        num_params = param_bytes // size
    for name, value in (
        ("num_params", num_params),
        ("activation_bytes", activation_bytes),
        ("in_flight", in_flight),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"training_memory: {name} must be an int >= 0, got {value!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"training_memory: unknown optimizer {optimizer!r}; use one of {list(_OPTIMIZERS)}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(
            f"training_memory: unknown precision {precision!r}; use one of {list(_PRECISIONS)}"
        )
    weights, grads, states = _BYTES_PER_PARAM[precision, _OPTIMIZERS[optimizer]]
    return MemoryEstimate(
        parameters=weights * num_params,
        gradients=grads * num_params,
        optimizer_states=states * num_params,
        activations=activation_bytes * in_flight,
    )


# --- communication ----------------------------------------------------------------------------


def _group(owner: str, num_bytes: object, num_ranks: object, link: Link) -> tuple[float, int]:
    amount = _amount(owner, "num_bytes", num_bytes)
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, numbers.Integral) or num_ranks < 1:
        raise ValueError(f"{owner}: num_ranks must be an int >= 1, got {num_ranks!r}")
    if not isinstance(link, Link):
        raise TypeError(f"{owner}: link must be a Link (see Cluster.group_link), got {link!r}")
    return amount, num_ranks


def point_to_point_time(num_bytes: float, link: Link) -> float:
    """One send of ``num_bytes`` over ``link``: ``alpha + bytes / bandwidth`` (alpha-beta).

    Example::

        >>> point_to_point_time(1e9, Link(kind="network", bandwidth=12.5e9, latency=5e-6))
        0.080005
    """
    amount, _ = _group("point_to_point_time", num_bytes, 1, link)
    return link.latency + amount / link.bandwidth


def all_reduce_time(num_bytes: float, num_ranks: int, link: Link) -> float:
    """Ring all-reduce of a ``num_bytes`` buffer on each of ``num_ranks`` ranks.

    Example::

        >>> all_reduce_time(4e9, 4, Link(kind="nvlink3", bandwidth=300e9, latency=0.0))
        0.02
    """
    amount, n = _group("all_reduce_time", num_bytes, num_ranks, link)
    # Reduce-scatter then all-gather, 2(n-1) steps of bytes/n each (Thakur et al. 2005;
    # bandwidth-optimal ring: Patarasuk and Yuan 2009).
    return 2 * (n - 1) * link.latency + 2 * (n - 1) / n * amount / link.bandwidth


def host_sum_time(num_bytes: float, num_ranks: int, memory_bandwidth: float, link: Link) -> float:
    """A ``num_bytes`` buffer summed over ``num_ranks`` CPU ranks of one host through shared
    memory, as whale's runtime sums gradients there (:mod:`whale.runtime.host_reduce`): a barrier
    (a one-element all-reduce over ``link``), one pass in which each rank reads its chunk of every
    rank's buffer and writes the sum back into the others (``(2 p - 1) / p`` of the buffer, at
    ``memory_bandwidth``), and a second barrier.

    Example::

        >>> round(host_sum_time(4e8, 2, 20e9, Link(kind="shm", bandwidth=1e9, latency=1e-4)) * 1e3, 3)
        30.4
    """
    amount, n = _group("host_sum_time", num_bytes, num_ranks, link)
    if n == 1:
        return 0.0
    return 2 * all_reduce_time(4, n, link) + (2 * n - 1) / n * amount / memory_bandwidth


def tensor_parallel_time(count, volume, num_ranks: int, link: Link):
    """``count`` ring all-reduces over a tensor-parallel group of ``num_ranks`` moving ``volume``
    bytes in all: the all-reduces (Megatron-LM's f and g) of the layers a group runs, as
    :func:`all_reduce_time` prices each. ``count`` and ``volume`` may be arrays (per-layer
    prefixes, as the search reads them).

    Example::

        >>> tensor_parallel_time(4, 8e9, 4, Link(kind="nvlink3", bandwidth=300e9, latency=0.0))
        0.04
    """
    t = num_ranks
    return 2 * (t - 1) * link.latency * count + 2 * (t - 1) / t * volume / link.bandwidth


def all_gather_time(num_bytes: float, num_ranks: int, link: Link) -> float:
    """Ring all-gather; ``num_bytes`` is the gathered result on each rank (n shards)."""
    amount, n = _group("all_gather_time", num_bytes, num_ranks, link)
    # Thakur et al. 2005, ring all-gather: (n-1) alpha + (n-1)/n * bytes * beta.
    return (n - 1) * link.latency + (n - 1) / n * amount / link.bandwidth


def reduce_scatter_time(num_bytes: float, num_ranks: int, link: Link) -> float:
    """Reduce-scatter; ``num_bytes`` is each rank's full input (it keeps 1/n, reduced)."""
    amount, n = _group("reduce_scatter_time", num_bytes, num_ranks, link)
    # Thakur et al. 2005, pairwise-exchange reduce-scatter: (n-1) alpha + (n-1)/n * bytes * beta
    # (the reduction arithmetic is left out: memory-bound and small next to the transfer).
    return (n - 1) * link.latency + (n - 1) / n * amount / link.bandwidth


def all_to_all_time(num_bytes: float, num_ranks: int, link: Link) -> float:
    """All-to-all; ``num_bytes`` is each rank's send buffer (n chunks, one stays local)."""
    amount, n = _group("all_to_all_time", num_bytes, num_ranks, link)
    # Thakur et al. 2005, pairwise exchange: n-1 steps, each sending one bytes/n chunk.
    return (n - 1) * link.latency + (n - 1) / n * amount / link.bandwidth


COLLECTIVES = {
    "all_reduce": all_reduce_time,
    "all_gather": all_gather_time,
    "reduce_scatter": reduce_scatter_time,
    "all_to_all": all_to_all_time,
}


def collective_time(op: str, num_bytes: float, cluster: Cluster, ranks: Iterable[int]) -> float:
    """Time of collective ``op`` among ``ranks`` of ``cluster``, over the group's slowest link.

    Example::

        cluster = parse_cluster("node0=8xA100-80GB,node1=8xA100-80GB;net=200Gbps")
        collective_time("all_reduce", 1e9, cluster, range(16))   # network-bound
    """
    if op not in COLLECTIVES:
        raise ValueError(
            f"collective_time: unknown collective {op!r}; use one of {list(COLLECTIVES)}"
        )
    group = sorted(set(ranks))
    return COLLECTIVES[op](num_bytes, max(1, len(group)), cluster.group_link(group))


# --- pipelines --------------------------------------------------------------------------------


def pipeline_step_time(
    schedule_name: str,
    stage_forward_times: Sequence[float],
    stage_backward_times: Sequence[float],
    num_micro_batch: int,
    p2p_time: float | Sequence[float] = 0.0,
    *,
    num_ranks: int | None = None,
    blocking: bool = False,
) -> SimResult:
    """Simulate one step of a named pipeline schedule with per-stage times.

    Args:
        schedule_name: ``"gpipe"``, ``"1f1b"`` or ``"interleaved_1f1b"``.
        stage_forward_times: one micro-batch's forward time per stage.
        stage_backward_times: one micro-batch's backward time per stage.
        num_micro_batch: micro-batches per step.
        p2p_time: one activation or gradient transfer, one number or one per stage boundary
            (e.g. :func:`point_to_point_time` over ``cluster.link`` of the two stages' ranks).
        num_ranks: ranks for ``interleaved_1f1b`` (stage ``s`` on rank ``s % num_ranks``).
        blocking: rendezvous p2p instead of async (see :mod:`whale.planner.schedules.simulator`).

    Returns:
        The simulator's result: ``step_time``, ``bubble_fraction``, ``peak_in_flight`` per rank.

    Example::

        >>> result = pipeline_step_time("gpipe", [1.0] * 4, [2.0] * 4, num_micro_batch=8)
        >>> result.step_time, round(result.bubble_fraction, 4)   # (m + p - 1)(f + b), 3/11
        (33.0, 0.2727)
    """
    forward, backward = tuple(stage_forward_times), tuple(stage_backward_times)
    if len(forward) != len(backward) or not forward:
        raise ValueError(
            f"pipeline_step_time: {len(forward)} forward and {len(backward)} backward stage "
            "times; give one of each per stage (at least one stage)"
        )
    schedule = make_schedule(schedule_name, len(forward), num_micro_batch, num_ranks)
    return simulate(schedule, forward, backward, p2p_time, blocking=blocking)


class SyncTimes(tuple):
    """Gradient sync seconds per pipeline position (a tuple of floats), with ``tail``: what of
    it no backward hides (the last bucket's all-reduce, then ``tied``: that of the weights the
    position shares with others, summed after every bucket)."""

    tail: tuple[float, ...]
    tied: tuple[float, ...]

    def __new__(cls, times, tail=None, tied=None) -> Self:
        out = super().__new__(cls, (float(t) for t in times))
        out.tail = tuple(tail) if tail is not None else (0.0,) * len(out)
        out.tied = tuple(tied) if tied is not None else (0.0,) * len(out)
        return out


def exposed_sync(sync: Sequence[float], k: int, last_compute: float) -> float:
    """What position ``k``'s gradient sync adds after its last compute: the all-reduce beyond
    that compute, and at least the last bucket's (``SyncTimes.tail``)."""
    tail = getattr(sync, "tail", None)
    return max(0.0, sync[k] - last_compute, tail[k] if tail else 0.0)
