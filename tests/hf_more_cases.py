"""Cases run on every rank of a gloo pool (tests/world.py) on the architectures of
tests/hf_more_models.py: ``tests.hf_cases.equivalence`` with the warnings ``parallelize`` gave."""

from __future__ import annotations

import warnings

from tests.hf_cases import equivalence


def equivalence_warnings(name: str, about: str = "split()", **kwargs) -> dict:
    """``equivalence(name, **kwargs)`` plus ``"warnings"``: whale's warnings while it built and
    ran that mention ``about``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = equivalence(name, **kwargs)
    out["warnings"] = [str(w.message) for w in caught if about in str(w.message)]
    return out
