"""The cost model's view of a finished :class:`~whale.ir.plan.Plan`: its step time and timeline.

The search scores :class:`~.predict.Candidate` objects and turns the best into a Plan
(:func:`~whale.planner.search.auto.plan_of`); a plan written by annotations never was a
candidate. :func:`candidate_of` goes back from any plan to the candidate it runs, so that the
program can carry its predicted step time and simulated timeline next to the measured ones.

Example::

    profile = profile_model(captured, rows, boundaries=plan.stage_boundaries)
    estimate = predict_plan(plan, profile, cluster, rows)
    estimate.prediction.step_time, estimate.timeline
"""

from __future__ import annotations

import dataclasses

from ...ir.cluster_spec import Cluster
from ...ir.plan import Plan
from ...ir.trace import Timeline
from .layers import ModelProfile
from .predict import Candidate, CostModel, CostOptions, Prediction, RankLayout

__all__ = ["PlanEstimate", "candidate_of", "predict_plan"]


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    """A plan's candidate, its prediction and its simulated step."""

    candidate: Candidate
    prediction: Prediction
    timeline: Timeline


def candidate_of(plan: Plan, profile: ModelProfile, global_batch: int) -> Candidate:
    """The candidate ``plan`` runs: its layout, stages, cuts, schedule and rows.

    Args:
        plan: the plan.
        profile: the model's layers; its ``pinned_cuts`` give the stage cuts (build it with
            ``boundaries=plan.stage_boundaries`` or from a model with ``stage()`` annotations).
        global_batch: rows per step.

    Raises:
        ValueError: a pipelined plan whose stage cuts the profile does not know.
    """
    t = plan.tensor_parallel
    pipelines = tuple(
        tuple(tuple(pipe[k : k + t]) for k in range(0, len(pipe), t))
        for pipe in plan.pipelines
    )
    cuts = tuple(profile.pinned_cuts or ())
    if len(cuts) != plan.num_stages - 1:
        raise ValueError(
            f"the plan has {plan.num_stages} stages but the model profile knows {len(cuts)} cuts; "
            f"build the profile with boundaries={list(plan.stage_boundaries)} (the plan's stage "
            "boundaries) or from the annotated model"
        )
    return Candidate(
        layout=RankLayout(tensor_parallel=t, pipelines=pipelines),
        num_stages=plan.num_stages,
        schedule=plan.schedule.name if plan.schedule is not None else "1f1b",
        num_micro_batch=plan.num_micro_batch,
        cuts=cuts,
        rows=tuple(plan.rows(global_batch)),
    )


def predict_plan(
    plan: Plan,
    profile: ModelProfile,
    cluster: Cluster,
    global_batch: int,
    options: CostOptions | None = None,
) -> PlanEstimate:
    """Predict one step of ``plan`` on ``cluster``: step time, memory, simulated timeline.

    Example::

        estimate = predict_plan(plan, profile, parse_cluster("2xCPU", profiles=measured), 16)
        print(f"{estimate.prediction.step_time * 1e3:.1f} ms")
    """
    if cluster.world_size != plan.world_size:
        raise ValueError(
            f"the plan runs on {plan.world_size} ranks but the cluster has {cluster.world_size} "
            f"devices ({cluster}); describe one device per rank"
        )
    candidate = candidate_of(plan, profile, global_batch)
    costs = CostModel(profile, cluster, options or CostOptions())
    prediction = costs.predict(candidate)
    return PlanEstimate(candidate, prediction, costs.timeline(candidate, prediction))
