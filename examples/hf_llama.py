"""A transformers Llama, built from a small config (random init, no download), trained with whale:
annotated by module name from outside (the model is not edited), pipelined and tensor parallel.

Run on 4 CPU processes, pipeline 2 x tensor 2 (each stage's layers sharded over 2 ranks)::

    torchrun --nproc_per_node=4 examples/hf_llama.py --pipeline 2 --tensor 2

On 2 processes, pipeline only or tensor only::

    torchrun --nproc_per_node=2 examples/hf_llama.py --pipeline 2 --tensor 1
    torchrun --nproc_per_node=2 examples/hf_llama.py --pipeline 1 --tensor 2

Processes beyond pipeline x tensor replicate the whole (data parallel). The whale part is
three calls::

    split = wh.split(2)                                  # annotated by module name
    wh.annotate(model, {"model.embed_tokens": split, "model.layers": split, "lm_head": split})
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs={"input_ids": x, ...},
                             config=wh.Config(stage_boundaries=["model.layers.2"],
                                              num_micro_batch=4, schedule="1f1b"))
    loss = program.step({"input_ids": x, ...}, y)

The tokens are synthetic and learnable (each mostly follows from the previous by a fixed rule),
so the loss falls within a few dozen steps (4.86 -> 0.99 over the default 40). Useful flags:
``--steps 40 --layers 4 --hidden 64 --batch 16 --seq 32 --micro-batches 4``. As a plain script,
``python examples/hf_llama.py --pipeline 1 --tensor 1`` trains the local model (a world of one);
every layout above prints its losses (4.861, 4.040, 3.375 at steps 0, 5, 9 of ``--steps 10``).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import whale as wh


def lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the model's output object (``out.logits``), a mean over tokens."""
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def build_llama(vocab: int, hidden: int, layers: int, seq: int):
    """A small ``LlamaForCausalLM`` (grouped-query attention: 4 heads, 2 kv heads; SwiGLU MLP)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
        use_cache=False,  # training needs no cache (and torch.export refuses a DynamicCache output)
    )
    return transformers.LlamaForCausalLM(cfg)


def token_batch(vocab: int, rows: int, seq: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences of ``seq + 1`` tokens where each token is ``rule[previous]`` 90% of the
    time; inputs and next-token targets. Every rank draws the same global batch for a step."""
    rule = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.empty(rows, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (rows,), generator=g)
    noise = torch.randint(vocab, (rows, seq), generator=g)
    keep = torch.rand(rows, seq, generator=g) < 0.9
    for t in range(seq):
        tokens[:, t + 1] = torch.where(keep[:, t], rule[tokens[:, t]], noise[:, t])
    return tokens[:, :-1], tokens[:, 1:]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train; the first and last step's losses."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", type=int, default=2, help="pipeline stages (decoder layers split evenly)")
    p.add_argument("--tensor", type=int, default=2, help="ranks each decoder layer is split over (1: none)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b or interleaved_1f1b")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=5)
    args = p.parse_args(argv)

    info = wh.init()
    torch.manual_seed(0)
    model = build_llama(args.vocab, args.hidden, args.layers, args.seq)
    # By module name, from outside: the transformers model itself is not edited.
    if args.tensor > 1:
        # Vocabulary-parallel embedding, every decoder layer (attention by whole kv-head groups,
        # SwiGLU MLP) and the LM head, whose cross-entropy reads the logits without gathering them.
        split = wh.split(args.tensor)
        wh.annotate(model, {"model.embed_tokens": split, "model.layers": split, "lm_head": split})
    per_stage = args.layers / args.pipeline
    boundaries = [f"model.layers.{round(k * per_stage)}" for k in range(1, args.pipeline)] or None
    x, y = token_batch(args.vocab, args.batch, args.seq, step=0)
    program = wh.parallelize(
        model,
        loss_fn=lm_loss,
        example_inputs={"input_ids": x},
        config=wh.Config(
            stage_boundaries=boundaries,
            num_micro_batch=args.micro_batches if boundaries else 1,
            schedule=args.schedule,
        ),
    )
    if info.rank == 0:
        plan = program.plan
        print(f"Llama {args.layers}x{args.hidden} on {info.world_size} ranks: {plan.num_stages} stages x "
              f"tensor {plan.tensor_parallel} x data {plan.dp_degree}, {plan.num_micro_batch} micro-batches")
    opt = torch.optim.AdamW(program.parameters(), lr=args.lr)
    first = last = math.nan
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = token_batch(args.vocab, args.batch, args.seq, step)
        loss = program.step({"input_ids": x}, y).item()
        opt.step()
        opt.zero_grad()
        first = loss if step == 0 else first
        last = loss
        if info.rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            tok_s = (step + 1) * args.batch * args.seq / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss:.4f}  {tok_s:,.0f} tokens/s (global)", flush=True)
    if info.rank == 0:
        print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps on {info.world_size} ranks")
    return {"first": first, "last": last}


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leave together; tear gloo down before exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
