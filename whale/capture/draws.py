"""Random draws a traced graph would freeze.

A tracer runs forward once. What forward draws from Python's ``random`` or NumPy's global
generator is a plain number during that run, so the graph keeps the value drawn then: every
step would skip, or never skip, the layer a LayerDrop draw decides (MusicGen's decoder draws
``random.uniform(0, 1)``, Wav2Vec2's adapter ``np.random.random()``), or scale by the same
"noise". ``torch.fx`` does the same with a torch factory that takes no traced input
(``torch.rand([])`` runs for real while fx traces). ``torch.export`` records torch's own draws
as graph ops, drawn anew each step, and stops at an ``if`` on one (a data-dependent guard).

:func:`trace_checked` runs a trace with each draw made in the model's code just inside the
low end of its range (``random.random()`` gives 2**-53, ``uniform(a, b)`` just above ``a``);
where forward drew, it traces again just inside the high end. Where the two graphs are the
same, no draw decided anything (MusicGen's ``random.uniform(0, 1) < layerdrop`` and Wav2Vec2's
``np.random.random() > layerdrop`` at ``layerdrop=0``) and the graph stands. Where they
differ, a third trace stops at the first draw (:class:`RandomDraw`): fx then gives way to
export, and export makes the module whose forward drew an opaque call, which runs the module
itself, drawing each step as the local model does. A draw with no such range (``choice``,
``shuffle``, a normal variate) and fx's torch factories stop the trace at once. Draws made by
torch, whale or the standard library themselves are let through, and so are draws from a
generator forward seeds itself (BigBird's random attention blocks: ``np.random.seed(seed)``
before each draw), which repeat every step.

Capture runs the model eagerly too (an opaque call's recording, a custom Function's check):
:func:`kept_random_states` puts back every generator those runs drew from, so a job's dropout
masks and draws after ``parallelize`` are the ones the same seed gives without it.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from .errors import is_user_file

T = TypeVar("T")

__all__ = ["RandomDraw", "graph_signature", "kept_random_states", "trace_checked"]

_PYTHON = (
    "random", "uniform", "randint", "randrange", "choice", "choices", "shuffle", "sample", "gauss",
    "normalvariate", "lognormvariate", "expovariate", "betavariate", "gammavariate", "triangular",
    "vonmisesvariate", "paretovariate", "weibullvariate", "getrandbits", "binomialvariate",
)  # fmt: skip
_NUMPY = (
    "random", "rand", "randn", "randint", "random_sample", "ranf", "sample", "uniform", "normal",
    "standard_normal", "choice", "permutation", "shuffle", "binomial", "beta", "exponential",
    "gamma", "poisson", "random_integers",
)  # fmt: skip
# torch factories that fx runs for real when no input is traced (export records them as ops).
_TORCH = (
    "rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial", "poisson",
    "rand_like", "randn_like", "randint_like",
)  # fmt: skip


class RandomDraw(Exception):
    """Forward drew a random value a traced graph would keep as a constant."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source


def trace_checked(trace: Callable[[], T], signature: Callable[[T], object], torch_factories: bool = False) -> T:
    """``trace()``, its result kept only where no random draw in forward decides the graph
    (see the module's docstring); ``signature`` gives what two results are compared by
    (:func:`graph_signature` of the graph).

    Raises:
        RandomDraw: from the model's line that draws, where the draw decides the graph.

    Example::

        graph = trace_checked(lambda: tracer.trace(model), graph_signature, torch_factories=True)
    """
    drawn: list[str] = []
    with _draws("low", drawn, torch_factories):
        first = trace()
    if not drawn:
        return first
    with _draws("high", [], torch_factories):
        second = trace()
    if signature(first) == signature(second):
        return first
    with _draws("stop", [], torch_factories):
        trace()
    raise RandomDraw(  # a forward that drew on two traces and not on the third
        f"forward draws {drawn[0]}(), and the graph traced depends on the value drawn", drawn[0]
    )


def graph_signature(graph: torch.fx.Graph) -> list[tuple]:
    """What a graph computes, node by node: op, target and arguments (constants included)."""
    return [
        (n.op, str(n.target), str(torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.name)))
        for n in graph.nodes
    ]


# Where in its range a draw is taken: just inside both ends, so a test against the range's own
# end (``np.random.random() > layerdrop`` at ``layerdrop=0``) goes as every real draw does.
_LOW, _HIGH = 2.0**-53, math.nextafter(1.0, 0.0)


def _ends(label: str, name: str, args: tuple, kwargs: dict, high: bool):
    """The low or high end of a draw over a range (``random()``, ``uniform(a, b)``, NumPy's
    ``random(size)``, ``rand(*dims)``, ``uniform(low, high, size)``), or ``NotImplemented`` for
    any other draw."""
    if name == "uniform":
        bound = dict(zip(("a", "b") if label == "random" else ("low", "high", "size"), args), **kwargs)
        low, top = bound.get("a", bound.get("low", 0.0)), bound.get("b", bound.get("high", 1.0))
        size = bound.get("size")
    elif name in ("random", "random_sample", "ranf", "sample", "rand") and not (label == "random" and name == "sample"):
        low, top = 0.0, 1.0
        size = (args or None) if name == "rand" else (args[0] if args else kwargs.get("size"))
    else:
        return NotImplemented
    value = low + (top - low) * (_HIGH if high else _LOW)
    return value if size is None else np.full(size, value)


@contextmanager
def _draws(mode: str, drawn: list[str], torch_factories: bool) -> Iterator[None]:
    """Within the block, a draw from ``random`` or ``numpy.random`` in the model's code gives
    the low or high end of its range (``mode``, each noted in ``drawn``), or raises
    :class:`RandomDraw` (``"stop"``, and any draw without a range); with ``torch_factories``
    (fx), a torch factory called with no ``torch.fx.Proxy`` among its inputs raises too. The
    module attributes are replaced for the block and restored after."""
    patched: list[tuple[object, str, object]] = []
    seeded: set[str] = set()  # generators forward seeded itself: their draws repeat every step

    def seed(owner: object, label: str) -> None:
        original = owner.seed

        def reseed(*args, **kwargs):
            if is_user_file(sys._getframe(1).f_code.co_filename):
                seeded.add(label)
            return original(*args, **kwargs)

        patched.append((owner, "seed", original))
        owner.seed = reseed

    def stop(owner: object, name: str, label: str, traced: Callable[[tuple, dict], bool] | None = None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def draw(*args, **kwargs):
            if (label in seeded or not is_user_file(sys._getframe(1).f_code.co_filename)
                    or (traced is not None and traced(args, kwargs))):
                return original(*args, **kwargs)
            value = NotImplemented if mode == "stop" or traced is not None else _ends(label, name, args, kwargs, mode == "high")
            if value is NotImplemented:
                raise RandomDraw(
                    f"forward draws {label}.{name}(), which a traced graph keeps at the value drawn "
                    "while tracing instead of drawing anew each step",
                    f"{label}.{name}",
                )
            drawn.append(f"{label}.{name}")
            return value

        patched.append((owner, name, original))
        setattr(owner, name, draw)

    try:
        seed(random, "random")
        seed(np.random, "numpy.random")
        for name in _PYTHON:
            stop(random, name, "random")
        for name in _NUMPY:
            stop(np.random, name, "numpy.random")
        if torch_factories:
            for name in _TORCH:
                stop(torch, name, "torch", _holds_proxy)
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


@contextmanager
def kept_random_states(devices: list[int]) -> Iterator[None]:
    """Python's, NumPy's and torch's generators (CPU, and the CUDA ``devices``) as they were
    before the block, after it.

    Example::

        with kept_random_states([]):
            opaque.record(args, kwargs)
    """
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _holds_proxy(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(v, torch.fx.Proxy) for v in tree_leaves((args, kwargs)))
