"""Bad input to ``parallelize``/``Config`` is named before any process group is used.

These run in the test process with no process group: ``parallelize`` takes the world size from
``WORLD_SIZE`` (as torchrun sets it) when ``wh.init()`` has not run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import whale as wh
from examples.cnn import CNN


@pytest.fixture
def world(monkeypatch):
    assert not dist.is_initialized(), "these tests need the test process to have no group"

    def set_world(n: int) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(n))

    return set_world


def _x(rows: int = 8) -> torch.Tensor:
    return torch.randn(rows, 3, 16, 16)


def test_device_count_must_divide_the_world(world):
    world(4)
    model = wh.annotate(CNN(width=4), {"features": wh.replicate(3)})
    with pytest.raises(ValueError) as info:
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())
    msg = str(info.value)
    assert "'features'" in msg and "does not divide the world of 4" in msg and "[1, 2, 4]" in msg


def test_device_count_larger_than_the_world(world):
    world(2)
    model = wh.annotate(CNN(width=4), {"head": wh.replicate(4)})
    with pytest.raises(ValueError, match=r"asks for 4 devices but the world has 2 ranks"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())


def test_different_device_counts_without_stages(world):
    world(4)
    model = wh.annotate(CNN(width=4), {"features": wh.replicate(2), "head": wh.replicate(4)})
    with pytest.raises(ValueError, match=r"different device counts \[2, 4\]"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())


def test_pipeline_without_stages(world):
    world(2)
    model = wh.annotate(CNN(width=4), {"features": wh.pipeline(4)})
    with pytest.raises(ValueError, match=r"pipeline\(num_micro_batch=4\) at 'features' has no stage"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())


def test_forward_scope_split_is_seen_through_capture(world):
    world(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            with wh.split(2):
                x = self.a(x)
            return self.b(x)

    program = wh.parallelize(Net(), loss_fn=F.mse_loss, example_inputs=torch.randn(4, 4))
    assert program.plan.tensor_parallel == 2
    assert [p.strategy for p in program.plan.parts] == ["replicate", "split"]


def test_example_batch_too_small_for_the_replicas(world):
    world(4)
    with pytest.raises(ValueError, match="a batch of 2 rows cannot be split over 4 replicas"):
        wh.parallelize(CNN(width=4), loss_fn=F.cross_entropy, example_inputs=_x(2))


def test_example_batch_too_small_for_the_micro_batches(world):
    world(2)
    with pytest.raises(ValueError, match="fewer than num_micro_batch=4"):
        wh.parallelize(
            CNN(width=4), loss_fn=F.cross_entropy, example_inputs=_x(6),
            config=wh.Config(num_micro_batch=4),
        )


def test_row_weights_must_match_the_replicas(world):
    world(2)
    with pytest.raises(ValueError, match="has 3 entries but there are 2 data-parallel replicas"):
        wh.parallelize(
            CNN(width=4), loss_fn=F.cross_entropy, example_inputs=_x(),
            config=wh.Config(row_weights=(1, 2, 3)),
        )


def test_cluster_layout_must_cover_the_world(world):
    world(4)
    model = wh.annotate(CNN(width=4), {"": [wh.cluster([[0, 1], [2, 5]]), wh.replicate(2)]})
    with pytest.raises(ValueError, match=r"must hold each rank 0..3 exactly once"):
        wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())


def test_cluster_layout_sets_the_replica_groups(world):
    world(4)
    model = wh.annotate(CNN(width=4), {"": [wh.cluster([[0, 2], [1, 3]]), wh.replicate(2)]})
    program = wh.parallelize(model, loss_fn=F.cross_entropy, example_inputs=_x())
    assert program.plan.replica_groups == ((0, 2), (1, 3))
    (part,) = program.plan.parts
    assert (part.inner_degree, part.outer_degree) == (2, 2)


def test_step_before_init_is_refused(world):
    world(1)
    program = wh.parallelize(CNN(width=4), loss_fn=F.cross_entropy, example_inputs=_x())
    with pytest.raises(RuntimeError, match=r"call wh.init\(\) first"):
        program.step(_x(), torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"num_micro_batch": 0}, ValueError, "num_micro_batch=0"),
        ({"default_strategy": "split"}, ValueError, "default_strategy"),
        ({"grad_comm_dtype": torch.int8}, ValueError, "grad_comm_dtype"),
        ({"loss_reduction": "max"}, ValueError, "loss_reduction"),
        ({"row_weights": (1, -1)}, ValueError, "positive numbers"),
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb"),
    ],
)
def test_bad_config(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        wh.Config(**kwargs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown Config key\(s\) \['micro_batches'\]"):
        wh.Config.from_dict({"micro_batches": 2})
    with pytest.raises(TypeError):
        wh.Config(micro_batches=2)


def test_bad_parallelize_arguments():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        wh.parallelize("model", loss_fn=F.mse_loss)
    with pytest.raises(TypeError, match="must be callable"):
        wh.parallelize(CNN(width=4), loss_fn="mse")
    with pytest.raises(TypeError, match="takes wh.Config or a dict"):
        wh.parallelize(CNN(width=4), loss_fn=F.mse_loss, config=3)


def test_plan_round_trips_through_json(world):
    world(4)
    program = wh.parallelize(
        CNN(width=4), loss_fn=F.cross_entropy, example_inputs=_x(),
        config=wh.Config(row_weights=(1, 2, 3, 2)),
    )
    plan = program.plan
    assert type(plan).from_json(plan.to_json()) == plan
    assert plan.rows(8) == (1, 2, 3, 2)
    assert "rank" in plan.table(8)
