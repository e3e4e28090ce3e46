"""The top-level API: the only place that wires capture, planner, rewrite and runtime together."""
def init(*a, **k): raise NotImplementedError
def parallelize(*a, **k): raise NotImplementedError
