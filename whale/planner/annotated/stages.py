"""Planning pipelines: stages over ranks, data-parallel replicas of the pipeline, the schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ...config import Config
from ...primitives import Annotation, Pipeline, Replicate
from .replicas import check_annotations, distinct_annotations, name_annotations, parts_of, split_degree
from ...ir.plan import Plan
from ..schedules.generate import make_schedule

__all__ = ["count_stages", "plan_pipeline"]


def count_stages(scopes: Mapping[str, Sequence[Annotation]], config: Config) -> int:
    """Stages the user asked for: ``stage()`` annotations or ``Config(stage_boundaries)``."""
    annotated = [a for a in distinct_annotations(scopes) if a.kind == "stage"]
    if annotated and config.stage_boundaries:
        raise ValueError(
            f"the model has {len(annotated)} stage() annotations and Config(stage_boundaries="
            f"{list(config.stage_boundaries)}); give the stages one way, not both"
        )
    return len(config.stage_boundaries) + 1 if config.stage_boundaries else len(annotated)


def plan_pipeline(
    scopes: Mapping[str, Sequence[Annotation]],
    world_size: int,
    config: Config,
    *,
    example_rows: int | None = None,
) -> Plan:
    """Plan a pipeline of stages, replicated data parallel over the rest of the world.

    Ranks are laid out as Megatron-LM does: pipeline outermost, tensor parallel innermost.
    Tensor-parallel index ``t`` of position ``p`` of replica ``d`` is rank
    ``(p * dp_degree + d) * tensor_parallel + t``, so a tensor-parallel group and a stage's
    replicas are consecutive ranks (one node under torchrun) and only activations cross nodes.

    Raises:
        ValueError: too few ranks for the stages, a world the pipeline does not divide,
            contradicting micro-batch counts, a bad schedule, or a batch too small.
    """
    check_annotations(scopes, world_size)
    num_stages = count_stages(scopes, config)
    pipes = [a for a in distinct_annotations(scopes) if isinstance(a, Pipeline)]
    if len(pipes) > 1:
        raise ValueError(f"the model has {len(pipes)} pipeline() scopes {pipes}; use one pipeline")
    m = config.num_micro_batch
    if pipes and pipes[0].num_micro_batch is not None:
        if m != 1 and m != pipes[0].num_micro_batch:
            raise ValueError(
                f"{pipes[0]!r} and Config(num_micro_batch={m}) disagree; set the count in one place"
            )
        m = pipes[0].num_micro_batch
    interleaved = config.schedule == "interleaved_1f1b"
    degree = config.pipeline_degree
    if degree is None:
        if interleaved:
            raise ValueError(
                "Config(schedule='interleaved_1f1b') needs pipeline_degree: the ranks per "
                f"pipeline, each running num_stages/pipeline_degree of the {num_stages} stages"
            )
        degree = num_stages
    elif not interleaved and degree != num_stages:
        raise ValueError(
            f"Config(pipeline_degree={degree}) differs from the {num_stages} stages, which only "
            "an interleaved schedule allows; use schedule='interleaved_1f1b' or drop pipeline_degree"
        )
    if degree > world_size:
        raise ValueError(
            f"{num_stages} pipeline stages need {degree} ranks but the world has {world_size}; "
            f"launch at least {degree} processes or use fewer stages"
        )
    tp = split_degree(scopes, world_size // degree if world_size % degree == 0 else 1)
    if world_size % (degree * tp):
        raise ValueError(
            f"pipelines of {degree} positions x {tp} tensor-parallel ranks do not divide the "
            f"world of {world_size}; use a world that is a multiple of {degree * tp}"
        )
    schedule = make_schedule(config.schedule, num_stages, m, degree if interleaved else None)
    dp = world_size // (degree * tp)
    weights = (1.0,) * dp if config.row_weights is None else config.row_weights
    if len(weights) != dp:
        raise ValueError(
            f"Config(row_weights=...) has {len(weights)} entries but there are {dp} pipeline "
            f"replicas ({world_size} ranks / {degree} per pipeline); give one weight per replica"
        )
    counts = {a.device_count for a in distinct_annotations(scopes) if isinstance(a, Replicate) and a.device_count}
    inner = counts.pop() if len(counts) == 1 else dp
    if counts or dp % inner:
        raise ValueError(
            f"replicate(device_count=...) around a pipeline counts pipeline replicas: it must "
            f"divide the {dp} replicas, got {sorted(counts | {inner})}"
        )
    plan = Plan(
        world_size=world_size,
        pipelines=tuple(
            tuple((p * dp + d) * tp + t for p in range(degree) for t in range(tp)) for d in range(dp)
        ),
        row_weights=tuple(float(w) for w in weights),
        replica_groups=tuple(tuple(range(s, s + inner)) for s in range(0, dp, inner)),
        num_micro_batch=m,
        parts=parts_of(scopes, name_annotations(scopes), inner, dp, tp),
        num_stages=num_stages,
        schedule=schedule if num_stages > 1 else None,
        stage_boundaries=tuple(config.stage_boundaries or ()),
        tensor_parallel=tp,
        shard_sizes=tuple(sorted((config.shard_sizes or {}).items())),
    )
    if example_rows is not None:
        rows = plan.rows(example_rows)
        if min(rows) < m:
            raise ValueError(
                f"num_micro_batch={m} is larger than the {min(rows)} rows a replica gets from "
                f"the example batch of {example_rows}; use at least {m * dp} rows or fewer "
                "micro-batches"
            )
    return plan
