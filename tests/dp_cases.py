"""Cases run on every rank of a gloo pool (see tests/world.py) for the data-parallel tests."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import whale as wh
from examples.cnn import CNN, SyntheticImages
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import LR, train_distributed, train_reference
from tests.models import ReversibleLM, RoutedLM

_STEPS = 2


def _model_and_batches(kind: str, global_batch: int):
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
        batches = [corpus.batch(global_batch, cfg.block_size, s) for s in range(_STEPS)]
        return GPT(cfg), batches, lm_loss
    if kind == "cnn":
        data = SyntheticImages()
        return CNN(width=8), [data.batch(global_batch, s) for s in range(_STEPS)], F.cross_entropy
    raise ValueError(kind)


def equivalence(
    kind: str,
    global_batch: int,
    *,
    row_weights=None,
    num_micro_batch: int = 1,
    batch: str = "global",
    replicate_count: int | None = None,
    grad_comm_dtype=None,
    bucket_cap_mb: float = 25.0,
) -> dict:
    """Train ``_STEPS`` steps distributed and, on every rank, the local model on the same data."""
    model, batches, loss_fn = _model_and_batches(kind, global_batch)
    if replicate_count is not None:
        wh.annotate(model, {"": wh.replicate(replicate_count)})
    reference = copy.deepcopy(model)
    config = wh.Config(
        row_weights=row_weights,
        num_micro_batch=num_micro_batch,
        grad_comm_dtype=grad_comm_dtype,
        bucket_cap_mb=bucket_cap_mb,
        first_bucket_cap_mb=min(1.0, bucket_cap_mb),
    )
    out = train_reference(reference, batches, loss_fn)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states"), batch=batch))
    out["rows"] = program.plan.rows(global_batch)
    return out


def different_shapes_per_rank() -> None:
    model, batches, loss_fn = _model_and_batches("cnn", 8)
    x, y = batches[0]
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,))
    if dist.get_rank() == 1:
        x, y = x[:6], y[:6]
    program.step(x, y)


def batch_too_small() -> None:
    model, batches, loss_fn = _model_and_batches("cnn", 8)
    x, y = batches[0]
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,))
    program.step(x[:1], y[:1])


def local_rows_not_as_planned() -> None:
    model, batches, loss_fn = _model_and_batches("cnn", 8)
    x, y = batches[0]
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,))
    rows = slice(0, 3) if dist.get_rank() == 0 else slice(3, 8)
    program.step(x[rows], y[rows], batch="local")


def replicas_start_equal() -> float:
    """Each rank seeds differently; after parallelize every rank holds rank 0's weights."""
    torch.manual_seed(dist.get_rank())
    model = CNN(width=8)
    program = wh.parallelize(model, loss_fn=F.cross_entropy)
    flat = torch.cat([p.detach().flatten() for p in program.parameters()])
    return float(flat.sum())


def state_dict_round_trip() -> bool:
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],))
    opt = torch.optim.SGD(program.parameters(), lr=0.1)
    program.step(*batches[0])
    opt.step()
    state = program.full_state_dict()
    fresh, _, _ = _model_and_batches("gpt", 8)
    fresh.load_state_dict(state)
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))
    other, _, _ = _model_and_batches("gpt", 8)
    program2 = wh.parallelize(other, loss_fn=loss_fn)
    program2.load_full_state_dict(state)
    return same and all(
        torch.equal(a, b) for a, b in zip(program2.full_state_dict().values(), state.values())
    )


def too_few_rows_for_micro_batches() -> None:
    """Uneven replicas where only one gets fewer rows than micro-batches: every rank raises."""
    model, batches, loss_fn = _model_and_batches("cnn", 8)
    x, y = batches[0]
    config = wh.Config(num_micro_batch=2, row_weights=(5, 1))
    program = wh.parallelize(model, loss_fn=loss_fn, config=config)
    program.step(x[:6], y[:6])


def different_shapes_in_a_later_step() -> None:
    """After a first agreed step, a rank whose batch differs is caught on the loss all-reduce."""
    model, batches, loss_fn = _model_and_batches("cnn", 8)
    x, y = batches[0]
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,))
    program.step(x, y)
    if dist.get_rank() == 1:
        x, y = x[:6], y[:6]
    program.step(x, y)


def collectives_per_step(**config) -> dict:
    """All-reduces one step after the first makes, against the reducer's buckets."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(**config))
    program.step(*batches[0])
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        loss = program.step(*batches[1])
    finally:
        dist.all_reduce = real
    grads = {n: p.grad.clone() for n, p in program.named_parameters()}
    return {"calls": calls, "buckets": len(program._reducer.buckets), "loss": loss.item(), "grads": grads}


def timeline_case(spec: str = "", steps: int = 3, n_embd: int = 32) -> dict:
    """Data parallel with two micro-batches (optionally under WHALE_EMULATE_SLOWDOWN=spec): the
    measured timeline of the last of ``steps`` steps and each step's backward seconds."""
    import os

    from whale.ir.emulation import ENV_VAR

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=n_embd)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    model, batches, loss_fn = GPT(cfg), [corpus.batch(8, 64, s) for s in range(2)], lm_loss
    os.environ[ENV_VAR] = spec
    try:
        config = wh.Config(num_micro_batch=2)
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config)
    finally:
        del os.environ[ENV_VAR]
    backward = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        program.step(x, y)
        backward.append(sum(e - b for code, b, e in program.last_timeline if "B" in code))
    timeline = program.timeline()
    return {
        "names": [(e.rank, e.name, e.category) for e in timeline.events],
        "backward": backward,
        "report": program.timing_report(),
    }


class _Routed(torch.nn.Module):
    """Rows whose first feature is positive go through ``a``, the others through ``b`` (as a
    mixture of experts routes tokens); no row goes through ``never``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.never, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        pos = x[:, 0] > 0
        y = torch.zeros_like(h)
        if pos.any():
            y = y.index_put((pos,), self.a(h[pos]))
        if not pos.all():
            y = y.index_put((~pos,), self.b(h[~pos]))
        return self.out(torch.relu(y))


def routed(**config) -> dict:
    """``_Routed`` on 8 rows: in step 0 rank 0's rows all go through ``a`` and rank 1's through
    ``b`` (each used on one rank only), in step 1 every row goes through ``a`` (``b`` used by no
    rank); ``never`` is used in no step. Loss, gradients (``None`` where the local model has
    none) and parameters after each AdamW step (weight decay on), here and on the local model."""
    torch.manual_seed(0)
    model = _Routed()
    x0 = torch.randn(8, 4)
    x0[:4, 0], x0[4:, 0] = x0[:4, 0].abs() + 0.1, -x0[4:, 0].abs() - 0.1
    x1 = torch.randn(8, 4)
    x1[:, 0] = x1[:, 0].abs() + 0.1
    batches = [(x0, torch.randint(0, 2, (8,))), (x1, torch.randint(0, 2, (8,)))]
    return _train_both(model, batches, F.cross_entropy, config)


def routed_lm(**config) -> dict:
    """tests.models.RoutedLM (a loop over the experts rows were routed to, which neither fx nor
    export traces: captured with each RoutedExperts as one opaque call) on 8 rows of 6 tokens,
    2 steps; each rank's rows go to other experts. Loss, gradients (``None`` where the local
    model has none) and parameters after each AdamW step, here and on the local model."""
    return _token_lm(RoutedLM, config)


def _token_lm(cls, config: dict) -> dict:
    """A language model of 32 tokens, seed 0, on 2 steps of 8 rows of 6 tokens."""
    torch.manual_seed(0)
    model = cls()
    batches = [(torch.randint(0, 32, (8, 6)), torch.randint(0, 32, (8, 6))) for _ in range(2)]

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    return _train_both(model, batches, loss_fn, config, example_inputs=(batches[0][0],))


def _train_both(model, batches, loss_fn, config: dict, example_inputs=None) -> dict:
    reference = copy.deepcopy(model)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=example_inputs, config=wh.Config(**config))

    def grads(named):
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in named}

    out = {"loss": [], "grads": [], "params": [], "ref_loss": [], "ref_grads": [], "ref_params": []}
    opt, ref_opt = torch.optim.AdamW(program.parameters(), lr=LR), torch.optim.AdamW(reference.parameters(), lr=LR)
    for x, y in batches:
        out["loss"].append(program.step(x, y).item())
        got = grads(program.named_parameters())
        gather = getattr(program, "gather_full", None)
        if gather is not None and config.get("zero_stage"):  # shards: the used ones gathered whole
            whole = gather({n: g for n, g in got.items() if g is not None})
            got = {n: whole.get(n) for n in got}
        out["grads"].append(got)
        opt.step()
        opt.zero_grad()
        out["params"].append({k: v.clone() for k, v in program.full_state_dict().items()})
        loss = loss_fn(reference(x), y)
        loss.backward()
        out["ref_loss"].append(loss.item())
        out["ref_grads"].append(grads(reference.named_parameters()))
        ref_opt.step()
        ref_opt.zero_grad()
        out["ref_params"].append({k: v.clone() for k, v in reference.state_dict().items()})
    return out


def reversible_lm(**config) -> dict:
    """tests.models.ReversibleLM (a custom autograd.Function whose backward runs the layers'
    children again, as Reformer's reversible layers: captured with the stack as one opaque
    call) on 8 rows of 6 tokens, 2 steps, here and on the local model."""
    return _token_lm(ReversibleLM, config)
