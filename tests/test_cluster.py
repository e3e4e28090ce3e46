"""Device profiles, cluster strings and files, and the links between ranks (no processes).

Exactness: every expected number below is either a datasheet figure typed in by hand or a
product/quotient of such figures that the parser computes exactly (decimal scaling, then one
rounding), so values compare with ``==``.
"""

from __future__ import annotations

import doctest
import json
import math
import pickle
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale.ir import cluster_spec as cluster_module
from whale.ir import devices as devices_module
from whale.ir import topology as topology_module
from whale.ir.cluster_spec import (
    DEFAULT_NETWORK,
    LOOPBACK,
    Cluster,
    ClusterSpecError,
    Link,
    Node,
    cluster_from_dict,
    cluster_to_dict,
    format_bandwidth,
    format_cluster,
    format_duration,
    load_cluster,
    parse_bandwidth,
    parse_cluster,
    parse_duration,
)
from whale.ir.device_catalog import (
    DATASHEET_PROFILES,
    get_profile,
    known_device_names,
    load_profiles,
    save_profiles,
)
from whale.ir.devices import CPU_PROFILE, INTRA_LINKS, DeviceProfile, normalize_dtype

GiB = 2**30
T = 1e12

# --- the datasheet table ----------------------------------------------------------------------

# (name, memory, {dtype: dense peak}, memory bandwidth, intra link): typed from the datasheets.
DATASHEET = [
    ("P100-16GB", 16 * GiB, {"fp32": 10.6 * T, "fp16": 21.2 * T}, 732e9, "nvlink1"),
    ("V100-16GB", 16 * GiB, {"fp32": 15.7 * T, "fp16": 125 * T}, 900e9, "nvlink2"),
    ("V100-32GB", 32 * GiB, {"fp32": 15.7 * T, "fp16": 125 * T}, 900e9, "nvlink2"),
    ("T4", 16 * GiB, {"fp32": 8.1 * T, "fp16": 65 * T}, 300e9, "pcie3"),
    ("A10", 24 * GiB, {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T}, 600e9, "pcie4"),
    ("L4", 24 * GiB, {"fp32": 30.3 * T, "bf16": 121 * T, "fp8": 242.5 * T}, 300e9, "pcie4"),
    ("A100-40GB", 40 * GiB, {"tf32": 156 * T, "bf16": 312 * T}, 1555e9, "nvlink3"),
    ("A100-80GB", 80 * GiB, {"tf32": 156 * T, "bf16": 312 * T}, 2039e9, "nvlink3"),
    (
        "H100-80GB",
        80 * GiB,
        {"fp32": 67 * T, "bf16": 989.5 * T, "fp8": 1979 * T},
        3.35e12,
        "nvlink4",
    ),
    ("H200-141GB", 141 * GiB, {"bf16": 989.5 * T, "fp8": 1979 * T}, 4.8e12, "nvlink4"),
]


@pytest.mark.parametrize(("name", "memory", "peaks", "bandwidth", "link"), DATASHEET)
def test_datasheet_rows(name, memory, peaks, bandwidth, link) -> None:
    profile = get_profile(name)
    assert profile in DATASHEET_PROFILES and profile.name == name
    assert profile.memory_bytes == memory
    assert profile.memory_bandwidth == bandwidth
    assert profile.intra_link == link
    assert profile.intra_link_bandwidth == INTRA_LINKS[link].bandwidth
    for dtype, rate in peaks.items():
        assert profile.peak(dtype) == rate
    assert "datasheet" in profile.source


def test_every_profile_has_positive_numbers_and_a_source() -> None:
    assert len(DATASHEET_PROFILES) >= 10
    for profile in (*DATASHEET_PROFILES, CPU_PROFILE):
        assert profile.memory_bytes > 0 and profile.memory_bandwidth > 0
        assert profile.intra_link_bandwidth > 0
        assert profile.peak("fp32") > 0 and all(rate > 0 for _, rate in profile.peak_flops)
        assert len(profile.source) > 20
    for kind in INTRA_LINKS.values():
        assert kind.bandwidth > 0 and kind.latency > 0 and kind.source
    # Tensor-core rates beat the fp32 rate wherever a 16-bit rate exists.
    for profile in DATASHEET_PROFILES:
        assert profile.peak("fp16") > profile.peak("fp32")


def test_cpu_profile_is_the_nominal_xeon() -> None:
    cpu = get_profile("cpu")
    assert cpu is CPU_PROFILE
    assert cpu.peak("fp32") == 40 * 2.3e9 * 64  # cores x base clock x AVX-512 FLOP/cycle
    assert cpu.memory_bandwidth == 204.8e9  # 8 channels x 3200 MT/s x 8 bytes
    assert cpu.intra_link == "shm" and cpu.dtypes == ("fp32",)


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("A100-80GB", "A100-80GB"),
        ("a100_80g", "A100-80GB"),
        ("a100 80gb", "A100-80GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("V100-32GB", "V100-32GB"),
        ("v100_32g", "V100-32GB"),
        ("Tesla V100-SXM2-16GB", "V100-16GB"),
        ("tesla t4", "T4"),
        ("H100", "H100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("h200", "H200-141GB"),
        ("P100", "P100-16GB"),
        ("CPU", "CPU"),
    ],
)
def test_lookup_by_alias_ignores_case_and_punctuation(alias: str, name: str) -> None:
    assert get_profile(alias).name == name


def test_unknown_device_lists_the_known_names_and_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown device type 'B200'") as info:
        get_profile("B200")
    for known in known_device_names():
        assert known in str(info.value)
    with pytest.raises(ValueError, match="did you mean V100-16GB or V100-32GB"):
        get_profile("V100")
    with pytest.raises(ValueError, match="did you mean A100-80GB"):
        get_profile("A100-80")


def test_peak_of_a_missing_dtype_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"V100-32GB has no bf16 rate.*\['fp32', 'fp16'\]"):
        get_profile("V100-32GB").peak("bfloat16")


def test_normalize_dtype_accepts_torch_names_and_dtypes() -> None:
    torch = pytest.importorskip("torch")
    assert normalize_dtype(torch.bfloat16) == "bf16"
    assert normalize_dtype("float16") == normalize_dtype("half") == "fp16"
    assert normalize_dtype(torch.float8_e4m3fn) == "fp8"
    with pytest.raises(ValueError, match="unknown compute dtype 'int8'"):
        normalize_dtype("int8")


def _profile(**changes) -> DeviceProfile:
    fields = dict(
        name="Gadget-1",
        memory_bytes=8 * GiB,
        peak_flops={"fp32": 1e13, "bf16": 4e13},
        memory_bandwidth=5e11,
        intra_link="pcie4",
        source="test",
    )
    return DeviceProfile(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "bad name"}, "must start with a letter or digit"),
        ({"memory_bytes": 0}, "memory_bytes must be an int > 0"),
        ({"memory_bytes": 1.5e9}, "memory_bytes must be an int > 0"),
        ({"peak_flops": {"bf16": 1e13}}, "needs an 'fp32' rate"),
        ({"peak_flops": {"fp32": -1.0}}, r"peak_flops\['fp32'\] must be a finite number > 0"),
        ({"peak_flops": {"fp32": 1.0, "int4": 2.0}}, "unknown compute dtype 'int4'"),
        ({"intra_link": "nvlink9"}, "intra_link='nvlink9' is unknown"),
        ({"source": " "}, "source must name where the numbers come from"),
    ],
)
def test_profile_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _profile(**changes)


def test_profile_is_hashable_picklable_and_canonical() -> None:
    profile = _profile(peak_flops={"bfloat16": 4e13, "fp32": 1e13})
    assert profile.peak_flops == (("fp32", 1e13), ("bf16", 4e13))  # DTYPES order
    assert profile.intra_link_bandwidth == 32e9  # pcie4's standard
    assert pickle.loads(pickle.dumps(profile)) == profile
    assert len({profile, _profile()}) == 1


# --- profile files ------------------------------------------------------------------------------


def test_profiles_round_trip_and_a_measured_profile_replaces_the_datasheet(tmp_path) -> None:
    measured = DeviceProfile(
        name="A100-80GB",
        memory_bytes=79 * GiB,
        peak_flops={"fp32": 1.8e13, "bf16": 2.5e14},
        memory_bandwidth=1.8e12,
        intra_link="nvlink3",
        intra_link_bandwidth=2.3e11,
        source="measured by whale profile",
    )
    custom = _profile(aliases=("gadget",))
    path = tmp_path / "profiles.json"
    save_profiles([measured, custom], path)
    loaded = load_profiles(path)
    assert list(loaded) == ["A100-80GB", "Gadget-1"]
    assert loaded["A100-80GB"] == measured and loaded["Gadget-1"] == custom
    # Every alias of the datasheet row now finds the measured profile.
    assert get_profile("a100_80g", loaded) is loaded["A100-80GB"]
    assert get_profile("NVIDIA A100-SXM4-80GB", loaded).source == "measured by whale profile"
    assert get_profile("GADGET", loaded) == custom
    assert get_profile("a100_80g").source.startswith("NVIDIA A100")  # without profiles: datasheet
    cluster = parse_cluster("a=2xa100_80g,b=4xgadget", profiles=loaded)
    assert [d.profile for d in cluster.devices()] == [measured] * 2 + [custom] * 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"devices": []}', "exactly the keys 'version' and 'devices'"),
        ('{"version": 2, "devices": []}', "version must be 1"),
        ('{"version": 1, "devices": {}}', "'devices' must be a list"),
        ('{"version": 1, "devices": [{"name": "X"}]}', r"devices\[0\]: missing keys"),
        (
            '{"version": 1, "devices": [{"name": "X", "memory_bytes": 1, "peak_flops": '
            '{"fp32": 1}, "memory_bandwidth": 1, "intra_link": "pcie4", "source": "s", '
            '"colour": "red"}]}',
            r"devices\[0\]: unknown keys \['colour'\]",
        ),
        (
            '{"version": 1, "devices": [{"name": "X", "memory_bytes": "8GB", "peak_flops": '
            '{"fp32": 1}, "memory_bandwidth": 1, "intra_link": "pcie4", "source": "s"}]}',
            r"devices\[0\]: .*memory_bytes must be an int > 0, got '8GB'",
        ),
        (
            '{"version": 1, "devices": [{"name": "X", "memory_bytes": 1, "peak_flops": 1e13, '
            '"memory_bandwidth": 1, "intra_link": "pcie4", "source": "s"}]}',
            "peak_flops must be an object",
        ),
    ],
)
def test_bad_profile_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_profiles(path)


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100Gbps", 12.5e9),
        ("25 Gb/s", 3.125e9),
        ("400Gbps", 50e9),
        ("300GB/s", 300e9),
        ("300GBps", 300e9),
        ("1.5TB/s", 1.5e12),
        ("800Mbps", 100e6),
        ("10kbps", 1250.0),
        ("2e3 B/s", 2000.0),
    ],
)
def test_parse_bandwidth(text: str, value: float) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("5us", 5e-6), ("9.6us", 9.6e-6), ("1.5ms", 1.5e-3), ("300ns", 3e-7), ("0s", 0.0)],
)
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["100", "100Gbit", "fast", "-1Gbps", "1 G bps", ""])
def test_bad_bandwidth(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read bandwidth"):
        parse_bandwidth(text)


def test_format_picks_the_shortest_exact_unit() -> None:
    assert format_bandwidth(12.5e9) == "100Gbps"
    assert format_bandwidth(300e9) == "300GB/s"
    assert format_bandwidth(1.5e12) == "1.5TB/s"
    assert format_duration(5e-6) == "5us"
    assert format_duration(1.2345e-7) == "123.45ns"
    assert format_duration(0.0) == "0s"


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_units_round_trip_exactly(value: float) -> None:
    assert parse_bandwidth(format_bandwidth(value)) == value
    assert parse_duration(format_duration(value)) == value


# --- the cluster string ------------------------------------------------------------------------

EXAMPLE = "node0=8xA100-80GB,node1=8xV100-32GB(net=25Gbps);net=100Gbps,lat=5us"


def test_parse_the_example() -> None:
    cluster = parse_cluster(EXAMPLE)
    a100, v100 = get_profile("A100-80GB"), get_profile("V100-32GB")
    assert cluster.world_size == 16
    assert [n.name for n in cluster.nodes] == ["node0", "node1"]
    ranks = cluster.devices()
    assert [r.rank for r in ranks] == list(range(16))
    assert [r.profile for r in ranks] == [a100] * 8 + [v100] * 8
    assert ranks[9].node.name == "node1" and cluster.node_of(7).name == "node0"
    assert cluster.network == Link(kind="network", bandwidth=12.5e9, latency=5e-6)
    assert cluster.nodes[1].network == Link(kind="network", bandwidth=3.125e9, latency=5e-6)
    assert not cluster.is_homogeneous
    assert cluster.device_types == ("A100-80GB", "V100-32GB")
    assert cluster.ranks_by_device() == {
        "A100-80GB": tuple(range(8)),
        "V100-32GB": tuple(range(8, 16)),
    }


def test_links_between_ranks() -> None:
    cluster = parse_cluster(EXAMPLE)
    assert cluster.link(3, 3) == LOOPBACK
    assert cluster.link(0, 7) == Link(kind="nvlink3", bandwidth=300e9, latency=3.4e-6)
    assert cluster.link(8, 15) == Link(kind="nvlink2", bandwidth=150e9, latency=3.4e-6)
    # Across nodes: the slower interface (node1's 25 Gbps) and the larger latency.
    assert cluster.link(0, 8) == Link(kind="network", bandwidth=3.125e9, latency=5e-6)
    assert cluster.link(0, 8) == cluster.link(8, 0)
    with pytest.raises(ValueError, match=r"rank 16 is not in the cluster, whose ranks are 0\.\.15"):
        cluster.link(0, 16)


def test_group_link_is_the_slowest_link_with_the_largest_latency() -> None:
    cluster = parse_cluster("a=2xT4,b=2xA100-80GB;net=400Gbps,lat=2us")
    assert cluster.group_link([2]) == LOOPBACK
    assert cluster.group_link([2, 3]) == Link(kind="nvlink3", bandwidth=300e9, latency=3.4e-6)
    assert cluster.group_link([1, 2]) == Link(kind="network", bandwidth=50e9, latency=2e-6)
    # T4's PCIe Gen3 (16 GB/s) is slower than the 400 Gbps network; its 5.7 us the largest.
    assert cluster.group_link(range(4)) == Link(kind="pcie3", bandwidth=16e9, latency=5.7e-6)


def test_defaults_names_counts_and_network() -> None:
    cluster = parse_cluster(" 2xT4 , cpu ")
    assert [(n.name, n.num_devices, n.device.name) for n in cluster.nodes] == [
        ("node0", 2, "T4"),
        ("node1", 1, "CPU"),
    ]
    assert (
        cluster.network == DEFAULT_NETWORK == Link(kind="network", bandwidth=12.5e9, latency=9.6e-6)
    )
    assert cluster.nodes[0].intra_link is None and cluster.nodes[0].network is None
    assert cluster.link(0, 1) == Link(kind="pcie3", bandwidth=16e9, latency=5.7e-6)
    assert cluster.link(1, 2) == DEFAULT_NETWORK
    assert parse_cluster("4xA10").is_homogeneous


def test_intra_node_options() -> None:
    # A100s in PCIe slots: the link kind's standard figures, or the numbers given.
    pcie = parse_cluster("box=8xA100-80GB(link=pcie4)")
    assert pcie.link(0, 1) == Link(kind="pcie4", bandwidth=32e9, latency=5.7e-6)
    slow = parse_cluster("box=8xA100-80GB(intra=200GB/s,intra_lat=4us)")
    assert slow.link(0, 1) == Link(kind="nvlink3", bandwidth=200e9, latency=4e-6)
    lat_only = parse_cluster("a=1xT4(lat=20us),b=1xT4;net=10Gbps")
    assert lat_only.link(0, 1) == Link(kind="network", bandwidth=1.25e9, latency=20e-6)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (EXAMPLE, "node0=8xA100-80GB,node1=8xV100-32GB(net=25Gbps,lat=5us);net=100Gbps,lat=5us"),
        ("2xT4", "node0=2xT4"),
        ("x=a100_80g(link=pcie4)", "x=1xA100-80GB(link=pcie4,intra=32GB/s,intra_lat=5.7us)"),
        ("2xT4; net = 25 Gbps", "node0=2xT4;net=25Gbps,lat=9.6us"),
    ],
)
def test_format_is_canonical_and_parses_back(spec: str, expected: str) -> None:
    cluster = parse_cluster(spec)
    assert format_cluster(cluster) == str(cluster) == expected
    assert parse_cluster(expected) == cluster


SYNTAX_ERRORS = [
    # (spec, position of the caret, words of the message)
    ("node0=8xA100-80GB,,node1=8xT4", 18, "expected a node"),
    ("node0=8xA100-80GB node1=8xT4", 18, "expected ',' and another node"),
    ("node0=8x", 8, "expected a device name after '8x'"),
    ("node0=8", 7, "expected 'x' and a device name after the count"),
    ("node0=0xT4", 6, "needs at least one device, got 0"),
    ("9lives=2xT4", 0, "node name '9lives' must start with a letter"),
    ("a=2xT4,a=2xT4", 7, "node name 'a' is used twice"),
    ("node1=2xT4,4xT4", 11, r"node name 'node1' \(the default name of node 1\) is used twice"),
    ("a=2xT4(net=fast)", 11, "cannot read bandwidth 'fast'"),
    ("a=2xT4(net=1Gbps", 16, r"expected '\)' to close the node options"),
    ("a=2xT4(speed=1Gbps)", 7, "unknown option 'speed'"),
    ("a=2xT4(net=1Gbps,net=2Gbps)", 17, "option 'net' is given twice"),
    ("a=2xT4(link=nvlink9)", 12, "link kind 'nvlink9' is unknown"),
    ("a=2xT4;intra=1GB/s", 7, r"unknown option 'intra'; the options here are \['net', 'lat'\]"),
    ("a=2xT4;net=1Gbps;lat=5us", 16, "expected ',' and an option, or the end"),
    ("a=2xT4;lat 5us", 11, "expected '=' and a value after 'lat'"),
    ("", 0, "expected a node such as 'node0=8xA100-80GB', found the end"),
    ("ws=1xA100-80GB+", 15, "expected a run of devices after '\\+' in node 'ws'"),
    ("ws=1xA100-80GB++1xT4", 15, "expected a run of devices such as 1xT4 in node 'ws'"),
    ("ws=+1xT4", 3, "expected a run of devices such as 1xT4 in node 'ws'"),
    ("ws=1xA100-80GB+0xT4", 15, "node 'ws' needs at least one device, got 0"),
    ("ws=1xA100-80GB+2x", 17, "expected a device name after '2x'"),
    ("ws=1xA100-80GB+1xT5", 17, "unknown device type 'T5'"),
]


@pytest.mark.parametrize(("spec", "position", "words"), SYNTAX_ERRORS)
def test_syntax_errors_name_the_position_with_a_caret(spec: str, position: int, words: str) -> None:
    with pytest.raises(ClusterSpecError, match=words) as info:
        parse_cluster(spec)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.position == position
    lines = str(error).splitlines()
    assert f"at position {position}:" in lines[0]
    assert lines[1] == f"  {spec}" and lines[2] == "  " + " " * position + "^"
    assert "e.g. 'node0=8xA100-80GB" in lines[3]


def test_unknown_device_in_a_spec_points_at_it_and_lists_the_known_names() -> None:
    with pytest.raises(ClusterSpecError, match="unknown device type 'B300'") as info:
        parse_cluster("node0=8xA100-80GB,node1=4xB300")
    assert info.value.position == 26
    for known in known_device_names():
        assert known in str(info.value)


def test_spec_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="takes a string, got list"):
        parse_cluster(["8xT4"])


# --- the data model directly ------------------------------------------------------------------


def test_model_validation() -> None:
    t4 = get_profile("T4")
    with pytest.raises(ValueError, match="needs at least one node"):
        Cluster(nodes=())
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        Cluster(nodes=(Node(name="a", device=t4, num_devices=1),) * 2)
    with pytest.raises(ValueError, match="num_devices must be an int >= 1, got 0"):
        Node(name="a", device=t4, num_devices=0)
    with pytest.raises(TypeError, match="device must be a DeviceProfile"):
        Node(name="a", device="T4", num_devices=1)
    with pytest.raises(ValueError, match="is not an intra-node link"):
        Node(name="a", device=t4, num_devices=2, intra_link=DEFAULT_NETWORK)
    with pytest.raises(ValueError, match="only a loopback has infinite bandwidth"):
        Link(kind="network", bandwidth=math.inf, latency=0.0)
    with pytest.raises(ValueError, match="latency must be a finite number >= 0"):
        Link(kind="nvlink3", bandwidth=1e9, latency=-1e-6)
    with pytest.raises(ValueError, match=r"Link\(kind='ethernet'\) is unknown"):
        Link(kind="ethernet", bandwidth=1e9, latency=0.0)
    assert math.copysign(1.0, Link(kind="network", bandwidth=1, latency=-0.0).latency) == 1.0


# --- random clusters: text and JSON round trips -----------------------------------------------

positive = st.floats(min_value=1.0, max_value=1e13, allow_nan=False, allow_infinity=False)
latency = st.floats(min_value=0.0, max_value=1e-2, allow_nan=False, allow_infinity=False)


@st.composite
def links(draw: st.DrawFn, kinds: st.SearchStrategy[str]) -> Link:
    return Link(kind=draw(kinds), bandwidth=draw(positive), latency=draw(latency))


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    names = draw(
        st.lists(
            st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,8}", fullmatch=True),
            min_size=1,
            max_size=5,
            unique=True,
        )
    )
    profiles = st.sampled_from((*DATASHEET_PROFILES, CPU_PROFILE))
    nodes = tuple(
        Node(
            name=name,
            intra_link=draw(st.none() | links(st.sampled_from(tuple(INTRA_LINKS)))),
            network=draw(st.none() | links(st.just("network"))),
            **draw(
                st.fixed_dictionaries({"device": profiles, "num_devices": st.integers(1, 16)})
                | st.fixed_dictionaries({"devices": st.lists(profiles, min_size=2, max_size=6).map(tuple)})
            ),
        )
        for name in names
    )
    network = draw(st.just(DEFAULT_NETWORK) | links(st.just("network")))
    return Cluster(nodes=nodes, network=network)


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_parse_format_round_trip(cluster: Cluster) -> None:
    assert parse_cluster(format_cluster(cluster)) == cluster
    assert cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster)))) == cluster
    assert sum(n.num_devices for n in cluster.nodes) == len(cluster.devices())


# --- cluster files ----------------------------------------------------------------------------

CLUSTER_JSON = {
    "nodes": [
        {"name": "node0", "device": "A100-80GB", "count": 8},
        {
            "name": "node1",
            "device": "v100_32g",
            "count": 8,
            "network": {"bandwidth": "25Gbps"},
            "intra_link": {"kind": "pcie3"},
        },
    ],
    "network": {"bandwidth": 12.5e9, "latency": "5us"},
}


def test_load_cluster_json(tmp_path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(CLUSTER_JSON))
    cluster = load_cluster(path)
    assert cluster == parse_cluster(
        "node0=8xA100-80GB,node1=8xV100-32GB(net=25Gbps,link=pcie3);net=100Gbps,lat=5us"
    )
    assert cluster.link(8, 9) == Link(kind="pcie3", bandwidth=16e9, latency=5.7e-6)


def test_load_cluster_yaml(tmp_path) -> None:
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(CLUSTER_JSON))
    assert load_cluster(path) == load_cluster_from(tmp_path, CLUSTER_JSON)


def load_cluster_from(tmp_path, data) -> Cluster:
    path = tmp_path / "again.json"
    path.write_text(json.dumps(data))
    return load_cluster(path)


def test_yaml_without_pyyaml_says_so(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text("nodes: []\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(ValueError, match=r"reading YAML needs PyYAML.*write the cluster as JSON"):
        load_cluster(path)


def test_custom_devices_travel_inside_the_cluster_file(tmp_path) -> None:
    cluster = parse_cluster("lab=4xGadget-1", profiles=[_profile()])
    data = cluster_to_dict(cluster)
    assert data["devices"] == [_profile().to_dict()]
    path = tmp_path / "lab.json"
    path.write_text(json.dumps(data))
    assert load_cluster(path) == cluster


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": [{"device": "T4"}], "colour": 1}, r"bad.json: unknown keys \['colour'\]"),
        ({"network": {}}, r"bad.json: missing keys \['nodes'\]"),
        ({"nodes": {"device": "T4"}}, "'nodes' and 'devices' must be lists"),
        ({"nodes": [{"count": 2}]}, r"nodes\[0\]: missing keys \['device'\]"),
        ({"nodes": [{"device": "T4", "gpus": 2}]}, r"nodes\[0\]: unknown keys \['gpus'\]"),
        ({"nodes": [{"device": "T5"}]}, r"nodes\[0\]: unknown device type 'T5'.*Known devices"),
        ({"nodes": [{"device": "T4", "count": 0}]}, "num_devices must be an int >= 1, got 0"),
        ({"nodes": [{"device": "T4", "network": {"bandwidth": "x"}}]}, "cannot read bandwidth"),
        ({"nodes": [{"device": "T4", "network": {"kind": "pcie4"}}]}, r"unknown keys \['kind'\]"),
        ({"nodes": [{"device": "T4"}], "network": {"latency": True}}, "a number or text"),
        ({"nodes": [{"device": "T4", "intra_link": {"kind": "nvlink7"}}]}, "nvlink7"),
    ],
)
def test_bad_cluster_files(tmp_path, data: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_cluster(path)


def test_cluster_file_that_is_not_json(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("node0=8xT4")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        load_cluster(path)


def test_docstring_examples() -> None:
    extra = {"get_profile": get_profile, "parse_cluster": parse_cluster}
    for module in (devices_module, topology_module, cluster_module):
        result = doctest.testmod(module, extraglobs=extra)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# --- nodes of mixed device types --------------------------------------------------------------


def test_mixed_node_in_the_string_and_json_forms(tmp_path) -> None:
    a100, t4 = get_profile("A100-80GB"), get_profile("T4")
    cluster = parse_cluster("ws = 1xA100-80GB + 2xT4, node1=2xA100-80GB")
    ws = cluster.nodes[0]
    assert ws.is_mixed and ws.device is None and ws.num_devices == 3
    assert ws.devices == (a100, t4, t4) and ws.blocks == ((a100, 1), (t4, 2))
    assert [d.profile for d in cluster.devices()] == [a100, t4, t4, a100, a100]
    assert cluster.device_types == ("A100-80GB", "T4") and not cluster.is_homogeneous
    assert cluster.ranks_by_device() == {"A100-80GB": (0, 3, 4), "T4": (1, 2)}
    assert ws.device_link.kind == t4.intra_link  # the slower device's link (PCIe)
    assert cluster.link(0, 1) == ws.device_link
    assert format_cluster(cluster) == "ws=1xA100-80GB+2xT4,node1=2xA100-80GB"
    data = cluster_to_dict(cluster)
    assert data["nodes"][0] == {"name": "ws", "devices": [{"device": "A100-80GB", "count": 1},
                                                          {"device": "T4", "count": 2}]}  # fmt: skip
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(data))
    assert load_cluster(path) == cluster
    # Runs of one type make a node of one type.
    assert parse_cluster("a=1xT4+1xT4") == parse_cluster("a=2xT4")
    assert Node(name="a", devices=(t4, t4)) == Node(name="a", device=t4, num_devices=2)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"devices": [{"device": "T4"}], "device": "T4"}, "not both"),
        ({"devices": []}, "'devices' must be a non-empty list"),
        ({"devices": [{"device": "T4", "count": 0}]}, r"devices\[0\]: count must be an int >= 1"),
        ({"devices": [{"device": "T4", "number": 2}]}, r"devices\[0\]: unknown keys \['number'\]"),
        ({"devices": [{"device": "T5"}]}, "unknown device type 'T5'"),
    ],
)
def test_bad_mixed_nodes_in_cluster_files(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"cluster: nodes\[0\]: .*" + message):
        cluster_from_dict({"nodes": [entry]})


def test_node_validation_for_mixed_devices() -> None:
    t4 = get_profile("T4")
    with pytest.raises(ValueError, match="give device and num_devices, or devices"):
        Node(name="a")
    with pytest.raises(ValueError, match="num_devices=3 but devices lists 2 devices"):
        Node(name="a", devices=(t4, t4), num_devices=3)
    with pytest.raises(TypeError, match="a device must be a DeviceProfile"):
        Node(name="a", devices=(t4, "T4"))
