"""Graph capture: an annotated model -> a graph with whale's annotations, shapes and costs per node."""

from .errors import CaptureError
from .graph import CapturedModel, NodeInfo, capture, module_annotation_map
from .graph_io import GraphIO, split_example_inputs

__all__ = [
    "CaptureError",
    "CapturedModel",
    "GraphIO",
    "NodeInfo",
    "capture",
    "module_annotation_map",
    "split_example_inputs",
]
