"""A plan run for real: three llama.cpp RPC workers on loopback, the default model
quantized by a plan for a main machine and those three workers.

What is checked comes from llama.cpp itself (its log of where it put every layer and
how big each buffer is), against the plan; and the cluster's output against the
same file run in one process. Everything binds to 127.0.0.1 and is stopped by the
fixtures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from models import shared_data

pytestmark = pytest.mark.slow

EWQ = [sys.executable, "-m", "ewq"]
PROMPT = "The history of the city begins"


def serve_args(cluster) -> list[str]:
    """`ewq serve PLAN --model MODEL` for the module's cluster."""
    return [*EWQ, "serve", str(cluster["plan"]), "--model", str(cluster["model"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker on {port} exited: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"worker on {port} did not listen")


def start_worker(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*EWQ, "worker", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_listening(port, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three workers, a plan that gives each of them and the main machine blocks
    (mixed precisions: the memory is short), and the model quantized by it."""
    tmp = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    workers = [start_worker(p) for p in ports]
    try:
        (tmp / "cluster.yaml").write_text(
            "machines:\n"
            "  - {name: main, memory: 48MB}\n"
            f"  - {{name: w1, memory: 38MB, host: 127.0.0.1:{ports[0]}}}\n"
            f"  - {{name: w2, memory: 38MB, host: 127.0.0.1:{ports[1]}}}\n"
            f"  - {{name: w3, memory: 142MB, host: 127.0.0.1:{ports[2]}}}\n"
        )
        plan, model = tmp / "plan.json", tmp / "model.gguf"
        for args in (
            [
                "plan",
                "default",
                "--cluster",
                str(tmp / "cluster.yaml"),
                "--context",
                "512",
                "--json",
                str(plan),
            ],
            ["quantize", "default", "--plan", str(plan), "--out", str(model)],
        ):
            done = subprocess.run([*EWQ, *args], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        yield {
            "plan": plan,
            "model": model,
            "ports": ports,
            "workers": workers,
            "tmp": tmp,
        }
    finally:
        for w in workers:
            stop(w)


RUN = r"""
import json, sys
import numpy as np
import llama_cpp
from ewq.planfile import load_plan
from ewq.serve.cluster import load, model_params

plan, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]

def run(llm):
    toks = llm.tokenize(prompt.encode(), add_bos=False)
    out = llm.create_completion(prompt, max_tokens=16, temperature=0)
    window = llm.tokenize(open(sys.argv[4]).read().encode(), add_bos=False)[:128]
    llm.reset(); llm.eval(window)
    s = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    lp = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    return out["choices"][0]["text"], lp

# the workers' buffers are never repacked: the reference runs the same kernels
with model_params(use_extra_bufts=False):
    single = llama_cpp.Llama(model, n_ctx=512, logits_all=True, verbose=False, n_threads=1)
text1, lp1 = run(single)
del single
cm = load(model, load_plan(plan), n_ctx=512, threads=1, logits_all=True, repack=False)
text2, lp2 = run(cm.model)
print(json.dumps({
    "single": text1, "cluster": text2,
    "max_abs_logprob_diff": float(np.abs(lp1 - lp2).max()),
    "report": cm.report(), "ngl": cm.n_gpu_layers, "split": cm.tensor_split,
}))
"""


def test_each_worker_holds_the_plan_share_and_the_output_matches(cluster, tmp_path):
    window = tmp_path / "window.txt"
    valid = shared_data() / "wikitext-2" / "valid.txt"
    window.write_text(valid.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN,
            str(cluster["plan"]),
            str(cluster["model"]),
            PROMPT,
            str(window),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    plan = json.loads(cluster["plan"].read_text())
    n = plan["num_blocks"]
    machines = [m for m in plan["machines"] if m["exec_indices"]]
    assert [m["name"] for m in machines] == ["main", "w1", "w2", "w3"]
    for m, row in zip(machines, got["report"], strict=True):
        assert row["machine"] == m["name"]
        # llama.cpp's layers 0..n-1 are exec_index 2..n+1; its output layer n is
        # the head (exec_index n+2)
        want = sorted(i - 2 for i in m["exec_indices"] if 2 <= i <= n + 2)
        assert row["layers"] == want, (m["name"], row["layers"], want)
        if row["endpoint"] is not None:  # a worker: its buffer is exactly its share
            planned = m["weights_bytes"] / 2**20
            assert row["model_mib"] == pytest.approx(planned, rel=0.05)
            assert row["kv_mib"] == pytest.approx(m["kv_bytes"] / 2**20, rel=0.05)
            # all llama.cpp allocates there stays within what the plan charged
            used = row["model_mib"] + row["kv_mib"] + row["compute_mib"]
            assert used <= m["bytes"] / 2**20 * 1.01
    types = {t["type"] for t in plan["tensors"]}
    assert "Q4_1" in types and types - {"Q4_1"}  # some kept as shipped, some not
    assert got["cluster"] == got["single"] and got["single"].strip()
    assert got["max_abs_logprob_diff"] < 1e-6


def test_a_worker_that_dies_mid_run_is_named_not_a_hang(cluster):
    proc = subprocess.Popen(
        [
            *serve_args(cluster),
            "--ctx",
            "512",
            "--threads",
            "1",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "400",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = cluster["workers"][1]
    try:
        # the placement table is printed once the model is loaded: then kill w2
        first = proc.stdout.readline()
        assert "llama.cpp placement" in first, proc.stderr.read()
        victim.kill()
        victim.wait()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster["workers"][1] = start_worker(cluster["ports"][1])  # for later tests
    assert proc.returncode == 1
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("ewq: error: lost the worker(s) w2")


def test_a_port_in_use_is_one_line(cluster):
    done = subprocess.run(
        [*EWQ, "worker", "--port", str(cluster["ports"][0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"ewq: error: cannot listen on 127.0.0.1:{cluster['ports'][0]}: in use"
    )


def test_an_unreachable_worker_is_one_line(cluster):
    closed = free_port()
    eps = [f"127.0.0.1:{p}" for p in cluster["ports"][:2]] + [f"127.0.0.1:{closed}"]
    done = subprocess.run(
        [
            *serve_args(cluster),
            "--prompt",
            "x",
            "--rpc",
            ",".join(eps),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"ewq: error: cannot reach the worker at 127.0.0.1:{closed}"
    )
    assert len(done.stderr.strip().splitlines()) == 1


class Impostor:
    """Something on a loopback port that is not a worker: it accepts connections and
    either never answers (``reply=None``) or answers ``reply`` and closes."""

    def __init__(self, reply: bytes | None):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.reply, self.held = reply, []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.reply is None:
                self.held.append(conn)  # silent: hold it open
            else:
                conn.recv(64)
                conn.sendall(self.reply)
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def test_the_workers_answer_llama_cpps_hello(cluster):
    """Each real worker answers the handshake with the protocol version of the
    llama.cpp it was built from (7.0.0 in llama-cpp-python 0.3.36's ggml-rpc.h)."""
    from ewq.serve import rpc

    for p in cluster["ports"]:
        assert rpc.hello(f"127.0.0.1:{p}") == (7, 0, 0)


@pytest.mark.parametrize(
    "reply,says",
    [
        (None, "accepts connections but does not answer llama.cpp's RPC hello"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "is not an ewq/llama.cpp RPC worker"),
        (
            (28).to_bytes(8, "little") + bytes([6, 1, 0, 0]) + bytes(24),
            "speaks llama.cpp RPC protocol 6.1.0, this ewq 7.0.0",
        ),
    ],
    ids=["silent", "http", "old-version"],
)
def test_an_impostor_on_a_worker_port_is_one_line(cluster, reply, says):
    """Not a worker (a socket that never answers, an HTTP server, a worker of
    another llama.cpp): serve ends in one line naming the endpoint, within the
    hello's timeout, instead of waiting forever inside llama.cpp."""
    imp = Impostor(reply)
    eps = [f"127.0.0.1:{p}" for p in cluster["ports"][:2]] + [f"127.0.0.1:{imp.port}"]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*serve_args(cluster), "--prompt", "x", "--rpc", ",".join(eps)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        imp.close()
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{imp.port}" in lines[0] and says in lines[0]
    assert time.monotonic() - started < 20


def test_the_plan_and_the_endpoints_must_agree(cluster):
    done = subprocess.run(
        [
            *serve_args(cluster),
            "--prompt",
            "x",
            "--rpc",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 1
    assert "give the 3 worker endpoint(s)" in done.stderr


def test_serve_http_answers_as_the_prompt_mode(cluster):
    """Without --prompt, `ewq serve` is llama-cpp-python's OpenAI-compatible server
    over the same placement; its greedy completion is the prompt mode's."""
    import urllib.request

    common = [*serve_args(cluster), "--threads", "1", "--no-repack"]
    once = subprocess.run(
        [
            *common,
            "--prompt",
            PROMPT,
            "--max-tokens",
            "16",
            "--json",
            str(cluster["tmp"] / "served.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert once.returncode == 0, once.stderr
    expected = json.loads((cluster["tmp"] / "served.json").read_text())["completion"]
    port = free_port()
    proc = subprocess.Popen(
        [*common, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(port, proc, timeout=120)
        body = json.dumps(
            {
                "prompt": PROMPT,
                "max_tokens": 16,
                "temperature": 0,
                "repeat_penalty": 1.0,
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["text"] == expected
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)  # stops by itself


def _serving(cluster, *extra: str) -> subprocess.Popen:
    """`ewq serve --prompt` generating 400 tokens, once the placement is printed
    (the model is loaded over the workers and generation starts)."""
    proc = subprocess.Popen(
        [
            *serve_args(cluster),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "400",
            "--threads",
            "1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:  # the placement table ends with the last worker's row
        if "w3" in line:
            break
    return proc


def test_a_frozen_worker_is_one_line_naming_it(cluster):
    """A worker stopped mid-generation (SIGSTOP: what a network partition looks like
    to llama.cpp's client, which waits without a timeout) ends serve within the
    --rpc-timeout with one line naming it, not a hang."""
    w3 = cluster["workers"][2]
    proc = _serving(cluster, "--rpc-timeout", "3")
    w3.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        w3.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    ep = f"127.0.0.1:{cluster['ports'][2]}"
    assert lines[0].startswith(f"ewq: error: the worker w3 ({ep}) has not answered")
    assert waited < 15


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_serve_while_it_waits_on_a_worker(cluster, sig, code):
    """SIGTERM and Ctrl-C end serve at once even while llama.cpp waits inside C on
    a frozen worker (Python's own handlers never run there)."""
    w3 = cluster["workers"][2]
    proc = _serving(cluster, "--rpc-timeout", "600")
    w3.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    finally:
        w3.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert stderr.strip() == f"ewq: stopped by {signal.Signals(sig).name}"
