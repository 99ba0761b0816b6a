"""A local HTTP server for a generated mirror folder, with injectable faults.

`MirrorServer` serves the folder on 127.0.0.1 with what a real object store answers (Range and
If-Range, ETag, Last-Modified, HEAD) and, on request, what a bad network does: error statuses,
bodies cut short under a full Content-Length, hangs and latency. Tests drive a real downloader
against it.
"""

from __future__ import annotations

import email.utils
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from oimirror.layout import IMAGES_DIR, METADATA_DIR

# A path relative to the mirror root ("openimages/v5/...") or a predicate on such paths.
PathMatch = str | Callable[[str], bool]


class _RangeNotSatisfiable(Exception):
    pass


@dataclass
class _Fault:
    match: Callable[[str], bool]
    kind: str  # fail | truncate
    remaining: int
    status: int = 503
    keep: float = 0.5


def _matcher(path_or_predicate: PathMatch) -> Callable[[str], bool]:
    if callable(path_or_predicate):
        return path_or_predicate
    target = path_or_predicate.lstrip("/")
    return lambda p: p == target


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the inclusive (start, end) of a single byte range; None to ignore the header."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unknown unit or multiple ranges: a full 200 is a valid answer
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0 or size == 0:
                raise _RangeNotSatisfiable
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None
    if end is None:
        end = size - 1
    if start >= size:
        raise _RangeNotSatisfiable
    return start, min(end, size - 1)


_CONTENT_TYPES = {".jpg": "image/jpeg", ".csv": "text/csv", ".json": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OpenImagesMirror/1.0"
    timeout = 60  # drop idle keep-alive connections eventually
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK would stall every response by the delayed-ACK timeout (40 ms on Linux).
    disable_nagle_algorithm = True

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _simple(
        self, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        mirror = self.server.mirror
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        mirror._record(rel, head, range_header)
        if mirror._wait(mirror.latency + mirror._delay_for(rel)):
            self.close_connection = True
            return
        fault = None if head else mirror._take_fault(rel)
        if fault is not None and fault.kind == "fail":
            self._simple(fault.status, f"injected {fault.status}\n".encode(), head)
            return
        path = mirror._resolve(rel)
        if path is None:
            self._simple(404, b"Not Found\n", head)
            return
        st = path.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        byte_range = None
        if range_header is not None:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range.strip() in (etag, last_modified):
                try:
                    byte_range = _parse_range(range_header, size)
                except _RangeNotSatisfiable:
                    self._simple(
                        416,
                        b"Range Not Satisfiable\n",
                        head,
                        {"Content-Range": f"bytes */{size}", "ETag": etag},
                    )
                    return
        start, end = byte_range if byte_range else (0, size - 1)
        length = end - start + 1
        self.send_response(206 if byte_range else 200)
        self.send_header(
            "Content-Type", _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        )
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        if byte_range:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or length <= 0:
            return
        if fault is not None and fault.kind == "truncate":
            # The header promised `length` bytes; closing early is what a dropped link looks like.
            length = int(length * fault.keep)
            self.close_connection = True
        with path.open("rb") as fh:
            if length > 0:
                self.connection.sendfile(fh, offset=start, count=length)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hung (delayed) handler must not block close()
    mirror: MirrorServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # clients hanging up (timeouts, truncation tests) are expected
        super().handle_error(request, client_address)


class MirrorServer:
    """Serve a generated mirror folder over HTTP on 127.0.0.1, with injectable faults.

    Starts serving on construction; use as a context manager or call `close()`.
    """

    def __init__(
        self, root: Path, latency: float = 0.0, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"mirror root {self.root} is not a directory")
        self.latency = latency
        self.requests: Counter[str] = Counter()
        self.head_requests: Counter[str] = Counter()
        self.range_requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._delays: list[tuple[Callable[[str], bool], float]] = []
        self._closing = threading.Event()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.mirror = self
        bound, self.port = self._httpd.server_address[:2]
        self.host = bound.decode() if isinstance(bound, (bytes, bytearray)) else bound
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mirror-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}{METADATA_DIR}/"

    @property
    def images_url(self) -> str:
        return f"{self.base_url}{IMAGES_DIR}/"

    def fail_first(self, path_or_predicate: PathMatch, times: int = 1, status: int = 503) -> None:
        """Answer the first `times` GETs of matching paths with `status`."""
        with self._lock:
            self._faults.append(_Fault(_matcher(path_or_predicate), "fail", times, status=status))

    def truncate(self, path_or_predicate: PathMatch, times: int = 1, keep: float = 0.5) -> None:
        """Send only `keep` of the body (full Content-Length) on the first `times` GETs."""
        if not 0.0 <= keep < 1.0:
            raise ValueError("keep must be in [0, 1)")
        with self._lock:
            self._faults.append(_Fault(_matcher(path_or_predicate), "truncate", times, keep=keep))

    def delay(self, path_or_predicate: PathMatch, seconds: float) -> None:
        """Add `seconds` before answering matching paths (the latest matching rule wins)."""
        with self._lock:
            self._delays.append((_matcher(path_or_predicate), seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.head_requests.clear()
            self.range_requests.clear()

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MirrorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Called from handler threads.
    def _record(self, rel: str, head: bool, range_header: str | None) -> None:
        with self._lock:
            if head:
                self.head_requests[rel] += 1
                return
            self.requests[rel] += 1
            if range_header is not None:
                self.range_requests.append((rel, range_header))

    def _delay_for(self, rel: str) -> float:
        with self._lock:
            for match, seconds in reversed(self._delays):
                if match(rel):
                    return seconds
        return 0.0

    def _wait(self, seconds: float) -> bool:
        """Sleep, waking early on close; True if the server is closing."""
        if seconds > 0:
            return self._closing.wait(seconds)
        return self._closing.is_set()

    def _take_fault(self, rel: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.match(rel):
                    fault.remaining -= 1
                    return fault
        return None

    def _resolve(self, rel: str) -> Path | None:
        try:
            path = (self.root / rel).resolve()
        except (OSError, ValueError):
            return None
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path
