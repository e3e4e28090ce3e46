"""Cases run on every rank of a gloo pool (see tests/world.py) for
tests/test_activation_checkpointing.py: checkpointed programs against the local model and
against the same program without checkpointing."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import whale as wh
from tests.equivalence import LR, train_distributed, train_reference
from tests.hf_models import BUILDERS
from tests.models import TinyGPT

_STEPS = 2


def _tiny_gpt() -> TinyGPT:
    """TinyGPT (its causal masks non-persistent buffers, which every stage that reads one gets)."""
    torch.manual_seed(0)
    return TinyGPT(n_layer=2)


def _lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def _tiny_batches(rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(64, (rows, 16), generator=g), torch.randint(64, (rows, 16), generator=g)) for _ in range(_STEPS)]


def tiny_equivalence(paths, **config) -> dict:
    """TinyGPT (no dropout) checkpointed at ``paths`` against the local model; with how many
    regions the program's stages recompute."""
    model = _tiny_gpt()
    batches = _tiny_batches()
    out = train_reference(copy.deepcopy(model), batches, _lm_loss)
    states = out.pop("ref_states")
    program = wh.parallelize(
        model, loss_fn=_lm_loss, example_inputs=(batches[0][0],),
        config=wh.Config(activation_checkpointing=paths, **config),
    )
    out.update(train_distributed(program, batches, states))
    out["recomputed"] = _recomputed(program)
    out["user_forward_untouched"] = all("forward" not in m.__dict__ for m in model.modules())
    return out


def _recomputed(program) -> list[str]:
    """The checkpointed modules (data parallel) or regions (stages) of this rank's program."""
    from whale.rewrite.recompute import _CheckpointedForward, _Region

    modules = [program.module] if hasattr(program, "module") else [s.module for s in program.program.local_stages]
    found = []
    for module in modules:
        for name, m in module.named_modules():
            if isinstance(m, _Region):
                found.append(m.path)
            elif isinstance(m.__dict__.get("forward"), _CheckpointedForward):
                found.append(name)
    return sorted(found)


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def dropout_runs(name: str, paths, **config) -> dict:
    """``name`` ("tiny" or a transformers builder) with dropout 0.1, trained with and without
    checkpointing from the same seed per step: losses, gradients and parameters after AdamW."""
    results = {}
    for key, ckpt in (("plain", "none"), ("ckpt", paths)):
        if name == "tiny":
            model = _tiny_gpt()
            model.drop = nn.Dropout(0.1)  # on the block outputs, through a checkpointed region
            for block in model.h:
                block.mlp.proj = nn.Sequential(block.mlp.proj, nn.Dropout(0.1))
            batches = _tiny_batches()
            loss_fn, example = _lm_loss, (batches[0][0],)
        else:
            case = BUILDERS[name](rows=8)
            model = case.model
            _set_dropout(model, 0.1)
            batches = [(case.inputs, case.target)] * _STEPS
            loss_fn, example = case.loss_fn, case.inputs
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=example,
                                 config=wh.Config(activation_checkpointing=ckpt, **config))
        opt = torch.optim.AdamW(program.parameters(), lr=LR)
        run = {"loss": [], "grads": []}
        for step, (x, y) in enumerate(batches):
            torch.manual_seed(100 + step)
            run["loss"].append(program.step(x, y).item())
            run["grads"].append({n: p.grad.clone() for n, p in program.named_parameters()})
            opt.step()
            opt.zero_grad()
        run["params"] = {n: p.detach().clone() for n, p in program.named_parameters()}
        run["recomputed"] = _recomputed(program)
        results[key] = run
    return results


class _KeyCache:
    """transformers' ``DynamicCache`` reduced: ``update`` appends and returns every key so far."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None

    def update(self, k: torch.Tensor) -> torch.Tensor:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        return self.keys


class _CachedAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.k = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: _KeyCache) -> torch.Tensor:
        keys = cache.update(self.k(x))
        return x * keys.mean(dim=1, keepdim=True)  # one shape however many keys: no error to see


class CacheNet(nn.Module):
    """XLM's layers: forward makes a cache (``XLMModel``: ``cache = EncoderDecoderCache(...)``)
    and each attention layer appends its keys to it; a recompute on the cache forward left
    behind sees its own keys twice."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.attn = nn.ModuleList(_CachedAttention(width) for _ in range(2))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = _KeyCache()
        h = self.inp(x)
        for layer in self.attn:
            h = layer(h, cache)
        return self.out(h)


def cache_equivalence(**config) -> dict:
    """CacheNet with both attention layers checkpointed, against the local model."""
    torch.manual_seed(0)
    model = CacheNet()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, 8, generator=g), torch.randn(8, 4, 8, generator=g)) for _ in range(_STEPS)]
    out = train_reference(copy.deepcopy(model), batches, F.mse_loss)
    states = out.pop("ref_states")
    program = wh.parallelize(model, loss_fn=F.mse_loss, example_inputs=(batches[0][0],),
                             config=wh.Config(activation_checkpointing=["attn.0", "attn.1"], **config))  # fmt: skip
    out.update(train_distributed(program, batches, states))
    out["recomputed"] = _recomputed(program)
    return out
