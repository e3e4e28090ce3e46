"""Training that survives a killed rank: checkpoints every few steps, torchrun restarts the job,
and it resumes from the newest checkpoint to the same parameters as an uninterrupted run.

Run on 2 CPU processes, rank 1 dying at step 5 in the first attempt::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 --max-restarts=1 \\
        examples/resume_training.py --ckpt /tmp/whale-ckpt --steps 8 --save-every 2 --die-at 5

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt its own rendezvous store: with the
shared one, a restarted attempt can read the previous attempt's addresses and fail to connect
(pytorch/pytorch#135712).

torchrun sees rank 1 exit, stops the other ranks and starts every rank again
(``TORCHELASTIC_RESTART_COUNT`` counts the attempts); each attempt loads the newest complete
checkpoint (``wh.checkpoint.load``) and trains on from the step after it. A save runs behind
training (``asynchronous=True``) and appears only once every rank has written its part, so a
rank dying mid-save leaves the previous checkpoint to resume from. ``--stages 2`` trains a
pipeline instead of data parallel; a checkpoint of either loads into the other.
``--out final.pt`` writes the final local-model state dict (rank 0).
"""

from __future__ import annotations

import argparse
import os

import torch

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss

LR = 1e-2


def build() -> tuple[GPT, SyntheticCorpus]:
    """The model (the same initial weights on every rank) and the corpus batches come from."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPT(cfg), SyntheticCorpus(cfg.vocab_size, length=4096)


def batch(corpus: SyntheticCorpus, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return corpus.batch(8, 16, step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root directory")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--die-at", type=int, default=None, help="rank --die-rank exits at this step (first attempt only)")
    parser.add_argument("--die-rank", type=int, default=1)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    info = wh.init()
    model, corpus = build()
    config = wh.Config(stage_boundaries=["blocks.1"], num_micro_batch=2) if args.stages == 2 else wh.Config()
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batch(corpus, 0)[0],), config=config)
    opt = torch.optim.AdamW(program.parameters(), lr=LR)
    start, pending = 0, None
    if wh.checkpoint.latest(args.ckpt) is not None:
        start = wh.checkpoint.load(args.ckpt, program, opt)
        if info.rank == 0:
            print(f"attempt {attempt}: resumed from step {start}", flush=True)
    for step in range(start, args.steps):
        if args.die_at == step and attempt == 0 and info.rank == args.die_rank:
            print(f"attempt {attempt}: rank {info.rank} dies at step {step}", flush=True)
            os._exit(1)  # as a killed process: no cleanup, no goodbye to the others
        x, y = batch(corpus, step)
        loss = program.step(x, y)
        opt.step()
        opt.zero_grad()
        if info.rank == 0:
            print(f"attempt {attempt}: step {step} loss {loss.item():.4f}", flush=True)
        if (step + 1) % args.save_every == 0:
            # Written behind the next steps; a later save (or load) waits for it first.
            pending = wh.checkpoint.save(args.ckpt, program, opt, step=step + 1, asynchronous=True)
    if pending is not None:
        pending.wait()
    state = program.full_state_dict()
    if args.out and info.rank == 0:
        torch.save(state, args.out)
        print(f"attempt {attempt}: done, {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
