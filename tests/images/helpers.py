"""A local mirror server, real gpg test keys and a cloud-images-like tree, for the image tests."""

from __future__ import annotations

import hashlib
import http.server
import random
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

WRITE_BLOCK = 64 * 1024
STALL_LIMIT = 30.0


# Local mirror server


@dataclass
class LoggedRequest:
    """One request the server received, and how many body bytes it handed to the socket."""

    path: str
    range: str | None
    if_range: str | None
    accept_encoding: str | None
    status: int = 0
    sent: int = 0


@dataclass
class MirrorServer:
    """A static mirror of ROOT. The attributes below make it misbehave in controlled ways."""

    root: Path
    log: list[LoggedRequest] = field(default_factory=list)
    ignore_range: bool = False
    ignore_if_range: bool = False
    send_validators: bool = True
    # path -> file offsets at which the connection is closed, one per request.
    cut_after: dict[str, list[int]] = field(default_factory=dict)
    # path -> file offset at which the server stops sending, on every request.
    stall_after: dict[str, int] = field(default_factory=dict)
    # path -> HTTP statuses to respond with, consumed one per request.
    errors: dict[str, list[int]] = field(default_factory=dict)
    # paths that get 200 and an HTML page.
    html: set[str] = field(default_factory=set)
    port: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def requests_for(self, path: str) -> list[LoggedRequest]:
        with self.lock:
            return [entry for entry in self.log if entry.path == path]

    def paths(self) -> list[str]:
        with self.lock:
            return [entry.path for entry in self.log]


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MirrorHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        mirror = self.server.mirror
        path = urllib.parse.urlsplit(self.path).path
        entry = LoggedRequest(
            path=path,
            range=self.headers.get("Range"),
            if_range=self.headers.get("If-Range"),
            accept_encoding=self.headers.get("Accept-Encoding"),
        )
        with mirror.lock:
            mirror.log.append(entry)
            queued = mirror.errors.get(path)
            forced = queued.pop(0) if queued else None

        if forced is not None:
            self._send_simple(entry, forced, b"temporary failure\n", "text/plain")
            return
        if path in mirror.html:
            self._send_simple(entry, 200, b"<html><body>Mirror maintenance</body></html>\n", "text/html")
            return

        file = mirror.root / path.lstrip("/")
        if not file.is_file():
            self._send_simple(entry, 404, b"<html><body>404 Not Found</body></html>\n", "text/html")
            return
        self._send_file(entry, file)

    def _send_simple(self, entry: LoggedRequest, status: int, body: bytes, content_type: str) -> None:
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(entry, body)

    def _send_file(self, entry: LoggedRequest, file: Path) -> None:
        mirror = self.server.mirror
        data = file.read_bytes()
        etag = etag_of(data)
        modified = formatdate(file.stat().st_mtime, usegmt=True)
        start = self._range_start(entry, etag, modified)

        if start is not None and start >= len(data):
            entry.status = 416
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        entry.status = 200 if start is None else 206
        self.send_response(entry.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if mirror.send_validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        body = data[start or 0 :]
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

        with mirror.lock:
            cuts = mirror.cut_after.get(entry.path)
            cut = cuts.pop(0) if cuts else None
            stall = mirror.stall_after.get(entry.path)
        if cut is not None:
            self._write(entry, body[: max(0, cut - (start or 0))])
            self.close_connection = True
        elif stall is not None:
            self._write(entry, body[: max(0, stall - (start or 0))])
            mirror.released.wait(STALL_LIMIT)
            self.close_connection = True
        else:
            self._write(entry, body)

    def _range_start(self, entry: LoggedRequest, etag: str, modified: str) -> int | None:
        mirror = self.server.mirror
        if entry.range is None or mirror.ignore_range:
            return None
        if (
            entry.if_range is not None
            and not mirror.ignore_if_range
            and entry.if_range not in (etag, modified)
        ):
            return None
        spec = entry.range.removeprefix("bytes=")
        first, _, _ = spec.partition("-")
        return int(first)

    def _write(self, entry: LoggedRequest, body: bytes) -> None:
        # Count before writing: the client may finish reading before this thread runs again.
        for offset in range(0, len(body), WRITE_BLOCK):
            block = body[offset : offset + WRITE_BLOCK]
            entry.sent += len(block)
            try:
                self.wfile.write(block)
            except OSError:
                entry.sent -= len(block)
                self.close_connection = True
                return
        self.wfile.flush()


class MirrorHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mirror: MirrorServer


# OpenPGP keys


@dataclass(frozen=True)
class GpgKeys:
    """A throwaway GNUPGHOME with two signing keys and their exported public keys."""

    home: Path
    trusted_fpr: str
    other_fpr: str
    trusted_pub: Path
    other_pub: Path

    def sign(self, data: Path, *, key: str = "trusted") -> Path:
        fingerprint = self.trusted_fpr if key == "trusted" else self.other_fpr
        signature = data.with_name(data.name + ".gpg")
        run_gpg(
            self.home,
            "--yes",
            "--local-user",
            fingerprint,
            "--output",
            str(signature),
            "--detach-sign",
            str(data),
        )
        return signature


def run_gpg(home: Path, *args: str) -> str:
    result = subprocess.run(
        ["gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", "", *args],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout


def new_key(home: Path, uid: str) -> str:
    run_gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = run_gpg(home, "--with-colons", "--list-keys", uid)
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


# A cloud-images-like tree


IMAGE_SIZE = 3 * 1024 * 1024 + 4321
KERNEL_SIZE = 700 * 1024 + 17
INITRD_SIZE = 1024 * 1024 + 99


@dataclass
class CloudTree:
    """`releases/<codename>/release/` under ROOT, with files named as Ubuntu names them."""

    root: Path
    keys: GpgKeys
    version: str = "24.04"
    codename: str = "noble"
    arch: str = "amd64"
    layout: str = "parent"
    seed: int = 1

    @property
    def directory(self) -> Path:
        return self.root / "releases" / self.codename / "release"

    @property
    def prefix(self) -> str:
        return f"ubuntu-{self.version}-server-cloudimg"

    @property
    def image_name(self) -> str:
        return f"{self.prefix}-{self.arch}.img"

    @property
    def kernel_name(self) -> str:
        return f"unpacked/{self.prefix}-{self.arch}-vmlinuz-generic"

    @property
    def initrd_name(self) -> str:
        return f"unpacked/{self.prefix}-{self.arch}-initrd-generic"

    def url_path(self, name: str) -> str:
        return "/" + (self.directory / name).relative_to(self.root).as_posix()

    def data(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def digest(self, name: str) -> str:
        return hashlib.sha256(self.data(name)).hexdigest()

    def build(self) -> CloudTree:
        """Write the files with fresh content from SEED, the checksum lists and their signatures."""
        rng = random.Random(self.seed)
        other_arch = "arm64" if self.arch == "amd64" else "amd64"
        files = {
            self.image_name: rng.randbytes(IMAGE_SIZE),
            self.kernel_name: rng.randbytes(KERNEL_SIZE),
            self.initrd_name: rng.randbytes(INITRD_SIZE),
            # Neighbors that must not be picked: other architectures and formats.
            f"{self.prefix}-{other_arch}.img": rng.randbytes(1000),
            f"{self.prefix}-{self.arch}-disk-kvm.img": rng.randbytes(1000),
            f"{self.prefix}-{self.arch}.tar.gz": rng.randbytes(1000),
            f"{self.prefix}-{self.arch}.img.manifest": b"manifest\n",
            f"unpacked/{self.prefix}-{other_arch}-vmlinuz-generic": rng.randbytes(1000),
            f"unpacked/{self.prefix}-{self.arch}-vmlinuz-lowlatency": rng.randbytes(1000),
        }
        for name, content in files.items():
            path = self.directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        self.write_sums()
        return self

    def write_sums(self, *, sign_with: str | None = "trusted") -> None:
        names = sorted(
            p.relative_to(self.directory).as_posix()
            for p in self.directory.rglob("*")
            if p.is_file() and not p.name.startswith("SHA256SUMS")
        )
        top = [n for n in names if self.layout == "parent" or not n.startswith("unpacked/")]
        self._write_list(self.directory, top, sign_with)
        if self.layout == "separate":
            inner = [n.removeprefix("unpacked/") for n in names if n.startswith("unpacked/")]
            self._write_list(self.directory / "unpacked", inner, sign_with)

    def _write_list(self, directory: Path, names: list[str], sign_with: str | None) -> None:
        lines = [f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()} *{n}\n" for n in names]
        sums = directory / "SHA256SUMS"
        sums.write_text("".join(lines))
        (directory / "SHA256SUMS.gpg").unlink(missing_ok=True)
        if sign_with is not None:
            self.keys.sign(sums, key=sign_with)
