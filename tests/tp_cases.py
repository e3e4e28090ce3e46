"""Cases run on every rank of a gloo pool (see tests/world.py) for the tensor-parallel tests.

Every case builds the same model from the same seed on every rank, shards it with
``shard_model`` and trains it; rank 0 also trains the local model on the same batch and returns
both, gradients gathered to the local model's names.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

import whale as wh
from examples.gpt import GPT, GPTConfig
from examples.moe import MoELM
from examples.moe import lm_loss as moe_loss
from tests.models import Block, MHAModel, TinyGPT
from whale.capture import capture
from whale.rewrite import shard_model
from whale.runtime.grad_sync import GradientReducer

_STEPS = 2
# Above round-off: a gradient of ~1e-11 (a key bias, whose true gradient is 0) must not become
# an lr-sized Adam step whose sign is decided by summation order.
_ADAM_EPS = 1e-6


class Classifier(nn.Module):
    """Features, then a wide classifier under ``split``: the Whale large-classification case."""

    def __init__(self, d_in: int = 16, width: int = 32, classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.LayerNorm(width))
        with wh.split():
            self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EmbeddingBag(nn.Module):
    """A vocabulary-parallel embedding, mean-pooled, then a small replicated head."""

    def __init__(self, vocab: int = 1000, dim: int = 32, out: int = 8) -> None:
        super().__init__()
        with wh.split():
            self.embed = nn.Embedding(vocab, dim, padding_idx=3)
        self.head = nn.Linear(dim, out)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx).mean(1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def build(kind: str, rows: int = 8):
    """(model, batches [(x, y)], loss_fn) for a kind; the same on every rank."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "block":  # hand-written attention + MLP, the whole block split
        model = Block(32, 4, 16)
        wh.annotate(model, {"": wh.split()})
        data = [(torch.randn(rows, 16, 32, generator=g), torch.randn(rows, 16, 32, generator=g)) for _ in range(_STEPS)]
        return model, data, _mse
    if kind == "gpt":  # vocab-parallel embedding, blocks, split lm head with lm_loss
        model = TinyGPT(vocab=96, block_size=16, n_layer=2, n_head=4, n_embd=32)
        wh.annotate(model, {"wte": wh.split(), "h": wh.split(), "lm_head": wh.split()})
        data = [(torch.randint(96, (rows, 16), generator=g), torch.randint(96, (rows, 16), generator=g)) for _ in range(_STEPS)]
        return model, data, lm_loss
    if kind == "gpt-sdpa":  # examples/gpt.py: SDPA, shapes from x.shape, blocks split inside replicate
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32))
        wh.annotate(model, {"blocks": wh.split()})
        data = [(torch.randint(64, (rows, 16), generator=g), torch.randint(64, (rows, 16), generator=g)) for _ in range(_STEPS)]
        return model, data, lm_loss
    if kind == "mha":
        model = MHAModel(d_in=8, d_model=32, n_head=4, d_out=8)
        wh.annotate(model, {"attn": wh.split()})
        data = [(torch.randn(rows, 10, 8, generator=g), torch.randn(rows, 10, 8, generator=g)) for _ in range(_STEPS)]
        return model, data, _mse
    if kind == "classifier":
        model = Classifier()
        data = [(torch.randn(rows, 16, generator=g), torch.randint(1000, (rows,), generator=g)) for _ in range(_STEPS)]
        return model, data, F.cross_entropy
    if kind == "classifier-smooth":  # nn.CrossEntropyLoss with label smoothing and ignored rows
        model = Classifier()
        ys = [torch.randint(1000, (rows,), generator=g) for _ in range(_STEPS)]
        for y in ys:
            y[::3] = -100
        data = [(torch.randn(rows, 16, generator=g), y) for y in ys]
        return model, data, nn.CrossEntropyLoss(label_smoothing=0.1)
    if kind == "embedding":
        model = EmbeddingBag()
        ids = [torch.randint(1000, (rows, 12), generator=g) for _ in range(_STEPS)]
        return model, [(i, torch.randn(rows, 8, generator=g)) for i in ids], _mse
    if kind == "moe":
        model = MoELM(vocab=64, d_model=32, d_hidden=48, num_experts=6, top_k=2)
        data = [(torch.randint(64, (rows, 12), generator=g), torch.randint(64, (rows, 12), generator=g)) for _ in range(_STEPS)]
        return model, data, moe_loss
    if kind == "mha-masked":
        model = MaskedMHA()
        data = [(torch.randn(10, rows, 32, generator=g), torch.randn(10, rows, 32, generator=g)) for _ in range(_STEPS)]
        return model, data, _mse
    if kind == "variants":
        model = Variants()
        data = [(torch.randn(rows, 10, 32, generator=g), torch.randn(rows, 10, 32, generator=g)) for _ in range(_STEPS)]
        return model, data, _mse
    raise ValueError(kind)


def _groups(tp: int):
    """(tp group, dp group, this rank's index in tp, dp index, dp size) for consecutive TP blocks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp == world:
        return None, None, rank, 0, 1
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    dp_groups = [dist.new_group(list(range(i, world, tp))) for i in range(tp)]
    return tp_groups[rank // tp], dp_groups[rank % tp], rank % tp, rank // tp, world // tp


def equivalence(kind: str, sizes=None, tp: int | None = None, rows: int = 8) -> dict:
    """Train ``_STEPS`` AdamW steps sharded (and data parallel over world/tp replicas)."""
    model, batches, loss_fn = build(kind, rows)
    reference = copy.deepcopy(model)
    tp = tp or dist.get_world_size()
    tp_group, dp_group, _, dp_index, dp = _groups(tp)
    sharded = shard_model(model, capture(model, (batches[0][0],)), group=tp_group, shard_sizes=sizes, loss_fn=loss_fn)
    compute_loss = sharded.loss_fn or loss_fn
    params = list(sharded.module.parameters())
    reducer = GradientReducer(params, group=dp_group) if dp > 1 else None
    opt = torch.optim.AdamW(params, lr=1e-2, eps=_ADAM_EPS)
    out = {"loss": [], "grads": [], "counts": [], "logits_width": None}
    for x, y in batches:
        if dp > 1:  # this replica's rows (dim 0 is the batch for the models run data parallel)
            share = rows // dp
            x, y = x[dp_index * share : (dp_index + 1) * share], y[dp_index * share : (dp_index + 1) * share]
        with CommDebugMode() as fwd:
            output = sharded.module(x)
            loss = compute_loss(output, y)
        if reducer is not None:
            reducer.begin()
        with CommDebugMode() as bwd:  # with data parallel, also counts the reducer's all-reduces
            (loss / dp).backward()
        if reducer is not None:
            reducer.finish()
            total = loss.detach().clone()
            dist.all_reduce(total, group=dp_group)
            loss = total / dp
        out["counts"].append((_counts(fwd), _counts(bwd)))
        out["logits_width"] = output.shape[-1]
        out["loss"].append(loss.item())
        grads = sharded.gather_full({n: p.grad for n, p in sharded.module.named_parameters()})
        out["grads"].append(grads if dist.get_rank() == 0 else None)
        opt.step()
        opt.zero_grad()
    full = sharded.full_state_dict()
    out["params"] = full if dist.get_rank() == 0 else None
    out["regions"] = {r.name: (r.kind, r.num_atoms) for r in sharded.plan.regions}
    out["sizes"] = dict(sharded.sizes)
    out["fallbacks"] = sharded.plan.fallbacks
    if dist.get_rank() == 0:
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, eps=_ADAM_EPS)
        out["ref_loss"], out["ref_grads"] = [], []
        for x, y in batches:
            loss = loss_fn(reference(x), y)
            loss.backward()
            out["ref_loss"].append(loss.item())
            out["ref_grads"].append({n: p.grad.clone() if p.grad is not None else None for n, p in reference.named_parameters()})
            ref_opt.step()
            ref_opt.zero_grad()
        out["ref_params"] = {k: v.clone() for k, v in reference.state_dict().items()}
    return out


def _counts(mode: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1].rstrip("_"): n for op, n in mode.get_comm_counts().items() if n}


def state_dict_round_trip(kind: str, sizes=None) -> bool:
    """Local weights -> sharded -> train a step -> full state dict -> local model, and back."""
    model, batches, loss_fn = build(kind)
    x, y = batches[0]
    sharded = shard_model(model, capture(model, (x,)), shard_sizes=sizes, loss_fn=loss_fn)
    torch.manual_seed(123)
    fresh, _, _ = build(kind)
    for p in fresh.parameters():  # different weights, to see that loading overwrites them
        nn.init.normal_(p)
    sharded.load_full_state_dict(fresh.state_dict())
    compute = sharded.loss_fn or loss_fn
    loss = compute(sharded.module(x), y)
    ref_loss = loss_fn(fresh(x), y)
    same_loss = torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.optim.SGD(sharded.module.parameters(), lr=0.1).step()
    state = sharded.full_state_dict()
    assert list(state) == list(fresh.state_dict()), "keys in the local model's order"
    fresh.load_state_dict(state)  # strict: the gathered dict is a local model's dict
    again = shard_model(fresh, capture(fresh, (x,)), shard_sizes=sizes, loss_fn=loss_fn)
    back = again.full_state_dict()
    return same_loss and all(torch.equal(state[k], back[k]) for k in state)


def bad_sizes() -> None:
    model, batches, _ = build("block")
    shard_model(model, capture(model, (batches[0][0],)), shard_sizes={"attn": [3, 3]})


class TimmAttention(nn.Module):
    """timm's ViT attention: qkv reshaped to (3, heads) and permuted, then unbound."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class SeparateQKV(nn.Module):
    """Llama-style: separate q, k, v projections, heads inferred with -1, SDPA, an output gate."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 96) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Variants(nn.Module):
    """Three attention/MLP styles and a lone Linear (column-parallel, gathered) under one split."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        with wh.split():
            self.a1, self.m1 = TimmAttention(dim), SwiGLU(dim)
            self.a2 = SeparateQKV(dim)
            self.lone = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a1(x)
        x = x + self.m1(x)
        x = x + self.a2(x)
        return self.norm(self.lone(x))


class MaskedMHA(nn.Module):
    """Sequence-first ``nn.MultiheadAttention`` with padding and causal masks, weights used."""

    def __init__(self, dim: int = 32, heads: int = 4, length: int = 10) -> None:
        super().__init__()
        with wh.split():
            self.attn = nn.MultiheadAttention(dim, heads)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad some later keys; key 0 is never padded, so no query row is fully masked.
        pad = (x[..., 0] > 1.0) & (torch.arange(x.shape[0]).unsqueeze(1) > 4)
        out, weights = self.attn(x, x, x, key_padding_mask=pad.t(), attn_mask=self.causal)
        return out + weights.mean(-1).t().unsqueeze(-1)
