"""Cases run on every rank of a gloo pool for the pipeline tests (see tests/world.py)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import train_distributed, train_reference

_STEPS = 2


def _gpt(n_layer: int, global_batch: int, seq_lens=None, n_embd: int = 32, block_size: int = 16):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    seq_lens = seq_lens or [cfg.block_size] * _STEPS
    return GPT(cfg), [corpus.batch(global_batch, t, s) for s, t in enumerate(seq_lens)]


def equivalence(
    *,
    n_layer: int = 4,
    global_batch: int = 8,
    boundaries=None,
    annotate=None,
    schedule: str = "1f1b",
    num_micro_batch: int = 4,
    pipeline_degree=None,
    row_weights=None,
    batch: str = "global",
    seq_lens=None,
) -> dict:
    """Train ``_STEPS`` steps pipelined (or one per entry of ``seq_lens``, the sequence length
    of that step's batch); every rank also trains the local model on the same data.

    Returns this rank's loss, gradients and parameters (by local name) and the reference's.
    """
    model, batches = _gpt(n_layer, global_batch, seq_lens)
    if annotate:
        wh.annotate(model, {name: [_make(k) for k in kinds] for name, kinds in annotate.items()})
    reference = copy.deepcopy(model)
    config = wh.Config(
        schedule=schedule,
        num_micro_batch=num_micro_batch,
        pipeline_degree=pipeline_degree,
        stage_boundaries=boundaries,
        row_weights=row_weights,
    )
    out = train_reference(reference, batches, lm_loss)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states"), batch=batch))
    out["memory"] = program.memory()
    out["final"] = {n: p.detach().clone() for n, p in program.named_parameters()}
    full = program.full_state_dict()  # collective: every rank calls it
    out["full_state"] = full if dist.get_rank() == 0 else None
    timeline = program.timeline()  # collective too
    out["timeline"] = (timeline.ranks, sum(e.is_compute for e in timeline.events))
    position = program.plan.position_of(dist.get_rank())
    out["num_computes"] = sum(a.is_compute for a in program.schedule.actions[position])
    return out


def _make(kind: str):
    if kind == "stage":
        return wh.stage()
    if kind.startswith("pipeline"):
        return wh.pipeline(int(kind.split(":")[1])) if ":" in kind else wh.pipeline()
    if kind == "replicate":
        return wh.replicate()
    raise ValueError(kind)


class SkipNet(torch.nn.Module):
    """Four blocks where block 0's output skips over blocks 1 and 2 (crossing two boundaries)
    and block 3 reads two tensors at once."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)
        self.c = torch.nn.Linear(width, width)
        self.d = torch.nn.Linear(2 * width, 4)

    def forward(self, x):
        h0 = torch.tanh(self.a(x))
        h1 = torch.tanh(self.b(h0))
        h2 = torch.tanh(self.c(h1)) + h0
        return self.d(torch.cat([h2, h1], dim=-1))


def skip_equivalence(num_micro_batch: int = 2, schedule: str = "1f1b") -> dict:
    torch.manual_seed(0)
    model = SkipNet()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(_STEPS)]
    reference = copy.deepcopy(model)
    loss_fn = torch.nn.functional.mse_loss
    out = train_reference(reference, batches, loss_fn)
    config = wh.Config(stage_boundaries=["b", "c", "d"], num_micro_batch=num_micro_batch, schedule=schedule)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["received"] = [s.received for s in program.stages]
    out["memory"] = program.memory()
    out["final"] = {n: p.detach().clone() for n, p in program.named_parameters()}
    full = program.full_state_dict()
    out["full_state"] = full if dist.get_rank() == 0 else None
    return out


class MaskedHead(torch.nn.Module):
    """ViTMAE's random masking: a mask made from the input alone (``ones_like``, zeros written into it
    in place, a ``gather`` by the input's order) and read by the last stage only. ``exported``: a
    branch on the batch size fx cannot trace, so capture uses torch.export (an aten write into
    a slice; fx records a ``getitem`` view and a ``zero_`` method)."""

    def __init__(self, exported: bool) -> None:
        super().__init__()
        self.exported = exported
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        if self.exported and x.shape[0] > 0:
            x = x * 1.0
        restore = torch.argsort(torch.argsort(x, dim=1), dim=1)
        mask = torch.ones_like(x)
        mask[:, :4].zero_()
        mask = torch.gather(mask, 1, restore)
        return self.b(self.a(x)) * mask[:, :4]


def masked_equivalence(exported: bool) -> dict:
    """Two stages cut at ``b`` over :class:`MaskedHead`: the mask stage 1 uses is the one with
    the zeros (not a recomputation without the write)."""
    torch.manual_seed(0)
    model = MaskedHead(exported)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(_STEPS)]
    reference = copy.deepcopy(model)
    loss_fn = torch.nn.functional.mse_loss
    out = train_reference(reference, batches, loss_fn)
    config = wh.Config(stage_boundaries=["b"], num_micro_batch=2)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["aten"] = any(isinstance(n.target, torch._ops.OpOverload)
                      for s in program.stages if s.module is not None for n in s.module.graph.nodes)
    out["final"] = {n: p.detach().clone() for n, p in program.named_parameters()}
    full = program.full_state_dict()
    out["full_state"] = full if dist.get_rank() == 0 else None
    return out


def built_on_meta() -> dict:
    """A GPT built on the meta device: each rank allocates only its stage, then loads weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    real = GPT(cfg)
    with torch.device("meta"):
        meta = GPT(cfg)
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(8, cfg.block_size, s) for s in range(_STEPS)]
    config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2)
    program = wh.parallelize(meta, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    program.load_full_state_dict(real.state_dict())
    out = train_reference(copy.deepcopy(real), batches, lm_loss)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["meta_left"] = sum(p.is_meta for p in meta.parameters())
    out["memory"] = program.memory()
    return out


class ForwardScoped(torch.nn.Module):
    """Stages annotated around code in forward(), the second of the three places."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        with wh.pipeline(2):
            with wh.stage():
                x = torch.relu(self.layers[1](torch.relu(self.layers[0](x))))
            with wh.stage():
                x = self.layers[3](torch.relu(self.layers[2](x)))
        return x


def forward_scoped() -> dict:
    torch.manual_seed(0)
    model = ForwardScoped()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)) for _ in range(_STEPS)]
    loss_fn = torch.nn.functional.mse_loss
    out = train_reference(copy.deepcopy(model), batches, loss_fn)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],))
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["stages"] = (program.plan.num_stages, program.plan.num_micro_batch)
    return out


def different_batches_per_rank() -> str:
    """A later step where rank 1's batch differs: every rank raises before any transfer, and the
    program still trains on the next (agreeing) step."""
    model, batches = _gpt(4, 8)
    config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    x, y = batches[0]
    program.step(x, y)
    bad_x, bad_y = (x[:, :8], y[:, :8]) if dist.get_rank() == 1 else (x, y)
    try:
        program.step(bad_x, bad_y)
    except ValueError as err:
        message = str(err)
    else:
        message = ""
    loss = program.step(*batches[1])
    return f"{message}|{loss.item():.6f}"


def measured_bubble() -> float:
    model, batches = _gpt(4, 8)
    config = wh.Config(stage_boundaries=["blocks.2"], schedule="gpipe", num_micro_batch=2)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    program.step(*batches[0])
    return program.measured_bubble()


def inference(*, n_layer: int = 4, **config) -> dict:
    """The pipelined model's output on a batch against the local model with the same weights."""
    model, batches = _gpt(n_layer, 8)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=wh.Config(**config))
    program.step(*batches[0])  # a training step first: inference must not disturb its transfers
    reference, _ = _gpt(n_layer, 8)
    reference.load_state_dict(program.full_state_dict())
    program.eval()
    reference.eval()
    x = batches[1][0][:6]  # rows that do not divide evenly into the micro-batches
    out = program(x)
    program.train()
    loss = program.step(*batches[1])  # and training goes on
    with torch.no_grad():
        expected = reference(x)
    return {"diff": (out - expected).abs().max().item(), "shape": tuple(out.shape), "loss": loss.item()}


def gpt_example(argv: list[str]) -> dict:
    """examples/gpt.py's main job, as torchrun runs it (the pool's world is torchrun's)."""
    from examples.gpt import main

    return main(argv)


def timeline_case(trace_path: str, bad_path: str) -> dict:
    """program.timeline() refused before a step, then two steps: the measured timeline, the
    report, the trace written by rank 0 and refused on every rank for an unwritable path."""
    model, batches = _gpt(4, 8)
    config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=4)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    out = {"report_before": program.timing_report()}
    try:
        program.timeline()  # no collective before the error: no rank waits for another
    except ValueError as err:
        out["before"] = str(err)
    try:
        program.save_trace(trace_path)
    except ValueError as err:
        out["trace_before"] = str(err)
    for x, y in batches:
        program.step(x, y)
    timeline = program.timeline()
    position = program.plan.position_of(dist.get_rank())
    out["actions"] = [str(a) for a in program.schedule.actions[position]]
    out["events"] = [(e.rank, e.name, e.category, e.start, e.end) for e in timeline.events]
    out["last_timeline"] = program.last_timeline
    out["report"] = program.timing_report()
    out["step_times"] = list(program.step_times)
    out["predicted"] = program.predicted_timeline is not None
    program.save_trace(trace_path)
    try:
        program.save_trace(bad_path)
    except ValueError as err:
        out["bad_path"] = str(err)
    return out


def emulated_slowdown(spec: str, steps: int = 4) -> dict:
    """A 2-stage pipeline under ``WHALE_EMULATE_SLOWDOWN=spec``, trained ``steps`` steps against
    the local model; per step, this rank's compute seconds (from its timeline) and CPU seconds."""
    import os
    import time

    from whale.ir.emulation import ENV_VAR

    # Wide enough that a compute lasts milliseconds, well above a busy machine's jitter.
    model, batches = _gpt(4, 8, seq_lens=[64] * steps, n_embd=128, block_size=64)
    reference = copy.deepcopy(model)
    os.environ[ENV_VAR] = spec
    try:
        config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2)
        program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    finally:
        del os.environ[ENV_VAR]  # read once, when the program is made
    out = train_reference(reference, batches, lm_loss)
    compute, cpu = [], []
    step = program.step

    def timed_step(*args, **kwargs):
        began = time.thread_time()
        loss = step(*args, **kwargs)
        cpu.append(time.thread_time() - began)
        compute.append(sum(e - b for code, b, e in program.last_timeline if code.strip("0123456789") in "FB"))
        return loss

    program.step = timed_step
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["compute"], out["cpu"] = compute, cpu
    timeline = program.timeline()
    out["timeline_compute"] = {
        r: sum(e.duration for e in timeline.events if e.rank == r and e.is_compute) for r in timeline.ranks
    }
    return out
