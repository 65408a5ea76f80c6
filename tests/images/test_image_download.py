from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from hkpod.images.download import (
    ChecksumError,
    DownloadOptions,
    Fetcher,
    Progress,
    UnavailableError,
    Validator,
    format_size,
)

from .helpers import MirrorServer, etag_of

SIZE = 2 * 1024 * 1024 + 333
CUT = 1024 * 1024 + 77
PATH = "/files/disk.img"


@pytest.fixture
def served(tmp_path: Path, start_server: Callable[[Path], MirrorServer]) -> tuple[MirrorServer, bytes]:
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    data = random.Random(7).randbytes(SIZE)
    (root / "files" / "disk.img").write_bytes(data)
    return start_server(root), data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(server: MirrorServer, dest: Path, data: bytes, options: DownloadOptions, **kwargs: object) -> None:
    fetcher = Fetcher(options, **kwargs)  # type: ignore[arg-type]
    try:
        fetcher.download(server.url + PATH.lstrip("/"), dest, sha256=sha(data))
    finally:
        fetcher.close()


def test_plain_download(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    dest = tmp_path / "out" / "disk.img"
    fetch(server, dest, data, fast_options)
    assert dest.read_bytes() == data
    assert not dest.with_name("disk.img.part").exists()
    assert not dest.with_name("disk.img.part.json").exists()
    assert server.requests_for(PATH)[0].accept_encoding == "identity"


def test_cut_resumes_in_same_run(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    fetch(server, dest, data, fast_options)

    first, second = server.requests_for(PATH)
    assert dest.read_bytes() == data
    assert first.sent == CUT
    assert second.range == f"bytes={CUT}-"
    assert second.status == 206
    assert second.sent == SIZE - CUT


def test_cut_resumes_next_run(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    once = replace(fast_options, attempts=1)
    with pytest.raises(UnavailableError):
        fetch(server, dest, data, once)
    part = dest.with_name("disk.img.part")
    assert part.stat().st_size == CUT
    assert not dest.exists()

    fetch(server, dest, data, once)
    first, second = server.requests_for(PATH)
    assert dest.read_bytes() == data
    assert second.if_range == etag_of(data)
    assert second.sent == SIZE - CUT
    assert first.sent + second.sent == SIZE


def test_resume_uses_last_modified_without_etag(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    part = dest.with_name("disk.img.part")
    with pytest.raises(UnavailableError):
        fetch(server, dest, data, replace(fast_options, attempts=1))
    meta = json.loads(part.with_name("disk.img.part.json").read_text())
    meta["etag"] = None
    part.with_name("disk.img.part.json").write_text(json.dumps(meta))

    fetch(server, dest, data, fast_options)
    second = server.requests_for(PATH)[1]
    assert dest.read_bytes() == data
    assert second.if_range == meta["last_modified"]
    assert second.sent == SIZE - CUT


def test_progress_resets_retry_count(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.cut_after[PATH] = [500_000, 1_000_000, 1_500_000, 2_000_000]
    dest = tmp_path / "disk.img"
    fetch(server, dest, data, replace(fast_options, attempts=2))

    requests = server.requests_for(PATH)
    assert dest.read_bytes() == data
    assert len(requests) == 5
    assert sum(r.sent for r in requests) == SIZE


def test_server_ignoring_range(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.ignore_range = True
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    fetch(server, dest, data, fast_options)

    second = server.requests_for(PATH)[1]
    assert dest.read_bytes() == data
    assert second.range == f"bytes={CUT}-"
    assert second.status == 200
    assert second.sent == SIZE


@pytest.mark.parametrize("ignore_if_range", [False, True])
def test_changed_file_fetched_whole(
    served: tuple[MirrorServer, bytes],
    tmp_path: Path,
    fast_options: DownloadOptions,
    ignore_if_range: bool,
) -> None:
    server, old = served
    server.ignore_if_range = ignore_if_range
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    with pytest.raises(UnavailableError):
        fetch(server, dest, old, replace(fast_options, attempts=1))

    new = random.Random(8).randbytes(SIZE)
    (server.root / "files" / "disk.img").write_bytes(new)
    fetch(server, dest, new, fast_options)

    # A server that ignores If-Range sends 206 with the new ETag. The client
    # detects the change and requests the file again without Range.
    retries = server.requests_for(PATH)[1:]
    assert dest.read_bytes() == new
    assert retries[0].if_range == etag_of(old)
    assert len(retries) == (2 if ignore_if_range else 1)
    assert retries[-1].status == 200
    assert retries[-1].sent == SIZE


def test_part_without_validator_restarts(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.send_validators = False
    server.cut_after[PATH] = [CUT]
    dest = tmp_path / "disk.img"
    fetch(server, dest, data, fast_options)

    second = server.requests_for(PATH)[1]
    assert dest.read_bytes() == data
    assert second.range is None
    assert second.sent == SIZE


def test_complete_part_gets_416(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    dest = tmp_path / "disk.img"
    part = dest.with_name("disk.img.part")
    part.write_bytes(data)
    part.with_name("disk.img.part.json").write_text(
        json.dumps({"etag": etag_of(data), "last_modified": None})
    )
    fetch(server, dest, data, fast_options)

    first, second = server.requests_for(PATH)
    assert dest.read_bytes() == data
    assert first.status == 416
    assert second.sent == SIZE


def test_checksum_mismatch(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    dest = tmp_path / "disk.img"
    fetcher = Fetcher(fast_options)
    with pytest.raises(ChecksumError) as caught:
        fetcher.download(server.url + PATH.lstrip("/"), dest, sha256="0" * 64)
    assert sha(data) in caught.value.message
    assert not dest.exists()
    assert not dest.with_name("disk.img.part").exists()


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_transient_status_retried(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions, status: int
) -> None:
    server, data = served
    server.errors[PATH] = [status, status]
    dest = tmp_path / "disk.img"
    fetch(server, dest, data, fast_options)
    assert dest.read_bytes() == data
    assert [r.status for r in server.requests_for(PATH)] == [status, status, 200]


def test_retries_bounded(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.errors[PATH] = [503] * 10
    dest = tmp_path / "disk.img"
    with pytest.raises(UnavailableError, match="after 3 attempts: HTTP 503"):
        fetch(server, dest, data, fast_options)
    assert len(server.requests_for(PATH)) == 3
    assert not dest.exists()


@pytest.mark.parametrize("status", [403, 404, 410])
def test_client_error_not_retried(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions, status: int
) -> None:
    server, data = served
    server.errors[PATH] = [status]
    dest = tmp_path / "disk.img"
    with pytest.raises(UnavailableError) as caught:
        fetch(server, dest, data, fast_options)
    assert caught.value.status == status
    assert PATH in caught.value.message
    assert len(server.requests_for(PATH)) == 1


def test_html_body_rejected(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.html.add(PATH)
    dest = tmp_path / "disk.img"
    with pytest.raises(UnavailableError, match="returned an HTML page"):
        fetch(server, dest, data, fast_options)
    assert not dest.exists()
    assert not dest.with_name("disk.img.part").exists() or dest.with_name("disk.img.part").stat().st_size == 0


def test_stall_times_out(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    server.stall_after[PATH] = CUT
    dest = tmp_path / "disk.img"
    options = replace(fast_options, read_timeout=0.3, attempts=2)
    with pytest.raises(UnavailableError, match="read timeout"):
        fetch(server, dest, data, options)
    assert not dest.exists()
    assert len(server.requests_for(PATH)) == 2


def test_refused_connection(tmp_path: Path, fast_options: DownloadOptions) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "disk.img"
    fetcher = Fetcher(replace(fast_options, attempts=2))
    with pytest.raises(UnavailableError, match="connection failed"):
        fetcher.download(f"http://127.0.0.1:{port}/disk.img", dest, sha256="0" * 64)


class _Interrupting:
    """Progress that raises KeyboardInterrupt once CUT bytes arrived, like Ctrl-C."""

    def __init__(self, label: str, total: int | None, initial: int) -> None:
        self.done = initial

    def update(self, count: int) -> None:
        self.done += count
        if self.done >= CUT:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_ctrl_c_leaves_resumable_part(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    dest = tmp_path / "disk.img"
    factory: Callable[[str, int | None, int], Progress] = _Interrupting
    with pytest.raises(KeyboardInterrupt):
        fetch(server, dest, data, fast_options, progress_factory=factory)
    kept = dest.with_name("disk.img.part").stat().st_size
    assert kept >= CUT

    fetch(server, dest, data, fast_options)
    last = server.requests_for(PATH)[-1]
    assert dest.read_bytes() == data
    assert last.range == f"bytes={kept}-"
    assert last.sent == SIZE - kept


def test_mode_applied(
    served: tuple[MirrorServer, bytes], tmp_path: Path, fast_options: DownloadOptions
) -> None:
    server, data = served
    dest = tmp_path / "disk.img"
    Fetcher(fast_options).download(server.url + PATH.lstrip("/"), dest, sha256=sha(data), mode=0o444)
    assert dest.stat().st_mode & 0o777 == 0o444


def test_fetch_bytes_small_file(served: tuple[MirrorServer, bytes], fast_options: DownloadOptions) -> None:
    server, data = served
    assert Fetcher(fast_options).fetch_bytes(server.url + PATH.lstrip("/")) == data


def test_fetch_bytes_size_limit(served: tuple[MirrorServer, bytes], fast_options: DownloadOptions) -> None:
    server, _ = served
    with pytest.raises(UnavailableError, match="larger than"):
        Fetcher(fast_options).fetch_bytes(server.url + PATH.lstrip("/"), max_size=1000)


@pytest.mark.parametrize(
    ("etag", "kept"),
    [('"abc"', '"abc"'), ('W/"abc"', None), ("abc", None), (None, None)],
)
def test_validator_keeps_strong_etag(etag: str | None, kept: str | None) -> None:
    headers = {} if etag is None else {"ETag": etag}
    assert Validator.from_headers(headers).etag == kept


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 * 1024**3, "3.0 GiB"), (5 * 1024**4, "5120.0 GiB")],
)
def test_format_size(count: int, text: str) -> None:
    assert format_size(count) == text


def test_progress_bar_on_request(
    served: tuple[MirrorServer, bytes],
    tmp_path: Path,
    fast_options: DownloadOptions,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, data = served
    fetch(server, tmp_path / "disk.img", data, replace(fast_options, progress_bar=True))
    assert "disk.img" in capsys.readouterr().err


def test_progress_lines_without_terminal(
    served: tuple[MirrorServer, bytes],
    tmp_path: Path,
    fast_options: DownloadOptions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, data = served
    caplog.set_level("INFO", logger="hkpod.images.download")
    fetch(server, tmp_path / "disk.img", data, replace(fast_options, progress_bar=False, log_interval=0.0))
    assert f"disk.img: {format_size(SIZE)} of {format_size(SIZE)} (100%)" in caplog.text
