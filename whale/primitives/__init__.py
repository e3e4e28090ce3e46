"""The annotations users write: replicate, split, stage, pipeline, cluster."""

from .annotations import (
    Annotation,
    Pipeline,
    Replicate,
    Split,
    Stage,
    VirtualDevices,
    cluster,
    current_scope,
    merge_stacks,
    module_annotations,
    pipeline,
    replicate,
    split,
    stage,
    validate_stack,
)
from .by_name import annotate

__all__ = [
    "Annotation",
    "Pipeline",
    "Replicate",
    "Split",
    "Stage",
    "VirtualDevices",
    "annotate",
    "cluster",
    "current_scope",
    "merge_stacks",
    "module_annotations",
    "pipeline",
    "replicate",
    "split",
    "stage",
    "validate_stack",
]
