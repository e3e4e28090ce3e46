"""Expert parallelism: a mixture-of-experts layer with its experts spread over the ranks.

Recognized by structure, not by name: a module (inside a ``split`` scope) that owns an
``nn.ModuleList`` of at least two experts of one type and shape, and an ``nn.Linear`` router with
one output per expert. Its routing must be top-k over a softmax of the router's logits, the k
weights optionally renormalized to sum to 1 (Switch, GShard, Mixtral). whale checks this by
running the module and its own routing on one random batch before sharding (a module that
routes otherwise is rejected, naming it); on the meta device, where nothing can run, ``top_k``
and ``norm_topk_prob``/``normalize`` attributes are trusted.

Sharded, every rank routes all tokens (a small replicated matmul), keeps a slice of the tokens,
sends each (token, slot) pair to the rank owning its expert with one all-to-all of uneven counts
(the counts are known on every rank, so none are exchanged), runs its experts, sends results
back with a second all-to-all, and all-gathers the token slices: 3 collectives forward, 3 back.
Capacity-free: no token is dropped, so the result equals the local layer's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from ...capture.graph import NODE_INFO_KEY
from ...ir.rows import row_offsets
from ..collectives import all_to_all, gather_from_group, scatter_to_group
from .shard_sizes import even_sizes

__all__ = ["ExpertParallelMoE", "MoESpec", "collapse_moe", "find_moe"]

_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k")
_NORM_ATTRS = ("norm_topk_prob", "normalize", "renormalize")


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """One recognized mixture-of-experts module."""

    path: str
    experts_attr: str
    router_attr: str
    num_experts: int
    top_k: int
    normalize: bool


def _experts_and_router(module: nn.Module) -> tuple[str, str] | None:
    lists = [
        (name, child)
        for name, child in module.named_children()
        if isinstance(child, nn.ModuleList) and len(child) >= 2 and _homogeneous(child)
    ]
    for name, experts in lists:
        for rname, router in module.named_children():
            if isinstance(router, nn.Linear) and router.out_features == len(experts):
                return name, rname
    return None


def _homogeneous(experts: nn.ModuleList) -> bool:
    first = experts[0]
    shapes = [tuple(p.shape) for p in first.parameters()]
    return bool(shapes) and all(
        type(e) is type(first) and [tuple(p.shape) for p in e.parameters()] == shapes for e in experts
    )


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax routing: (weights, expert ids), each ``(tokens, top_k)``."""
    weights, ids = torch.topk(F.softmax(logits, dim=-1), top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _dense_reference(module: nn.Module, spec: MoESpec, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    weights, ids = route(getattr(module, spec.router_attr)(tokens), spec.top_k, spec.normalize)
    outs = torch.stack([e(tokens) for e in getattr(module, spec.experts_attr)])  # (E, N, d)
    picked = outs[ids, torch.arange(tokens.shape[0]).unsqueeze(1)]  # (N, k, d)
    y = (weights.unsqueeze(-1) * picked).sum(1)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def find_moe(model: nn.Module, paths: list[str], input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, MoESpec]:
    """Mixture-of-experts modules among ``paths`` (outermost first), each checked by a probe run.

    Args:
        model: the local model.
        paths: candidate module paths (modules inside a split scope).
        input_shapes: the full shape of each candidate's input, from the captured graph.
    """
    found: dict[str, MoESpec] = {}
    for path in paths:
        if any(path.startswith(p + ".") for p in found) or path not in input_shapes:
            continue
        module = model.get_submodule(path)
        parts = _experts_and_router(module)
        if parts is None:
            continue
        experts_attr, router_attr = parts
        num = len(getattr(module, experts_attr))
        k_attr = next((getattr(module, a) for a in _TOP_K_ATTRS if isinstance(getattr(module, a, None), int)), 1)
        norm_attr = next((bool(getattr(module, a)) for a in _NORM_ATTRS if isinstance(getattr(module, a, None), bool)), False)
        candidates = [(k_attr, norm_attr), (k_attr, not norm_attr)]
        candidates += [(k, n) for k in range(1, min(num, 4) + 1) for n in (False, True) if (k, n) not in candidates]
        spec = _probe(module, path, experts_attr, router_attr, num, candidates, input_shapes[path])
        found[path] = spec
    return found


def _probe(module, path, experts_attr, router_attr, num, candidates, shape) -> MoESpec:
    params = list(module.parameters())
    if params[0].is_meta:
        k, norm = candidates[0]
        return MoESpec(path, experts_attr, router_attr, num, k, norm)
    gen = torch.Generator().manual_seed(0)
    dtype = params[0].dtype
    # A few hundred tokens tell the routing apart; the example batch may be far larger.
    shape = list(shape)
    while len(shape) > 1 and math.prod(shape[:-1]) > 256 and max(shape[:-1]) > 1:
        big = shape[:-1].index(max(shape[:-1]))
        shape[big] = max(1, shape[big] // 2)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(params[0].device)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 2e-3}
    was_training = module.training
    module.eval()  # dropout off: the probe compares two deterministic computations
    try:
        with torch.no_grad():
            expected = module(x)
            for k, norm in candidates:
                spec = MoESpec(path, experts_attr, router_attr, num, k, norm)
                got = _dense_reference(module, spec, x)
                if got.shape == expected.shape and torch.allclose(got, expected, **tol):
                    return spec
    finally:
        module.train(was_training)
    raise ValueError(
        f"split() at {path!r}: {type(module).__name__} looks like a mixture of experts "
        f"({num} experts in {path}.{experts_attr}, router {path}.{router_attr}) but its output is "
        "not top-k softmax routing over them (checked on a random batch for k = 1..4, with and "
        "without renormalized weights). whale shards that routing only; put split() around the "
        "experts' Linears instead, or keep this module replicated"
    )


def collapse_moe(gm: GraphModule, model: nn.Module, specs: Mapping[str, MoESpec]) -> None:
    """Replace each MoE module's traced nodes by one ``call_module`` node of ``model``'s module (in place)."""
    graph = gm.graph
    for path in specs:
        gm.add_submodule(path, model.get_submodule(path))
        inside = [
            n for n in graph.nodes
            if n.op not in ("placeholder", "output")
            and _owned(n.meta[NODE_INFO_KEY].module_path, path)
        ]
        members = set(inside)
        inputs = {a for n in inside for a in n.all_input_nodes if a not in members}
        outputs = [n for n in inside if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"split() at {path!r}: the mixture-of-experts module must take one tensor and "
                f"return one tensor; its traced forward reads {len(inputs)} values and exposes "
                f"{len(outputs)}"
            )
        (source,), (result,) = inputs, outputs
        with graph.inserting_before(result):
            node = graph.call_module(path, (source,))
        node.meta = dict(result.meta)
        node.meta[NODE_INFO_KEY] = dataclasses.replace(
            result.meta[NODE_INFO_KEY], name=node.name, op="call_module", target=path, module_path=path
        )
        result.replace_all_uses_with(node)
        for n in reversed(inside):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()


def _owned(module_path: str, path: str) -> bool:
    return module_path == path or module_path.startswith(path + ".")


class ExpertParallelMoE(nn.Module):
    """This rank's experts of a mixture-of-experts layer, tokens exchanged by all-to-all.

    Parameter names are the local model's: ``<experts_attr>.<global expert id>.*`` and the
    replicated router under its own attribute.
    """

    def __init__(
        self,
        source: nn.Module,
        spec: MoESpec,
        expert_sizes: tuple[int, ...],
        rank: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.group = group
        self.rank = rank
        self.expert_sizes = expert_sizes
        first = row_offsets(expert_sizes)[rank]
        self.local_ids = tuple(range(first, first + expert_sizes[rank]))
        setattr(self, spec.router_attr, getattr(source, spec.router_attr))
        experts = getattr(source, spec.experts_attr)
        setattr(self, spec.experts_attr, nn.ModuleDict({str(e): experts[e] for e in self.local_ids}))
        owner = torch.repeat_interleave(torch.arange(len(expert_sizes)), torch.tensor(expert_sizes))
        self.register_buffer("owner", owner, persistent=False)

    def extra_repr(self) -> str:
        return f"experts={list(self.local_ids)} of {self.spec.num_experts}, top_k={self.spec.top_k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, group, ranks = self.spec, self.group, len(self.expert_sizes)
        tokens = x.reshape(-1, x.shape[-1])
        n, k = tokens.shape[0], spec.top_k
        # Routing is replicated: every rank knows every pair's destination, so counts need no exchange.
        weights, ids = route(getattr(self, spec.router_attr)(tokens), k, spec.normalize)
        rows = even_sizes(n, ranks)
        start = row_offsets(rows)[self.rank]
        mine = scatter_to_group(tokens, 0, rows, group)
        src = torch.repeat_interleave(torch.arange(ranks, device=x.device), torch.tensor(rows, device=x.device))
        pair_src = src.repeat_interleave(k)
        pair_expert = ids.reshape(-1)
        pair_dst = self.owner[pair_expert]
        counts = torch.bincount(pair_src * ranks + pair_dst, minlength=ranks * ranks).view(ranks, ranks)
        send_splits, recv_splits = counts[self.rank].tolist(), counts[:, self.rank].tolist()

        my_expert = pair_expert[start * k : (start + rows[self.rank]) * k]
        order = torch.argsort(my_expert, stable=True)  # experts are contiguous per rank: grouped by destination
        send = mine.repeat_interleave(k, dim=0)[order]
        received = all_to_all(send, recv_splits, send_splits, group)

        # The received pairs, in order: each source's pairs for my experts, sorted by expert.
        key = torch.argsort(pair_src * spec.num_experts + pair_expert, stable=True)
        recv_expert = pair_expert[key][pair_dst[key] == self.rank]
        by_expert = torch.argsort(recv_expert, stable=True)
        per_expert = torch.bincount(recv_expert, minlength=spec.num_experts)[list(self.local_ids)].tolist()
        experts = getattr(self, spec.experts_attr)
        chunks = received[by_expert].split(per_expert)
        outs = [experts[str(e)](c) for e, c in zip(self.local_ids, chunks) if c.shape[0]]
        width = outs[0].shape[-1] if outs else self._out_width(tokens)
        done = torch.cat(outs) if outs else received.new_zeros((0, width))
        done = done[torch.argsort(by_expert)]

        back = all_to_all(done, send_splits, recv_splits, group)
        pairs = back[torch.argsort(order)].view(rows[self.rank], k, -1)
        y = gather_from_group(pairs, 0, rows, group)
        out = (weights.unsqueeze(-1) * y).sum(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _out_width(self, tokens: torch.Tensor) -> int:
        expert = next(iter(getattr(self, self.spec.experts_attr).values()))
        with torch.no_grad():
            return expert(tokens[:0]).shape[-1]
