"""Cases run on every rank of a gloo pool: ranks that disagree on their setup or their batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import whale as wh
from tests.dp_cases import _model_and_batches
from tests.pp_cases import _gpt, lm_loss


def _left_in_shm() -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"whale-{os.getpid()}-")]


def config_differs(field: str, mine: object, theirs: object) -> dict:
    """Rank 1 passes ``Config(field=theirs)``, the others ``mine``: every rank raises the same
    error naming the field, before any bucket or segment is made, and leaves nothing in /dev/shm."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    value = theirs if dist.get_rank() == 1 else mine
    config = wh.Config(**{field: getattr(torch, value) if isinstance(value, str) and value.startswith("bfloat") else value})

    def bind_and_step() -> None:
        wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=config).step(*batches[0])

    return {"error": _value_error(bind_and_step), "left": _left_in_shm()}


def buckets_differ_in_shared_memory() -> dict:
    """Below the setup check: ranks whose gradient buckets differ get a named error from the
    shared-memory group, and no segment is left behind."""
    from whale.runtime.host_reduce import HostLink, HostReduce

    link = HostLink(dist.new_group(list(range(dist.get_world_size()))))
    sizes = [(1000, torch.float32)] * (2 if dist.get_rank() == 0 else 3)
    return {"error": _value_error(HostReduce, sizes, link), "left": _left_in_shm()}


def _value_error(fn, *args) -> str:
    """The message of the ValueError ``fn(*args)`` raises, or "" where it returns."""
    try:
        fn(*args)
    except ValueError as err:
        return str(err)
    return ""


def _bad(x: torch.Tensor, y: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dist.get_rank() != 1:
        return x, y
    if how == "values":  # the DistributedDataParallel habit: each rank its own rows
        return x.roll(1, dims=1), y
    if how == "rows":  # the same rows in another order
        return x.flip(0), y.flip(0)
    if how == "one_value":
        x = x.clone()
        x[-1, -1] += 1
        return x, y
    raise ValueError(how)


def dp_batch_values_differ(how: str, later: bool, **config) -> dict:
    """A data-parallel step where rank 1's batch has the same shapes but other values; on the
    first step (the check before backward) or a later one (the digest riding on the gradients)."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(**config))
    if later:
        program.step(*batches[0])
    error = _value_error(program.step, *_bad(*batches[1], how))
    loss = program.step(*batches[0]).item()  # every rank raised at one point: it trains on
    return {"error": error, "loss": loss}


def pp_batch_values_differ(how: str, batch: str = "global") -> dict:
    """A pipeline step where rank 1 (the last stage, which reads the target) passes other values:
    every rank raises before any transfer; the next agreeing step trains on."""
    model, batches = _gpt(4, 8)
    config = wh.Config(stage_boundaries=["blocks.2"], num_micro_batch=2, batch=batch)
    program = wh.parallelize(model, loss_fn=lm_loss, example_inputs=(batches[0][0],), config=config)
    program.step(*batches[0])
    error = _value_error(program.step, *_bad(*batches[1], how))
    return {"error": error, "loss": program.step(*batches[0]).item()}


def local_batches(default_local: bool) -> dict:
    """``batch="local"``: each rank passes only its replica's rows (different values, as
    intended), through ``Config(batch="local")`` or ``step(batch="local")``; the loss and
    gradients equal those of the global batch passed everywhere."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    x, y = batches[0]
    config = wh.Config(batch="local") if default_local else wh.Config()
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(x,), config=config)
    rows = program.local_slice(len(x))
    loss = program.step(x[rows], y[rows]) if default_local else program.step(x[rows], y[rows], batch="local")
    grads = {n: p.grad.clone() for n, p in program.named_parameters()}
    reference = wh.parallelize(_model_and_batches("gpt", 8)[0], loss_fn=loss_fn, example_inputs=(x,))
    ref_loss = reference.step(x, y)
    return {
        "loss": (loss.item(), ref_loss.item()),
        # The same rows, summed in the same order: the gradients agree to the last bit or two.
        "grads_close": all(torch.allclose(grads[n], p.grad, rtol=1e-6, atol=1e-7) for n, p in reference.named_parameters()),
    }


def values_unchecked() -> dict:
    """``Config(check_batch_values=False)``: shapes only, so other values pass unseen (the
    documented cost of turning the checksum off)."""
    model, batches, loss_fn = _model_and_batches("gpt", 8)
    program = wh.parallelize(model, loss_fn=loss_fn, example_inputs=(batches[0][0],), config=wh.Config(check_batch_values=False))
    return {"loss": program.step(*_bad(*batches[0], "values")).item()}


def hf_mask_differs(name: str = "bert", **config) -> dict:
    """A transformers model (keyword inputs): rank 1's attention mask differs, its input_ids
    do not; the error names the keyword input."""
    from tests.hf_models import BUILDERS

    case = BUILDERS[name]()
    program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs, config=wh.Config(**config))
    inputs = dict(case.inputs)
    if dist.get_rank() == 1:
        inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    error = _value_error(program.step, inputs, case.target)
    return {"error": error, "loss": program.step(case.inputs, case.target).item()}
