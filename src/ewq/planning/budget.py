"""Budgets: sizes with units, machines and clusters (METHOD.md section 5)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ewq.errors import EwqError, SourceNotFoundError

__all__ = [
    "BudgetError",
    "Link",
    "Machine",
    "load_cluster",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "single_machine",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_MAX_SIZE = float(2**60)  # 1 EiB
_SIZE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


class BudgetError(EwqError):
    """A size, machine or cluster file that cannot be used."""


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes from '8GB', '7.5 GiB', '512MiB', '1e9' or a number (bytes).

    KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
    """
    if isinstance(text, bool):
        raise BudgetError(f"{what}: {text!r} is not a size")
    if isinstance(text, int) and not text < _MAX_SIZE:  # float() would overflow
        raise BudgetError(f"{what}: {text} is larger than any machine (max 1 EiB)")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise BudgetError(
                f"{what}: cannot read {text!r} as a size (examples: 8GB, 7.5GiB, 512MiB)"
            )
        value, unit = float(m.group(1)), m.group(2).upper()
        if unit not in _UNITS:
            raise BudgetError(
                f"{what}: unknown unit {m.group(2)!r} in {text!r} (B, KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB)"
            )
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"{what}: {text!r} is negative or not a number")
    size = value * _UNITS[unit]
    if not size < _MAX_SIZE:
        raise BudgetError(f"{what}: {text!r} is larger than any machine (max 1 EiB)")
    return int(size)


_BITS = {"BIT": 1 / 8, "KBIT": 10**3 / 8, "MBIT": 10**6 / 8, "GBIT": 10**9 / 8}
_BITS |= {"TBIT": 10**12 / 8, "BPS": 1 / 8, "KBPS": 10**3 / 8, "MBPS": 10**6 / 8}
_BITS |= {"GBPS": 10**9 / 8}
_SECONDS = {"S": 1.0, "MS": 1e-3, "US": 1e-6, "NS": 1e-9}


def parse_rate(text: str | int | float, what: str = "bandwidth") -> float:
    """Bytes per second from '25GB/s', '1Gbit/s', '10Gbps', '800MiB/s' or a number."""
    if isinstance(text, str):
        t = text.strip()
        if t.lower().endswith("/s"):
            t = t[:-2]
        m = _SIZE.match(t)
        if m and m.group(2).upper() in _BITS:
            rate = float(m.group(1)) * _BITS[m.group(2).upper()]
        else:
            rate = float(parse_size(t, what))
    else:
        rate = float(parse_size(text, what))
    if not rate > 0:
        raise BudgetError(f"{what}: {text!r} must be more than 0 per second")
    return rate


def parse_duration(text: str | int | float, what: str = "latency") -> float:
    """Seconds from '0.2ms', '50us', '1s' or a number of seconds."""
    if isinstance(text, bool):
        raise BudgetError(f"{what}: {text!r} is not a duration")
    if isinstance(text, int | float):
        value, unit = float(text), "S"
    else:
        m = _SIZE.match(str(text))
        if not m or (m.group(2) or "s").upper() not in _SECONDS:
            raise BudgetError(
                f"{what}: cannot read {text!r} as a duration (examples: 0.2ms, 50us, 1s)"
            )
        value, unit = float(m.group(1)), (m.group(2) or "s").upper()
    seconds = value * _SECONDS[unit]
    if not (math.isfinite(seconds) and 0 <= seconds < 3600):
        raise BudgetError(f"{what}: {text!r} must be between 0 and an hour")
    return seconds


@dataclass(frozen=True)
class Link:
    """A network link: bytes per second and seconds of latency per message."""

    bandwidth: float
    latency: float = 0.0


@dataclass(frozen=True)
class Machine:
    """One machine. Its capacity is min(memory, disk) less the reserve."""

    name: str
    memory: int
    disk: int | None = None
    reserve: int = 0
    speed: float = 1.0
    host: str | None = None  # for llama.cpp RPC: host[:port] of its rpc-server
    memory_bandwidth: float | None = None  # bytes/s, for the time per token
    network: Link | None = None  # its link to a switch every such machine shares
    links: tuple[tuple[str, Link], ...] = ()  # direct links: (other machine, link)

    @property
    def capacity(self) -> int:
        room = self.memory if self.disk is None else min(self.memory, self.disk)
        return max(0, room - self.reserve)


def single_machine(
    memory: str, disk: str | None = None, reserve: str | None = None
) -> Machine:
    return Machine(
        name="local",
        memory=parse_size(memory, "--memory"),
        disk=parse_size(disk, "--disk") if disk is not None else None,
        reserve=parse_size(reserve, "--reserve") if reserve is not None else 0,
    )


_MACHINE_KEYS = {
    "name",
    "memory",
    "disk",
    "reserve",
    "speed",
    "host",
    "memory_bandwidth",
    "network",
}


def _link(doc: Any, where: str) -> Link:
    if not isinstance(doc, dict) or "bandwidth" not in doc:
        raise BudgetError(f"{where}: expected {{bandwidth: 1Gbit/s, latency: 0.2ms}}")
    unknown = set(doc) - {"bandwidth", "latency", "between"}
    if unknown:
        raise BudgetError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}"
        )
    return Link(
        parse_rate(doc["bandwidth"], f"{where}: bandwidth"),
        parse_duration(doc.get("latency", 0), f"{where}: latency"),
    )


def cluster_from_doc(doc: Any, origin: str = "cluster") -> tuple[Machine, ...]:
    """Machines from a decoded YAML document::

    reserve: 1GiB            # optional, for every machine
    machines:
      - {name: a, memory: 16GB, disk: 100GB, speed: 1.0, host: 10.0.0.2:50052}
      - {name: b, memory: 8GiB, memory_bandwidth: 50GB/s,
         network: {bandwidth: 1Gbit/s, latency: 0.2ms}}   # its link to a switch
    links:                   # optional: direct links between two machines
      - {between: [a, b], bandwidth: 10Gbit/s, latency: 0.05ms}

    With a network (``network`` or ``links``) every machine needs its
    ``memory_bandwidth``, and the placement chooses the machines' order
    (planning/placement.py).
    """
    if not isinstance(doc, dict):
        raise BudgetError(f"{origin}: expected a mapping with a 'machines' list")
    unknown = set(doc) - {"machines", "reserve", "links"}
    if unknown:
        raise BudgetError(
            f"{origin}: unknown key(s) {', '.join(sorted(map(str, unknown)))}"
        )
    machines = doc.get("machines")
    if not isinstance(machines, list) or not machines:
        raise BudgetError(f"{origin}: the cluster has no machines")
    default_reserve = parse_size(doc.get("reserve", 0), f"{origin}: reserve")
    out, names = [], set()
    for i, m in enumerate(machines):
        where = f"{origin}: machine {i + 1}"
        if not isinstance(m, dict):
            raise BudgetError(f"{where}: expected a mapping")
        unknown = set(m) - _MACHINE_KEYS
        if unknown:
            raise BudgetError(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}"
            )
        if "memory" not in m:
            raise BudgetError(f"{where}: 'memory' is required")
        name = str(m.get("name", f"machine-{i + 1}"))
        if name in names:
            raise BudgetError(f"{origin}: two machines are named {name!r}")
        names.add(name)
        speed = m.get("speed", 1.0)
        if (
            isinstance(speed, bool)
            or not isinstance(speed, int | float)
            or not (math.isfinite(speed) and speed > 0)
        ):
            raise BudgetError(f"{where}: speed must be a number > 0, got {speed!r}")
        out.append(
            Machine(
                name=name,
                memory=parse_size(m["memory"], f"{where}: memory"),
                disk=parse_size(m["disk"], f"{where}: disk") if "disk" in m else None,
                reserve=parse_size(
                    m.get("reserve", default_reserve), f"{where}: reserve"
                ),
                speed=float(speed),
                host=str(m["host"]) if "host" in m else None,
                memory_bandwidth=(
                    parse_rate(m["memory_bandwidth"], f"{where}: memory_bandwidth")
                    if "memory_bandwidth" in m
                    else None
                ),
                network=(
                    _link(m["network"], f"{where}: network") if "network" in m else None
                ),
            )
        )
    links = doc.get("links", [])
    if not isinstance(links, list):
        raise BudgetError(f"{origin}: links must be a list")
    pairs: dict[str, list[tuple[str, Link]]] = {m.name: [] for m in out}
    for i, lk in enumerate(links):
        where = f"{origin}: link {i + 1}"
        ends = lk.get("between") if isinstance(lk, dict) else None
        if (
            not isinstance(ends, list)
            or len(ends) != 2
            or any(str(e) not in pairs for e in ends)
            or str(ends[0]) == str(ends[1])
        ):
            raise BudgetError(
                f"{where}: 'between' must name two different machines of the cluster"
            )
        a, b = map(str, ends)
        if any(other == b for other, _ in pairs[a]):
            raise BudgetError(f"{where}: {a} and {b} are linked twice")
        pairs[a].append((b, _link(lk, where)))
    out = [replace(m, links=tuple(pairs[m.name])) for m in out]
    if any(m.network is not None or m.links for m in out):
        missing = [m.name for m in out if m.memory_bandwidth is None]
        if missing:
            raise BudgetError(
                f"{origin}: machine(s) {', '.join(missing)} need a memory_bandwidth "
                "(e.g. 50GB/s) when the cluster declares a network: the placement "
                "weighs compute time against network time"
            )
    return tuple(out)


def load_cluster(path: str | Path, reserve: str | None = None) -> tuple[Machine, ...]:
    """Machines from a cluster YAML file; ``reserve`` (e.g. "1GiB") overrides every
    machine's reserve."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceNotFoundError(f"no such cluster file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetError(f"{path}: cannot read ({exc})") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise BudgetError(f"{path}: not valid YAML ({first})") from None
    except RecursionError:
        raise BudgetError(f"{path}: YAML nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit, a bad date
        raise BudgetError(
            f"{path}: not a cluster file ({str(exc).split(';')[0]})"
        ) from None
    machines = cluster_from_doc(doc, str(path))
    if reserve is None:
        return machines
    extra = parse_size(reserve, "--reserve")
    return tuple(replace(m, reserve=extra) for m in machines)
