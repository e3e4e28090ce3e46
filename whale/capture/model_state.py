"""Capture never changes the user's model: snapshot every module's state, restore it after.

Tracing runs ``forward``. A forward that assigns state (``self.count += 1`` on a buffer, a
Python counter, a cache kept on the module) would leave an fx ``Proxy`` or a fake tensor in the
user's module, or advance a counter. :func:`preserved_state` records each module's attributes
and the contents of its containers (``_parameters``, ``_buffers``, ``_modules``, hook dicts)
and puts them back, and keeps the values of parameters and buffers: a tracer that writes into a
real tensor is undone, and a forward that assigns state is reported by :meth:`ModelState.assigned`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["ModelState", "config_without_cache", "preserved_state"]


class ModelState:
    """A snapshot of every module of a model: attributes, containers, tensor versions."""

    def __init__(self, model: nn.Module) -> None:
        self._names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        self._modules = list({id(m): m for m in model.modules()}.values())
        self._attrs = [dict(vars(m)) for m in self._modules]
        # Containers (dicts, sets, lists) are restored in place: the model keeps its own objects.
        self._contents = [
            {k: c for k, c in ((k, _copy_container(v)) for k, v in attrs.items()) if c is not None}
            for attrs in self._attrs
        ]
        tensors = {
            id(t): t for m in self._modules for t in [*m._parameters.values(), *m._buffers.values()]
            if isinstance(t, torch.Tensor)
        }
        self._tensors = list(tensors.values())
        self._versions = [t._version for t in self._tensors]
        # Buffers are small (statistics, masks, rotary tables); a copy undoes any real write.
        self._buffer_values = {
            id(t): t.detach().clone()
            for m in self._modules for t in m._buffers.values()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }

    def assigned(self) -> list[str]:
        """Qualified names of the parameters, buffers and tensor attributes forward reassigned
        (other attributes, such as a Python step counter, are restored without a word)."""
        changed = []
        for module, attrs, contents in zip(self._modules, self._attrs, self._contents):
            prefix = self._names.get(id(module), "")
            prefix = f"{prefix}." if prefix else ""
            now = vars(module)
            for key in sorted(set(now) | set(attrs)):
                if key in contents:
                    if key in ("_parameters", "_buffers"):
                        old, new = contents[key], now.get(key, {})
                        changed += [f"{prefix}{n}" for n in sorted(set(old) | set(new)) if old.get(n) is not new.get(n)]
                    continue
                old, new = attrs.get(key), now.get(key)
                if old is not new and (_is_tensor_like(old) or _is_tensor_like(new)):
                    changed.append(f"{prefix}{key}")
        return changed

    def restore(self) -> None:
        """Put every attribute, container entry and tensor value back as it was."""
        for module, attrs, contents in zip(self._modules, self._attrs, self._contents):
            state = vars(module)
            state.clear()
            state.update(attrs)
            for key, saved in contents.items():
                _restore_container(attrs[key], saved)
        with torch.no_grad():
            for t, version in zip(self._tensors, self._versions):
                if t._version == version:
                    continue
                if id(t) in self._buffer_values:
                    t.copy_(self._buffer_values[id(t)])
                elif t.device.type != "meta":
                    raise RuntimeError(
                        "whale's capture wrote into a parameter of the model; this is a whale bug, "
                        "please report it"
                    )


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[ModelState]:
    """Within the block, forward may run in any tracer; on leaving, the model is as it was.

    Example::

        with preserved_state(model) as state:
            graph = tracer.trace(model)
            reassigned = state.assigned()
    """
    state = ModelState(model)
    try:
        yield state
    finally:
        state.restore()


@contextlib.contextmanager
def config_without_cache(model: nn.Module, kwargs: Mapping[str, object]) -> Iterator[None]:
    """``model.config.use_cache`` False while capture runs, where forward has no ``use_cache``
    parameter of its own (transformers' GraniteMoE takes it through ``**kwargs``) and the
    example does not pass it: the cache object the default returns cannot be exported, and
    ``use_cache=False`` passed through ``**kwargs`` would make export fix the batch size.
    Restored after. Forward's own ``use_cache`` is set as an input instead
    (``graph_io.training_defaults``)."""
    config = getattr(model, "config", None)
    try:
        named = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        named = True
    if getattr(config, "use_cache", None) is not True or named or "use_cache" in kwargs:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _is_tensor_like(value: object) -> bool:
    return isinstance(value, (torch.Tensor, torch.fx.Proxy))


def _copy_container(value: object) -> object | None:
    if isinstance(value, (dict, set, list)):
        return value.copy()
    return None


def _restore_container(target: object, saved: object) -> None:
    if isinstance(target, dict):
        target.clear()
        target.update(saved)
    elif isinstance(target, set):
        target.clear()
        target.update(saved)
    elif isinstance(target, list):
        target[:] = saved
