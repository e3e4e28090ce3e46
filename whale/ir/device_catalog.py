"""The devices whale knows by name: the datasheet table, lookups by name or alias, and the
profile files (format in :mod:`~.devices`) that add devices or stand in for datasheet rows.

Example::

    get_profile("a100_80g").name                 # 'A100-80GB'
    profiles = load_profiles("measured.json")    # written by `whale profile --out`
    get_profile("A100-80GB", profiles)           # the measured one, where the file has it
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping

from .devices import CPU_PROFILE, DeviceProfile

__all__ = [
    "DATASHEET_PROFILES",
    "get_profile",
    "known_device_names",
    "load_profiles",
    "save_profiles",
]

_FORMAT_VERSION = 1
_GiB = 2**30  # NVIDIA's memory "GB" are binary: an "80GB" A100 is five 16 GiB HBM2e stacks


def _gpu(
    name: str,
    gib: int,
    flops: Mapping[str, float],
    bandwidth: float,
    link: str,
    source: str,
    *aliases: str,
) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        memory_bytes=gib * _GiB,
        peak_flops=flops,
        memory_bandwidth=bandwidth,
        intra_link=link,
        source=source,
        aliases=aliases,
    )


_T = 1e12  # TFLOP/s
# fmt: off
DATASHEET_PROFILES: tuple[DeviceProfile, ...] = (
    _gpu("P100-16GB", 16, {"fp32": 10.6 * _T, "fp16": 21.2 * _T}, 732e9, "nvlink1",
         "NVIDIA Tesla P100 datasheet (2016), SXM2 module for NVLink servers",
         "P100", "P100-SXM2-16GB", "Tesla P100-SXM2-16GB"),
    _gpu("V100-16GB", 16, {"fp32": 15.7 * _T, "fp16": 125 * _T}, 900e9, "nvlink2",
         "NVIDIA V100 Tensor Core GPU datasheet (2020), SXM2; fp16 = Tensor Core rate",
         "V100-SXM2-16GB", "Tesla V100-SXM2-16GB"),
    _gpu("V100-32GB", 32, {"fp32": 15.7 * _T, "fp16": 125 * _T}, 900e9, "nvlink2",
         "NVIDIA V100 Tensor Core GPU datasheet (2020), SXM2; fp16 = Tensor Core rate",
         "V100-SXM2-32GB", "Tesla V100-SXM2-32GB"),
    _gpu("T4", 16, {"fp32": 8.1 * _T, "fp16": 65 * _T}, 300e9, "pcie3",
         "NVIDIA T4 Tensor Core GPU datasheet (2019); fp16 = mixed-precision Tensor Core rate",
         "T4-16GB", "Tesla T4"),
    _gpu("A10", 24, {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "fp16": 125 * _T, "bf16": 125 * _T},
         600e9, "pcie4", "NVIDIA A10 Tensor Core GPU datasheet (2021), dense (no sparsity)",
         "A10-24GB", "NVIDIA A10"),
    _gpu("L4", 24, {"fp32": 30.3 * _T, "tf32": 60 * _T, "fp16": 121 * _T, "bf16": 121 * _T,
                    "fp8": 242.5 * _T}, 300e9, "pcie4",
         "NVIDIA L4 Tensor Core GPU datasheet (2023); dense = half the listed sparse figures",
         "L4-24GB", "NVIDIA L4"),
    _gpu("A100-40GB", 40, {"fp32": 19.5 * _T, "tf32": 156 * _T, "fp16": 312 * _T, "bf16": 312 * _T},
         1555e9, "nvlink3",
         "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM4 40GB, dense (no sparsity)",
         "A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"),
    _gpu("A100-80GB", 80, {"fp32": 19.5 * _T, "tf32": 156 * _T, "fp16": 312 * _T, "bf16": 312 * _T},
         2039e9, "nvlink3",
         "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM4 80GB, dense (no sparsity)",
         "A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
    _gpu("H100-80GB", 80, {"fp32": 67 * _T, "tf32": 494.5 * _T, "fp16": 989.5 * _T,
                           "bf16": 989.5 * _T, "fp8": 1979 * _T}, 3.35e12, "nvlink4",
         "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM; dense = half the listed "
         "sparse figures", "H100", "H100-SXM", "H100-SXM5-80GB", "NVIDIA H100 80GB HBM3"),
    _gpu("H200-141GB", 141, {"fp32": 67 * _T, "tf32": 494.5 * _T, "fp16": 989.5 * _T,
                             "bf16": 989.5 * _T, "fp8": 1979 * _T}, 4.8e12, "nvlink4",
         "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM; dense = half the listed "
         "sparse figures", "H200", "H200-SXM", "NVIDIA H200"),
)
# fmt: on
"""Datasheet profiles of common NVIDIA data-center GPUs (SXM modules where both forms exist)."""


def _key(name: str) -> str:
    """Lookup key: lower case, no vendor prefix, no punctuation, ``80gb`` -> ``80g``."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"^(nvidia|tesla)+", "", key)
    return re.sub(r"(\d)gb", r"\1g", key)


def _table(profiles: Mapping[str, DeviceProfile] | Iterable[DeviceProfile] | None) -> dict:
    """Lookup key -> profile: the datasheet and CPU, then ``profiles`` in their place."""
    table: dict[str, DeviceProfile] = {}
    for profile in (*DATASHEET_PROFILES, CPU_PROFILE):
        for name in (profile.name, *profile.aliases):
            table[_key(name)] = profile
    extra = profiles.values() if isinstance(profiles, Mapping) else (profiles or ())
    for profile in extra:
        if not isinstance(profile, DeviceProfile):
            raise TypeError(f"profiles must hold DeviceProfile objects, got {profile!r}")
        replaced = table.get(_key(profile.name))
        if replaced is not None:  # a measured profile stands in for the datasheet row
            table = {k: (profile if v is replaced else v) for k, v in table.items()}
        for name in (profile.name, *profile.aliases):
            table[_key(name)] = profile
    return table


def known_device_names(
    profiles: Mapping[str, DeviceProfile] | Iterable[DeviceProfile] | None = None,
) -> tuple[str, ...]:
    """Canonical names of every profile a lookup can find, datasheet order first."""
    return tuple(dict.fromkeys(p.name for p in _table(profiles).values()))


def get_profile(
    name: str, profiles: Mapping[str, DeviceProfile] | Iterable[DeviceProfile] | None = None
) -> DeviceProfile:
    """Find a device profile by name or alias, ignoring case, spaces, ``-``/``_`` and ``GB``/``G``.

    Args:
        name: e.g. ``"A100-80GB"``, ``"a100_80g"``, ``"NVIDIA A100-SXM4-80GB"``, ``"cpu"``.
        profiles: custom or measured profiles (from :func:`load_profiles`); one whose name
            matches a datasheet row replaces that row.

    Example::

        >>> get_profile("v100_32g").name
        'V100-32GB'

    Raises:
        ValueError: for an unknown name, listing the known names and the closest matches.
    """
    if not isinstance(name, str):
        raise TypeError(f"a device name is a string, got {name!r}")
    table = _table(profiles)
    key = _key(name)
    if key in table:
        return table[key]
    known = known_device_names(profiles)
    starts = sorted({p.name for k, p in table.items() if key and k.startswith(key)})
    close = starts or [table[k].name for k in difflib.get_close_matches(key, list(table), n=3)]
    hint = f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else "."
    raise ValueError(
        f"unknown device type {name!r}{hint} Known devices: {', '.join(known)}. "
        "Describe other devices in a profile file (whale.ir.device_catalog.load_profiles)."
    )


def load_profiles(path: str | os.PathLike, *, require: Iterable[str] = ()) -> dict[str, DeviceProfile]:
    """Read custom or measured device profiles from a JSON file (format in the module docstring).

    Args:
        path: the file.
        require: device names the file must describe (by name or alias, as :func:`get_profile`
            matches them), e.g. the devices of the cluster the profiles are for.

    Returns:
        The profiles by canonical name, in file order; pass them as ``profiles=`` to
        :func:`get_profile` or to the cluster parser.

    Example::

        profiles = load_profiles("measured.json")
        cluster = parse_cluster("node0=8xA100-80GB", profiles=profiles)
    """
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{where} is not valid JSON: {error}; write it with `whale profile --out` or "
            "whale.ir.device_catalog.save_profiles"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read the profile file {where}: {error.strerror or error}") from None
    if not isinstance(data, dict) or set(data) != {"version", "devices"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{where}: a profile file is an object with exactly the keys 'version' and "
            f"'devices', got {keys}"
        )
    if data["version"] != _FORMAT_VERSION:
        raise ValueError(f"{where}: version must be {_FORMAT_VERSION}, got {data['version']!r}")
    if not isinstance(data["devices"], list):
        raise ValueError(f"{where}: 'devices' must be a list of device objects")
    profiles: dict[str, DeviceProfile] = {}
    for index, entry in enumerate(data["devices"]):
        profile = DeviceProfile.from_dict(entry, where=f"{where}: devices[{index}]")
        if profile.name in profiles:
            raise ValueError(f"{where}: devices[{index}] repeats the name {profile.name!r}")
        profiles[profile.name] = profile
    for name in require:
        if not any(_key(name) in {_key(n) for n in (p.name, *p.aliases)} for p in profiles.values()):
            described = [p.name for p in profiles.values()]
            raise ValueError(
                f"{where} has no profile for the device {name!r} (it describes {described}); "
                f"measure that device with `whale profile --out {where}` or use one of those names"
            )
    return profiles


def save_profiles(profiles: Iterable[DeviceProfile], path: str | os.PathLike) -> None:
    """Write profiles in the format :func:`load_profiles` reads."""
    devices = [p.to_dict() for p in profiles]
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"version": _FORMAT_VERSION, "devices": devices}, file, indent=2)
        file.write("\n")
