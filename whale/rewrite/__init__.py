"""fx rewrite passes: tensor-parallel sharding (``split``) and its communication."""

from .tensor_parallel.shard import ShardedModel, shard_model
from .tensor_parallel.analysis import TensorParallelAnalysis

__all__ = ["ShardedModel", "TensorParallelAnalysis", "shard_model"]
