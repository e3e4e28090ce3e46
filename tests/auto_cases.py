"""Cases run on every rank of a gloo pool (tests/world.py) for ``Config(cluster="auto")`` and
saved plans (``Config(plan=...)``): each trains distributed and, on every rank, the local model on
the same batches, and returns what ``tests.equivalence.assert_equivalent`` compares plus the
rows, the measured cluster and the plan."""

from __future__ import annotations

import contextlib
import copy
import io
import os

import torch.distributed as dist

import whale as wh
from tests.dp_cases import _model_and_batches
from tests.equivalence import train_distributed, train_reference
from tests.hf_cases import _batches, _train_distributed, _train_reference
from tests.hf_models import BUILDERS
from whale.ir.emulation import ENV_VAR


@contextlib.contextmanager
def _emulated(spec: str | None):
    """``WHALE_EMULATE_SLOWDOWN=spec`` on this rank for the block (the pool's ranks live on)."""
    before = os.environ.get(ENV_VAR)
    if spec is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = spec
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


def _facts(program, printed: str, total: int) -> dict:
    cluster = program.config.cluster
    return {
        "rows": list(program.plan.rows(total)),
        "devices": None if cluster is None or isinstance(cluster, str) else [d.profile.name for d in cluster.devices()],
        "speeds": None if cluster is None or isinstance(cluster, str)
        else [d.profile.peak("fp32") for d in cluster.devices()],
        "plan_json": program.plan.to_json(),
        "printed": printed,
    }  # fmt: skip


def _rows_by_model(program, model, example: tuple, total: int) -> dict:
    """The rows ``cluster="auto"`` should give on the program's measured cluster: the cost
    model's (``rows_on_cluster`` with the model's layers) and speed's alone (without them)."""
    import dataclasses

    from whale.capture import capture
    from whale.planner.annotated.cluster_rows import rows_on_cluster
    from whale.planner.cost.model_profile import profile_model

    plan = dataclasses.replace(program.plan, row_weights=(1.0,) * program.plan.dp_degree)
    cluster = program.config.cluster
    profile = profile_model(capture(model, example), total)
    return {
        "cost_rows": list(rows_on_cluster(plan, cluster, example_rows=total, profile=profile).rows(total)),
        "speed_rows": list(rows_on_cluster(plan, cluster, example_rows=total).rows(total)),
    }


def gpt_auto(spec: str | None, rows: int, *, save_to: str | None = None, **config) -> dict:
    """The examples' GPT, data parallel, under ``Config(cluster="auto", **config)`` with
    ``WHALE_EMULATE_SLOWDOWN=spec``; rank 0 saves the plan it ran to ``save_to``."""
    return gpt_run(spec, rows, save_to=save_to, cluster="auto", **config)


def gpt_run(spec: str | None, rows: int, *, save_to: str | None = None, **config) -> dict:
    """As :func:`gpt_auto` under ``Config(**config)``."""
    from whale.planner.saved_plan import save_plan

    model, batches, loss_fn = _model_and_batches("gpt", rows)
    reference = copy.deepcopy(model)
    out = train_reference(reference, batches, loss_fn)
    printed = io.StringIO()
    with _emulated(spec), contextlib.redirect_stdout(printed):
        program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(**config))
        out.update(train_distributed(program, batches, out.pop("ref_states")))
    if save_to is not None and dist.get_rank() == 0:
        save_plan(save_to, program.plan, model, cluster=program.config.cluster, global_batch=rows)
    out.update(_facts(program, printed.getvalue(), rows))
    if config.get("cluster") == "auto" and program.plan.num_stages == 1:
        out.update(_rows_by_model(program, model, (batches[0][0],), rows))
    return out


def hf_auto(name: str, spec: str | None, rows: int, **config) -> dict:
    """A transformers model (tests/hf_models.py) under ``Config(**config)`` (``cluster="auto"``
    or a saved ``plan=``) with ``WHALE_EMULATE_SLOWDOWN=spec``."""
    case = BUILDERS[name](rows=rows)
    batches = _batches(case)
    reference = copy.deepcopy(case.model)
    out = _train_reference(reference, batches, case.loss_fn)
    printed = io.StringIO()
    with _emulated(spec), contextlib.redirect_stdout(printed):
        program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs, config=wh.Config(**config))
        out.update(_train_distributed(program, batches, out.pop("ref_states"), "dict"))
    out.update(_facts(program, printed.getvalue(), rows))
    out["stages"] = program.plan.num_stages
    if config.get("cluster") == "auto" and program.plan.num_stages == 1:
        out.update(_rows_by_model(program, case.model, case.inputs, rows))
    return out


def gpt_error(**config) -> str:
    """The ValueError ``parallelize`` raises on this rank under ``Config(**config)`` (every rank
    must raise; none may wait for another)."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    try:
        wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(quiet=True, **config))
    except ValueError as err:
        return str(err)
    return "no error"


def hf_error(name: str, **config) -> str:
    """As :func:`gpt_error`, on a transformers model."""
    case = BUILDERS[name](rows=8)
    try:
        wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs, config=wh.Config(quiet=True, **config))
    except ValueError as err:
        return str(err)
    return "no error"


def gpt2_target():
    """``whale plan tests/auto_cases.py:gpt2_target``: the GPT-2 of tests/hf_models.py."""
    case = BUILDERS["gpt2"](rows=8)
    return case.model, case.inputs


def gpt_target():
    """``whale plan tests/auto_cases.py:gpt_target``: the examples' GPT."""
    model, batches, _ = _model_and_batches("gpt", 8)
    return model, (batches[0][0],)


def emulated_rank_reports(spec: str) -> dict:
    """This rank's self-profile under ``WHALE_EMULATE_SLOWDOWN=spec``, measured at once with the
    other ranks (as ``parallelize`` does)."""
    import torch.distributed as dist

    from whale.planner.self_profile import rank_report

    with _emulated(spec):
        dist.barrier()
        report = rank_report(dist.get_rank())
    return {"speed": report.speed, "seconds": report.seconds, "error": report.error}


def split_auto(spec: str | None, **kwargs) -> dict:
    """tests/split_cases.py's split GPT under ``Config(cluster="auto")`` with
    ``WHALE_EMULATE_SLOWDOWN=spec``: shard widths by measured speed."""
    from tests.split_cases import gpt_split

    with _emulated(spec), contextlib.redirect_stdout(io.StringIO()):
        return gpt_split(cluster="auto", **kwargs)


def emulated_optimizer(spec: str, steps: int) -> dict:
    """The examples' GPT (4 x 128) data parallel under ``WHALE_EMULATE_SLOWDOWN=spec``: per step,
    the wall and CPU seconds of the AdamW step over the program's parameters and of one over
    copies of them (other tensors, the same work), and whether the program's optimizer hooks
    go with the program."""
    import gc
    import time

    import torch
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    from examples.gpt import GPT, GPTConfig, SyntheticCorpus, lm_loss

    gc.collect()  # programs of earlier cases on this pool rank drop their hooks now, not mid-count
    hooks = len(_global_optimizer_pre_hooks)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=16)
    x, y = SyntheticCorpus(cfg.vocab_size).batch(4, cfg.block_size, 0)
    with _emulated(spec):
        program = wh.parallelize(GPT(cfg), loss_fn=lm_loss, example_inputs=(x,), config=wh.Config(quiet=True))
    ours = torch.optim.AdamW(program.parameters(), lr=1e-3)
    other_params = [torch.nn.Parameter(p.detach().clone()) for p in program.parameters()]
    other = torch.optim.AdamW(other_params, lr=1e-3)
    out: dict = {"ours": [], "other": []}
    for _ in range(steps):
        program.step(x, y)
        for p in other_params:
            p.grad = torch.full_like(p, 1e-3)
        for name, opt in (("ours", ours), ("other", other)):
            wall, cpu = time.perf_counter(), time.thread_time()
            opt.step()
            out[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
            opt.zero_grad()
    out["hooks_while"] = len(_global_optimizer_pre_hooks) - hooks
    del program, ours
    gc.collect()
    out["hooks_after"] = len(_global_optimizer_pre_hooks) - hooks
    return out
