"""The tensor-parallel rewrite (``split``): analysis of the graph, sharding rules, sharded modules."""
