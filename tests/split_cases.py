"""Cases for ``split`` through ``wh.parallelize`` (tensor parallel, alone and inside replicate)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import whale as wh
from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss
from tests.equivalence import train_distributed, train_reference

_STEPS = 2


def gpt_split(*, split: dict, row_weights=None, shard_sizes=None, global_batch: int = 8, cluster=None) -> dict:
    """A GPT whose annotated parts are split; every rank also trains the local model."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg)
    if "lm_head" in split:
        # A split head shards its weight by vocabulary rows; the embedding keeps its own copy.
        model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
    wh.annotate(model, {name: wh.split(n) for name, n in split.items()})
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(global_batch, cfg.block_size, s) for s in range(_STEPS)]
    out = train_reference(copy.deepcopy(model), batches, lm_loss)
    config = wh.Config(row_weights=row_weights, shard_sizes=shard_sizes, cluster=cluster)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["plan"] = (program.plan.tensor_parallel, program.plan.dp_degree)
    out["shard_sizes"] = dict(program.plan.shard_sizes)
    out["shards"] = {n: tuple(p.shape) for n, p in program.named_parameters()}
    full = program.full_state_dict()  # collective
    plain = GPT(cfg)
    if "lm_head" in split:
        plain.lm_head.weight = torch.nn.Parameter(plain.wte.weight.detach().clone())
    plain.load_state_dict(full)  # a model trained with split loads into the plain local model
    out["full_matches"] = all(torch.equal(full[k], v) for k, v in plain.state_dict().items())
    out["rank"] = dist.get_rank()
    return out


def split_in_stage(*, split: dict, boundaries, num_micro_batch: int = 2, shard_sizes=None, cluster=None) -> dict:
    """A pipelined GPT whose stages hold split parts (tensor parallel inside pipeline stages)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32)
    model = GPT(cfg)
    wh.annotate(model, {name: wh.split(n) for name, n in split.items()})
    corpus = SyntheticCorpus(cfg.vocab_size, length=4096)
    batches = [corpus.batch(8, cfg.block_size, s) for s in range(_STEPS)]
    out = train_reference(copy.deepcopy(model), batches, lm_loss)
    config = wh.Config(
        stage_boundaries=boundaries, num_micro_batch=num_micro_batch, shard_sizes=shard_sizes, cluster=cluster
    )
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    out.update(train_distributed(program, batches, out.pop("ref_states")))
    out["plan"] = (program.plan.dp_degree, program.plan.pipeline_degree, program.plan.tensor_parallel)
    out["shards"] = {n: tuple(p.shape) for n, p in program.named_parameters()}
    full = program.full_state_dict()
    out["full_keys_ok"] = set(full) == set(GPT(cfg).state_dict())
    # Inference: the output of the local model with the trained weights, or refused (a split
    # last stage keeps its output sharded) on every rank alike.
    reference = GPT(cfg)
    reference.load_state_dict(full)
    x = batches[0][0]
    try:
        got = program(x)
    except NotImplementedError:
        out["inference"] = "refused"
    else:
        with torch.no_grad():
            out["inference"] = (got - reference(x)).abs().max().item()
    return out
