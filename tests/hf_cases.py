"""Cases run on every rank of a gloo pool (see tests/world.py) on transformers models.

Every case trains the model of ``tests.hf_models`` distributed and, on every rank, the local
model on the same batches (inputs given as the model takes them: a dict of keyword inputs),
and returns what ``tests.equivalence.assert_equivalent`` compares, plus the state-dict facts
the tests check. transformers is a test dependency only.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import whale as wh
from tests.equivalence import LR
from tests.hf_models import BUILDERS as _BUILDERS
from tests.hf_more_models import BUILDERS as _MORE
from tests.hf_more_models2 import BUILDERS as _MORE2
from tests.hf_more_models3 import BUILDERS as _MORE3
from tests.hf_more_models4 import BUILDERS as _MORE4
from tests.hf_more_models5 import BUILDERS as _MORE5
from tests.hf_more_models6 import BUILDERS as _MORE6
from tests.hf_more_models7 import BUILDERS as _MORE7
from tests.hf_more_models8 import BUILDERS as _MORE8

BUILDERS = {**_BUILDERS, **_MORE, **_MORE2, **_MORE3, **_MORE4, **_MORE5, **_MORE6, **_MORE7, **_MORE8}  # every family a case may name

_STEPS = 2


def _batches(case, steps: int = _STEPS) -> list[tuple[dict, torch.Tensor]]:
    """``steps`` batches: the case's own, then its rows rolled (a different batch, same shapes)."""
    out = []
    for s in range(steps):
        inputs = {k: v.roll(s, dims=0) for k, v in case.inputs.items()}
        out.append((inputs, case.target.roll(s, dims=0)))
    return out


def _train_reference(model, batches, loss_fn) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = {"ref_loss": [], "ref_grads": [], "ref_states": []}
    for inputs, target in batches:
        loss = loss_fn(model(**inputs), target)
        loss.backward()
        out["ref_loss"].append(loss.item())
        # A frozen parameter (Whisper's sinusoidal positions) has no gradient.
        out["ref_grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        out.setdefault("ref_params", {n: p.detach().clone() for n, p in model.named_parameters()})
        out["ref_states"].append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _step(program, inputs: dict, target, form: str):
    """One step with the inputs in the given form: all the forms a user may pass."""
    if form == "dict":
        return program.step(inputs, target)
    if form == "keywords":  # the first input positional, the rest as keywords of step()
        first, *rest = inputs
        return program.step(inputs[first], target, **{k: inputs[k] for k in rest})
    if form == "tuple":  # every input positional, in forward's order (dicts keep it)
        return program.step(tuple(inputs.values()), target)
    if form == "local":  # each rank passes only its replica's rows
        rows = program.local_slice(len(target))
        return program.step({k: v[rows] for k, v in inputs.items()}, target[rows], batch="local")
    if form == "none":  # an optional input passed as None, which the example left out
        return program.step(inputs, target, attention_mask=None)
    raise ValueError(form)


def _train_distributed(program, batches, ref_states, form: str) -> dict:
    """As tests.equivalence.train_distributed: the reference's weights are loaded (through
    ``load_full_state_dict`` of the local model's own state dict) before every step after
    the first, so each step is compared from identical weights."""
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    out = {"loss": [], "grads": []}
    for step, (inputs, target) in enumerate(batches):
        if step:
            program.load_full_state_dict(ref_states[step - 1])
        loss = _step(program, inputs, target, form)
        out["loss"].append(loss.item())
        out["grads"].append({n: p.grad.detach().clone() for n, p in program.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        out.setdefault("params", {n: p.detach().clone() for n, p in program.named_parameters()})
    return out


def equivalence(
    name: str, *, rows: int = 8, form: str = "dict", example: bool = True, split: tuple[str, ...] = (), **config
) -> dict:
    """Train ``name`` under ``Config(**config)`` against the local model; then the state-dict
    round trips: the program's full state dict under the local model's names (tied weights
    under each), loaded back, and loaded into a fresh local model. ``split``: module names
    annotated ``wh.split(2)``."""
    case = BUILDERS[name](rows=rows)
    if split:
        wh.annotate(case.model, {path: wh.split(2) for path in split})
    batches = _batches(case)
    reference = copy.deepcopy(case.model)
    out = _train_reference(reference, batches, case.loss_fn)
    program = wh.parallelize(
        case.model, loss_fn=case.loss_fn, example_inputs=case.inputs if example else None,
        config=wh.Config(**config),
    )
    out.update(_train_distributed(program, batches, out.pop("ref_states"), form))
    if split or config.get("zero_stage"):  # shards gathered into whole tensors (collective)
        frozen = {n for n, p in case.model.named_parameters() if not p.requires_grad}
        # gather_full gives a frozen shard's missing gradient as zeros (ZeRO) or None (split)
        out["grads"] = [
            {n: g for n, g in program.gather_full(grads).items() if not (n in frozen and (g is None or not g.any()))}
            for grads in out["grads"]
        ]
        out["params"] = program.gather_full(out["params"])
    # A tied weight may be named by any of its names (a split that holds the head and the
    # embedding names it by the head): compare under the local model's first name.
    first = {}
    for n, p in reference.named_parameters(remove_duplicate=False):
        first.setdefault(n, next(m for m, q in reference.named_parameters() if q is p))
    out["grads"] = [{first.get(n, n): g for n, g in grads.items()} for grads in out["grads"]]
    out["params"] = {first.get(n, n): p for n, p in out["params"].items()}
    full = program.full_state_dict()  # collective
    out["full_keys"] = list(full)
    out["ref_keys"] = list(reference.state_dict())
    # Every name of a tied weight holds the trained tensor; the program's own parameters agree.
    aliases: dict[int, list[str]] = {}
    for n, t in reference.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(n)
    out["tied_equal"] = all(
        torch.equal(full[names[0]], full[n]) for names in aliases.values() for n in names
    )
    out["tied_names"] = [names for names in aliases.values() if len(names) > 1]
    final = {n: p.detach() for n, p in program.named_parameters()}
    final = program.gather_full(final) if split or config.get("zero_stage") else final  # collective
    out["full_matches_params"] = all(torch.equal(full[n], p.cpu()) for n, p in final.items())
    # Round trips: the program's own state dict back in; then a fresh local model takes it.
    program.load_full_state_dict(full)
    fresh = BUILDERS[name](rows=rows, seed=1).model
    fresh.load_state_dict(full)
    out["fresh_equal"] = all(torch.equal(fresh.state_dict()[k], v) for k, v in full.items())
    # Non-persistent buffers are kept by the program (and the local model's are untouched).
    out["buffers_kept"] = _buffers_kept(program, reference)
    out["buffers_close"] = _buffers_kept(program, reference, exact=False)
    out["plan"] = (program.plan.num_stages, program.plan.dp_degree, program.plan.num_micro_batch)
    out["received"] = [len(s.received) for s in getattr(program, "stages", ())]
    return out


def _buffers_kept(program, reference, exact: bool = True) -> bool:
    """Every buffer the program's modules hold equals the local model's; ``exact=False``: floats
    within a few ulps (running statistics a synchronized BatchNorm sums in float64)."""
    ref = dict(reference.named_buffers(remove_duplicate=False))
    modules = [program.module] if hasattr(program, "module") else [s.module for s in program.program.local_stages]
    for module in modules:
        for n, b in module.named_buffers(remove_duplicate=False):
            if n not in ref:
                continue
            same = torch.equal if exact or not b.is_floating_point() else _ulps
            if not same(b.cpu(), ref[n]):
                return False
    return True


def _ulps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=torch.finfo(a.dtype).eps)


def bad_keyword(name: str, **config) -> dict:
    """A keyword input forward does not take: every rank raises TypeError before any
    collective (so the next step still runs, no message left stranded)."""
    case = BUILDERS[name]()
    program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs,
                             config=wh.Config(**config))
    try:
        program.step(case.inputs, case.target, attention_maskk=case.inputs["input_ids"])
    except TypeError as err:
        message = str(err)
    else:
        message = ""
    loss = program.step(case.inputs, case.target)
    return {"message": message, "loss": loss.item(), "rank": dist.get_rank()}


def inference(name: str, **config) -> dict:
    """``program(**inputs)`` returns what the local model returns (its output object)."""
    case = BUILDERS[name](rows=6)  # 6 rows in 4 micro-batches: uneven
    reference = copy.deepcopy(case.model).eval()
    program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs,
                             config=wh.Config(**config)).eval()
    out = program(**case.inputs)
    with torch.no_grad():
        expected = reference(**case.inputs)
    return {"type": type(out).__name__, "ref_type": type(expected).__name__,
            "diff": (out.logits - expected.logits).abs().max().item()}


class _Tracker(torch.nn.Module):
    """A layer that keeps a running mean of its input rows (a statistics buffer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.register_buffer("running", torch.zeros(width))

    def forward(self, h):
        self.running.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.lin(h)


class Counting(torch.nn.Module):
    """Buffers updated in forward: a step counter at the root and running statistics in ``b``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = _Tracker(width)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1
        return self.b(torch.tanh(self.a(x)))


def updated_buffers(*, steps: int = 2, **config) -> dict:
    """Buffers after each step against the local model run forward on the first replica's
    micro-batches, in order (what the programs document); every rank's full state dict."""
    from whale.ir.rows import row_offsets, split_rows

    torch.manual_seed(0)
    model = Counting()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)) for _ in range(steps)]
    program = wh.parallelize(model, loss_fn=torch.nn.functional.mse_loss, example_inputs=batches[0][0],
                             config=wh.Config(**config))
    out = {"untouched_by_capture": int(model.steps) == 0 and not model.b.running.any(), "got": [], "want": []}
    for x, y in batches:
        program.step(x, y)
        rows = program.plan.rows(len(x))[0]  # the first replica's
        mb = split_rows(rows, [1.0] * program.plan.num_micro_batch, what="micro-batches")
        with torch.no_grad():
            for at, n in zip(row_offsets(mb), mb):
                reference(x[at : at + n])
        full = program.full_state_dict()
        out["got"].append({k: full[k].clone() for k in ("steps", "b.running")})
        out["want"].append({k: v.clone() for k, v in reference.state_dict().items() if k in ("steps", "b.running")})
    return out


def whole_split_refusal(name: str) -> str:
    """The message ``split()`` of the whole model ``name`` is refused with, at analysis (in this
    process, 2 shards; capture's warnings silenced)."""
    import warnings

    from tests.hf_models import capture_case
    from whale.rewrite import TensorParallelAnalysis

    case = BUILDERS[name]()
    wh.annotate(case.model, {"": wh.split()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TensorParallelAnalysis(2)(case.model, capture_case(case))
        except ValueError as error:
            return str(error)
    raise AssertionError(f"split() of the whole {name} was not refused")

