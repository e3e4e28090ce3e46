"""The cost model against hand-computed values: roofline, memory, collectives, pipelines.

Tolerances: expected values are written as the same arithmetic the formulas do, in a different
order or from rounded decimal literals, so floats are compared with ``rel=1e-12`` (a few ulps);
where the computation is the very same product or quotient the test uses ``==``.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.capture.graph import NodeInfo
from whale.planner.cost import formulas as cost_model_module
from whale.ir.cluster_spec import Link, parse_cluster
from whale.planner.cost.formulas import (
    BACKWARD_FLOPS_FACTOR,
    DEFAULT_EFFICIENCY,
    MemoryEstimate,
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    backward_flops,
    collective_time,
    compute_time,
    node_compute_times,
    pipeline_step_time,
    point_to_point_time,
    reduce_scatter_time,
    training_memory,
)
from whale.ir.device_catalog import get_profile
from whale.planner.schedules.generate import make_schedule
from whale.planner.schedules.simulator import simulate

A100 = get_profile("A100-80GB")
T4 = get_profile("T4")
EPS = 1e-12

# --- compute --------------------------------------------------------------------------------


def test_roofline_compute_bound() -> None:
    # 312 TFLOP at half of A100's 312 TFLOP/s bf16 peak; 1 GB of traffic is negligible.
    assert compute_time(312e12, 1e9, A100, "bf16", efficiency=0.5) == 2.0
    assert compute_time(65e12, 0, T4, "fp16", efficiency=1.0) == 1.0
    assert compute_time(19.5e12, 0, A100, "fp32", efficiency=1.0) == 1.0  # fp32 has no tensor cores


def test_roofline_memory_bound() -> None:
    # An elementwise op: 1 FLOP per 8 bytes is far below A100's ridge point (~153 FLOP/byte).
    bytes_moved = 2.039e12
    assert compute_time(bytes_moved / 8, bytes_moved, A100, "bf16", efficiency=0.5) == 1.0
    assert compute_time(0, 300e9, T4) == 1.0


def test_roofline_is_the_max_of_both_roofs() -> None:
    flops, moved = 1e12, 1e10
    expected = max(flops / (312e12 * 0.25), moved / 2.039e12)
    assert compute_time(flops, moved, A100, "bf16", 0.25) == expected
    assert DEFAULT_EFFICIENCY == 0.5
    assert compute_time(312e12, 0, A100, "bf16") == 2.0  # the default efficiency


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.0, 0.0, A100, "bf16", 0.0), r"efficiency must be in \(0, 1\], got 0.0"),
        ((1.0, 0.0, A100, "bf16", 1.5), r"efficiency must be in \(0, 1\], got 1.5"),
        ((-1.0, 0.0, A100, "bf16", 0.5), "flops must be a finite number >= 0"),
        ((1.0, float("inf"), A100, "bf16", 0.5), "bytes_accessed must be a finite number >= 0"),
        ((1.0, 0.0, get_profile("V100-32GB"), "bf16", 0.5), r"V100-32GB has no bf16 rate"),
        ((1.0, 0.0, A100, "fp8", 0.5), r"A100-80GB has no fp8 rate"),
    ],
)
def test_compute_time_rejects_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_time(*args)


def _node(flops: int, bytes_accessed: int) -> NodeInfo:
    return NodeInfo(
        name="mm",
        op="call_function",
        target="aten.mm.default",
        module_path="fc",
        annotations=(),
        shapes=((1024, 1024),),
        dtypes=("torch.float32",),
        flops=flops,
        bytes_accessed=bytes_accessed,
        param_bytes=0,
        output_bytes=4 * 1024 * 1024,
    )


def test_backward_is_twice_the_forward() -> None:
    assert BACKWARD_FLOPS_FACTOR == 2 and backward_flops(3e9) == 6e9
    # A 4096^3 matmul: 2 * 4096^3 FLOPs over 3 * 4096^2 fp16 values is 1365 FLOP/byte, above
    # a T4's ridge point (65e12 / 300e9 = 217 FLOP/byte): compute bound.
    node = _node(2 * 4096**3, 3 * 2 * 4096**2)
    forward, backward = node_compute_times(node, T4, "fp16", efficiency=1.0)
    assert forward == 2 * 4096**3 / 65e12
    assert backward == 4 * 4096**3 / 65e12
    # A memory-bound node: the backward moves twice the bytes.
    relu = _node(1024**2, 8 * 1024**2)
    forward, backward = node_compute_times(relu, T4, "fp16", efficiency=1.0)
    assert (forward, backward) == (8 * 1024**2 / 300e9, 16 * 1024**2 / 300e9)


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "optimizer", "per_param"),
    [
        ("mixed", "adamw", (2, 2, 12)),  # ZeRO: 16 bytes per parameter
        ("mixed", "adam", (2, 2, 12)),
        ("fp32", "adamw", (4, 4, 8)),
        ("fp32", "sgd", (4, 4, 0)),
        ("fp32", "sgd_momentum", (4, 4, 4)),
        ("mixed", "sgd", (2, 2, 4)),
        ("mixed", "sgd_momentum", (2, 2, 8)),
        ("half", "adamw", (2, 2, 4)),
        ("half", "sgd", (2, 2, 0)),
    ],
)
def test_bytes_per_parameter(precision: str, optimizer: str, per_param: tuple) -> None:
    memory = training_memory(1_000_000, optimizer=optimizer, precision=precision)
    weights, grads, states = per_param
    assert memory == MemoryEstimate(
        parameters=weights * 10**6,
        gradients=grads * 10**6,
        optimizer_states=states * 10**6,
        activations=0,
    )


def test_zero_paper_example() -> None:
    # ZeRO §3.1: a 1.5B-parameter GPT-2 needs 24 GB (16 bytes per parameter) with mixed Adam.
    assert training_memory(1_500_000_000).total == 24_000_000_000


def test_param_bytes_from_a_captured_model() -> None:
    # 4 MB of captured fp32 parameters are 1M parameters.
    assert training_memory(param_bytes=4_000_000) == training_memory(1_000_000)
    assert training_memory(param_bytes=2_000_000, param_dtype="bfloat16").parameters == 2_000_000
    with pytest.raises(ValueError, match="not a whole number of 4-byte fp32 parameters"):
        training_memory(param_bytes=4_000_002)
    with pytest.raises(ValueError, match="exactly one of num_params and param_bytes"):
        training_memory()
    with pytest.raises(ValueError, match="exactly one of num_params and param_bytes"):
        training_memory(10, param_bytes=40)


def test_activations_held_under_the_schedule() -> None:
    # 4 stages, 8 micro-batches: GPipe holds all 8 on every stage, 1F1B holds p - s on stage s.
    gpipe = pipeline_step_time("gpipe", [1.0] * 4, [2.0] * 4, 8)
    one_f_one_b = pipeline_step_time("1f1b", [1.0] * 4, [2.0] * 4, 8)
    assert gpipe.peak_in_flight == (8, 8, 8, 8)
    assert one_f_one_b.peak_in_flight == (4, 3, 2, 1)
    per_micro_batch = 3 * 2**30
    held = [
        training_memory(
            250_000_000, activation_bytes=per_micro_batch, in_flight=result.peak_in_flight[0]
        )
        for result in (gpipe, one_f_one_b)
    ]
    assert [m.activations for m in held] == [8 * per_micro_batch, 4 * per_micro_batch]
    assert held[0].total - held[1].total == 4 * per_micro_batch
    assert held[1].total == 16 * 250_000_000 + 4 * per_micro_batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "lamb"}, r"unknown optimizer 'lamb'; use one of \['adam', 'adamw'"),
        ({"precision": "fp8"}, r"unknown precision 'fp8'; use one of \['fp32', 'mixed', 'half'\]"),
        ({"activation_bytes": -1}, "activation_bytes must be an int >= 0, got -1"),
        ({"in_flight": 1.5}, "in_flight must be an int >= 0, got 1.5"),
    ],
)
def test_training_memory_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        training_memory(1000, **kwargs)


# --- communication --------------------------------------------------------------------------

LINK = Link(kind="network", bandwidth=1e9, latency=1e-5)


def test_collectives_by_hand() -> None:
    # 4 ranks, 4 GB, 1 GB/s, 10 us: a ring step moves 1 GB in 1 s plus 10 us.
    assert all_reduce_time(4e9, 4, LINK) == pytest.approx(6 * 1e-5 + 6.0, rel=EPS)
    assert all_gather_time(4e9, 4, LINK) == pytest.approx(3 * 1e-5 + 3.0, rel=EPS)
    assert reduce_scatter_time(4e9, 4, LINK) == pytest.approx(3 * 1e-5 + 3.0, rel=EPS)
    assert all_to_all_time(4e9, 4, LINK) == pytest.approx(3 * 1e-5 + 3.0, rel=EPS)
    assert point_to_point_time(4e9, LINK) == pytest.approx(1e-5 + 4.0, rel=EPS)
    # 2 ranks: all-reduce is one exchange each way of half the buffer.
    assert all_reduce_time(1e9, 2, LINK) == pytest.approx(2 * 1e-5 + 1.0, rel=EPS)


def test_one_rank_communicates_nothing() -> None:
    for collective in (all_reduce_time, all_gather_time, reduce_scatter_time, all_to_all_time):
        assert collective(1e9, 1, LINK) == 0.0


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0, 1e12, allow_nan=False),
    st.integers(1, 1024),
    st.floats(1e6, 1e12, allow_nan=False),
    st.floats(0, 1e-3, allow_nan=False),
)
def test_all_reduce_is_reduce_scatter_then_all_gather(
    num_bytes: float, ranks: int, bandwidth: float, latency: float
) -> None:
    link = Link(kind="network", bandwidth=bandwidth, latency=latency)
    both = reduce_scatter_time(num_bytes, ranks, link) + all_gather_time(num_bytes, ranks, link)
    assert all_reduce_time(num_bytes, ranks, link) == pytest.approx(both, rel=EPS, abs=1e-300)
    # The bandwidth term never exceeds twice the buffer, whatever the group size.
    assert (
        all_reduce_time(num_bytes, ranks, link) <= 2 * num_bytes / bandwidth + 2 * ranks * latency
    )


def test_collective_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_ranks must be an int >= 1, got 0"):
        all_reduce_time(1.0, 0, LINK)
    with pytest.raises(ValueError, match="num_bytes must be a finite number >= 0, got -1"):
        all_gather_time(-1, 2, LINK)
    with pytest.raises(TypeError, match="link must be a Link"):
        all_to_all_time(1.0, 2, 1e9)


def test_collective_over_a_cluster_uses_the_groups_slowest_link() -> None:
    cluster = parse_cluster("node0=8xA100-80GB,node1=8xA100-80GB;net=100Gbps,lat=5us")
    # Across nodes: 100 Gbps = 12.5 GB/s; latency max(5 us network, 3.4 us NVLink) = 5 us.
    expected = 2 * 15 * 5e-6 + 2 * 15 / 16 * 1e9 / 12.5e9
    assert collective_time("all_reduce", 1e9, cluster, range(16)) == pytest.approx(
        expected, rel=EPS
    )
    # Inside node0: NVLink 3 at 300 GB/s each way, 3.4 us per step (NCCL's ring latency).
    expected = 2 * 7 * 3.4e-6 + 2 * 7 / 8 * 1e9 / 300e9
    assert collective_time("all_reduce", 1e9, cluster, range(8)) == pytest.approx(expected, rel=EPS)
    expected = 1 * 5e-6 + 1 / 2 * 1e9 / 12.5e9
    assert collective_time("all_gather", 1e9, cluster, [3, 11]) == pytest.approx(expected, rel=EPS)
    assert collective_time("all_to_all", 1e9, cluster, [5, 5]) == 0.0
    with pytest.raises(
        ValueError, match=r"unknown collective 'broadcast'; use one of \['all_reduce'"
    ):
        collective_time("broadcast", 1e9, cluster, range(4))


def test_heterogeneous_group_is_paced_by_its_slowest_member() -> None:
    cluster = parse_cluster("a=4xT4,b=4xA100-80GB;net=400Gbps,lat=2us")
    # T4's PCIe Gen3 (16 GB/s each way) is slower than the 50 GB/s network.
    expected = 2 * 7 * 5.7e-6 + 2 * 7 / 8 * 8e9 / 16e9
    assert collective_time("all_reduce", 8e9, cluster, range(8)) == pytest.approx(expected, rel=EPS)
    p2p = point_to_point_time(1e8, cluster.link(3, 4))
    assert p2p == pytest.approx(2e-6 + 1e8 / 50e9, rel=EPS)


# --- pipelines ------------------------------------------------------------------------------


def test_gpipe_step_and_bubble_by_hand() -> None:
    p, m, f, b = 4, 8, 1.0, 2.0
    result = pipeline_step_time("gpipe", [f] * p, [b] * p, m)
    assert result.step_time == (m + p - 1) * (f + b)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), rel=EPS)
    # Async p2p: the forward and the backward each cross p - 1 boundaries once more.
    c = 0.5
    result = pipeline_step_time("gpipe", [f] * p, [b] * p, m, p2p_time=c)
    assert result.step_time == (m + p - 1) * (f + b) + 2 * (p - 1) * c


def test_1f1b_has_gpipes_step_time_and_less_memory() -> None:
    result = pipeline_step_time("1f1b", [1.0] * 4, [2.0] * 4, 8)
    assert result.step_time == 33.0
    assert result.bubble_fraction == pytest.approx(3 / 11, rel=EPS)


def test_interleaved_bubble_shrinks_by_the_chunk_count() -> None:
    # 4 ranks x 2 chunks: each rank computes 2 * 8 * 3 = 48; the fill costs (p - 1)(f + b) = 9.
    result = pipeline_step_time("interleaved_1f1b", [1.0] * 8, [2.0] * 8, 8, num_ranks=4)
    assert result.step_time == 48 + 9
    assert result.bubble_fraction == pytest.approx(4 * 9 / (4 * 57), rel=EPS)


def test_uneven_stages_match_the_simulator() -> None:
    forward, backward, links = [1.0, 1.5, 0.5], [2.0, 3.5, 1.0], [0.25, 0.125]
    result = pipeline_step_time("1f1b", forward, backward, 6, p2p_time=links)
    direct = simulate(make_schedule("1f1b", 3, 6), forward, backward, links)
    assert result == direct
    # The slowest stage bounds the step from below: it runs all its micro-batches.
    assert result.step_time >= 6 * (1.5 + 3.5)
    blocking = pipeline_step_time("1f1b", forward, backward, 6, p2p_time=links, blocking=True)
    assert blocking.step_time >= result.step_time


def test_pipeline_step_time_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 forward and 2 backward stage times"):
        pipeline_step_time("gpipe", [1.0] * 3, [2.0] * 2, 4)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        pipeline_step_time("zb", [1.0] * 3, [2.0] * 3, 4)
    with pytest.raises(ValueError, match=r"p2p_time=\.\.\.\) has 1 entries"):
        pipeline_step_time("gpipe", [1.0] * 3, [2.0] * 3, 4, p2p_time=[0.1])


def test_docstring_examples() -> None:
    extra = {"get_profile": get_profile, "Link": Link}
    result = doctest.testmod(cost_model_module, extraglobs=extra)
    assert result.failed == 0 and result.attempted > 0
