"""Placement over a network: the search against brute force over every order."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewq.planning.budget import BudgetError, Link, Machine, cluster_from_doc
from ewq.planning.placement import Route, place, token_seconds


def brute(order, sizes, machines, route):
    """Least time over every ordered subset of machines and every split into
    contiguous, non-empty ranges; None when nothing fits."""
    n, best = len(order), None
    for r in range(1, len(machines) + 1):
        for seq in itertools.permutations(range(len(machines)), r):
            for cuts in itertools.combinations(range(1, n), r - 1):
                bounds = (0, *cuts, n)
                stages = [
                    (m, order[a:b])
                    for m, a, b in zip(seq, bounds, bounds[1:], strict=False)
                ]
                ok = True
                for s, (m, idxs) in enumerate(stages):
                    need = sum(sizes[i] for i in idxs)
                    if route.tied and r > 1 and s == r - 1:
                        need += sizes[order[0]]
                    ok &= need <= machines[m].capacity
                if not ok:
                    continue
                t = token_seconds(stages, sizes, machines, route)
                if math.isfinite(t) and (best is None or t < best):
                    best = t
    return best


link_st = st.builds(
    Link,
    st.sampled_from([1e6, 1e7, 1e8, 1e9]),
    st.sampled_from([0.0, 1e-4, 1e-3, 1e-2]),
)


@st.composite
def clusters(draw):
    k = draw(st.integers(1, 4))
    names = [f"m{i}" for i in range(k)]
    machines = []
    for name in names:
        machines.append(
            Machine(
                name,
                draw(st.integers(0, 600)),
                memory_bandwidth=draw(st.sampled_from([1e3, 5e3, 2e4])),
                network=draw(st.none() | link_st),
            )
        )
    pairs = {}
    for a, b in itertools.combinations(range(k), 2):
        if draw(st.booleans()):
            pairs[(a, b)] = draw(link_st)
    out = []
    for i, m in enumerate(machines):
        mine = tuple(
            (names[b if a == i else a], lk)
            for (a, b), lk in pairs.items()
            if a == i  # each pair is declared once, on its first machine
        )
        out.append(Machine(**{**m.__dict__, "links": mine}))
    if not any(m.network or m.links for m in out):  # a network must be declared
        out[0] = Machine(**{**out[0].__dict__, "network": Link(1e9, 0.0)})
    return out


@settings(max_examples=300, deadline=None)
@given(
    clusters(),
    st.lists(st.integers(1, 200), min_size=1, max_size=7),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 10, 10_000]),
)
def test_search_is_the_brute_force_optimum(machines, sizes_, relay, tied, ret):
    order = list(range(1, len(sizes_) + 1))
    sizes = dict(zip(order, sizes_, strict=True))
    params = dict.fromkeys(order, 1)
    route = Route(hop_bytes=100, return_bytes=ret, relay=relay, tied=tied)
    got = place(order, sizes, params, machines, route)
    want = brute(order, sizes, machines, route)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got.seconds == pytest.approx(want, rel=1e-9, abs=1e-12)
    # what it returns is a real pipeline of that time, within every capacity
    stages = [(m, list(idxs)) for m, idxs in got.stages]
    assert [i for _, idxs in stages for i in idxs] == order
    assert token_seconds(stages, sizes, machines, route) == pytest.approx(got.seconds)
    for m, idxs in stages:
        held = sum(sizes[i] for i in idxs) + got.extra.get(m, 0)
        assert held <= machines[m].capacity


def test_a_slow_link_moves_the_pipeline():
    """Three equal machines, a and b on a fast link, c behind a slow one: the model
    needs two machines; the pipeline uses a and b, whatever the file's order."""
    fast, slow = Link(1.25e9, 1e-5), Link(1.25e6, 5e-3)
    m = [
        Machine("c", 600, memory_bandwidth=1e4, links=(("a", slow), ("b", slow))),
        Machine("a", 600, memory_bandwidth=1e4, links=(("b", fast),)),
        Machine("b", 600, memory_bandwidth=1e4),
    ]
    order = list(range(1, 11))
    sizes = dict.fromkeys(order, 100)
    got = place(order, sizes, dict.fromkeys(order, 1), m, Route(hop_bytes=4096))
    assert {m[k].name for k, _ in got.stages} == {"a", "b"}
    # the same cluster without the network: the file's order, c first
    plain = [Machine(x.name, x.memory) for x in m]
    got = place(order, sizes, dict.fromkeys(order, 1), plain, Route())
    assert [plain[k].name for k, _ in got.stages] == ["c", "a"]


def test_relay_prefers_the_main_machine_with_the_best_links():
    """llama.cpp relays through its main machine: with a star of links around b, b
    goes first, even though the file lists a first."""
    lk = Link(1e8, 1e-3)
    m = [
        Machine("a", 300, memory_bandwidth=1e4, links=(("b", lk),)),
        Machine("b", 300, memory_bandwidth=1e4, links=(("c", lk),)),
        Machine("c", 300, memory_bandwidth=1e4),
    ]
    order = list(range(1, 10))
    sizes = dict.fromkeys(order, 100)
    got = place(order, sizes, dict.fromkeys(order, 1), m, Route(100, 100, relay=True))
    assert m[got.stages[0][0]].name == "b"
    assert len(got.stages) == 3


def test_cluster_file_with_a_network():
    machines = cluster_from_doc(
        {
            "machines": [
                {
                    "name": "a",
                    "memory": "8GB",
                    "memory_bandwidth": "50GB/s",
                    "network": {"bandwidth": "1Gbit/s", "latency": "0.2ms"},
                },
                {"name": "b", "memory": "8GB", "memory_bandwidth": "20GiB/s"},
            ],
            "links": [
                {"between": ["a", "b"], "bandwidth": "10Gbps", "latency": "50us"}
            ],
        }
    )
    a, b = machines
    assert a.memory_bandwidth == 50e9 and b.memory_bandwidth == 20 * 2**30
    assert a.network == Link(1e9 / 8, 2e-4)
    ((other, lk),) = a.links
    assert other == "b" and lk.bandwidth == 10e9 / 8
    assert lk.latency == pytest.approx(5e-5)


@pytest.mark.parametrize(
    "doc, message",
    [
        (
            {
                "machines": [
                    {"name": "a", "memory": "1GB", "network": {"bandwidth": "1Gbit/s"}}
                ]
            },
            "need a memory_bandwidth",
        ),
        (
            {
                "machines": [{"name": "a", "memory": "1GB"}],
                "links": [{"between": ["a", "z"], "bandwidth": "1GB/s"}],
            },
            "'between' must name two different machines",
        ),
        (
            {
                "machines": [
                    {"name": "a", "memory": "1GB", "memory_bandwidth": "1GB/s"},
                    {"name": "b", "memory": "1GB", "memory_bandwidth": "1GB/s"},
                ],
                "links": [{"between": ["a", "b"], "bandwidth": "fast"}],
            },
            "bandwidth",
        ),
        (
            {
                "machines": [
                    {"name": "a", "memory": "1GB", "memory_bandwidth": "1GB/s"},
                    {"name": "b", "memory": "1GB", "memory_bandwidth": "1GB/s"},
                ],
                "links": [
                    {"between": ["a", "b"], "bandwidth": "1GB/s", "latency": "-1ms"}
                ],
            },
            "latency",
        ),
        (
            {"machines": [{"name": "a", "memory": "1GB", "memory_bandwidth": "0GB/s"}]},
            "more than 0",
        ),
    ],
)
def test_bad_network(doc, message):
    with pytest.raises(BudgetError, match=message):
        cluster_from_doc(doc)


def test_plan_of_the_default_model_avoids_the_slow_link(tmp_path, monkeypatch, capsys):
    """End to end: the file lists `far` first, behind a 10 Mbit/s link; the model
    fits on `near1` + `near2` (1 Gbit/s between them), so the plan leaves `far` out,
    and llama.cpp's export starts at near1."""
    from test_cli import run

    (tmp_path / "c.yaml").write_text(
        "machines:\n"
        "  - {name: far, memory: 150MB, memory_bandwidth: 20GB/s,"
        " network: {bandwidth: 10Mbit/s, latency: 5ms}}\n"
        "  - {name: near1, memory: 150MB, memory_bandwidth: 20GB/s, host: 10.0.0.2}\n"
        "  - {name: near2, memory: 150MB, memory_bandwidth: 20GB/s, host: 10.0.0.3}\n"
        "links:\n"
        "  - {between: [near1, near2], bandwidth: 1Gbit/s, latency: 0.1ms}\n"
    )
    out = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        "default",
        "--cluster",
        str(tmp_path / "c.yaml"),
        "--context",
        "512",
        "--json",
        str(out),
    )
    assert code == 0, err
    import json

    doc = json.loads(out.read_text())
    used = [m["name"] for m in doc["machines"] if m["exec_indices"]]
    assert "far" not in used and used[0] == "near1"
    assert doc["exports"]["llama_cpp"]["main"] == "near1"
    assert doc["seconds_per_token"] > 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 600), min_size=2, max_size=4),
    st.lists(st.integers(1, 200), min_size=1, max_size=7),
    st.integers(0, 300),
    st.booleans(),
)
def test_llama_cpp_keeps_the_embedding_on_the_first_machine(caps, sizes_, last, tied):
    """llama.cpp keeps the input embedding in the serving process (the first machine
    of a cluster without a network): a placement for its route never moves it to a
    worker; without llama.cpp's rule the same clusters may skip the first machine."""
    machines = [Machine(f"m{i}", c) for i, c in enumerate(caps)]
    order = list(range(1, len(sizes_) + 1))
    sizes = dict(zip(order, sizes_, strict=True))
    params = dict.fromkeys(order, 1)
    route = Route(relay=True, tied=tied, last_bytes=last)
    got = place(order, sizes, params, machines, route)
    free = place(order, sizes, params, machines, Route(tied=tied, last_bytes=last))
    if got is not None:
        assert got.stages[0][0] == 0 and got.stages[0][1][0] == order[0]
    if free is not None and free.stages[0][0] == 0:
        assert got is not None  # the rule only ever refuses skipping the first
