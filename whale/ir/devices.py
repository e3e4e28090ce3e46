"""Device profiles: peak rates, memory and intra-node links of the devices a plan runs on.

A :class:`DeviceProfile` comes from one of three places (:mod:`~.device_catalog` finds them by
name, and reads and writes the files):

* the datasheet table :data:`~.device_catalog.DATASHEET_PROFILES` (common NVIDIA GPUs; the
  vendor datasheet is named in each row's ``source``),
* :data:`CPU_PROFILE`, a nominal CPU for gloo runs,
* a JSON file read by :func:`~.device_catalog.load_profiles`: custom devices, or profiles
  measured on the devices at hand, which then stand in for the datasheet rows of the same name.

Units are SI throughout: bytes, FLOP/s, bytes/s, seconds. Peak FLOP/s are *dense* rates (no 2:4
sparsity); where a datasheet lists only the sparse figure, the row holds half of it. Link
bandwidths are per direction (datasheets quote both directions added up).

The profile file (``version`` 1) is one JSON object::

    {"version": 1,
     "devices": [{"name": "A100-80GB",
                  "memory_bytes": 85899345920,
                  "peak_flops": {"fp32": 1.95e13, "tf32": 1.56e14, "bf16": 3.12e14},
                  "memory_bandwidth": 2.039e12,
                  "intra_link": "nvlink3",
                  "intra_link_bandwidth": 3.0e11,
                  "source": "measured by whale profile on host gpu07",
                  "aliases": ["a100"]}]}

``intra_link_bandwidth`` and ``aliases`` may be left out; every other key is required and
unknown keys are rejected. Five keys that ``whale profile`` measures may be left out too (files
written before them still load; the defaults below stand in):

* ``"efficiency": [[2.1e6, 0.08], [2.7e8, 0.6], [3.4e9, 1.0]]``: the share of the peak rate a
  matrix multiply of that many FLOPs reaches, sizes increasing (interpolated in log size);
* ``"op_overhead": 8e-6``: seconds every graph operation costs on top of its roofline (Python
  dispatch, kernel launch), in the forward;
* ``"optimizer_step": {"adamw": [3e-5, 2e-9], "sgd": [6e-6, 4e-10]}``: one optimizer step on
  fp32 parameters, as seconds per parameter tensor and seconds per parameter;
* ``"op_classes": {"linear": [1.4, 1.5], "attention": [3.1, 1.7], "elementwise": [1.3, 1.2],
  "view": [2.0, 1.2]}``: how graph-node classes run in a transformer block against the cost
  model's base (time factor, backward / forward; see :mod:`~.profile_fields`);
* ``"jitter": 0.05``: the spread of the device's time for the same work from step to step
  (standard deviation over the mean; default 0), which the wait for the slowest replica grows by.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .profile_fields import (
    OP_CLASSES,
    OPTIMIZERS,
    check_curve,
    check_op_classes,
    check_optimizer_steps,
)

__all__ = [
    "CPU_PROFILE",
    "DTYPES",
    "INTRA_LINKS",
    "OPTIMIZERS",
    "OP_CLASSES",
    "DeviceProfile",
    "IntraLink",
    "normalize_dtype",
]

# Kernel launch latency of a CUDA kernel is ~3-5 us (NVIDIA CUDA C++ Best Practices Guide,
# "Asynchronous transfers and overlapping"; Lustig and Martonosi 2013 measure 3-7 us).
_GPU_OP_OVERHEAD = 5e-6
# PyTorch eager CPU dispatch of one aten op from Python, with autograd recording: ~5-15 us
# (measured by whale profile on Xeon hosts; the nominal value for an unmeasured CPU).
_CPU_OP_OVERHEAD = 10e-6
# cuBLAS GEMM efficiency by size on A100/H100 (NVIDIA "Matrix multiplication background user's
# guide", fig. "performance vs size": small GEMMs are latency bound, ~4096^3 reaches the plateau),
# scaled to the 50% plateau of whole-model training (Narayanan et al. 2021: 52% on A100).
_GPU_EFFICIENCY = ((1e6, 0.005), (1e7, 0.04), (1e8, 0.15), (1e9, 0.3), (1e10, 0.45), (1e11, 0.5))
# oneDNN fp32 GEMM on one Xeon socket: ~64^3 runs at a few % of peak, ~1024^3 near the plateau.
_CPU_EFFICIENCY = ((1e5, 0.02), (1e6, 0.08), (1e7, 0.25), (1e8, 0.4), (1e9, 0.5))
# Parameter bytes read and written by one fused step on fp32 parameters: AdamW reads p, g, m, v
# and writes p, m, v (7 x 4); SGD reads p, g, writes p (3 x 4); with momentum also the buffer.
_OPTIMIZER_BYTES = {"adamw": 28, "sgd": 12, "sgd_momentum": 20}

DTYPES: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "fp8")
"""Compute dtypes a profile may give a peak rate for, in display order."""

# fmt: off
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "tf32": "tf32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
}
# fmt: on


@dataclasses.dataclass(frozen=True)
class IntraLink:
    """Standard figures of one intra-node link kind (per direction)."""

    bandwidth: float
    latency: float
    source: str


# Latencies: NCCL src/graph/tuning.cc hwLat, Ring/Simple per-step latency (NVLink 3.4us, PCI 5.7us).
# fmt: off
INTRA_LINKS: Mapping[str, IntraLink] = MappingProxyType({
    "nvlink1": IntraLink(80e9, 3.4e-6, "Tesla P100 datasheet: NVLink 160 GB/s both ways"),
    "nvlink2": IntraLink(150e9, 3.4e-6, "V100 datasheet: NVLink 300 GB/s both ways"),
    "nvlink3": IntraLink(300e9, 3.4e-6, "A100 datasheet: NVLink 600 GB/s both ways"),
    "nvlink4": IntraLink(450e9, 3.4e-6, "H100/H200 datasheets: NVLink 900 GB/s both ways"),
    "pcie3": IntraLink(16e9, 5.7e-6, "V100 PCIe / T4 datasheets: PCIe Gen3 x16 32 GB/s both ways"),
    "pcie4": IntraLink(32e9, 5.7e-6, "A100 / A10 / L4 datasheets: PCIe Gen4 x16 64 GB/s both ways"),
    "pcie5": IntraLink(64e9, 5.7e-6, "H100 datasheet: PCIe Gen5 x16 128 GB/s both ways"),
    # Nominal, in no datasheet: gloo's TCP transport between processes of one host.
    "shm": IntraLink(10e9, 20e-6, "nominal gloo TCP over loopback; measure with whale profile"),
})
# fmt: on
"""Intra-node link kinds: NVLink generations, PCIe generations, and host memory (``shm``)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def normalize_dtype(dtype: object) -> str:
    """The canonical compute dtype (``"fp32"``, ``"tf32"``, ``"fp16"``, ``"bf16"``, ``"fp8"``).

    Accepts those names, torch's names (``"bfloat16"``, ``"float16"``) and ``torch.dtype`` objects.

    Example::

        >>> normalize_dtype("bfloat16"), normalize_dtype("half")
        ('bf16', 'fp16')
    """
    text = str(dtype).lower().removeprefix("torch.")
    if text not in _DTYPE_ALIASES:
        raise ValueError(
            f"unknown compute dtype {dtype!r}; use one of {list(DTYPES)} "
            "(torch names such as 'bfloat16' or a torch.dtype also work)"
        )
    return _DTYPE_ALIASES[text]


def _positive(owner: str, name: str, value: object, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or value <= 0
    ):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{owner}: {name} must be {what} > 0, got {value!r}")


def _below_one(owner: str, name: str, value: object, what: str) -> float:
    """``value`` as a float where it is a number in [0, 1); else the error naming ``what`` it must be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What the cost model needs to know about one device type.

    Example::

        a100 = get_profile("a100_80g")
        a100.peak("bf16")        # 3.12e14 FLOP/s
        a100.memory_bytes        # 85899345920
    """

    name: str
    """Canonical name, usable in a cluster string (letters, digits, ``_.-``): ``"A100-80GB"``."""
    memory_bytes: int
    """Device memory in bytes (physical; the planner leaves its own headroom)."""
    peak_flops: tuple[tuple[str, float], ...]
    """Dense peak FLOP/s per compute dtype; a mapping is accepted and stored as sorted pairs."""
    memory_bandwidth: float
    """Device memory bandwidth, bytes/s."""
    intra_link: str
    """Kind of the link between devices of one node: a key of :data:`INTRA_LINKS`."""
    intra_link_bandwidth: float | None = None
    """Bytes/s per direction between two devices of a node; None takes the kind's standard."""
    source: str
    """Where the numbers come from: the datasheet, or the measurement."""
    aliases: tuple[str, ...] = ()
    """Other names that find this profile (matched case- and punctuation-insensitively)."""
    efficiency: tuple[tuple[float, float], ...] | None = None
    """Matrix-multiply efficiency by size: ``(FLOPs of one operation, share of peak)`` points,
    sizes increasing, shares non-decreasing in (0, 1]; None: the default (see
    :meth:`efficiency_curve`)."""
    op_overhead: float | None = None
    """Seconds each graph operation costs beyond its roofline in the forward (dispatch, kernel
    launch); None: the default for the device kind (see :meth:`overhead`)."""
    optimizer_step: tuple[tuple[str, float, float], ...] | None = None
    """Measured optimizer steps on fp32 parameters: ``(optimizer, seconds per parameter tensor,
    seconds per parameter)``; a mapping ``{"adamw": [a, b]}`` is accepted. None: from the memory
    bandwidth (see :meth:`optimizer_cost`)."""
    op_classes: tuple[tuple[str, float, float], ...] | None = None
    """Measured time of graph-node classes in a transformer block against the cost model's base
    (:mod:`~.profile_fields`): ``(class, factor, backward / forward)``; a mapping
    ``{"linear": [f, b]}`` is accepted. None, or a class left out: factor 1 (the base as is)."""
    jitter: float | None = None
    """Spread of the device's time for the same step from step to step: standard deviation over
    the mean (a CPU core shared with other processes ~0.1). The cost model prices the wait for
    the slowest replica by it (:mod:`whale.planner.cost.stragglers`). None: 0, a steady device."""

    def __post_init__(self) -> None:
        owner = f"DeviceProfile({self.name!r})"
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"DeviceProfile(name={self.name!r}) must start with a letter or digit and hold "
                "only letters, digits, '_', '.' and '-', e.g. 'A100-80GB'"
            )
        _positive(owner, "memory_bytes", self.memory_bytes, integer=True)
        _positive(owner, "memory_bandwidth", self.memory_bandwidth)
        items = self.peak_flops.items() if isinstance(self.peak_flops, Mapping) else self.peak_flops
        rates: dict[str, float] = {}
        for key, rate in items:
            dtype = normalize_dtype(key)
            if dtype in rates:
                raise ValueError(f"{owner}: peak_flops gives {dtype!r} twice")
            _positive(owner, f"peak_flops[{key!r}]", rate)
            rates[dtype] = float(rate)
        if "fp32" not in rates:
            raise ValueError(f"{owner}: peak_flops needs an 'fp32' rate, got {sorted(rates)}")
        object.__setattr__(self, "peak_flops", tuple((d, rates[d]) for d in DTYPES if d in rates))
        if self.intra_link not in INTRA_LINKS:
            raise ValueError(
                f"{owner}: intra_link={self.intra_link!r} is unknown; "
                f"use one of {list(INTRA_LINKS)}"
            )
        if self.intra_link_bandwidth is None:
            object.__setattr__(self, "intra_link_bandwidth", INTRA_LINKS[self.intra_link].bandwidth)
        _positive(owner, "intra_link_bandwidth", self.intra_link_bandwidth)
        object.__setattr__(self, "memory_bandwidth", float(self.memory_bandwidth))
        object.__setattr__(self, "intra_link_bandwidth", float(self.intra_link_bandwidth))
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"{owner}: source must name where the numbers come from")
        if isinstance(self.aliases, str) or not all(isinstance(a, str) for a in self.aliases):
            raise ValueError(f"{owner}: aliases must be a list of strings, got {self.aliases!r}")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if self.efficiency is not None:
            object.__setattr__(self, "efficiency", check_curve(owner, self.efficiency))
        if self.op_overhead is not None:
            object.__setattr__(self, "op_overhead", _below_one(owner, "op_overhead", self.op_overhead, "seconds per operation in [0, 1), e.g. 8e-6"))
        if self.optimizer_step is not None:
            object.__setattr__(self, "optimizer_step", check_optimizer_steps(owner, self.optimizer_step))
        if self.op_classes is not None:
            object.__setattr__(self, "op_classes", check_op_classes(owner, self.op_classes))
        if self.jitter is not None:
            object.__setattr__(self, "jitter", _below_one(owner, "jitter", self.jitter, "a spread in [0, 1) (standard deviation over mean), e.g. 0.05"))

    @property
    def measured(self) -> bool:
        """The numbers come from ``whale profile`` (its ``source`` starts with ``measured``)."""
        return self.source.startswith("measured")

    def efficiency_curve(self) -> tuple[tuple[float, float], ...]:
        """The efficiency points in use: this profile's, else a default.

        Defaults: a measured profile written before curves were measured takes its rates at face
        value (1.0 at every size); a GPU row, a typical cuBLAS curve up to 50%; a CPU, a oneDNN
        curve up to 50%.
        """
        if self.efficiency is not None:
            return self.efficiency
        if self.measured:
            return ((1.0, 1.0),)
        return _CPU_EFFICIENCY if self.intra_link == "shm" else _GPU_EFFICIENCY

    def overhead(self) -> float:
        """Seconds per graph operation in the forward: measured, else the device kind's default."""
        if self.op_overhead is not None:
            return self.op_overhead
        return _CPU_OP_OVERHEAD if self.intra_link == "shm" else _GPU_OP_OVERHEAD

    def class_factors(self) -> tuple[float, ...]:
        """Time factor of each of :data:`OP_CLASSES` (1.0 where the profile measured none)."""
        given = {name: factor for name, factor, _ in self.op_classes or ()}
        return tuple(given.get(name, 1.0) for name in OP_CLASSES)

    def class_backward_ratios(self) -> tuple[float, ...] | None:
        """Backward over forward time of each of :data:`OP_CLASSES` as measured (2.0, the FLOPs'
        ratio, where the profile measured none); None where it measured none at all."""
        if not self.op_classes:
            return None
        given = {name: backward for name, _, backward in self.op_classes}
        return tuple(given.get(name, 2.0) for name in OP_CLASSES)

    def optimizer_cost(self, optimizer: str) -> tuple[float, float]:
        """``(seconds per parameter tensor, seconds per fp32 parameter)`` of one step of
        ``optimizer`` (``"adamw"``/``"adam"``, ``"sgd"``, ``"sgd_momentum"``).

        Measured where the profile has it; otherwise memory bound: the bytes a fused step reads
        and writes per parameter over the memory bandwidth, and one operation's overhead per
        tensor on a CPU (torch steps CPU tensors one by one; CUDA ones in multi-tensor kernels).
        """
        name = "adamw" if optimizer == "adam" else optimizer
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {list(OPTIMIZERS)}")
        for key, per_tensor, per_param in self.optimizer_step or ():
            if key == name:
                return per_tensor, per_param
        per_tensor = self.overhead() * (4 if name == "adamw" else 1) if self.intra_link == "shm" else 0.0
        return per_tensor, _OPTIMIZER_BYTES[name] / self.memory_bandwidth

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The compute dtypes this device has a peak rate for."""
        return tuple(d for d, _ in self.peak_flops)

    def peak(self, dtype: object = "fp32") -> float:
        """Dense peak FLOP/s for ``dtype`` (any name :func:`normalize_dtype` accepts)."""
        key = normalize_dtype(dtype)
        for d, rate in self.peak_flops:
            if d == key:
                return rate
        raise ValueError(
            f"{self.name} has no {key} rate (it computes {list(self.dtypes)}); pick one of those "
            f"dtypes, or give the device a {key!r} peak_flops entry in a profile file"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this profile in the profile file format."""
        out = dataclasses.asdict(self)
        out["peak_flops"] = dict(self.peak_flops)
        out["aliases"] = list(self.aliases)
        for key in [k for k in ("efficiency", "op_overhead", "optimizer_step", "op_classes", "jitter") if out[k] is None]:
            del out[key]  # the file stays readable as before: a missing key is the default
        if self.efficiency is not None:
            out["efficiency"] = [list(point) for point in self.efficiency]
        if self.optimizer_step is not None:
            out["optimizer_step"] = {name: [a, b] for name, a, b in self.optimizer_step}
        if self.op_classes is not None:
            out["op_classes"] = {name: [a, b] for name, a, b in self.op_classes}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "device profile") -> DeviceProfile:
        """Build a profile from its JSON object; ``where`` names it in error messages."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; the keys are {sorted(fields)}")
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        if not isinstance(data["peak_flops"], Mapping):
            raise ValueError(
                f'{where}: peak_flops must be an object such as {{"fp32": 1.95e13}}, '
                f"got {data['peak_flops']!r}"
            )
        if "efficiency" in data and not isinstance(data["efficiency"], list):
            raise ValueError(
                f"{where}: efficiency must be a list of [flops, share] pairs such as "
                f"[[1e6, 0.1], [1e9, 0.9]], got {data['efficiency']!r}; leave it out for the default"
            )
        if "optimizer_step" in data and not isinstance(data["optimizer_step"], Mapping):
            raise ValueError(
                f'{where}: optimizer_step must be an object such as {{"adamw": [3e-5, 2e-9]}}, '
                f"got {data['optimizer_step']!r}; leave it out for the default"
            )
        if "op_classes" in data and not isinstance(data["op_classes"], Mapping):
            raise ValueError(
                f'{where}: op_classes must be an object such as {{"linear": [1.4, 1.5]}}, '
                f"got {data['op_classes']!r}; leave it out for the default"
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


# Nominal: one Intel Xeon Platinum 8380 socket (Intel ARK: 40 cores, 2.3 GHz base; two AVX-512
# FMA units = 64 fp32 FLOP/cycle/core -> 5.89 TFLOP/s; 8 channels of DDR4-3200 -> 204.8 GB/s).
CPU_PROFILE = DeviceProfile(
    name="CPU",
    memory_bytes=256 * 2**30,
    peak_flops={"fp32": 40 * 2.3e9 * 64},
    memory_bandwidth=8 * 3200e6 * 8,
    intra_link="shm",
    source="nominal: one Intel Xeon Platinum 8380 socket (Intel ARK), 256 GiB of DDR4; "
    "measure with whale profile for real numbers",
    aliases=("cpu", "host"),
    efficiency=_CPU_EFFICIENCY,
    op_overhead=_CPU_OP_OVERHEAD,
)
