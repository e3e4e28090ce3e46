"""Shallow copies of the modules on the path to some submodules, for passes that change those
submodules for the program without touching the user's model."""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["PathCopies"]


class PathCopies:
    """``copies(path)`` is a shallow copy of ``model.get_submodule(path)`` whose parents, up to
    the root, are copies too (each with its own ``_modules`` dict), so replacing a child or a
    ``forward`` on it leaves ``model`` as it was; every parameter and buffer stays shared.
    ``copies.root`` is the copied model (``copies("")``).

    Example::

        copies = PathCopies(model)
        copies("blocks")._modules["0"] = new_block
        program_model = copies.root
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._copies: dict[str, nn.Module] = {}

    def __call__(self, path: str) -> nn.Module:
        if path not in self._copies:
            module = copy.copy(self._model.get_submodule(path))
            object.__setattr__(module, "_modules", dict(module._modules))
            self._copies[path] = module
            if path:
                parent, _, name = path.rpartition(".")
                self(parent)._modules[name] = module
        return self._copies[path]

    @property
    def root(self) -> nn.Module:
        return self("")
