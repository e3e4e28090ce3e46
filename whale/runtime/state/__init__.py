"""A program's state beyond a step: sharded checkpoints any plan loads, gradient clipping by the
whole model's norm."""

from .clip import clip_grad_norm

__all__ = ["clip_grad_norm"]
