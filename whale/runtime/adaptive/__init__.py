"""Rebalancing at run time: batch rows follow the speeds the replicas measure (``Config(adaptive_rows=True)``)."""

from .adaptive_rows import AdaptiveRows, check_adaptive_plan, compute_seconds
from .row_balancer import RowBalancer, rows_for_speeds

__all__ = ["AdaptiveRows", "RowBalancer", "check_adaptive_plan", "compute_seconds", "rows_for_speeds"]
