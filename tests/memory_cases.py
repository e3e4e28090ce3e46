"""Cases run on every rank of a gloo pool (tests/world.py): what a bound program keeps alive.

Each case builds a model, parallelizes it, drops the caller's reference to the model (as
``model = wh.parallelize(model, ...)`` does) and counts the bytes of every tensor storage still
alive in the process (``gc``), against the count before the model was built. A rank of a
pipeline must then hold its own stages' parameters and buffers only; a rank of a split part
only its shards. The program's ``full_state_dict()`` must still be the local model's: it is
compared with the same model built again from the same seed.
"""

from __future__ import annotations

import gc
import warnings

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import whale as wh
from tests.models import TinyGPT


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage a Python object refers to in this process."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)]
    for obj in tensors:
        if not obj.is_meta and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse, nested, ...
                continue
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def saved_tensor_bytes(fn, params) -> tuple[object, int]:
    """``fn()``'s result and the bytes of the tensors autograd saves for backward while it runs
    (storages of ``params`` and their views left out; each storage once): activation memory,
    measured. Tensors saved inside ``torch.utils.checkpoint`` regions go to the checkpoint's
    own hooks and are not counted, as they are not kept."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _tensor_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def _gpt(seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab=64, block_size=16, n_layer=4, n_head=4, n_embd=128)


def _gpt_case():
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return _gpt, (x,), loss_fn, x


def _hf_case(name: str):
    from tests.hf_models import BUILDERS

    case = BUILDERS[name](rows=4)
    return (lambda seed: BUILDERS[name](rows=4, seed=seed).model), case.inputs, case.loss_fn, case.target


def held_after_binding(model: str = "gpt", split: tuple[str, ...] = (), **config) -> dict:
    """Live tensor bytes after binding, with the caller's model dropped, against what the
    program's own modules hold; then one step and the full state dict against a fresh build."""
    build, example, loss_fn, _ = _gpt_case() if model == "gpt" else _hf_case(model)
    before = live_tensor_bytes()
    local = build(0)
    model_bytes = _tensor_bytes(list(local.parameters()) + list(local.buffers()))
    if split:
        wh.annotate(local, {path: wh.split(2) for path in split})
    program = wh.parallelize(local, loss_fn=loss_fn, example_inputs=example, config=wh.Config(**config))
    del local
    held = live_tensor_bytes() - before
    modules = getattr(program, "_modules", None) or {0: program.module}
    own = _tensor_bytes(t for m in modules.values() for t in [*m.parameters(), *m.buffers()])
    params = _tensor_bytes(program.parameters())
    full = program.full_state_dict()  # collective: gathered from the stage owners
    fresh = build(0).state_dict()
    return {
        "held": held,
        "own": own,
        "params": params,
        "model_bytes": model_bytes,
        "full_equal": list(full) == list(fresh) and all(torch.equal(full[k], v) for k, v in fresh.items()),
    }


def release_local_model(**config) -> dict:
    """``release_local_model``: the caller keeps the model object, the other stage's tensors go
    to the meta device (ties kept), this rank's stay shared with the program; a step still
    trains and the full state dict is still the whole model's."""
    build, example, loss_fn, _ = _gpt_case()
    before = live_tensor_bytes()
    local = build(0)
    program = wh.parallelize(local, loss_fn=loss_fn, example_inputs=example, config=wh.Config(**config))
    with_model = live_tensor_bytes() - before
    released = program.release_local_model(local)
    held = live_tensor_bytes() - before
    own = _tensor_bytes(t for m in program._modules.values() for t in [*m.parameters(), *m.buffers()])
    meta = sorted(n for n, p in local.named_parameters() if p.is_meta)
    real = sorted(n for n, p in local.named_parameters() if not p.is_meta)
    loss = program.step(example[0], example[0].roll(1, dims=1)).item()
    full = program.full_state_dict()
    fresh = build(0).state_dict()
    try:
        program.release_local_model(build(1).h[0])
        wrong_model = None
    except ValueError as err:
        wrong_model = str(err)
    return {
        "with_model": with_model, "held": held, "own": own, "released": released, "meta": meta,
        "real": real, "loss": loss, "program_params": sorted(n for n, _ in program.named_parameters()),
        "full_equal": all(torch.equal(full[k], v) for k, v in fresh.items()), "wrong_model": wrong_model,
    }
