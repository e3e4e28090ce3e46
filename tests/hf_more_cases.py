"""Cases run on every rank of a gloo pool (tests/world.py) on the architectures of
tests/hf_more_models.py and tests/hf_more_models2.py: ``tests.hf_cases.equivalence`` with the
warnings ``parallelize`` gave, and inference in eval mode."""

from __future__ import annotations

import copy
import warnings

import torch

import whale as wh
from tests.hf_cases import BUILDERS, equivalence


def equivalence_warnings(name: str, about: str = "split()", **kwargs) -> dict:
    """``equivalence(name, **kwargs)`` plus ``"warnings"``: whale's warnings while it built and
    ran that mention ``about``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = equivalence(name, **kwargs)
    out["warnings"] = [str(w.message) for w in caught if about in str(w.message)]
    return out


def eval_inference(name: str, dropout: float = 0.0, split: tuple[str, ...] = (), **config) -> dict:
    """``program.eval()(**inputs)`` against the local model in eval mode, every ``nn.Dropout``
    set to ``dropout`` first (captured as training): the output's largest difference, and
    whether the state (BatchNorm running statistics) is still the local model's."""
    case = BUILDERS[name](rows=6)  # 6 rows in 4 micro-batches: uneven
    for m in case.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    reference = copy.deepcopy(case.model).eval()
    if split:
        wh.annotate(case.model, {path: wh.split() for path in split})
    program = wh.parallelize(case.model, loss_fn=case.loss_fn, example_inputs=case.inputs,
                             config=wh.Config(**config)).eval()
    out = program(**case.inputs)
    with torch.no_grad():
        expected = reference(**case.inputs)
    full = program.full_state_dict()  # collective
    return {"diff": (out.logits - expected.logits).abs().max().item(),
            "state_kept": all(torch.equal(full[k], v) for k, v in reference.state_dict().items())}
