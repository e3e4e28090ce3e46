"""Planning: cluster specs, cost model, balancing, search, pipeline schedules and the Plan."""

__all__ = []
