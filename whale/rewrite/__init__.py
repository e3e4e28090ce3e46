"""fx rewrite passes: tensor-parallel sharding (``split``) and its communication."""

from .tensor_parallel import ShardedModel, shard_model
from .tp_analysis import TensorParallelAnalysis

__all__ = ["ShardedModel", "TensorParallelAnalysis", "shard_model"]
