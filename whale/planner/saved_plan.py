"""Saved plans: a :class:`~whale.ir.plan.Plan` in a file with what it was made for, so that
``Config(plan="plan.json")`` can execute it as written after checking it still fits.

The file (``whale plan ... --out plan.json``, or :func:`save_plan`) is JSON::

    {"format": "whale-plan", "version": 1,
     "model": {"class": "GPT2LMHeadModel", "digest": "sha256:...", "parameters": 148, "values": 124439808},
     "world_size": 2, "devices": ["CPU", "CPU"], "cluster": "node0=2xCPU", "global_batch": 8,
     "plan": {... Plan.to_json() ...}}

* ``model.digest``: a hash of the model's parameter names and shapes (in
  ``named_parameters()`` order, tied ones once): another model, or the same one with another
  width or depth, has another digest.
* ``devices``: each rank's device kind (the datasheet name its profile is of: ``CPU``,
  ``A100-80GB``; an emulated or measured class ``CPU-slow2`` is of kind ``CPU``).

A bare ``Plan.to_json()`` file (``whale plan --json``) is read too; it can be checked against the
world size only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..ir.cluster_spec import Cluster, format_cluster
from ..ir.device_catalog import get_profile
from ..ir.plan import Plan

__all__ = ["SavedPlan", "check_saved_plan", "device_kind", "load_plan", "model_digest", "save_plan"]

FORMAT = "whale-plan"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class SavedPlan:
    """A plan and what it was made for (None where the source did not say).

    Attributes:
        plan: the plan to execute.
        model_class: the model's class name, for messages.
        digest: :func:`model_digest` of the model.
        num_parameters: parameter tensors (tied ones once).
        num_values: parameter values.
        devices: each rank's device kind (:func:`device_kind`).
        cluster: the cluster it was planned for, as a spec, for messages.
        global_batch: rows per step it was balanced for.
        source: where it was read from (a path, or ``"a Plan"``).
    """

    plan: Plan
    model_class: str | None = None
    digest: str | None = None
    num_parameters: int | None = None
    num_values: int | None = None
    devices: tuple[str, ...] | None = None
    cluster: str | None = None
    global_batch: int | None = None
    source: str = "a Plan"

    def to_json(self) -> str:
        """The file's text (:func:`load_plan` reads it back equal)."""
        data = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"class": self.model_class, "digest": self.digest,
                      "parameters": self.num_parameters, "values": self.num_values},
            "world_size": self.plan.world_size,
            "devices": None if self.devices is None else list(self.devices),
            "cluster": self.cluster,
            "global_batch": self.global_batch,
            "plan": json.loads(self.plan.to_json()),
        }  # fmt: skip
        return json.dumps(data, indent=2) + "\n"


def model_digest(model: nn.Module) -> tuple[str, int, int]:
    """``(digest, parameter tensors, values)`` of a model's parameter names and shapes.

    Works on a model built on the meta device (only shapes are read).

    Example::

        digest, tensors, values = model_digest(torch.nn.Linear(4, 2))   # ('sha256:...', 2, 10)
    """
    h = hashlib.sha256()
    tensors = values = 0
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
        tensors += 1
        values += p.numel()
    return f"sha256:{h.hexdigest()[:32]}", tensors, values


def device_kind(name: str) -> str:
    """The datasheet device a profile name is of: ``"CPU-slow2"`` -> ``"CPU"``, ``"a100_80g"``
    -> ``"A100-80GB"``, ``"NVIDIA A100-SXM4-80GB"`` -> ``"A100-80GB"``; an unknown device keeps
    its name (custom profiles from a file)."""
    for candidate in (name, re.sub(r"(-slow[0-9.e+]+)?(-\d+)?$", "", name)):
        try:
            return get_profile(candidate).name
        except ValueError:
            continue
    return name


def save_plan(
    path: str | os.PathLike,
    plan: Plan,
    model: nn.Module,
    *,
    cluster: Cluster | None = None,
    global_batch: int | None = None,
) -> None:
    """Write ``plan`` for ``model`` (and the cluster it was made for) to ``path`` atomically: a
    temporary file in the same folder, renamed over ``path`` once complete, so a reader never
    sees half a file and a failed write leaves nothing behind.

    Example::

        save_plan("plan.json", program.plan, model, cluster=program.config.cluster)
    """
    digest, tensors, values = model_digest(model)
    if cluster is not None and cluster.world_size != plan.world_size:
        raise ValueError(f"save_plan: the plan is for {plan.world_size} ranks but the cluster {cluster} has {cluster.world_size}")
    saved = SavedPlan(
        plan, type(model).__name__, digest, tensors, values,
        devices=None if cluster is None else tuple(device_kind(d.profile.name) for d in cluster.devices()),
        cluster=None if cluster is None else format_cluster(cluster), global_batch=global_batch,
    )  # fmt: skip
    write_atomically(path, saved.to_json())


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename (nothing half-written)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".whale-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_plan(source: str | os.PathLike | Plan) -> SavedPlan:
    """Read a plan file (this module's format, or a bare ``Plan.to_json()``), or wrap a Plan.

    Raises:
        ValueError: the file cannot be read, is not JSON, or is not a plan (naming the field).
    """
    if isinstance(source, Plan):
        return SavedPlan(source)
    where = os.fspath(source)
    try:
        with open(where, encoding="utf-8") as file:
            text = file.read()
    except OSError as err:
        raise ValueError(f"Config(plan={where!r}): cannot read the plan file: {err.strerror or err}") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Config(plan={where!r}) is not JSON ({err}); write it with `whale plan ... --out {where}`") from None
    if not isinstance(data, dict):  # a file's content is a value, not a type, to fix
        raise ValueError(f"Config(plan={where!r}): a plan file is a JSON object, got {type(data).__name__}")  # noqa: TRY004
    if data.get("format") != FORMAT:  # a bare Plan.to_json()
        try:
            return SavedPlan(Plan.from_json(text), source=where)
        except ValueError as err:
            raise ValueError(f"Config(plan={where!r}): {err}") from None
    if data.get("version") != VERSION:
        raise ValueError(f"Config(plan={where!r}): plan file version {data.get('version')!r}, this whale reads {VERSION}; re-plan")
    try:
        model, devices = data["model"], data["devices"]
        plan = Plan.from_json(json.dumps(data["plan"]))
        saved = SavedPlan(
            plan, model["class"], model["digest"], model["parameters"], model["values"],
            devices=None if devices is None else tuple(str(d) for d in devices),
            cluster=data["cluster"], global_batch=data["global_batch"], source=where,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Config(plan={where!r}): the plan file is malformed ({type(err).__name__}: {err}); re-plan") from None
    if data["world_size"] != plan.world_size:
        raise ValueError(f"Config(plan={where!r}): world_size {data['world_size']} but its plan is for {plan.world_size} ranks")
    return saved


def check_saved_plan(saved: SavedPlan, model: nn.Module, world_size: int, hardware: Sequence[str | None] | None) -> Plan:
    """The saved plan, if it was made for this model, this world size and these devices.

    Args:
        saved: from :func:`load_plan`.
        model: the model being parallelized.
        world_size: ranks in the job.
        hardware: each rank's device name (``"CPU"``, a CUDA device name), None for a rank not
            known here; None: not checked.

    Raises:
        ValueError: naming the mismatch (another model, another world size, another device
            set) and how to make a plan that fits.
    """
    where = f"the plan from {saved.source}" if saved.source != "a Plan" else "Config(plan=<Plan>)"
    remake = "re-plan for this job (whale plan ... --out FILE, or Config(cluster='auto') and save program.plan)"
    if saved.digest is not None:
        digest, tensors, values = model_digest(model)
        if digest != saved.digest:
            raise ValueError(
                f"{where} was made for another model: {saved.model_class} with {saved.num_parameters} "
                f"parameter tensors ({saved.num_values:,} values), but this model is "
                f"{type(model).__name__} with {tensors} ({values:,} values)"
                + (" of other names or shapes" if (tensors, values) == (saved.num_parameters, saved.num_values) else "")
                + f"; {remake}"
            )
    if saved.plan.world_size != world_size:
        raise ValueError(
            f"{where} is for a world of {saved.plan.world_size} ranks, but this job has {world_size}; "
            f"launch {saved.plan.world_size} processes or {remake}"
        )
    if saved.devices is not None and hardware is not None:
        kinds = [None if h is None else device_kind(h) for h in hardware]
        wrong = [r for r, k in enumerate(kinds) if k is not None and k != saved.devices[r]]
        if wrong:
            planned = ", ".join(f"rank {r}: {saved.devices[r]}" for r in wrong)
            actual = ", ".join(f"rank {r}: {kinds[r]}" for r in wrong)
            raise ValueError(
                f"{where} is for other devices ({saved.cluster or list(saved.devices)}; {planned}), "
                f"but this job runs on {actual}; {remake}"
            )
    return saved.plan
