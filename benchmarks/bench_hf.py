"""transformers models: whale against the PyTorch anchors, 2 gloo ranks, same weights and batches.

Part ``pp``: a ``GPT2LMHeadModel`` (built from a config, random init, dropout 0) pipelined over 2
stages split at ``transformer.h.k`` (embeddings and ``h[:k]`` | ``h[k:]``, ``ln_f``, ``lm_head``),
1F1B over 4 micro-batches, AdamW. whale gets ``Config(stage_boundaries=["transformer.h.k"])`` and
the model as it is; ``torch.distributed.pipelining`` gets the same split twice over:

- ``tracer``: its own frontend, ``pipeline(model, split_spec={"transformer.h.k": BEGINNING})``
  (torch.export of one micro-batch). Its stage 0 sends the hidden state *and* the 4-d attention
  mask transformers builds, as that is what the traced graph carries across the cut.
- ``manual``: two hand-built stage modules around the same HF submodules (``wte``, ``wpe``,
  ``h[:k]`` | ``h[k:]``, ``ln_f``, ``lm_head``), sending the hidden state only (sdpa attention
  is causal by itself when no mask is given).

GPT-2 ties ``lm_head`` to ``wte``; manual torch stages on two ranks cannot share a weight, so the
model is built untied (``tie_word_embeddings=False``) for all three. Before timing, the first
batch's loss (no optimizer step) must agree across the three.

Part ``tp``: a 2-layer ``LlamaModel`` (grouped-query attention, SwiGLU MLP) split 2 ways: whale by
``wh.annotate(model, {"layers": wh.split(2)})``, DTensor by ``parallelize_module`` with
``ColwiseParallel`` on q/k/v/gate/up and ``RowwiseParallel`` on o/down of every layer. Same
weights, same batch; the loss (MSE of ``last_hidden_state`` to a fixed target) and every
parameter's gradient, gathered to full tensors, are checked equal before timing.

Rounds alternate (whale, then the anchors) so drift of the machine hits all alike; a ratio is
whale's throughput over the anchor's in the same round (>1: whale faster), with min/median/max.

Run (spawns its own 2 processes per part)::

    python benchmarks/bench_hf.py
    python benchmarks/bench_hf.py --part pp --rounds 7
    python benchmarks/bench_hf.py --part tp --hidden 512
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import whale as wh
from _launch import run_on_ranks


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _time_rounds(runs: dict, batches: list, warmup: int) -> dict[str, tuple[float, list[float]]]:
    """Per ``runs[name] = (step_fn, opt)``: seconds per step over ``batches[warmup:]`` and this
    rank's time of each of those steps; one call is one round, the runs one after another."""
    out = {}
    for name, (step_fn, opt) in runs.items():
        stamps = []
        for i, batch in enumerate(batches):
            if i == warmup:
                dist.barrier()
                stamps.append(time.perf_counter())
            step_fn(*batch)
            opt.step()
            opt.zero_grad()
            if i >= warmup:
                stamps.append(time.perf_counter())
        dist.barrier()
        out[name] = ((time.perf_counter() - stamps[0]) / (len(batches) - warmup),
                     [b - a for a, b in itertools.pairwise(stamps)])
    return out


def _gather_rounds(rounds: list[dict], world: int) -> list[dict] | None:
    """Rank 0: every round's per-run mean step time (rank 0's, which includes the closing
    barrier) and each step's time on the slower rank; other ranks: None."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rounds)
    if dist.get_rank():
        return None
    return [{name: (mean, [max(ts) for ts in zip(*(g[i][name][1] for g in gathered))])
             for name, (mean, _) in r.items()} for i, r in enumerate(rounds)]


# --- pipeline -----------------------------------------------------------------------------------


class _FirstStage(nn.Module):
    """``wte``, ``wpe`` and ``h[:split]`` of a GPT-2: ``input_ids -> hidden``."""

    def __init__(self, gpt2, split: int) -> None:
        super().__init__()
        t = gpt2.transformer
        self.wte, self.wpe = t.wte, t.wpe
        self.h = nn.ModuleList(t.h[:split])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.h:
            x = block(x)
        return x


class _LastStage(nn.Module):
    """``h[split:]``, ``ln_f`` and ``lm_head`` of a GPT-2: ``hidden -> logits``."""

    def __init__(self, gpt2, split: int) -> None:
        super().__init__()
        self.h = nn.ModuleList(gpt2.transformer.h[split:])
        self.ln_f, self.lm_head = gpt2.transformer.ln_f, gpt2.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _gpt2(args):
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers,
                       n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                       tie_word_embeddings=False, use_cache=False)
    return t.GPT2LMHeadModel(cfg)


def _logits_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _output_loss(out, target: torch.Tensor) -> torch.Tensor:
    return _logits_loss(out.logits, target)


def _pp_worker(rank: int, world: int, args, results) -> None:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        SplitPoint,
        pipeline,
    )

    m, split = args.micro_batches, args.layers // 2
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(args.vocab, (args.batch, args.seq), generator=g),
                torch.randint(args.vocab, (args.batch, args.seq), generator=g))
               for _ in range(args.warmup + args.steps)]
    gpt2 = _gpt2(args)
    x0, y0 = batches[0]

    program = wh.parallelize(
        copy.deepcopy(gpt2), loss_fn=_output_loss, example_inputs={"input_ids": x0},
        config=wh.Config(stage_boundaries=[f"transformer.h.{split}"], num_micro_batch=m, schedule="1f1b"),
    )
    whale_opt = torch.optim.AdamW(program.parameters(), lr=1e-3)

    traced = pipeline(copy.deepcopy(gpt2), mb_args=(), mb_kwargs={"input_ids": x0[: args.batch // m]},
                      split_spec={f"transformer.h.{split}": SplitPoint.BEGINNING})
    tracer_stage = traced.build_stage(rank, torch.device("cpu"))
    tracer_sched = Schedule1F1B(tracer_stage, n_microbatches=m, loss_fn=_logits_loss)
    tracer_opt = torch.optim.AdamW(tracer_stage.submod.parameters(), lr=1e-3)

    manual_module = (_FirstStage if rank == 0 else _LastStage)(copy.deepcopy(gpt2), split)
    manual_stage = PipelineStage(manual_module, rank, world, torch.device("cpu"))
    manual_sched = Schedule1F1B(manual_stage, n_microbatches=m, loss_fn=_logits_loss)
    manual_opt = torch.optim.AdamW(manual_module.parameters(), lr=1e-3)

    def torch_step(schedule, first_takes_kwargs: bool):
        def step(x, y):
            if rank == 0:
                schedule.step(input_ids=x) if first_takes_kwargs else schedule.step(x)
                return None
            losses: list[torch.Tensor] = []
            schedule.step(target=y, losses=losses)
            return torch.stack(losses).mean()  # equal micro-batches: the mean of their means
        return step

    runs = {
        "whale": (lambda x, y: program.step({"input_ids": x}, y), whale_opt),
        "tracer": (torch_step(tracer_sched, True), tracer_opt),
        "manual": (torch_step(manual_sched, False), manual_opt),
    }
    # Same weights, first batch, no optimizer step: the losses must agree.
    loss0 = {name: fn(x0, y0) for name, (fn, _) in runs.items()}
    for _, opt in runs.values():
        opt.zero_grad()
    loss0 = {k: None if v is None else v.item() for k, v in loss0.items()}
    rounds = _gather_rounds([_time_rounds(runs, batches, args.warmup) for _ in range(args.rounds)], world)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, loss0)
    if rank == 0:
        results.put((rounds, gathered))


# --- tensor parallel ----------------------------------------------------------------------------


def _llama(args):
    t = _transformers()
    torch.manual_seed(0)
    cfg = t.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.tp_layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, max_position_embeddings=args.tp_seq, use_cache=False)
    return t.LlamaModel(cfg)


def _hidden_loss(out, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.last_hidden_state, target)


def _tp_worker(rank: int, world: int, args, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randint(args.vocab, (args.tp_batch, args.tp_seq), generator=g)
    y = torch.randn(args.tp_batch, args.tp_seq, args.hidden, generator=g)
    llama = _llama(args)

    local = copy.deepcopy(llama)
    wh.annotate(local, {"layers": wh.split(world)})
    program = wh.parallelize(local, loss_fn=_hidden_loss, example_inputs={"input_ids": x})
    assert program.plan.tensor_parallel == world, program.plan
    whale_opt = torch.optim.AdamW(program.parameters(), lr=1e-4)

    mesh = init_device_mesh("cpu", (world,))
    dt = copy.deepcopy(llama)
    col, row = ColwiseParallel(), RowwiseParallel()
    layer_plan = {"self_attn.q_proj": col, "self_attn.k_proj": col, "self_attn.v_proj": col,
                  "self_attn.o_proj": row, "mlp.gate_proj": col, "mlp.up_proj": col, "mlp.down_proj": row}
    for layer in dt.layers:
        parallelize_module(layer, mesh, layer_plan)
    dt_opt = torch.optim.AdamW(dt.parameters(), lr=1e-4)

    def dt_step(x, y):
        loss = _hidden_loss(dt(input_ids=x), y)
        loss.backward()
        return loss

    # Same function before timing: the loss and every gradient, as full tensors.
    whale_loss = program.step({"input_ids": x}, y).item()
    dt_loss = dt_step(x, y).item()
    whale_grads = program.gather_full({n: p.grad for n, p in program.named_parameters()})
    dt_grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                for n, p in dt.named_parameters()}
    grad_diff = max((whale_grads[n] - dt_grads[n]).abs().max().item() for n in dt_grads)
    whale_opt.zero_grad()
    dt_opt.zero_grad()

    runs = {"whale": (lambda x, y: program.step({"input_ids": x}, y), whale_opt), "dtensor": (dt_step, dt_opt)}
    batches = [(x, y)] * (args.warmup + args.steps)
    rounds = _gather_rounds([_time_rounds(runs, batches, args.warmup) for _ in range(args.rounds)], world)
    if rank == 0:
        results.put((rounds, whale_loss, dt_loss, grad_diff, sorted(whale_grads) == sorted(dt_grads)))


# --- report -------------------------------------------------------------------------------------


def _report(rounds: list[dict], anchors: list[str], tokens: int) -> None:
    names = ["whale", *anchors]
    print(f"{'round':>5}  " + "  ".join(f"{n + ' tok/s':>14}" for n in names)
          + "  " + "  ".join(f"{'/' + a:>9}" for a in anchors))
    for i, r in enumerate(rounds):
        print(f"{i:>5}  " + "  ".join(f"{tokens / r[n][0]:>14,.0f}" for n in names)
              + "  " + "  ".join(f"{r[a][0] / r['whale'][0]:>9.3f}" for a in anchors))
    steps = {n: [t for r in rounds for t in r[n][1]] for n in names}
    print("per-step ms (slower rank): " + "  ".join(
        f"{n} median {statistics.median(steps[n]) * 1e3:.1f} best {min(steps[n]) * 1e3:.1f}" for n in names))
    for a in anchors:
        ratios = [r[a][0] / r["whale"][0] for r in rounds]  # throughput ratio = inverse time ratio
        print(f"throughput ratio whale/{a}: rounds min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
              f"max {max(ratios):.3f};  per-step median {statistics.median(steps[a]) / statistics.median(steps['whale']):.3f}"
              f"  best {min(steps[a]) / min(steps['whale']):.3f}")


def _run_pp(args) -> None:
    if args.batch % args.micro_batches:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --micro-batches {args.micro_batches}")
    start = time.perf_counter()
    rounds, loss0 = run_on_ranks(_pp_worker, args, threads=args.threads)
    split = args.layers // 2
    print(f"[pp] GPT2LMHeadModel {args.layers}x{args.embd} (untied), vocab {args.vocab}, global batch "
          f"{args.batch}x{args.seq}, 2 gloo ranks, stages [wte, wpe, h.0-{split - 1}] | "
          f"[h.{split}-{args.layers - 1}, ln_f, lm_head], 1f1b, {args.micro_batches} micro-batches, "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up)")
    last = loss0[-1]
    print(f"first-batch loss: whale {last['whale']:.6f}  tracer {last['tracer']:.6f}  manual {last['manual']:.6f}")
    if max(abs(last[k] - last["whale"]) for k in ("tracer", "manual")) > 1e-4:
        raise SystemExit("the three pipelines disagree on the first batch's loss")
    _report(rounds, ["tracer", "manual"], args.batch * args.seq)
    print(f"[pp] wall {time.perf_counter() - start:.0f} s")


def _run_tp(args) -> None:
    start = time.perf_counter()
    rounds, whale_loss, dt_loss, grad_diff, same_names = run_on_ranks(_tp_worker, args, threads=args.threads)
    print(f"[tp] LlamaModel {args.tp_layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads / {args.kv_heads} kv heads, batch {args.tp_batch}x{args.tp_seq}, 2 gloo ranks, "
          f"whale split(2) on 'layers' vs DTensor Colwise q/k/v/gate/up + Rowwise o/down, "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up)")
    print(f"first step: loss whale {whale_loss:.7f}  dtensor {dt_loss:.7f}; max |grad diff| {grad_diff:.2e} "
          f"over {'the same' if same_names else 'DIFFERENT'} parameter names")
    if abs(whale_loss - dt_loss) > 1e-5 or grad_diff > 1e-4 or not same_names:
        raise SystemExit("whale and DTensor disagree before timing")
    _report(rounds, ["dtensor"], args.tp_batch * args.tp_seq)
    print(f"[tp] wall {time.perf_counter() - start:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description="transformers GPT-2 (pipeline) and Llama (tensor parallel): "
                                            "whale vs torch, 2 gloo ranks")
    p.add_argument("--part", choices=["pp", "tp", "all"], default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    # pipeline (GPT-2)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    # tensor parallel (Llama)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tp-layers", type=int, default=2)
    p.add_argument("--tp-batch", type=int, default=8)
    p.add_argument("--tp-seq", type=int, default=128)
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"on {os.cpu_count()} cores; torch {torch.__version__}, transformers {_transformers().__version__}")
    if args.part in ("pp", "all"):
        _run_pp(args)
    if args.part in ("tp", "all"):
        _run_tp(args)
    print(f"load average at end {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
