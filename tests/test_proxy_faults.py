"""A real proxy on loopback in front of the real server:
its own error pages during a cache run lose no line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas.cache_dir import CacheDir
from tests.conftest import API_KEY, SAMPLE, read_lines, teacher_farm

pytestmark = pytest.mark.engine

#: What a load balancer answers during a deploy, in turn, before it passes requests through again.
PAGES = [
    (404, "text/html", b"<html><body><h1>404 Not Found</h1>nginx</body></html>"),
    (403, "text/html", b"<html><body><h1>403 Forbidden</h1></body></html>"),
    (408, "text/html", b"<html><body><h1>408 Request Time-out</h1></body></html>"),
    (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    (422, "application/json", b'{"detail": [{"msg": "extra fields not permitted"}]}'),
]


class Proxy:
    """A forwarding HTTP proxy on 127.0.0.1 whose first ``faults`` scoring requests get an error page."""

    def __init__(self, upstream: str, faults: int) -> None:
        self.faults, self.pages_sent, self.forwarded = faults, [], 0
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    fault = self.path.startswith("/v1/topk") and len(proxy.pages_sent) < proxy.faults
                    if fault:
                        page = PAGES[len(proxy.pages_sent) % len(PAGES)]
                        proxy.pages_sent.append(page[0])
                    else:
                        proxy.forwarded += 1
                if fault:
                    status, kind, text = page
                    return self._answer(status, {"Content-Type": kind, "Server": "nginx/1.25.3"}, text)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                r = httpx.request(
                    self.command, upstream + self.path, headers=headers, content=body, timeout=120
                )
                keep = {
                    k: v
                    for k, v in r.headers.items()
                    if k.lower()
                    not in ("content-length", "transfer-encoding", "connection", "content-encoding")
                }
                self._answer(r.status_code, keep, r.content)

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_proxys_error_pages_in_front_of_serve_are_retried_and_no_line_is_rejected(server, tmp_path):
    lines = read_lines(SAMPLE, 24)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    with Proxy(server.url, faults=10) as proxy:
        proc = teacher_farm(
            "cache",
            "--server",
            proxy.url,
            "--api-key",
            API_KEY,
            "--input",
            str(inp),
            "--out",
            str(out),
            "--k",
            "4",
            "--rows-per-shard",
            "6",
            "--batch-lines",
            "3",
            "--retry-for",
            "120",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proxy.pages_sent) == 10 and {404, 403, 408, 502, 422} <= set(proxy.pages_sent)
    assert (out / "rejects.jsonl").read_bytes() == b""
    cache = CacheDir(out)
    ids = pq.read_table(cache.shard_paths(), columns=["id"]).column("id").to_pylist()
    # Every line cached exactly once, under its own id.
    assert sorted(ids) == sorted(str(json.loads(line).get("id")) for line in lines)
