"""oipipe.data.fetch against a small real server on 127.0.0.1 that answers what each test scripts:
Retry-After on 429 and 503, one retry budget across urllib3 and the resume loop, capped bodies."""

from __future__ import annotations

import select
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

from oipipe.data.fetch import Fetcher, FetchError, TooLarge

BODY = bytes(range(256)) * 400  # 100 KiB
MiB = 1 << 20

Responder = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.server.hits[self.path].append(time.monotonic())
        script = self.server.routes[self.path]
        (script.pop(0) if len(script) > 1 else script[0])(self)  # the last answer repeats

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), Handler)
        self.routes: dict[str, list[Responder]] = {}
        self.hits: dict[str, list[float]] = defaultdict(list)  # request times, per path
        self.sent: dict[str, int] = {}  # body bytes a streaming answer got out before hang-up
        self.hung_up = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def status(code: int, **headers: str) -> Responder:
    def answer(h: Handler) -> None:
        body = f"{code}\n".encode()
        h.head(code, {"Content-Length": str(len(body)), **headers})
        h.wfile.write(body)

    return answer


def ok(body: bytes = BODY, keep: float = 1.0) -> Responder:
    """200 with the whole Content-Length; with keep < 1 only that share of the body is sent
    before the connection closes (a dropped link)."""

    def answer(h: Handler) -> None:
        h.head(200, {"Content-Length": str(len(body)), "ETag": '"v1"'})
        h.wfile.write(body[: int(len(body) * keep)])
        if keep < 1.0:
            h.close_connection = True

    return answer


def hang_up(h: Handler) -> None:
    """Close the connection without a word, as a server restarting does."""
    h.close_connection = True


def headers_then_silence(length: int) -> Responder:
    """Headers announcing `length` bytes, then no byte of body until the client hangs up."""

    def answer(h: Handler) -> None:
        h.head(200, {"Content-Length": str(length)})
        h.wfile.flush()
        readable, _, _ = select.select([h.connection], [], [], 30)
        if readable and not h.connection.recv(1):
            h.server.hung_up.set()
        h.close_connection = True

    return answer


def endless_chunks(limit: int) -> Responder:
    """A chunked body with no Content-Length, streamed until the client hangs up (or `limit`)."""

    def answer(h: Handler) -> None:
        h.head(200, {"Transfer-Encoding": "chunked"})
        chunk, sent = b"\xff" * (1 << 16), 0
        try:
            while sent < limit:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            h.server.sent[h.path] = sent
            h.server.hung_up.set()
        h.close_connection = True

    return answer


def fetch(fetcher: Fetcher, how: str, url: str, tmp_path: Path) -> bytes:
    if how == "get_bytes":
        return fetcher.get_bytes(url)
    return fetcher.download_file(url, tmp_path / "cache" / "file.csv").read_bytes()


@pytest.mark.parametrize("how", ["get_bytes", "download_file"])
@pytest.mark.parametrize("code", [503, 429])
def test_retry_after_is_waited_for(server: Server, tmp_path: Path, code: int, how: str) -> None:
    server.routes["/f"] = [status(code, **{"Retry-After": "1"}), ok()]
    # a backoff of 10 ms: a pause near 1 s can only be the server's Retry-After
    fetcher = Fetcher(retries=3, backoff=0.01, timeout=5)
    assert fetch(fetcher, how, server.url("/f"), tmp_path) == BODY
    first, second = server.hits["/f"]
    assert 0.95 <= second - first < 2.5, f"retried {second - first:.3f} s after the {code}"
    assert fetcher.retried == 1


@pytest.mark.parametrize("how", ["get_bytes", "download_file"])
def test_one_retry_budget_across_urllib3_and_the_resume_loop(
    server: Server, tmp_path: Path, how: str
) -> None:
    # A body cut short (retried by Fetcher's own loop), then 503s (retried by urllib3): 3 retries
    # in all make 4 requests, not 3 resumes of 1 + 3 urllib3 attempts each.
    server.routes["/f"] = [ok(keep=0.5), status(503)]
    fetcher = Fetcher(retries=3, backoff=0.01, timeout=5)
    with pytest.raises(FetchError, match=r"gave up after 3 retries \(HTTP 503\)"):
        fetch(fetcher, how, server.url("/f"), tmp_path)
    assert len(server.hits["/f"]) == 4
    assert fetcher.retried == 3


@pytest.mark.parametrize("how", ["get_bytes", "download_file"])
def test_dropped_connections_spend_the_same_budget(
    server: Server, tmp_path: Path, how: str
) -> None:
    server.routes["/f"] = [hang_up]  # urllib3 retries these itself, inside one GET
    fetcher = Fetcher(retries=2, backoff=0.01, timeout=5)
    with pytest.raises(FetchError, match=r"gave up after 2 retries \(ConnectionError"):
        fetch(fetcher, how, server.url("/f"), tmp_path)
    assert len(server.hits["/f"]) == 3 and fetcher.retried == 2


def test_a_content_length_over_the_cap_is_refused_before_any_body_byte(server: Server) -> None:
    # The server sends the headers and then nothing: a client that waited for the body to
    # count it would hang until its timeout instead of refusing at once.
    server.routes["/big.jpg"] = [headers_then_silence(64 * MiB)]
    fetcher = Fetcher(retries=2, backoff=0.01, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(TooLarge, match=r"Content-Length 67108864 bytes, over the cap of 1048576"):
        fetcher.get_bytes(server.url("/big.jpg"), max_bytes=MiB)
    assert time.monotonic() - t0 < 5
    assert server.hung_up.wait(5), "the client kept the connection open"
    assert len(server.hits["/big.jpg"]) == 1 and fetcher.retried == 0  # refused, not retried


def test_a_body_without_length_is_cut_off_once_past_the_cap(server: Server) -> None:
    server.routes["/big.jpg"] = [endless_chunks(limit=256 * MiB)]
    fetcher = Fetcher(retries=2, backoff=0.01, timeout=10)
    with pytest.raises(TooLarge, match="over the cap of 1048576 bytes, stopped reading"):
        fetcher.get_bytes(server.url("/big.jpg"), max_bytes=MiB)
    assert server.hung_up.wait(10), "the client read the whole body"
    # what the server got out before the hang-up: the cap plus the socket buffers, far from all
    assert server.sent["/big.jpg"] < 64 * MiB
    assert len(server.hits["/big.jpg"]) == 1 and fetcher.retried == 0


def test_a_body_within_the_cap_arrives_whole(server: Server) -> None:
    server.routes["/ok.jpg"] = [ok()]
    assert (
        Fetcher(retries=0, timeout=5).get_bytes(server.url("/ok.jpg"), max_bytes=len(BODY)) == BODY
    )
