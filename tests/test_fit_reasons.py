"""A cluster plan that does not fit names the machine that falls short and by how
much, and a plan that leaves a machine without blocks says why; each claim is
checked by planning again with the fix it names (issue: reliability, items 3-4)."""

from __future__ import annotations

import json
import re

from test_cli import run

from ewq import api
from ewq.planning import Machine

MIB = 1 << 20
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": 1 << 30}


def _cluster(tmp_path, *machines: tuple[str, str]) -> str:
    lines = ["machines:"]
    for k, (name, memory) in enumerate(machines):
        host = f", host: 127.0.0.1:{50160 + k}" if k else ""
        lines.append(f"  - {{name: {name}, memory: {memory}{host}}}")
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _bytes(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def _machines(*sizes: tuple[str, int]) -> list[Machine]:
    return [
        Machine(n, b, host=None if not k else f"127.0.0.1:{50160 + k}")
        for k, (n, b) in enumerate(sizes)
    ]


def _error(monkeypatch, capsys, tmp_path, cluster: str, context: str) -> str:
    js = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", "default", "--cluster", cluster,
        "--context", context, "--json", str(js),
    )  # fmt: skip
    assert code == 1 and not js.exists()
    # stderr is not a terminal here: the stage lines ([ewq] ...) come first
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("[ewq] ")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_a_head_no_machine_can_hold_is_named(monkeypatch, capsys, tmp_path):
    """main 100MB, w1 90MB, w2 120MB at 512 tokens: 296 MiB in all is plenty for the
    weights, but the head's machine also holds the logits and compute buffers and a
    copy of the tied embedding; the message names w2 and the bytes it lacks, and
    with those bytes more (not fewer) it fits."""
    cluster = _cluster(tmp_path, ("main", "100MB"), ("w1", "90MB"), ("w2", "120MB"))
    line = _error(monkeypatch, capsys, tmp_path, cluster, "512")
    m = re.search(r"give w2 ([\d.]+ \w+) more", line)
    assert line.startswith("ewq: error: cannot fit default on 3 machines: no machine")
    assert m and "plan a shorter --context" in line
    short = _bytes(m[1])
    base = [("main", 100_000_000), ("w1", 90_000_000)]
    fits = api.plan("default", _machines(*base, ("w2", 120_000_000 + short + 8)),
                    context=512)  # fmt: skip
    assert fits.result.fits
    held = {a.name: a.exec_indices for a in fits.result.assignments}
    assert held["w2"] and held["w2"][-1] == max(fits.result.precision)  # the head
    tight = api.plan("default", _machines(*base, ("w2", 120_000_000 + short - 2048)),
                     context=512)  # fmt: skip
    assert not tight.result.fits


def test_an_embedding_the_serving_machine_cannot_hold(monkeypatch, capsys, tmp_path):
    """main 60MB, w1 300MB at 2048 tokens: everything fits on w1, but llama.cpp keeps
    the input embedding in the serving process (main), so the plan must not leave
    main empty (ewq serve could not run it); the message says what main lacks, and
    with that much more main holds the embedding."""
    cluster = _cluster(tmp_path, ("main", "60MB"), ("w1", "300MB"))
    line = _error(monkeypatch, capsys, tmp_path, cluster, "2048")
    assert (
        "keeps the input embedding in the memory of the process that serves, main"
        in line
    )
    short = _bytes(re.search(r"give main ([\d.]+ \w+) more", line)[1])
    fits = api.plan("default", _machines(("main", 60_000_000 + short + 8), ("w1", 300_000_000)),
                    context=2048)  # fmt: skip
    assert fits.result.fits
    held = {a.name: a.exec_indices for a in fits.result.assignments}
    emb = min(fits.result.precision)
    assert emb in held["main"]
    llama = fits.exports["llama_cpp"]
    assert llama["main"] == "main" and llama["rpc"] == ["127.0.0.1:50161"]


def test_a_machine_left_without_blocks_says_why(monkeypatch, capsys, tmp_path):
    """main 150MB, w1 120MB, w2 150MB: every block fits on main, the head (with its
    buffers and embedding copy) does not fit w1, so w1 is skipped; the plan says so,
    and the numbers it gives are the plan's own: w2's load exceeds w1's room."""
    cluster = _cluster(tmp_path, ("main", "150MB"), ("w1", "120MB"), ("w2", "150MB"))
    js = tmp_path / "plan.json"
    code, out, err = run(
        monkeypatch, capsys, "plan", "default", "--cluster", cluster,
        "--context", "512", "--json", str(js),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(js.read_text())
    by = {m["name"]: m for m in doc["machines"]}
    assert by["w1"]["exec_indices"] == [] and by["w2"]["exec_indices"]
    why = by["w1"]["idle"]
    assert why.startswith("the next block to place, the output head")
    assert "w1 has no block" in " ".join(out.split())
    need = _bytes(re.search(r"head \(([\d.]+ \w+)", why)[1])
    stage = by["main"]["buffers_bytes"]  # what every machine holds for the runtime
    assert abs(need + stage - by["w2"]["bytes"]) < 0.01 * MIB  # w2 holds just that
    room = _bytes(re.search(r"does not fit its ([\d.]+ \w+) of room", why)[1])
    assert abs(room - (by["w1"]["capacity_bytes"] - stage)) < 0.01 * MIB
    assert need > room
    assert "idle" not in by["main"] and "idle" not in by["w2"]
    # the file is a plan `ewq quantize` and `ewq serve` read (the strict reader once
    # refused the "idle" it was written with)
    from ewq.planfile import load_plan

    assert {m.name: m.idle for m in load_plan(js).machines}["w1"] == why
