"""ZeRO over each data-parallel group (``Config.zero_stage``): sharded optimizer state (1),
gradients (2) and parameters (3)."""

from .sharded_params import ShardedParameters
from .sharded_reducer import ShardedReducer
from .zero_shards import ZeroShards

__all__ = ["ShardedParameters", "ShardedReducer", "ZeroShards"]
