"""The pipeline program: stage setup, the step executor and the surface users train."""

from .pipeline_program import PipelineProgram, step_bubble

__all__ = ["PipelineProgram", "step_bubble"]
