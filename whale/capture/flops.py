"""FLOP formulas torch's counter lacks, and a light counter that applies them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

__all__ = ["EXTRA_FLOP_FORMULAS", "FlopCount", "grouped_mm_flops", "sdpa_flops"]


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Same two matmuls as torch's CUDA SDPA formula (causal masks not discounted, as there).
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode counts the CUDA attention kernels but not the one SDPA picks on CPU,
# which is where fake tensors of a CPU (or meta) model dispatch.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}


def grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # Stacked experts: each of the M routed rows of x (M, K) meets one (K, N) expert matrix,
    # 2*K*N FLOPs a row (as aten.mm's formula counts each row).
    if len(x_shape) == 2 and len(w_shape) == 3:
        return 2 * x_shape[0] * x_shape[1] * w_shape[-1]
    return 0


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the aten ops run under it, by torch's own formulas (``flop_registry``).

    What ``FlopCounterMode`` counts, without its per-module breakdown.
    """

    def __init__(self, custom_mapping: Mapping) -> None:
        super().__init__()
        self.total = 0
        self.formulas = {**flop_registry, **{k: shape_wrapper(v) for k, v in custom_mapping.items()}}

    def get_total_flops(self) -> int:
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out
