"""HTTP with the failure handling downloads need: retries with backoff, resume, no partial files."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from oipipe.core import progress
from oipipe.core.errors import StageError
from oipipe.core.files import file_lock, fsync_dir, write_text

log = logging.getLogger("oipipe.data.fetch")

CHUNK = 1 << 16
# What a busy, restarting or rate-limiting server answers: worth another try, after a pause.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# A public S3 bucket answers 403 (not 404) for a key that does not exist.
MISSING_STATUS = {403, 404, 410}
TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
)
BACKOFF_MAX = 30.0
# A Retry-After longer than this is cut to it (urllib3 would honour up to 6 hours): better to
# spend this URL's retries and list it as failed than to stall the stage; a rerun fetches it.
RETRY_AFTER_MAX = 120


class FetchError(StageError):
    """Gave up on a URL after the configured retries (or on a non-retryable status)."""


class NotFound(FetchError):
    """The server says the object does not exist (404; 403 on S3): record it, do not retry."""


class TooLarge(FetchError):
    """The body is larger than the caller's cap; refused before it was read whole."""


class _Budget:
    """The retries one URL may still spend. urllib3 spends them on statuses and connection
    errors, Fetcher on bodies cut short (resumed with Range): one budget, so the two layers
    never multiply into retries * retries attempts."""

    def __init__(self, retries: int) -> None:
        self.left = retries
        self.last = ""  # the latest failure, for the message when none is left


class Fetcher:
    """Thread-safe GETs with a connection pool per thread.

    urllib3's `Retry`, on the adapter each thread's session mounts, retries connection errors and
    the statuses in RETRY_STATUS with exponential backoff plus jitter, and waits as long as a
    429's or 503's Retry-After asks. A body cut short is retried here, a file resuming where it
    broke off. Both draw on one budget of `retries` per URL; `retried` counts what was spent.
    """

    def __init__(
        self, retries: int = 5, backoff: float = 0.5, timeout: float = 30.0, pool: int = 16
    ):
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.pool = pool
        self.retried = 0  # total retries, for the statistics
        self._retry = Retry(
            total=retries,
            allowed_methods=frozenset({"GET", "HEAD"}),
            status_forcelist=RETRY_STATUS,
            backoff_factor=backoff,
            backoff_jitter=backoff,
            backoff_max=BACKOFF_MAX,
            respect_retry_after_header=True,
            retry_after_max=RETRY_AFTER_MAX,
            raise_on_status=False,
        )  # hand back the last error response, so its status is named
        self._local = threading.local()
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(
                pool_connections=self.pool, pool_maxsize=self.pool, max_retries=self._retry
            )
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session, self._local.adapter = s, adapter
        return s

    def _get(
        self, url: str, budget: _Budget, headers: dict[str, str] | None = None
    ) -> requests.Response:
        """A streamed GET that lets urllib3 spend what is left of `budget`."""
        session = self.session()
        # this thread's own adapter: setting its Retry for one request races with nothing
        self._local.adapter.max_retries = self._retry.new(total=budget.left)
        try:
            r = session.get(url, headers=headers, stream=True, timeout=self.timeout)
        except TRANSIENT:
            self._spend(budget, budget.left)  # urllib3 raises only once it has spent them all
            raise
        self._spend(budget, len(r.raw.retries.history) if r.raw.retries else 0)
        return r

    def _spend(self, budget: _Budget, n: int) -> None:
        budget.left -= n
        with self._lock:
            self.retried += n

    def _backoff(self, budget: _Budget) -> bool:
        """Spend one retry on a failure urllib3 cannot see (a body cut short), after a pause
        that doubles as retries are spent; False when none is left."""
        if budget.left <= 0:
            return False
        spent = self.retries - budget.left
        self._spend(budget, 1)
        time.sleep(min(BACKOFF_MAX, self.backoff * 2**spent) * random.uniform(0.5, 1.5))
        return True

    def get_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """The whole body of `url`; a body cut short is fetched again. A body larger than
        `max_bytes` raises TooLarge as soon as that is known (Content-Length, or the stream)."""
        budget = _Budget(self.retries)
        while True:
            try:
                with self._get(url, budget) as r:
                    if r.status_code in MISSING_STATUS:
                        raise NotFound(f"{url}: HTTP {r.status_code}")
                    if r.status_code in RETRY_STATUS:  # urllib3 spent the budget on it
                        raise _Retry(f"HTTP {r.status_code}")
                    if r.status_code != 200:
                        raise FetchError(f"{url}: HTTP {r.status_code}")
                    return _read_body(url, r, max_bytes)
            except TRANSIENT as e:
                budget.last = f"{type(e).__name__}: {e}"
            except _Retry as e:
                budget.last = str(e)
            if not self._backoff(budget):
                raise FetchError(f"{url}: gave up after {self.retries} retries ({budget.last})")

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
        with file_lock(dest.with_name(dest.name + ".lock")):
            if dest.exists():
                return dest
            return self._download_locked(url, dest, desc)

    def _download_locked(self, url: str, dest: Path, desc: str | None) -> Path:
        part = dest.with_name(dest.name + ".part")
        meta = dest.with_name(dest.name + ".part.json")
        budget = _Budget(self.retries)
        while True:
            try:
                self._download_once(url, part, meta, desc or dest.name, budget)
            except TRANSIENT as e:
                budget.last = f"{type(e).__name__}: {e}"
                if budget.left > 0:
                    log.warning(
                        "%s: %s; will resume from byte %d",
                        url,
                        budget.last,
                        part.stat().st_size if part.exists() else 0,
                    )
            except _Retry as e:
                budget.last = str(e)
            else:
                part.replace(dest)
                fsync_dir(dest.parent)
                meta.unlink(missing_ok=True)
                return dest
            if not self._backoff(budget):
                raise FetchError(
                    f"{url}: gave up after {self.retries} retries ({budget.last}); "
                    f"{part} is kept and the next run resumes from it"
                )

    def _download_once(self, url: str, part: Path, meta: Path, desc: str, budget: _Budget) -> None:
        """One GET from where `part` ends; returns once `part` is the whole file."""
        offset = part.stat().st_size if part.exists() else 0
        etag = json.loads(meta.read_text())["etag"] if offset and meta.exists() else None
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if etag:
            headers["If-Range"] = etag
        with self._get(url, budget, headers) as r:
            if r.status_code in MISSING_STATUS:
                raise NotFound(f"{url}: HTTP {r.status_code}")
            if r.status_code in RETRY_STATUS:  # urllib3 spent the budget on it
                raise _Retry(f"HTTP {r.status_code}")
            if r.status_code == 416:  # our part is already the whole file, or it changed size
                total = _total_from_content_range(r.headers.get("Content-Range", ""))
                if total == offset:
                    return
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
                total = _content_length(r)
                new_etag = r.headers.get("ETag")
                if new_etag:
                    write_text(meta, json.dumps({"etag": new_etag, "url": url}))
            else:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            with (
                open(part, mode) as f,
                progress.bar(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=desc, leave=False
                ) as bar,
            ):
                # read1 hands over whatever arrived, so a dropped connection keeps every byte
                # received before it (iter_content would discard its last, partial chunk).
                while chunk := r.raw.read1(CHUNK, decode_content=True):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # on disk before it is renamed to the cached name
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"connection closed at byte {size} of {total}")


def _read_body(url: str, r: requests.Response, max_bytes: int | None) -> bytes:
    """Read a streamed body whole, refusing one over `max_bytes` without reading the rest."""
    length = _content_length(r)
    if max_bytes is not None and length is not None and length > max_bytes:
        raise TooLarge(
            f"{url}: body too large: Content-Length {length} bytes, over the cap of {max_bytes}"
        )
    body = bytearray()
    while chunk := r.raw.read1(CHUNK, decode_content=True):
        body += chunk
        if max_bytes is not None and len(body) > max_bytes:
            raise TooLarge(
                f"{url}: body too large: over the cap of {max_bytes} bytes, stopped reading"
            )
    received = r.raw.tell()  # bytes on the wire, what Content-Length counts
    if length is not None and received != length:
        raise _Retry(f"truncated body: {received} of {length} bytes")
    return bytes(body)


def _content_length(r: requests.Response) -> int | None:
    try:
        return int(r.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


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
