"""HTTP downloads that resume, retry, verify and never leave a partial or wrong file in place.

A download streams into `NAME.part` and keeps the server's validator (strong
ETag, else Last-Modified) in `NAME.part.json`. The next attempt, in this run or
a later one, rehashes the part and requests the rest with `Range` and
`If-Range`, so a file that changed on the server comes back whole. Only a file
whose sha256 matches is fsynced and renamed to NAME.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import requests
import urllib3
from tqdm import tqdm

import hkpod
from hkpod.errors import HkpodError
from hkpod.fsutil import fsync_directory

LOG = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT: Final = f"hkpod/{hkpod.__version__}"
HASH_BLOCK: Final = 1 << 20
MAX_SMALL_FILE: Final = 16 << 20
# HTTP statuses besides 5xx that mean "try again later" rather than "this will never work".
RETRY_STATUSES: Final = frozenset({408, 429})
# Restarts from byte 0 allowed per download when the server's ranges do not fit the part file.
MAX_RESTARTS: Final = 3


@dataclass(frozen=True)
class DownloadOptions:
    """Timeouts in seconds, and how often to retry before a mirror counts as unavailable."""

    connect_timeout: float = 15.0
    # Maximum wait for the next bytes from the server. A transfer stalled this long is retried.
    read_timeout: float = 60.0
    # Failed attempts in a row that made no progress before giving up on a URL.
    attempts: int = 5
    # Delay before the first retry, doubled after each further failure up to max_backoff.
    backoff: float = 1.0
    max_backoff: float = 60.0
    chunk_size: int = 256 * 1024
    # None shows a progress bar when stderr is a terminal and log lines otherwise.
    progress_bar: bool | None = None
    log_interval: float = 30.0


class DownloadError(HkpodError):
    """A failed download of the file at `url`."""

    def __init__(self, message: str, url: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.url = url


class UnavailableError(DownloadError):
    """The server did not deliver the file (HTTP error, timeout, broken connection, HTML page).

    Another mirror may still have it. `status` is the HTTP status when there was one.
    """

    def __init__(self, message: str, url: str, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, url, hint)
        self.status = status


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the sha256 in the signed checksum list."""


class Progress(Protocol):
    """Receiver of download progress: a tqdm bar or periodic log lines."""

    def update(self, count: int, /) -> object: ...

    def close(self) -> None: ...


# (label, full size if known, bytes already on disk) -> Progress
ProgressFactory = Callable[[str, int | None, int], Progress]


class _Retryable(Exception):
    """A failure worth another attempt: connection error, timeout, 429 or 5xx."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Restart(Exception):
    """The part file cannot be continued, so the download starts again from byte 0 at once."""


@dataclass(frozen=True)
class Validator:
    """The server's identifiers of one version of a file, as sent in its response headers."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def from_headers(cls, headers: Any) -> Validator:
        etag = headers.get("ETag")
        # RFC 9110 forbids a weak ETag in If-Range, so only a strong one is kept.
        if etag is not None and (etag.startswith("W/") or not etag.startswith('"')):
            etag = None
        return cls(etag=etag, last_modified=headers.get("Last-Modified"))

    def if_range(self) -> str | None:
        return self.etag or self.last_modified


@dataclass
class _Part:
    """The partial file on disk and the sha256 state of the bytes it contains."""

    path: Path
    meta_path: Path
    size: int = 0
    validator: Validator | None = None

    def __post_init__(self) -> None:
        self.hasher = hashlib.sha256()

    def reset(self) -> None:
        self.path.write_bytes(b"")
        self.meta_path.unlink(missing_ok=True)
        self.size = 0
        self.validator = None
        self.hasher = hashlib.sha256()

    def save_validator(self, url: str, validator: Validator) -> None:
        self.validator = validator
        meta = {"url": url, "etag": validator.etag, "last_modified": validator.last_modified}
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.meta_path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


class _LogProgress:
    """Progress as an INFO line every `interval` seconds, for logs and pipes."""

    def __init__(self, label: str, total: int | None, initial: int, interval: float) -> None:
        self.label = label
        self.total = total
        self.done = initial
        self.interval = interval
        self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            LOG.info("%s: %s", self.label, _progress_text(self.done, self.total))

    def close(self) -> None:
        LOG.info("%s: %s", self.label, _progress_text(self.done, self.total))


def _progress_text(done: int, total: int | None) -> str:
    if not total:
        return f"{format_size(done)} received"
    return f"{format_size(done)} of {format_size(total)} ({100 * done // total}%)"


def format_size(count: int) -> str:
    """Return COUNT bytes in binary units, e.g. `512.0 MiB`; GiB is the largest unit."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class Fetcher:
    """Downloads over one HTTP session with the retry, resume and verification rules above."""

    def __init__(
        self,
        options: DownloadOptions | None = None,
        *,
        session: requests.Session | None = None,
        progress_factory: ProgressFactory | None = None,
    ) -> None:
        self.options = options or DownloadOptions()
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.progress_factory = progress_factory or self._default_progress

    def close(self) -> None:
        self.session.close()

    def fetch_bytes(self, url: str, *, max_size: int = MAX_SMALL_FILE) -> bytes:
        """Return the body of a small file such as SHA256SUMS, kept in memory and never cached."""
        return self._with_retries(url, lambda: self._fetch_once(url, max_size))

    def download(
        self,
        url: str,
        dest: Path,
        *,
        sha256: str,
        part: Path | None = None,
        mode: int = 0o644,
        label: str | None = None,
    ) -> None:
        """Download URL to DEST, resuming PART (default `DEST.part`), and verify its sha256.

        On success DEST has MODE and the part file is gone. A checksum mismatch
        deletes the part and raises ChecksumError. Any other failure keeps the
        part, so the next call resumes it.
        """
        part_path = part or dest.with_name(dest.name + ".part")
        part_path.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256.lower()
        state = _open_part(part_path)
        name = label or dest.name

        self._with_retries(url, lambda: self._transfer(url, state, name), position=lambda: state.size)

        actual = state.hasher.hexdigest()
        if actual != expected:
            state.discard()
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}",
                url,
                "the mirror may be in the middle of an update; try again later or use another --mirror",
            )

        _commit(state, dest, mode)
        LOG.debug("verified %s (sha256 %s)", dest, actual)

    def _with_retries(
        self,
        url: str,
        attempt: Callable[[], T],
        *,
        position: Callable[[], int] = lambda: 0,
    ) -> T:
        """Call ATTEMPT until it succeeds, retrying _Retryable failures with backoff.

        POSITION reports how many bytes are safely on disk: an attempt that got
        further than any before resets the failure count, so a flaky connection
        still finishes a large file.
        """
        failures = 0
        restarts = 0
        furthest = position()
        while True:
            try:
                return attempt()
            except _Restart as error:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise UnavailableError(
                        f"download of {url} failed: the server keeps sending inconsistent byte ranges",
                        url,
                    ) from error
                LOG.info("restarting %s from the beginning", url)
            except _Retryable as error:
                if position() > furthest:
                    furthest = position()
                    failures = 0
                failures += 1
                if failures >= self.options.attempts:
                    raise UnavailableError(
                        f"download of {url} failed after {failures} attempts: {error}",
                        url,
                        hint="check the network, or name another mirror with --mirror",
                    ) from error

                delay = self._delay(failures, error.retry_after)
                LOG.warning(
                    "download of %s failed (%s); retry %d of %d in %.1f s",
                    url,
                    error,
                    failures,
                    self.options.attempts - 1,
                    delay,
                )
                time.sleep(delay)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        delay = self.options.backoff * 2.0 ** (failures - 1)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.options.max_backoff)

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        # identity: a compressed body would not match the sha256 or the byte ranges.
        all_headers = {"Accept-Encoding": "identity", **headers}
        try:
            return self.session.get(
                url,
                headers=all_headers,
                stream=True,
                timeout=(self.options.connect_timeout, self.options.read_timeout),
            )
        except requests.exceptions.InvalidURL as error:
            raise UnavailableError(f"invalid URL {url}: {error}", url) from error
        except requests.exceptions.RequestException as error:
            raise _Retryable(_describe(error)) from error

    def _fetch_once(self, url: str, max_size: int) -> bytes:
        with _closing(self._get(url, {})) as response:
            _check_status(response, url)
            _reject_html(response, url)
            _reject_encoded(response, url)
            body = bytearray()
            for chunk in _iter_body(response, self.options.chunk_size):
                body += chunk
                if len(body) > max_size:
                    raise UnavailableError(f"{url} is larger than {format_size(max_size)}", url)
            _check_length(response, len(body))
            return bytes(body)

    def _transfer(self, url: str, state: _Part, label: str) -> None:
        headers = {}
        if_range = state.validator.if_range() if state.validator else None
        if state.size > 0 and if_range is None:
            LOG.debug("%s: no validator for the part file; starting over", label)
            state.reset()
        if state.size > 0 and if_range is not None:
            headers = {"Range": f"bytes={state.size}-", "If-Range": if_range}
            LOG.info("%s: resuming at %s", label, format_size(state.size))

        with _closing(self._get(url, headers)) as response:
            total = self._accept_response(response, url, state, label)
            self._receive(response, state, label, total)

    def _accept_response(self, response: requests.Response, url: str, state: _Part, label: str) -> int | None:
        """Match the response to the part file and return the expected full size, if known."""
        if response.status_code == 416 and state.size > 0:
            LOG.info("%s: server rejected the range request", label)
            state.reset()
            raise _Restart()

        _check_status(response, url)
        _reject_html(response, url)
        _reject_encoded(response, url)
        validator = Validator.from_headers(response.headers)

        if response.status_code == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            old = state.validator
            changed = bool(old and old.etag and validator.etag and old.etag != validator.etag)
            if start != state.size or changed:
                LOG.info("%s: server sent a different part or version of the file", label)
                state.reset()
                raise _Restart()
            return total

        if state.size > 0:
            LOG.info("%s: server sent the whole file instead of the rest; starting over", label)
            state.reset()
        state.save_validator(url, validator)
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    def _receive(self, response: requests.Response, state: _Part, label: str, total: int | None) -> None:
        progress = self.progress_factory(label, total, state.size)
        try:
            with state.path.open("ab") as out:
                for chunk in _iter_body(response, self.options.chunk_size):
                    out.write(chunk)
                    state.hasher.update(chunk)
                    state.size += len(chunk)
                    progress.update(len(chunk))
                out.flush()
        finally:
            progress.close()

        if total is not None and state.size != total:
            raise _Retryable(f"connection closed after {state.size} of {total} bytes")

    def _default_progress(self, label: str, total: int | None, initial: int) -> Progress:
        show_bar = self.options.progress_bar
        if show_bar is None:
            show_bar = sys.stderr.isatty()
        if show_bar:
            return tqdm(
                total=total,
                initial=initial,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                leave=False,
                file=sys.stderr,
            )
        return _LogProgress(label, total, initial, self.options.log_interval)


def _open_part(path: Path) -> _Part:
    """Load an existing part file and its validator, rehashing its bytes, or start an empty one.

    The server decides through If-Range whether the bytes still belong to its
    file. The sha256 check at the end catches anything that slips through.
    """
    meta_path = path.with_name(path.name + ".json")
    state = _Part(path=path, meta_path=meta_path)
    meta = _read_meta(meta_path)

    if not path.exists() or meta is None:
        state.reset()
        return state

    state.validator = Validator(etag=meta.get("etag"), last_modified=meta.get("last_modified"))
    with path.open("rb") as existing:
        while block := existing.read(HASH_BLOCK):
            state.hasher.update(block)
            state.size += len(block)
    return state


def _read_meta(meta_path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _commit(state: _Part, dest: Path, mode: int) -> None:
    """Make the verified part durable and move it to DEST in one rename."""
    with state.path.open("rb+") as verified:
        os.fsync(verified.fileno())
    os.chmod(state.path, mode)
    os.replace(state.path, dest)
    state.meta_path.unlink(missing_ok=True)
    fsync_directory(dest.parent)


def _check_status(response: requests.Response, url: str) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    reason = f"HTTP {status} {response.reason or ''}".strip()
    if status in RETRY_STATUSES or 500 <= status <= 599:
        raise _Retryable(reason, _retry_after(response.headers.get("Retry-After")))
    raise UnavailableError(f"{reason} for {url}", url, status=status)


def _reject_encoded(response: requests.Response, url: str) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnavailableError(
            f"{url} was sent with Content-Encoding {encoding} although identity was requested",
            url,
            status=response.status_code,
            hint="a proxy or the mirror compressed the file; use another --mirror",
        )


def _reject_html(response: requests.Response, url: str) -> None:
    # Captive portals and some mirrors answer 200 with an HTML page for a missing file.
    content_type = response.headers.get("Content-Type", "").lower()
    if content_type.startswith(("text/html", "application/xhtml")):
        raise UnavailableError(
            f"{url} returned an HTML page instead of the file",
            url,
            status=response.status_code,
            hint="the mirror may not carry this file, or a proxy or captive portal answered",
        )


def _check_length(response: requests.Response, received: int) -> None:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) != received:
        raise _Retryable(f"connection closed after {received} of {length} bytes")


def _iter_body(response: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """Yield the body as sent, including the bytes that arrived before a broken connection.

    requests' iter_content drops the last partial chunk when the connection
    breaks, so this reads urllib3's raw stream. Bytes are not decoded because
    the request asked for the identity encoding.
    """
    try:
        yield from response.raw.stream(chunk_size, decode_content=False)
    except urllib3.exceptions.ReadTimeoutError as error:
        raise _Retryable("no data received before the read timeout") from error
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise _Retryable(f"connection closed before the end of the file: {error}") from error


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """Return (first byte, full size) from a Content-Range header, None where absent."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _describe(error: requests.exceptions.RequestException) -> str:
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(error, requests.exceptions.ReadTimeout):
        return "no data received before the read timeout"
    text = str(error)
    if "Read timed out" in text:
        return "no data received before the read timeout"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection closed before the end of the file"
    if isinstance(error, requests.exceptions.ConnectionError):
        return f"connection failed: {text}"
    return text


@contextmanager
def _closing(response: requests.Response) -> Iterator[requests.Response]:
    try:
        yield response
    finally:
        response.close()
