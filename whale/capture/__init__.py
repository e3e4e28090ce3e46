"""Graph capture: an annotated model -> a graph with whale's annotations, shapes and costs per node."""

from .errors import CaptureError
from .graph import CapturedModel, NodeInfo, capture, module_annotation_map

__all__ = ["CaptureError", "CapturedModel", "NodeInfo", "capture", "module_annotation_map"]
