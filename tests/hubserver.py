"""A local HTTP server standing in for the Hugging Face hub (set HF_ENDPOINT to it).

It serves the endpoints huggingface_hub uses to resolve files, read headers with
range requests, and list a repository: enough for hf_hub_download,
get_safetensors_metadata and snapshot_download. It counts the bytes it sends of
each file, so tests can prove that metadata-only mode downloads no weight.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"
)


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.sent: Counter[str] = Counter()
        self.ranges = True  # False: answer every request with the whole file (200)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _error(self, h, status: int, code: str) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        body = json.dumps({"error": code}).encode()
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, doc, head: bool) -> None:
        body = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _serve(self, h, head: bool) -> None:
        path = h.path.split("?")[0]
        if m := _TREE.match(path):
            folder = self.repos.get(m["repo"])
            if folder is None:
                return self._error(h, 404, "RepoNotFound")
            entries = [
                {
                    "type": "file",
                    "path": p.relative_to(folder).as_posix(),
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(f"{p}:{p.stat().st_size}".encode()).hexdigest(),
                }
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            return self._json(h, entries, head)
        if m := _INFO.match(path):
            folder = self.repos.get(m["repo"])
            if folder is None:
                return self._error(h, 404, "RepoNotFound")
            siblings = [
                {
                    "rfilename": p.relative_to(folder).as_posix(),
                    "size": p.stat().st_size,
                }
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            return self._json(
                h, {"id": m["repo"], "sha": COMMIT, "siblings": siblings}, head
            )
        m = _RESOLVE.match(path)
        if m is None:
            return self._error(h, 404, "NotFound")
        folder = self.repos.get(m["repo"])
        if folder is None:
            return self._error(h, 404, "RepoNotFound")
        file = folder / m["path"]
        if not file.is_file():
            return self._error(h, 404, "EntryNotFound")
        st = file.stat()
        size = st.st_size
        etag = hashlib.sha256(f"{file}:{size}:{st.st_mtime_ns}".encode()).hexdigest()
        start, end = 0, size - 1
        status = 200
        if (rng := h.headers.get("Range")) and self.ranges:
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            start, end = int(lo), min(int(hi) if hi else size - 1, size - 1)
            status = 206
        with open(file, "rb") as fh:  # only the range asked for (GGUFs are large)
            fh.seek(start)
            chunk = fh.read(end + 1 - start)
        h.send_response(status)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not head:
            try:
                h.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return None  # the client had what it wanted and hung up
            self.sent[m["path"]] += len(chunk)
        return None
