"""Validation of the measured parts of a device profile (efficiency curve, optimizer steps,
operation classes), shared by :class:`~.devices.DeviceProfile` and its file format, and how its
``jitter`` is read from repeated times (:func:`spread`: by ``whale profile``, the ranks'
self-profile and a program's report of its steps).

Operation classes (``op_classes``): ``whale profile`` times a transformer block operation by
operation, forward and backward, and states for each class of graph node how its time compares
with the base the cost model computes for it:

* ``"linear"``: nodes with FLOPs that read parameters (``nn.Linear``, convolutions): the base is
  the roofline at the matmul efficiency curve;
* ``"attention"``: nodes with FLOPs on activations only (``scaled_dot_product_attention``,
  ``bmm``): the same base;
* ``"elementwise"``: nodes without FLOPs that move data (layer norm, GELU, residual add, a copy):
  the base is their bytes over the memory bandwidth;
* ``"view"``: nodes that move nothing (views, ``getitem``): the base is half an operation's
  overhead (they dispatch and record autograd but run no kernel).

Each class has two numbers: ``factor``, the forward-plus-backward time of the class in the block
(its per-operation overhead taken out) over three times its base (the cost model's convention:
backward twice the forward); and ``backward``, the measured backward time over the forward time,
which splits each node's forward-plus-backward time between the two (a CPU's layer norm backward
takes about 1.4 times its forward, not 2): the step total uses ``factor`` alone, a pipeline's
forward and backward both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

__all__ = ["OPTIMIZERS", "OP_CLASSES", "check_curve", "check_op_classes", "check_optimizer_steps", "jitter_of", "spread"]

OPTIMIZERS = ("adamw", "sgd", "sgd_momentum")
"""Optimizers a profile may give a measured step cost for (``adam`` steps as ``adamw``)."""
OP_CLASSES = ("linear", "attention", "elementwise", "view")
"""Classes of graph nodes a profile may give a measured time factor for, in this order."""


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_curve(owner: str, points: object) -> tuple[tuple[float, float], ...]:
    """Validated efficiency points: ``[flops, share]`` pairs, sizes increasing, shares rising."""
    fix = "give [flops, share] pairs with flops > 0 increasing and shares in (0, 1] not decreasing"
    if isinstance(points, (str, bytes)) or not isinstance(points, Iterable):
        raise TypeError(f"{owner}: efficiency must be a list of [flops, share] pairs; {fix}")
    out = []
    for k, point in enumerate(points):
        if isinstance(point, (str, bytes)) or not isinstance(point, Iterable) or len(tuple(point)) != 2:
            raise ValueError(f"{owner}: efficiency[{k}] is {point!r}, not a [flops, share] pair; {fix}")
        size, share = tuple(point)
        for value in (size, share):
            if not _number(value):
                raise ValueError(f"{owner}: efficiency[{k}] = {point!r} holds a non-number; {fix}")
        if size <= 0 or not 0 < share <= 1:
            raise ValueError(f"{owner}: efficiency[{k}] = {point!r} is out of range; {fix}")
        if out and (size <= out[-1][0] or share < out[-1][1]):
            raise ValueError(f"{owner}: efficiency[{k}] = {point!r} after {list(out[-1])}; {fix}")
        out.append((float(size), float(share)))
    if not out:
        raise ValueError(f"{owner}: efficiency is empty; {fix}, or leave it out for the default")
    return tuple(out)


def _named_pairs(owner: str, field: str, entries: object, known: tuple[str, ...], what: str, fix: str) -> list[tuple]:
    """``(name, a, b)`` entries of a ``{name: [a, b]}`` mapping or of a list of triples."""
    items = entries.items() if isinstance(entries, Mapping) else entries
    try:
        rows = [(name, *tuple(value)) for name, value in items] if isinstance(entries, Mapping) \
            else [tuple(entry) for entry in items]  # fmt: skip
    except TypeError:
        raise ValueError(f"{owner}: {field} must map names to two numbers, {fix}") from None
    for entry in rows:
        if len(entry) != 3:
            raise ValueError(f"{owner}: {field} entry {entry!r} needs two numbers, {fix}")
        if entry[0] not in known:
            raise ValueError(f"{owner}: {field} names the unknown {what} {entry[0]!r}; use one of {list(known)}")
    return rows


def check_optimizer_steps(owner: str, steps: object) -> tuple[tuple[str, float, float], ...]:
    """Validated optimizer costs as ``(name, per tensor, per parameter)``, names known."""
    fix = 'e.g. {"adamw": [3e-5, 2e-9]} (seconds per tensor, seconds per parameter)'
    out = {}
    for name, per_tensor, per_param in _named_pairs(owner, "optimizer_step", steps, OPTIMIZERS, "optimizer", fix):
        for value in (per_tensor, per_param):
            if not _number(value) or value < 0:
                raise ValueError(f"{owner}: optimizer_step[{name!r}] = {[per_tensor, per_param]!r} must be numbers >= 0, {fix}")
        out[name] = (name, float(per_tensor), float(per_param))
    return tuple(out[name] for name in OPTIMIZERS if name in out)


def check_op_classes(owner: str, classes: object) -> tuple[tuple[str, float, float], ...]:
    """Validated operation classes as ``(class, factor, backward)``: both numbers in (0, 1000]."""
    fix = 'e.g. {"linear": [1.4, 1.5], "attention": [3.0, 1.7]} (time factor, backward / forward)'
    out = {}
    for name, factor, backward in _named_pairs(owner, "op_classes", classes, OP_CLASSES, "operation class", fix):
        for value in (factor, backward):
            if not _number(value) or not 0 < value <= 1000:
                raise ValueError(f"{owner}: op_classes[{name!r}] = {[factor, backward]!r} must be numbers in (0, 1000], {fix}")
        out[name] = (name, float(factor), float(backward))
    return tuple(out[name] for name in OP_CLASSES if name in out)


def spread(times) -> float:
    """The relative spread of repeated times of the same work: their median absolute deviation
    over their median, scaled to a normal distribution's standard deviation (x 1.4826), so that
    a rare outlier (a page fault, a preemption) does not set it. 0.0 for fewer than 3 times.

    Example::

        >>> round(spread([1.0, 1.1, 0.9, 1.0, 1.2]), 3)
        0.148
    """
    times = list(times)
    if len(times) < 3:
        return 0.0
    middle = statistics.median(times)
    return 1.4826 * statistics.median(abs(t - middle) for t in times) / middle if middle > 0 else 0.0


def jitter_of(times) -> float:
    """The ``jitter`` a profile records for repeated times of the same work: their
    :func:`spread`, kept below 1 as the field requires, to 4 decimals.

    Example::

        >>> jitter_of([1.0, 1.1, 0.9, 1.0, 1.2])
        0.1483
    """
    return round(min(0.99, spread(times)), 4)
