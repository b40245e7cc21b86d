"""A watchdog for work that waits on RPC workers, and signals that always end it.

llama.cpp's RPC client blocks in ``recv`` without a timeout: a worker that is
stopped, or cut off by the network, leaves the serving thread waiting forever
inside C, where Python never runs its SIGINT/SIGTERM handlers. So, while a
``Watchdog`` is active:

* SIGINT and SIGTERM end the process at once with 130 / 143, one line, no traceback
  (nothing is half-written: outputs are written atomically): Python's C-level
  handler, whichever thread the kernel gives the signal to, writes its number to
  the wakeup file descriptor (``signal.set_wakeup_fd``), and a thread of the
  watchdog reading it exits (blocking the signals and ``sigwait`` would not do:
  threads started before, such as the BLAS library's, do not block them);
* the work calls ``beat()`` whenever it makes progress (a tensor sent while
  loading, a token generated); if ``timeout`` seconds pass without one while armed,
  it names the worker the process is waiting on and exits with 1. Which worker:
  Linux shows what each thread of the process is blocked in
  (``/proc/self/task/*/syscall``: the system call and its first argument, the
  socket) and which peer each socket talks to (``/proc/net/tcp``).

A worker that computes one step for longer than ``timeout`` looks the same as a
frozen one to the client (the protocol has no keep-alive), hence the option.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping

__all__ = ["Watchdog", "waited_on"]

_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}
# the system calls a thread waiting on a socket sits in, by Linux's numbers per
# architecture (read, recvfrom, recvmsg): their first argument is the socket
_RECV = {"x86_64": {0, 45, 47}, "aarch64": {63, 207, 212}}.get(
    platform.machine(), set()
)


def _peers() -> dict[str, str]:
    """socket inode -> "ip:port" of its remote end, for this process's TCP sockets."""
    out = {}
    for table in ("/proc/net/tcp",):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            ip_hex, port_hex = f[2].split(":")
            ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
            out[f[9]] = f"{ip}:{int(port_hex, 16)}"
    return out


def waited_on(endpoints: Mapping[str, str]) -> list[str]:
    """The workers (names from ``endpoints``: "ip:port" -> name) that a thread of
    this process is blocked reading from, or [] where Linux does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    peers = None
    found = []
    for tid in tasks:
        try:
            parts = open(f"/proc/self/task/{tid}/syscall").read().split()
        except OSError:
            continue
        if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) not in _RECV:
            continue
        try:
            link = os.readlink(f"/proc/self/fd/{int(parts[1], 16)}")
        except (OSError, ValueError):
            continue
        if not link.startswith("socket:["):
            continue
        peers = peers if peers is not None else _peers()
        peer = peers.get(link[len("socket:[") : -1])
        if peer in endpoints and endpoints[peer] not in found:
            found.append(endpoints[peer])
    return found


class Watchdog:
    """``with Watchdog(timeout, workers) as dog:`` ... ``dog.beat()`` ...;
    ``workers``: endpoint "host:port" -> machine name; ``dog.armed`` says whether
    silence counts (off while idle, e.g. between HTTP requests)."""

    def __init__(self, timeout: float, workers: Mapping[str, str]):
        self.timeout = timeout
        self.workers = dict(workers)
        self.by_ip: dict[str, str] = {}
        for ep, name in self.workers.items():
            host, _, port = ep.rpartition(":")
            try:
                self.by_ip[f"{socket.gethostbyname(host)}:{port}"] = f"{name} ({ep})"
            except OSError:
                continue
        self.armed = True
        self._last = time.monotonic()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handlers: dict = {}
        self._old_fd = -1

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        for sig in _SIGNALS:  # a Python handler, so that the C handler writes the fd
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.SIG_IGN, None):
                self._handlers[sig] = signal.signal(sig, _ignore)
        self._old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for target in (self._signals, self._watch):
            t = threading.Thread(target=target, daemon=True, name="ewq-watchdog")
            t.start()
            self._threads.append(t)
        self.beat()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        signal.set_wakeup_fd(self._old_fd)
        for sig, old in self._handlers.items():
            signal.signal(sig, old)
        os.close(self._write)  # the reader sees the end and returns

    def _signals(self) -> None:
        while True:
            data = os.read(self._read, 1)
            if not data:
                os.close(self._read)
                return
            if data[0] in _SIGNALS:
                sig = signal.Signals(data[0])
                _exit(f"ewq: stopped by {sig.name}", _SIGNALS[sig])

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            if not self.armed or time.monotonic() - self._last < self.timeout:
                continue
            who = waited_on(self.by_ip)
            if who:
                names = ", ".join(who)
                line = (
                    f"ewq: error: the worker {names} has not answered for "
                    f"{self.timeout:g} s (stopped, overloaded, or the network to it "
                    "is down); restart it, or raise --rpc-timeout for slow steps"
                )
            else:
                names = ", ".join(sorted(self.by_ip.values()))
                line = (
                    f"ewq: error: no progress for {self.timeout:g} s while waiting on "
                    f"the workers ({names}); check that each is running, or raise "
                    "--rpc-timeout for slow steps"
                )
            _exit(line, 1)


def _ignore(signum, frame) -> None:
    """Stands in for the default action while the watchdog ends the process."""


def _exit(line: str, code: int) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)
