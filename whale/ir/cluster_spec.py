"""Cluster descriptions as text and files: the grammar, units, JSON/YAML, and the model's names.

The data model (:class:`Cluster`, :class:`Node`, :class:`Link`) lives in
:mod:`whale.ir.topology` and is re-exported here. A cluster string::

    cluster  := node ("," node)* [";" option ("," option)*]
    node     := [name "="] devices ["(" option ("," option)* ")"]
    devices  := [count "x"] device ("+" [count "x"] device)*
    option   := key "=" value

* ``name`` defaults to ``node<i>``; ``count`` to 1; ``device`` is any name
  :func:`~whale.ir.device_catalog.get_profile` knows (``A100-80GB``, ``a100_80g``, ``T4``, ``cpu``).
* A node of mixed devices joins runs with ``+``: ``ws=1xA100-80GB+1xT4`` is a workstation
  whose rank 0 is the A100 and rank 1 the T4; its devices share the slowest profile's link.
* Cluster options (after ``;``): ``net=<bandwidth>`` and ``lat=<time>``, the network between
  nodes (default 100 Gbps, 9.6 us).
* Node options (in parentheses): ``net``/``lat`` for that node's own network interface;
  ``link=<kind>`` (``nvlink1``-``nvlink4``, ``pcie3``-``pcie5``, ``shm``), ``intra=<bandwidth>``
  and ``intra_lat=<time>`` for the link between its devices (default: the device profile's).
* A bandwidth is a number and a unit: ``bps``, ``Kbps``, ``Mbps``, ``Gbps``, ``Tbps`` (bits,
  also ``Gb/s``) or ``B/s``, ``KB/s``, ``MB/s``, ``GB/s``, ``TB/s`` (bytes, also ``GBps``).
  A time is a number and ``s``, ``ms``, ``us`` or ``ns``. Whitespace between tokens is ignored.

Example::

    node0=8xA100-80GB,node1=8xV100-32GB(net=25Gbps);net=100Gbps,lat=5us

The JSON form (YAML too when PyYAML is installed) holds the same fields; values are numbers in
bytes/s and seconds, or text with a unit::

    {"nodes": [{"name": "node0", "device": "A100-80GB", "count": 8},
               {"name": "node1", "device": "V100-32GB", "count": 8,
                "network": {"bandwidth": "25Gbps", "latency": "5us"},
                "intra_link": {"kind": "pcie3", "bandwidth": "16GB/s", "latency": "5.7us"}},
               {"name": "ws", "devices": [{"device": "A100-80GB", "count": 1},
                                          {"device": "T4", "count": 1}]}],
     "network": {"bandwidth": "100Gbps", "latency": "5us"},
     "devices": [...custom profiles, in the load_profiles format...]}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from .device_catalog import get_profile
from .devices import INTRA_LINKS, DeviceProfile
from .topology import (
    _NODE_NAME_RE,
    DEFAULT_NETWORK,
    LOOPBACK,
    Cluster,
    Link,
    Node,
    RankDevice,
    format_bandwidth,
    format_cluster,
    format_duration,
    parse_bandwidth,
    parse_duration,
)

__all__ = [
    "DEFAULT_NETWORK",
    "LOOPBACK",
    "MAX_DEVICES",
    "Cluster",
    "ClusterSpecError",
    "Link",
    "Node",
    "RankDevice",
    "check_device_count",
    "cluster_from_dict",
    "cluster_to_dict",
    "format_bandwidth",
    "format_cluster",
    "format_duration",
    "load_cluster",
    "parse_bandwidth",
    "parse_cluster",
    "parse_duration",
]

Profiles = Mapping[str, DeviceProfile] | Iterable[DeviceProfile] | None

MAX_DEVICES = 131_072
"""The most devices a cluster description may hold (2**17, past the largest GPU clusters
built): a count beyond it is a typo, refused before a device list is made for it."""


def check_device_count(count: int, what: str) -> None:
    """Raise ValueError if ``count`` devices (``what`` holds them) exceed :data:`MAX_DEVICES`."""
    if count > MAX_DEVICES:
        raise ValueError(
            f"{what} {count:,} devices, more than whale plans for ({MAX_DEVICES:,}); "
            "check the count (e.g. node0=8xA100-80GB is one node of 8)"
        )


def _datasheet(name: str) -> DeviceProfile | None:
    try:
        return get_profile(name)
    except ValueError:
        return None


def _link_values(link: Link) -> dict[str, str]:
    return {"bandwidth": format_bandwidth(link.bandwidth), "latency": format_duration(link.latency)}


# --- building nodes from options (shared by the string and the JSON form) --------------------


def _link_kind(value: object) -> str:
    if value not in INTRA_LINKS:
        raise ValueError(f"link kind {value!r} is unknown; use one of {list(INTRA_LINKS)}")
    return str(value)


def _number_or(parse: Callable[[str], float]) -> Callable[[object], float]:
    """A converter taking unit text (``"100Gbps"``) or a plain number in SI units."""

    def convert(value: object) -> float:
        if isinstance(value, str):
            return parse(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number or text with a unit, got {value!r}")
        return float(value)

    return convert


_NODE_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "net": _number_or(parse_bandwidth),
    "lat": _number_or(parse_duration),
    "link": _link_kind,
    "intra": _number_or(parse_bandwidth),
    "intra_lat": _number_or(parse_duration),
}
_CLUSTER_OPTIONS = {key: _NODE_OPTIONS[key] for key in ("net", "lat")}


def _node(
    name: str, blocks: list[tuple[DeviceProfile, int]], options: Mapping, network: Link
) -> Node:
    """A node of ``(profile, count)`` runs; ``options`` use the string form's keys, ``network``
    is the cluster's."""
    profile = min((p for p, _ in blocks), key=lambda d: d.intra_link_bandwidth)  # Node.link_profile
    net = None
    if "net" in options or "lat" in options:
        net = Link(
            kind="network",
            bandwidth=options.get("net", network.bandwidth),
            latency=options.get("lat", network.latency),
        )
    intra = None
    if {"link", "intra", "intra_lat"} & set(options):
        kind = options.get("link", profile.intra_link)
        standard = INTRA_LINKS[kind]
        bandwidth = (
            profile.intra_link_bandwidth if kind == profile.intra_link else standard.bandwidth
        )
        intra = Link(
            kind=kind,
            bandwidth=options.get("intra", bandwidth),
            latency=options.get("intra_lat", standard.latency),
        )
    if len(blocks) == 1:  # one type: Node checks the count
        return Node(name=name, device=profile, num_devices=blocks[0][1], intra_link=intra, network=net)
    devices = tuple(p for p, count in blocks for _ in range(count))
    return Node(name=name, devices=devices, intra_link=intra, network=net)


def _cluster_network(options: Mapping) -> Link:
    return Link(
        kind="network",
        bandwidth=options.get("net", DEFAULT_NETWORK.bandwidth),
        latency=options.get("lat", DEFAULT_NETWORK.latency),
    )


# --- the string form ------------------------------------------------------------------------

_EXAMPLE = "node0=8xA100-80GB,node1=8xV100-32GB;net=100Gbps,lat=5us"
_WORD_RE = re.compile(r"[^\s,;=()]+")
_VALUE_RE = re.compile(r"[^\s,;=()]+(?:[^\S\n]+[^\s,;=()]+)*")  # "25 Gbps" is one value


class ClusterSpecError(ValueError):
    """A cluster string that does not parse; ``position`` is the 0-based index of the problem."""

    def __init__(self, problem: str, spec: str, position: int) -> None:
        self.problem, self.spec, self.position = problem, spec, position
        super().__init__(
            f"cannot parse the cluster spec at position {position}: {problem}\n"
            f"  {spec}\n  {' ' * position}^\n"
            f"write [name=]<count>x<device>[+<count>x<device>...][(options)] per node, comma-separated, then optional "
            f"';net=<bandwidth>,lat=<time>', e.g. {_EXAMPLE!r}"
        )


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, problem: str, at: int | None = None) -> NoReturn:
        raise ClusterSpecError(problem, self.text, self.pos if at is None else at)

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos : self.pos + 1]

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def word(self, expected: str, pattern: re.Pattern = _WORD_RE) -> tuple[int, str]:
        self.peek()
        match = pattern.match(self.text, self.pos)
        if match is None:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            self.fail(f"expected {expected}, found {found}")
        self.pos = match.end()
        return match.start(), match.group()

    def options(self, allowed: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        while True:
            at, key = self.word(f"an option ({', '.join(allowed)})")
            if key not in allowed:
                self.fail(f"unknown option {key!r}; the options here are {list(allowed)}", at)
            if key in options:
                self.fail(f"option {key!r} is given twice", at)
            if not self.take("="):
                self.fail(f"expected '=' and a value after {key!r}")
            at, value = self.word(f"a value for {key!r}", _VALUE_RE)
            try:
                options[key] = allowed[key](value)
            except ValueError as error:
                self.fail(str(error), at)
            if not self.take(","):
                return options


def _runs(devices: str, at: int) -> list[tuple[int, str]]:
    """``"1xA100+1xT4"`` at 5 -> ``[(5, "1xA100"), (12, "1xT4")]``: runs and their positions."""
    out = []
    for run in devices.split("+"):
        out.append((at, run))
        at += len(run) + 1
    return out


def _parse_block(
    scan: _Scanner, name: str, devices: str, at_devices: int, profiles: Profiles
) -> tuple[DeviceProfile, int]:
    """One ``[count x] device`` run of node ``name`` starting at ``at_devices``."""
    if not devices:
        scan.fail(f"expected a run of devices such as 1xT4 in node {name!r}, around '+'", at_devices)
    count_text, x, device = re.fullmatch(r"(\d*)([xX]?)(.*)", devices).groups()
    if not x and devices.isdigit():
        scan.fail(
            f"expected 'x' and a device name after the count, e.g. {devices}xA100-80GB",
            at_devices + len(devices),
        )
    if not x:  # no count: one device, the whole word names it
        count_text, device = "", count_text + device
    at_device = at_devices + len(count_text) + len(x)
    if not device:
        scan.fail(
            f"expected a device name after {devices!r}, e.g. {devices or '8x'}A100-80GB",
            at_device,
        )
    # A count of many digits is refused unread (int() refuses over 4,300 digits on its own).
    count = 1 if not count_text else int(count_text) if len(count_text) <= 18 else MAX_DEVICES + 1
    if count < 1:
        scan.fail(f"node {name!r} needs at least one device, got {count}", at_devices)
    if count > MAX_DEVICES:
        scan.fail(
            f"node {name!r} asks for {count_text if len(count_text) <= 18 else f'a {len(count_text)}-digit number of'} devices, more than whale plans for "
            f"({MAX_DEVICES:,}); check the count (e.g. node0=8xA100-80GB is one node of 8)",
            at_devices,
        )
    try:
        profile = get_profile(device, profiles)
    except ValueError as error:
        scan.fail(str(error), at_device)
    return profile, count


def parse_cluster(spec: str, *, profiles: Profiles = None) -> Cluster:
    """Parse a cluster string (grammar in the module docstring).

    Args:
        spec: e.g. ``"node0=8xA100-80GB,node1=8xV100-32GB;net=100Gbps,lat=5us"``.
        profiles: custom or measured device profiles (:func:`~.device_catalog.load_profiles`).

    Example::

        >>> parse_cluster("2xT4,4xcpu").world_size
        6

    Raises:
        ClusterSpecError: a ``ValueError`` naming the position, with a caret under it; an
            unknown device is reported there too, with the known names.
    """
    if not isinstance(spec, str):
        raise TypeError(f"parse_cluster(spec=...) takes a string, got {type(spec).__name__}")
    scan = _Scanner(spec)
    parsed: list[tuple[str, list[tuple[DeviceProfile, int]], dict]] = []
    total = 0
    while True:
        at, first = scan.word("a node such as 'node0=8xA100-80GB'")
        name = f"node{len(parsed)}"
        if scan.take("="):
            if not _NODE_NAME_RE.fullmatch(first):
                scan.fail(
                    f"node name {first!r} must start with a letter or '_' and hold only "
                    "letters, digits, '_', '.' and '-'",
                    at,
                )
            name, (at_devices, devices) = first, scan.word(f"the devices of {first!r}, e.g. 8xT4")
        else:
            at_devices, devices = at, first
        if name in (p[0] for p in parsed):
            default = "" if at_devices != at else f" (the default name of node {len(parsed)})"
            scan.fail(f"node name {name!r}{default} is used twice; name the nodes", at)
        runs = _runs(devices, at_devices)
        while runs[-1][1] == "" or scan.peek() == "+":  # "A + B", "A+ B": runs across spaces
            if runs[-1][1] == "":
                runs.pop()
            else:
                scan.take("+")
            runs += _runs(*reversed(scan.word(f"a run of devices after '+' in node {name!r}, e.g. 1xT4")))
        blocks = [_parse_block(scan, name, run, at_run, profiles) for at_run, run in runs]
        total += sum(count for _, count in blocks)
        if total > MAX_DEVICES:
            scan.fail(
                f"the nodes up to {name!r} hold {total:,} devices, more than whale plans for "
                f"({MAX_DEVICES:,}); check the counts",
                at,
            )
        options = {}
        if scan.take("("):
            options = scan.options(_NODE_OPTIONS)
            if not scan.take(")"):
                scan.fail("expected ')' to close the node options, or ',' and another option")
        parsed.append((name, blocks, options))
        if not scan.take(","):
            break
    cluster_options = scan.options(_CLUSTER_OPTIONS) if scan.take(";") else {}
    if scan.peek():
        scan.fail(
            "expected ',' and an option, or the end of the spec"
            if cluster_options
            else "expected ',' and another node, ';' and the cluster options, or the end"
        )
    network = _cluster_network(cluster_options)
    return Cluster(nodes=tuple(_node(*p, network) for p in parsed), network=network)


# --- the file form --------------------------------------------------------------------------


def _keys(data: object, where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; the keys are {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    return dict(data)


def _options(data: object, where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Options in the string form's keys from a JSON link object (``names``: JSON -> option)."""
    data = _keys(data, where, names)
    try:
        return {names[k]: _NODE_OPTIONS[names[k]](v) for k, v in data.items()}
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """The JSON form of ``cluster``; profiles not in the datasheet table go under ``devices``.

    Example::

        json.dumps(cluster_to_dict(parse_cluster("node0=8xA100-80GB")))
    """
    nodes, custom = [], {}
    for node in cluster.nodes:
        entry: dict[str, Any] = {"name": node.name}
        if node.is_mixed:
            entry["devices"] = [{"device": p.name, "count": n} for p, n in node.blocks]
        else:
            entry["device"], entry["count"] = node.device.name, node.num_devices
        if node.intra_link is not None:
            entry["intra_link"] = {"kind": node.intra_link.kind, **_link_values(node.intra_link)}
        if node.network is not None:
            entry["network"] = _link_values(node.network)
        nodes.append(entry)
        for profile in dict.fromkeys(node.devices):
            if _datasheet(profile.name) != profile:
                custom[profile.name] = profile.to_dict()
    out = {"nodes": nodes, "network": _link_values(cluster.network)}
    return {**out, "devices": list(custom.values())} if custom else out


def cluster_from_dict(
    data: Mapping[str, Any], *, profiles: Profiles = None, where: str = "cluster"
) -> Cluster:
    """Build a cluster from its JSON form (module docstring); unknown keys are rejected."""
    data = _keys(data, where, ("nodes", "network", "devices"), ("nodes",))
    if not isinstance(data.get("devices", []), list) or not isinstance(data["nodes"], list):
        raise ValueError(f"{where}: 'nodes' and 'devices' must be lists of objects")
    known = [*(profiles.values() if isinstance(profiles, Mapping) else profiles or ())]
    known += [
        DeviceProfile.from_dict(d, where=f"{where}: devices[{i}]")
        for i, d in enumerate(data.get("devices", []))
    ]
    link_keys = {"bandwidth": "net", "latency": "lat"}
    network = _cluster_network(_options(data.get("network", {}), f"{where}: network", link_keys))
    nodes = []
    total = 0
    for i, entry in enumerate(data["nodes"]):
        at = f"{where}: nodes[{i}]"
        entry = _keys(entry, at, ("name", "device", "count", "devices", "intra_link", "network"))
        options = _options(entry.get("network", {}), f"{at}: network", link_keys)
        intra_keys = {"kind": "link", "bandwidth": "intra", "latency": "intra_lat"}
        options.update(_options(entry.get("intra_link", {}), f"{at}: intra_link", intra_keys))
        try:
            name = entry.get("name", f"node{i}")
            blocks = _json_blocks(entry, known)
            # Counts are checked before Node makes a device list of that length.
            total += sum(c for _, c in blocks if isinstance(c, int) and not isinstance(c, bool))
            check_device_count(total, "the nodes so far hold")
            nodes.append(_node(name, blocks, options, network))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{at}: {error}") from None
    return Cluster(nodes=tuple(nodes), network=network)


def _json_blocks(entry: Mapping, known: list) -> list[tuple[DeviceProfile, int]]:
    """The ``(profile, count)`` runs of a JSON node: ``device``/``count`` or ``devices``."""
    if "device" not in entry and "devices" not in entry:
        raise ValueError("missing keys ['device'] (or 'devices' for a mixed node)")
    if "devices" in entry and ("device" in entry or "count" in entry):
        raise ValueError(
            "give 'device' (and 'count') for one device type, or 'devices' as a list of "
            '{"device": ..., "count": ...} for a mixed node, not both'
        )
    if "device" in entry:
        return [(get_profile(entry["device"], known), entry.get("count", 1))]
    runs = entry["devices"]
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"'devices' must be a non-empty list of objects, got {runs!r}")
    out = []
    for k, run in enumerate(runs):
        run = _keys(run, f"devices[{k}]", ("device", "count"), ("device",))
        count = run.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"devices[{k}]: count must be an int >= 1, got {count!r}")
        out.append((get_profile(run["device"], known), count))
    return out


def load_cluster(path: str | os.PathLike, *, profiles: Profiles = None) -> Cluster:
    """Read a cluster from a JSON file, or a YAML file (``.yaml``/``.yml``) if PyYAML is installed.

    Example::

        cluster = load_cluster("cluster.json")
    """
    where = os.fspath(path)
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if where.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{where}: reading YAML needs PyYAML, which is not installed; "
                "`pip install pyyaml` or write the cluster as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{where} is not valid YAML: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from None
    return cluster_from_dict(data, profiles=profiles, where=where)
