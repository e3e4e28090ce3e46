"""The planner's view of a model: a sequence of layers with per-row costs (frozen data).

A :class:`Layer` is a contiguous run of graph nodes that begins at a module, so a stage boundary
at a layer is a module path the stage-split pass accepts; :class:`ModelProfile` holds the layers
and what crosses each possible cut. :mod:`~.grouping` builds one from a captured model; tests and
sketches build them directly (:meth:`Layer.simple`, :meth:`ModelProfile.from_layers`).

All sizes are per batch row, from the example batch the model was captured with: FLOPs, memory
traffic and saved activations grow with rows; parameter reads do not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["Layer", "ModelProfile"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's costs, per batch row unless said otherwise.

    The roofline is applied per node (a matmul is compute bound, a layer norm memory bound), so
    a layer keeps its nodes' figures, split into the part tensor parallelism shards and the part
    it replicates (Megatron-LM: layer norms, residual adds and dropouts on hidden-width tensors
    run on every shard; Shoeybi et al. 2019, section 3).

    Attributes:
        name: module path where the layer begins; a valid stage boundary when ``cuttable``.
        flops: forward FLOPs per node (per row), sharded nodes first.
        row_bytes: memory traffic that grows with rows, per node (per row).
        fixed_bytes: traffic that does not (parameter and buffer reads), per node.
        num_sharded: how many of the nodes are sharded under tensor parallelism.
        param_bytes: parameters the layer reads (tied ones once).
        replicated_param_bytes: the part of ``param_bytes`` tensor parallelism replicates.
        act_bytes: activations one row leaves for the backward.
        replicated_act_bytes: the part of ``act_bytes`` tensor parallelism replicates.
        hidden_bytes: the layer's output per row, the size of a tensor-parallel all-reduce.
        tp_all_reduces: all-reduces per forward under tensor parallelism: one per pair of
            matmuls (column- then row-parallel) and one per sharded embedding (Megatron-LM).
        param_names: canonical names of the parameters read, for tied weights.
        cuttable: a stage may begin here (``name`` is a module none of whose nodes ran before).
    """

    name: str
    flops: tuple[float, ...]
    row_bytes: tuple[float, ...]
    fixed_bytes: tuple[float, ...]
    num_sharded: int
    param_bytes: int
    replicated_param_bytes: int
    act_bytes: float
    replicated_act_bytes: float
    hidden_bytes: float
    tp_all_reduces: int
    param_names: tuple[str, ...] = ()
    cuttable: bool = True

    def __post_init__(self) -> None:
        if not len(self.flops) == len(self.row_bytes) == len(self.fixed_bytes):
            raise ValueError(f"Layer {self.name!r}: flops, row_bytes and fixed_bytes differ in length")
        if not 0 <= self.num_sharded <= len(self.flops):
            raise ValueError(f"Layer {self.name!r}: num_sharded={self.num_sharded} out of range")
        values = (*self.flops, *self.row_bytes, *self.fixed_bytes, self.act_bytes, self.hidden_bytes)
        if any(not (v >= 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"Layer {self.name!r}: costs must be finite numbers >= 0")
        if not 0 <= self.replicated_param_bytes <= self.param_bytes:
            raise ValueError(f"Layer {self.name!r}: replicated_param_bytes exceeds param_bytes")
        if not 0 <= self.replicated_act_bytes <= self.act_bytes + 1e-9:
            raise ValueError(f"Layer {self.name!r}: replicated_act_bytes exceeds act_bytes")

    @property
    def total_flops(self) -> float:
        """Forward FLOPs per row."""
        return sum(self.flops)

    @classmethod
    def simple(
        cls,
        name: str,
        *,
        flops: float,
        param_bytes: int,
        act_bytes: float,
        row_bytes: float = 0.0,
        hidden_bytes: float = 0.0,
    ) -> Layer:
        """A one-node layer, fully sharded under tensor parallelism (for tests and sketches).

        Example::

            Layer.simple("blocks.0", flops=1e9, param_bytes=4 << 20, act_bytes=1e6)
        """
        return cls(
            name=name, flops=(float(flops),), row_bytes=(float(row_bytes),),
            fixed_bytes=(float(param_bytes),), num_sharded=1, param_bytes=int(param_bytes),
            replicated_param_bytes=0, act_bytes=float(act_bytes), replicated_act_bytes=0.0,
            hidden_bytes=float(hidden_bytes), tp_all_reduces=1 if param_bytes else 0,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """The model as the planner sees it: layers in order and what crosses each cut.

    Attributes:
        layers: the layers in execution order.
        cut_bytes: ``cut_bytes[k]`` is what a stage boundary before layer ``k`` sends per row
            (every value made before ``k`` and used from ``k`` on); ``cut_bytes[0] == 0``.
        shared_params: tied parameters read by several layers: ``(name, bytes, layers)``.
        param_dtype_bytes: bytes per element of the captured parameters (4 for fp32).
        act_dtype_bytes: bytes per element of the captured activations.
        pinned_cuts: layer indices where pinned stages 1.. begin (``stage()`` annotations or
            ``Config(stage_boundaries)``), or None when the planner chooses.
        total_param_bytes: the model's distinct parameters.
        split_only: tensor parallelism shards only the ``split()`` parts (the runtime's rule);
            False: the profile assumes any layer could be sharded (a what-if).

    Example::

        profile = profile_model(capture(model, (x,)), example_rows=x.shape[0])   # grouping.py
        [layer.name for layer in profile.layers]   # ['wte', 'wpe', 'blocks.0', ...]
    """

    layers: tuple[Layer, ...]
    cut_bytes: tuple[float, ...]
    shared_params: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    param_dtype_bytes: int = 4
    act_dtype_bytes: int = 4
    pinned_cuts: tuple[int, ...] | None = None
    total_param_bytes: int | None = None
    split_only: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("ModelProfile: the model has no layer that computes")
        if len(self.cut_bytes) != len(self.layers) or self.cut_bytes[0] != 0:
            raise ValueError("ModelProfile: cut_bytes needs one entry per layer, the first 0")
        if self.pinned_cuts is not None:
            cuts = tuple(self.pinned_cuts)
            if list(cuts) != sorted(set(cuts)) or any(not 0 < c < len(self.layers) for c in cuts):
                raise ValueError(f"ModelProfile: pinned_cuts {list(cuts)} must increase within 1..{len(self.layers) - 1}")
        if self.total_param_bytes is None:
            shared = sum(b * (len(ls) - 1) for _, b, ls in self.shared_params)
            total = sum(layer.param_bytes for layer in self.layers) - shared
            object.__setattr__(self, "total_param_bytes", total)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_layers(cls, layers: Sequence[Layer], cut_bytes: Sequence[float] | None = None) -> ModelProfile:
        """A profile of independent layers; a cut sends the previous layer's ``hidden_bytes``.

        Example::

            ModelProfile.from_layers([Layer.simple(f"l{i}", flops=1e9, param_bytes=1 << 20,
                                                   act_bytes=1e5) for i in range(8)])
        """
        layers = tuple(layers)
        cuts = cut_bytes if cut_bytes is not None else [0.0] + [x.hidden_bytes for x in layers[:-1]]
        return cls(layers=layers, cut_bytes=tuple(float(c) for c in cuts))
