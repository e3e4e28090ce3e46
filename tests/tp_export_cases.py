"""Cases run on every rank of a gloo pool (tests/world.py): ``split`` on transformers models
captured with ``torch.export`` (aten-level graphs), against the local model.

One call runs every family, so the pool is shared and each model is built once per rank.
Every rank builds the same model from the same seed, annotates it by module name, captures it
with keyword inputs, shards it with ``shard_model`` and trains one AdamW step; rank 0 also
trains the local model and returns both, gradients and parameters gathered to the local model's
names.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import whale as wh
from tests.hf_models import BUILDERS, HFCase, lm_loss
from whale.capture import capture
from whale.rewrite import TensorParallelAnalysis, shard_model

_ADAM_EPS = 1e-6  # as tests/tp_cases.py: a round-off-sized gradient must not become an lr-sized step
_LR = 1e-2

# Family -> (split scopes by module name, uneven shard sizes by region).
SPLITS = {
    "llama": (
        ["model.embed_tokens", "model.layers", "lm_head"],
        {"model.layers.0.mlp": [40, 24], "model.embed_tokens": [24, 40], "lm_head": [36, 28]},
    ),
    # wte and lm_head are one tied weight: one vocabulary region, sliced once.
    "gpt2": (["transformer.wte", "transformer.h", "lm_head"],
             {"transformer.h.0.attn": [3, 1], "transformer.h.1.mlp": [100, 28], "lm_head": [40, 24]}),
    "bert": (["bert.encoder"], {"bert.encoder.layer.0.attention": [1, 3], "bert.encoder.layer.1": [20, 44]}),
    # The shared embedding is tied three ways (encoder, decoder, lm_head): one region.
    "gqa-sdpa": ([""], {}),  # the whole model: the attention math is in its own forward
    "t5": (["encoder", "decoder", "lm_head"], {"encoder.block.0.layer.0.SelfAttention": [3, 1],
                                              "decoder.block.1.layer.2.DenseReluDense": [48, 16], "lm_head": [30, 34]}),
}


def _kwargs(name: str, inputs: dict) -> dict:
    # use_cache=True returns a DynamicCache, which torch.export refuses; training needs no cache.
    return dict(inputs) if name in ("bert", "gqa-sdpa") else {**inputs, "use_cache": False}


def _build(name: str) -> HFCase:
    if name != "gqa-sdpa":
        return BUILDERS[name](rows=4)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(64, (4, 8), generator=g), torch.randint(64, (4, 8), generator=g)
    return HFCase(name, GQAttention(), {"input_ids": x}, y, lm_loss)


def family(name: str, uneven: bool) -> dict:
    """One AdamW step of ``name`` sharded over the world, and (rank 0) of the local model."""
    case = _build(name)
    reference = copy.deepcopy(case.model)
    scopes, sizes = SPLITS[name]
    wh.annotate(case.model, {s: wh.split() for s in scopes})
    kwargs = _kwargs(name, case.inputs)
    captured = capture(case.model, kwargs, frontend="export")  # a dict: keyword inputs
    sharded = shard_model(case.model, captured, shard_sizes=sizes if uneven else None, loss_fn=case.loss_fn)
    region_of = lambda key: sharded.plan.region(key).name  # a module path -> its region's name
    out = {"fallbacks": sharded.plan.fallbacks, "sizes": {k: sharded.sizes[region_of(k)] for k in sizes},
           "regions": {r.name: (r.kind, r.num_atoms) for r in sharded.plan.regions},
           "decisions": {d.path: (d.kind, d.layout.blocks if d.layout else 1) for d in sharded.plan.modules.values()},
           "sharded": sorted(sharded.full_specs), "batch_dynamic": _other_batch_error(name, case, sharded, reference)}
    if name == "llama" and dist.get_rank() == 0:  # 4 ranks cannot share 2 kv heads
        try:
            TensorParallelAnalysis(4)(case.model, captured)
        except ValueError as err:
            out["four_ranks"] = str(err)
    params = dict(sharded.module.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=_LR, eps=_ADAM_EPS)
    output = sharded.module(**kwargs)
    loss = (sharded.loss_fn or case.loss_fn)(output, case.target)
    loss.backward()
    out.update(loss=loss.item(), logits_width=_logits(output).shape[-1])
    out["grads"] = sharded.gather_full({n: p.grad for n, p in params.items()})
    opt.step()
    out["params"] = sharded.full_state_dict()
    # The gathered dict (every name of a tied weight, no non-persistent buffer) loads back.
    sharded.load_full_state_dict({k: torch.zeros_like(v) for k, v in out["params"].items()})
    sharded.load_full_state_dict(out["params"])
    again = sharded.full_state_dict()
    out["round_trip"] = all(torch.equal(again[k], v) for k, v in out["params"].items())
    if dist.get_rank() == 0:
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=_LR, eps=_ADAM_EPS)
        ref_loss = case.loss_fn(reference(**kwargs), case.target)
        ref_loss.backward()
        out["ref_loss"] = ref_loss.item()
        # Every name of a tied weight, so the program's name for it is found.
        out["ref_grads"] = {n: p.grad.clone() for n, p in reference.named_parameters(remove_duplicate=False)}
        ref_opt.step()
        out["ref_params"] = {k: v.clone() for k, v in reference.state_dict().items()}
    else:
        out["grads"] = out["params"] = None
    return out


def _other_batch_error(name: str, case, sharded, reference) -> float:
    """Max |logits - local logits| on a batch of another size than the captured one (this
    rank's classes where the logits stay sharded)."""
    half = {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in _kwargs(name, case.inputs).items()}
    with torch.no_grad():
        got, want = _logits(sharded.module(**half)), _logits(reference(**half))
    if got.shape[-1] != want.shape[-1]:
        counts = sharded.sizes[sharded.plan.region("lm_head").name]
        want = want[..., sum(counts[: sharded.rank]) : sum(counts[: sharded.rank + 1])]
    return (got - want).abs().max().item()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"]


def families(names: list[str], uneven: bool) -> dict:
    """Every family in one case, so the world is shared (a failing family names itself)."""
    results = {}
    for name in names:
        try:
            results[name] = family(name, uneven)
        except Exception as err:
            raise type(err)(f"{name}: {err}") from err
    return results


class GQAttention(torch.nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention(enable_gqa=True)``
    (4 query heads, 2 kv heads), the whole model split: vocabulary-parallel embedding, split LM head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.embed, self.lm_head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
        self.attn = torch.nn.ModuleDict({
            "q": torch.nn.Linear(dim, dim), "k": torch.nn.Linear(dim, kv_heads * self.hd),
            "v": torch.nn.Linear(dim, kv_heads * self.hd), "o": torch.nn.Linear(dim, dim)})

    def forward(self, input_ids: torch.Tensor):
        from transformers.modeling_outputs import CausalLMOutput

        x = self.embed(input_ids)
        b, t, _ = x.shape
        q, k, v = (self.attn[n](x).view(b, t, -1, self.hd).transpose(1, 2) for n in "qkv")
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return CausalLMOutput(logits=self.lm_head(x + self.attn["o"](y.transpose(1, 2).reshape(b, t, -1))))
