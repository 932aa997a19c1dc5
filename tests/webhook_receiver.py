"""A real HTTP webhook receiver on 127.0.0.1 for tests: records every request, answers as scripted."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    # path -> list of (status, headers) answered in order; the last one repeats. Default: 200.
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delays: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before answering

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def answer(self, path: str, *responses: tuple[int, dict[str, str]] | int) -> None:
        self.script[path] = [r if isinstance(r, tuple) else (r, {}) for r in responses]

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, n: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.got(path)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{path}: expected {n} request(s) within {timeout}s, got {len(self.got(path))}")

    def _respond(self, path: str) -> tuple[int, dict[str, str]]:
        with self.lock:
            seq = self.script.get(path)
            if not seq:
                return 200, {}
            return seq.pop(0) if len(seq) > 1 else seq[0]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver(host: str = "127.0.0.1") -> Receiver:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            rec = holder["r"]
            with rec.lock:
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                             time.time()))
            status, headers = rec._respond(self.path)
            time.sleep(rec.delays.get(self.path, 0.0))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    rec = Receiver(server)
    holder["r"] = rec
    threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True).start()
    return rec
