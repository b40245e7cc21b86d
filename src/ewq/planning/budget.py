"""Budgets: sizes with units, machines and clusters (docs/method.md section 5)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

from ewq.errors import EwqError, SourceNotFoundError

__all__ = [
    "BudgetError",
    "ClusterSpec",
    "LinkSpec",
    "MachineSpec",
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


# The cluster file, declared once: typed, strict records. The sizes, rates and
# durations keep their own parsers (units pydantic does not know); pydantic's
# errors are turned into one line that names the machine or link.


def _parsed(parse: Any) -> BeforeValidator:
    def check(value: Any, info: ValidationInfo) -> Any:
        try:
            return parse(value, info.field_name)
        except BudgetError as exc:
            raise ValueError(str(exc)) from None

    return BeforeValidator(check)


def _speed(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"speed must be a number > 0, got {value!r}")
    return float(value)


def _text(value: Any) -> Any:
    # YAML reads `name: 1` or `host: 10.0.0.2` as a number: a name all the same
    return str(value) if isinstance(value, int | float) else value


_Size = Annotated[int, _parsed(parse_size)]
_Rate = Annotated[float, _parsed(parse_rate)]
_Duration = Annotated[float, _parsed(parse_duration)]
_Text = Annotated[str, BeforeValidator(_text)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSpec(_Spec):
    """A network link: ``{bandwidth: 1Gbit/s, latency: 0.2ms}``."""

    bandwidth: _Rate
    latency: _Duration = 0.0


class PairLinkSpec(LinkSpec):
    """A direct link between two machines of the cluster."""

    between: list[_Text]


class MachineSpec(_Spec):
    name: _Text | None = None  # machine-N (its place in the list) when not given
    memory: _Size
    disk: _Size | None = None
    reserve: _Size | None = None  # the cluster's reserve when not given
    speed: Annotated[float, BeforeValidator(_speed)] = 1.0
    host: _Text | None = None  # host[:port] of its llama.cpp rpc-server
    memory_bandwidth: _Rate | None = None
    network: LinkSpec | None = None  # its link to a switch the machines share


class ClusterSpec(_Spec):
    """A cluster file (YAML)::

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

    reserve: _Size = 0
    machines: list[MachineSpec] = Field(min_length=1)
    links: list[PairLinkSpec] = []


def _where(origin: str, loc: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """'cluster.yaml: machine 2' and the rest of a pydantic location."""
    rest = list(loc)
    if len(rest) > 1 and rest[0] in ("machines", "links") and isinstance(rest[1], int):
        what = "machine" if rest[0] == "machines" else "link"
        return f"{origin}: {what} {rest[1] + 1}", rest[2:]
    return origin, rest


def _spec_error(exc: ValidationError, origin: str) -> BudgetError:
    """The first problem of a cluster file, in one line (unknown keys first: a
    misspelled key also makes its right spelling missing)."""
    errors = exc.errors()
    extra = [e for e in errors if e["type"] in ("extra_forbidden", "invalid_key")]
    if extra:
        where, _ = _where(origin, extra[0]["loc"])
        keys = sorted(
            str(e["loc"][-1]) for e in extra if _where(origin, e["loc"])[0] == where
        )
        return BudgetError(f"{where}: unknown key(s) {', '.join(keys)}")
    first = errors[0]
    where, rest = _where(origin, first["loc"])
    field = ".".join(map(str, rest))
    if first["loc"] == ("machines",) and first["type"] in ("missing", "too_short"):
        return BudgetError(f"{origin}: the cluster has no machines")
    if first["loc"] in ((), ("machines",)):
        return BudgetError(f"{origin}: expected a mapping with a 'machines' list")
    if first["type"] == "missing":
        return BudgetError(f"{where}: '{field}' is required")
    if first["type"] == "value_error":
        return BudgetError(f"{where}: {first['ctx']['error']}")
    if first["type"] == "model_type":
        return BudgetError(
            f"{where}{': ' + field if field else ''}: expected a mapping"
        )
    return BudgetError(f"{where}: {field}: {first['msg']}")


def cluster_from_doc(doc: Any, origin: str = "cluster") -> tuple[Machine, ...]:
    """Machines from a decoded cluster file (:class:`ClusterSpec`)."""
    try:
        spec = ClusterSpec.model_validate(doc)
    except ValidationError as exc:
        raise _spec_error(exc, origin) from None
    out, names = [], set()
    for i, m in enumerate(spec.machines):
        name = m.name if m.name is not None else f"machine-{i + 1}"
        if name in names:
            raise BudgetError(f"{origin}: two machines are named {name!r}")
        names.add(name)
        network = m.network and Link(m.network.bandwidth, m.network.latency)
        reserve = spec.reserve if m.reserve is None else m.reserve
        out.append(
            Machine(
                name,
                m.memory,
                m.disk,
                reserve,
                m.speed,
                m.host,
                m.memory_bandwidth,
                network,
            )
        )
    links = _links(spec, names, origin)
    out = [replace(m, links=links[m.name]) for m in out]
    if any(m.network is not None or m.links for m in out):
        missing = [m.name for m in out if m.memory_bandwidth is None]
        if missing:
            raise BudgetError(
                f"{origin}: machine(s) {', '.join(missing)} need a memory_bandwidth "
                "(e.g. 50GB/s) when the cluster declares a network: the placement "
                "weighs compute time against network time"
            )
    return tuple(out)


def _links(
    spec: ClusterSpec, names: set[str], origin: str
) -> dict[str, tuple[tuple[str, Link], ...]]:
    """Each machine's direct links (to the machines after it in the file's links)."""
    pairs: dict[str, list[tuple[str, Link]]] = {n: [] for n in names}
    for i, lk in enumerate(spec.links):
        where = f"{origin}: link {i + 1}"
        ends = lk.between
        if len(ends) != 2 or any(e not in names for e in ends) or ends[0] == ends[1]:
            raise BudgetError(
                f"{where}: 'between' must name two different machines of the cluster"
            )
        a, b = ends
        if any(other == b for other, _ in pairs[a]):
            raise BudgetError(f"{where}: {a} and {b} are linked twice")
        pairs[a].append((b, Link(lk.bandwidth, lk.latency)))
    return {n: tuple(v) for n, v in pairs.items()}


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
