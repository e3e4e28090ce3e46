"""The frozen result of the tensor-parallel analysis: regions, per-node layouts, decisions, edges."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch.fx import GraphModule

from .moe import MoESpec
from .layout import ShardLayout

__all__ = ["ModuleDecision", "Region", "TensorParallelPlan"]


@dataclasses.dataclass(frozen=True)
class Region:
    """Modules sharded together over the same atoms (heads, columns, classes, rows or experts)."""

    id: int
    name: str  # common module path of its modules
    kind: str  # "columns", "heads", "classes", "vocabulary entries", "experts"
    modules: tuple[str, ...]
    num_atoms: int


@dataclasses.dataclass(frozen=True)
class ModuleDecision:
    """How one call_module node is sharded."""

    node: str
    path: str
    kind: str  # "column", "row", "vocab", "mha", "moe"
    region: int
    layout: ShardLayout | None = None  # column: its output's layout; row: its input's layout
    need_weights: bool = False  # mha: the averaged attention weights are used


@dataclasses.dataclass(frozen=True)
class TensorParallelPlan:
    """What the analysis decided; :mod:`.tensor_parallel` applies it for one rank."""

    graph_module: GraphModule  # the captured graph, mixture-of-experts modules collapsed
    group_size: int
    regions: tuple[Region, ...]
    layouts: Mapping[str, Any]  # node name -> ShardLayout | None | tuple
    modules: Mapping[str, ModuleDecision]  # call_module node name -> decision
    edges: Mapping[tuple[str, str], tuple]  # (consumer, producer) -> steps: ("gather",), ("copy",), ("scatter", ShardLayout)
    fixes: Mapping[str, tuple]  # node -> (kind, ShardLayout, extra): shape arguments to localize
    reduce_after: frozenset[str]  # nodes whose output is a partial sum
    output_layout: ShardLayout | None  # the model output stays sharded (a split classifier)
    fallbacks: tuple[str, ...]  # where sharded values were gathered, and why
    moe: Mapping[str, MoESpec]
    output_index: int | None = None  # the sharded output among the flat outputs (export), or None: the output itself

    def region(self, key: str | int) -> Region:
        """A region by id, name, or the path of any of its modules."""
        for r in self.regions:
            if key in (r.id, r.name) or key in r.modules:
                return r
        raise KeyError(f"no sharded region {key!r}; regions are {[r.name for r in self.regions]}")

    def summary(self) -> str:
        """One line per region and per fallback, for logs and the dry run."""
        lines = [f"tensor parallel over {self.group_size} ranks: {len(self.regions)} region(s)"]
        for r in self.regions:
            kinds = sorted({d.kind for d in self.modules.values() if d.region == r.id})
            lines.append(f"  {r.name or '<root>'}: {r.num_atoms} {r.kind}, {'/'.join(kinds)} {list(r.modules)}")
        lines += [f"  gathered at {f}" for f in self.fallbacks]
        return "\n".join(lines)
