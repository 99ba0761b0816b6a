"""HTTP with the failure handling downloads need: retries with backoff, resume, no partial files."""

from __future__ import annotations

import fcntl
import json
import logging
import random
import threading
import time
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from stages.errors import StageError
from stages.io import write_text

log = logging.getLogger("stages.http")

CHUNK = 1 << 16
# Connection errors, timeouts and truncated bodies are worth retrying; so are these statuses.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# A public S3 bucket answers 403 (not 404) for a key that does not exist.
MISSING_STATUS = {403, 404, 410}
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
             requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError)


class FetchError(StageError):
    """Gave up on a URL after the configured retries (or on a non-retryable status)."""


class NotFound(FetchError):
    """The server says the object does not exist (404; 403 on S3): record it, do not retry."""


class Fetcher:
    """Thread-safe GETs with a connection pool per thread and exponential backoff with jitter."""

    def __init__(self, retries: int = 5, backoff: float = 0.5, timeout: float = 30.0,
                 pool: int = 16):
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.pool = pool
        self.retried = 0  # total retries, for the statistics
        self._local = threading.local()
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=self.pool, pool_maxsize=self.pool)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def _sleep(self, attempt: int) -> None:
        with self._lock:
            self.retried += 1
        time.sleep(min(30.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.5))

    def get_bytes(self, url: str) -> bytes:
        """The whole body of `url`; a short body (dropped connection) is retried."""
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(attempt - 1)
            try:
                r = self.session().get(url, timeout=self.timeout)
            except TRANSIENT as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in MISSING_STATUS:
                raise NotFound(f"{url}: HTTP {r.status_code}")
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            expected = r.headers.get("Content-Length")
            if expected is not None and int(expected) != len(r.content):
                last = f"truncated body: {len(r.content)} of {expected} bytes"
                continue
            return r.content
        raise FetchError(f"{url}: gave up after {self.retries} retries ({last})")

    def download_file(self, url: str, dest: Path, desc: str | None = None) -> Path:
        """Stream `url` to `dest`, resuming a previous partial download with HTTP Range.

        Bytes land in `dest.part` (with the server's ETag beside it, so a changed file restarts
        rather than splicing two versions); only a complete file is renamed to `dest`. An
        existing `dest` is the cache: it is not fetched again.
        """
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Parallel jobs sharing a cache (a DVC queue, a sweep) would append to one `.part` at
        # once: the first to take the lock downloads, the others wait and find `dest` complete.
        with open(dest.with_name(dest.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if dest.exists():
                return dest
            return self._download_locked(url, dest, desc)

    def _download_locked(self, url: str, dest: Path, desc: str | None) -> Path:
        part = dest.with_name(dest.name + ".part")
        meta = dest.with_name(dest.name + ".part.json")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(attempt - 1)
            try:
                done = self._download_once(url, part, meta, desc or dest.name)
            except TRANSIENT as e:
                last = f"{type(e).__name__}: {e}"
                log.warning("%s: %s; will resume from byte %d", url, last,
                            part.stat().st_size if part.exists() else 0)
                continue
            except _Retry as e:
                last = str(e)
                continue
            if done:
                part.replace(dest)
                meta.unlink(missing_ok=True)
                return dest
        raise FetchError(f"{url}: gave up after {self.retries} retries ({last}); "
                         f"{part} is kept and the next run resumes from it")

    def _download_once(self, url: str, part: Path, meta: Path, desc: str) -> bool:
        offset = part.stat().st_size if part.exists() else 0
        etag = json.loads(meta.read_text())["etag"] if offset and meta.exists() else None
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if etag:
            headers["If-Range"] = etag
        with self.session().get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            if r.status_code in MISSING_STATUS:
                raise NotFound(f"{url}: HTTP {r.status_code}")
            if r.status_code in RETRY_STATUS:
                raise _Retry(f"HTTP {r.status_code}")
            if r.status_code == 416:  # our part is already the whole file, or it changed size
                total = _total_from_content_range(r.headers.get("Content-Range", ""))
                if total == offset:
                    return True
                part.unlink(missing_ok=True)
                raise _Retry("range not satisfiable; restarting from byte 0")
            if r.status_code == 206:
                start, total = _parse_content_range(r.headers.get("Content-Range", ""))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise _Retry(f"server resumed at byte {start}, not {offset}; restarting")
                mode = "ab"
            elif r.status_code == 200:
                offset, mode = 0, "wb"
                length = r.headers.get("Content-Length")
                total = int(length) if length is not None else None
                new_etag = r.headers.get("ETag")
                if new_etag:
                    write_text(meta, json.dumps({"etag": new_etag, "url": url}))
            else:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B",
                                             unit_scale=True, desc=desc, leave=False) as bar:
                # read1 hands over whatever arrived, so a dropped connection keeps every byte
                # received before it (iter_content would discard its last, partial chunk).
                while chunk := r.raw.read1(CHUNK, decode_content=True):
                    f.write(chunk)
                    bar.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"connection closed at byte {size} of {total}")
        return True


class _Retry(Exception):
    """A response that is worth another (resumed) attempt."""


def _parse_content_range(value: str) -> tuple[int, int | None]:
    # "bytes 100-199/1000"
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total == "*" else int(total))
    except ValueError as e:
        raise _Retry(f"unparseable Content-Range {value!r}") from e


def _total_from_content_range(value: str) -> int | None:
    # "bytes */1000"
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None
