"""llama.cpp's RPC backend, from the library llama-cpp-python ships (built with
``-DGGML_RPC=on`` by scripts/setup.sh): a worker that serves its CPU to a remote
llama.cpp, and the client side that adds such workers as devices.

Why ctypes: llama-cpp-python 0.3.x accepts ``Llama(rpc_servers=...)`` and ignores it
(llama.cpp moved RPC to registered devices), and binds none of the RPC functions.
They are reached the way llama.cpp's own tools reach them (``common/arg.cpp``,
``tools/rpc/rpc-server.cpp``): the "RPC" backend registry's
``ggml_backend_rpc_add_server`` and ``ggml_backend_rpc_start_server`` through
``ggml_backend_reg_get_proc_address``; signatures from the bundled
``ggml/include/ggml-rpc.h``. Client and worker must come from the same build (the
RPC protocol version is checked at the handshake).

ggml stops the process on a broken connection (``GGML_ABORT``); ``on_abort``
replaces that with one line naming the cause and a non-zero exit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from ewq.errors import EwqError

__all__ = [
    "RpcError",
    "add_workers",
    "check_reachable",
    "hello",
    "ipv4",
    "on_abort",
    "split_endpoint",
    "start_worker",
]

_CPU = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_char_p,  # endpoint "host:port" (host: an IPv4 address)
    ctypes.c_char_p,  # cache_dir, or NULL
    ctypes.c_size_t,  # n_threads
    ctypes.c_size_t,  # n_devices
    ctypes.POINTER(ctypes.c_void_p),  # ggml_backend_dev_t devices[]
)
_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

# llama.cpp's RPC handshake, from the ggml-rpc.cpp and ggml-rpc.h that
# llama-cpp-python 0.3.36 vendors: the client sends | cmd 14 (RPC_CMD_HELLO, "must be
# always 14") | uint64 24 | 24 bytes of connection capabilities (zeros: plain TCP) |;
# the server answers | uint64 28 | major, minor, patch, padding, 24 bytes of caps |;
# the client accepts major == 7 and minor <= 0 (RPC_PROTO_MAJOR/MINOR_VERSION).
_HELLO_CMD, _CAPS = 14, 24
PROTOCOL = (7, 0, 0)
HELLO_TIMEOUT = 5.0


class RpcError(EwqError):
    """A worker that cannot be started or reached."""


_lock = threading.Lock()
_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
_keep: list[object] = []  # ctypes callbacks C holds pointers to


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (backend registry) and libggml-base, as llama_cpp loaded them."""
    global _libs
    with _lock:
        if _libs is not None:
            return _libs
        try:
            import llama_cpp
        except ImportError:
            raise RpcError(
                "llama.cpp's RPC backend comes with llama-cpp-python "
                "(scripts/setup.sh builds it with -DGGML_RPC=on)"
            ) from None
        # the copies libllama loaded (by soname): the wheel holds libggml.so and
        # libggml.so.0 as two files, and a second copy has a registry of its own
        del llama_cpp
        ggml = ctypes.CDLL("libggml.so.0")
        base = ctypes.CDLL("libggml-base.so.0")
        ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
        ]
        ggml.ggml_backend_register.restype = None
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        base.ggml_set_abort_callback.restype = ctypes.c_void_p
        base.ggml_set_abort_callback.argtypes = [_ABORT]
        _libs = (ggml, base)
        return _libs


def _proc(name: str) -> int:
    ggml, _ = _load()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError(
            "this llama-cpp-python was built without the RPC backend: reinstall it "
            'with CMAKE_ARGS="-DGGML_RPC=on" (scripts/setup.sh does)'
        )
    fn = ggml.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not fn:
        raise RpcError(f"the RPC backend has no {name}")
    return fn


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """('host', port) from 'host:port'."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"{endpoint!r} is not host:port")
    return host, int(port)


def ipv4(host: str) -> str:
    """The IPv4 address of ``host`` (the RPC server binds IPv4 literals only)."""
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise RpcError(f"cannot resolve {host!r} ({exc.strerror or exc})") from None


def on_abort(describe: Callable[[str], str]) -> None:
    """From now on, a ggml abort (a lost worker, a failed handshake) prints
    ``ewq: error: describe(message)`` and exits with status 1, at once."""
    _, base = _load()

    def handler(message: bytes | None) -> None:
        text = (message or b"").decode("utf-8", "replace").strip()
        try:
            line = describe(text)
        except Exception:  # noqa: BLE001 - the process is going down regardless
            line = text
        sys.stderr.write(f"ewq: error: {' '.join(line.split())}\n")
        sys.stderr.flush()
        os._exit(1)

    cb = _ABORT(handler)
    _keep.append(cb)
    base.ggml_set_abort_callback(cb)


def check_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if a worker accepts connections at ``endpoint``, else why not."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return "no answer"
    except OSError as exc:
        return exc.strerror or str(exc)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            break
        data += part
    return data


def hello(endpoint: str, timeout: float = HELLO_TIMEOUT) -> tuple[int, int, int]:
    """The RPC protocol version the worker at ``endpoint`` answers llama.cpp's hello
    with; raises RpcError, naming the endpoint and what answered, if nothing does
    within ``timeout`` seconds, the answer is not llama.cpp's, or its version is one
    this llama.cpp refuses. (A worker serves one client at a time: check before
    loading, not while a model runs on it.)"""
    host, port = split_endpoint(endpoint)
    start = f"`ewq worker --host 0.0.0.0 --port {port}`"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(
                bytes([_HELLO_CMD]) + _CAPS.to_bytes(8, "little") + bytes(_CAPS)
            )
            head = _recv(sock, 8)
            size = int.from_bytes(head, "little") if len(head) == 8 else None
            body = _recv(sock, 4 + _CAPS) if size == 4 + _CAPS else b""
    except TimeoutError:
        raise RpcError(
            f"something at {endpoint} accepts connections but does not answer "
            f"llama.cpp's RPC hello within {timeout:g} s (not an ewq worker, or "
            f"one that is stopped or busy with another client); start {start} there"
        ) from None
    except OSError as exc:
        raise RpcError(
            f"cannot reach the worker at {endpoint} ({exc.strerror or exc}); "
            f"start it there with {start}"
        ) from None
    if len(body) != 4 + _CAPS:
        got = (head + body)[:16]
        what = f"{len(got)} bytes ({got.hex()})" if got else "it closed the connection"
        raise RpcError(
            f"{endpoint} is not an ewq/llama.cpp RPC worker: to llama.cpp's hello "
            f"it answered {what}; start {start} there"
        )
    major, minor, patch = body[0], body[1], body[2]
    if major != PROTOCOL[0] or minor > PROTOCOL[1]:
        raise RpcError(
            f"the worker at {endpoint} speaks llama.cpp RPC protocol "
            f"{major}.{minor}.{patch}, this ewq {'.'.join(map(str, PROTOCOL))}: run "
            "the same ewq and llama-cpp-python on every machine"
        )
    return major, minor, patch


def add_workers(endpoints: Sequence[str]) -> None:
    """Register each worker's devices with llama.cpp, in order (llama.cpp puts them
    first among its devices, in the order they were added), after checking that
    each answers llama.cpp's hello (llama.cpp itself would wait forever on a socket
    that accepts and never answers)."""
    for ep in endpoints:
        hello(ep)
    add = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))
    ggml, _ = _load()
    for ep in endpoints:
        reg = add(ep.encode())
        if not reg:
            raise RpcError(f"the worker at {ep} offers no device")
        ggml.ggml_backend_register(reg)


def start_worker(host: str, port: int, threads: int | None = None) -> threading.Thread:
    """Serve this machine's CPU on host:port, in a daemon thread (the call it makes
    never returns); raises at once if the port cannot be bound."""
    addr = ipv4(host)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
    try:
        probe.bind((addr, port))
    except OSError as exc:
        why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise RpcError(f"cannot listen on {addr}:{port}: {why}") from None
    finally:
        probe.close()
    start = _START_SERVER(_proc("ggml_backend_rpc_start_server"))
    ggml, _ = _load()
    cpu = ggml.ggml_backend_dev_by_type(_CPU)
    if not cpu:
        raise RpcError("llama.cpp has no CPU device")
    devices = (ctypes.c_void_p * 1)(cpu)
    n = threads or os.cpu_count() or 1
    endpoint = f"{addr}:{port}".encode()
    _keep.append(devices)

    def run() -> None:
        start(endpoint, None, n, 1, devices)
        # returns only when it could not serve (it printed why on stderr)
        sys.stderr.write(f"ewq: error: the worker on {addr}:{port} stopped\n")
        sys.stderr.flush()
        os._exit(1)

    thread = threading.Thread(target=run, name=f"rpc-worker-{port}", daemon=True)
    thread.start()
    return thread
