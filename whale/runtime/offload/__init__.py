"""Granular offload (``Config(offload=...)``): optimizer state, and parameters, in a slower tier."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ...config import Config
from .layered import OFFLOAD_MODES, Offload, layer_key
from .tier import TierBlock, check_offload_dir, resident_bytes

__all__ = ["OFFLOAD_MODES", "Offload", "TierBlock", "attach_offload", "check_offload_dir", "layer_key", "resident_bytes"]


def attach_offload(program: object, config: Config, modules: Iterable[nn.Module] = ()) -> Offload | None:
    """The offload of a bound program's parameters (``program.named_parameters()``), or None
    for ``Config(offload="none")``. ``modules`` are the roots whose forward starts the
    parameters' prefetch (``offload="params"``)."""
    if config.offload == "none":
        return None
    directory = check_offload_dir(config.offload_dir)
    return Offload(program.named_parameters(), config.offload, directory, modules)
