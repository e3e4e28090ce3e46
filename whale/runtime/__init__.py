"""Running a Plan: process groups, gradient sync, schedule execution, the programs users train."""

__all__: list[str] = []
