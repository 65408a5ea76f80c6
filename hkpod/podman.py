"""The host's podman client: system connections and the known_hosts entry podman checks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hkpod.config import write_atomic
from hkpod.errors import HkpodError
from hkpod.run import CommandError, run
from hkpod.ssh import read_public_key

LOG = logging.getLogger(__name__)

ROOTFUL_SOCKET = "/run/podman/podman.sock"
MIN_SERVER_MAJOR_FOR_V4_CLIENT = 4


def find_client() -> str | None:
    return shutil.which("podman")


def connection_uri(user: str, host: str, port: int) -> str:
    authority = f"[{host}]" if ":" in host else host
    return f"ssh://{user}@{authority}:{port}{ROOTFUL_SOCKET}"


def user_known_hosts() -> Path:
    """Return the only known_hosts file podman's own SSH client reads."""
    return Path(os.path.expanduser("~")) / ".ssh" / "known_hosts"


def _marker(machine: str) -> str:
    return f"hkpod:{machine}"


def _host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def remove_known_host(machine: str, path: Path | None = None) -> None:
    """Remove the lines hkpod added for MACHINE; other lines stay byte for byte."""
    path = path or user_known_hosts()
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    marker = _marker(machine)
    kept = [line for line in lines if line.split()[-1:] != [marker]]
    if kept != lines:
        write_atomic(path, "".join(kept).encode(), mode=path.stat().st_mode & 0o777)


def add_known_host(machine: str, host: str, port: int, host_public_key: Path, path: Path | None = None) -> None:
    """Pin MACHINE's host key for HOST:PORT in podman's known_hosts, tagged so it can be removed again."""
    path = path or user_known_hosts()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_known_host(machine, path)
    key_type, blob = read_public_key(host_public_key)
    entry = f"{_host_pattern(host, port)} {key_type} {blob} {_marker(machine)}\n"
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    write_atomic(path, (existing + entry).encode(), mode=mode)


def list_connections(podman: str) -> dict[str, str]:
    """Return the host's podman connections as {name: URI}."""
    result = run([podman, "system", "connection", "list", "--format", "json"])
    entries = json.loads(result.stdout or "[]") or []
    return {entry["Name"]: entry.get("URI", "") for entry in entries}


def add_connection(podman: str, name: str, uri: str, identity: Path) -> bool:
    """Register NAME (replacing an older one of that name); return True when it became the default."""
    connections = list_connections(podman)
    if name in connections:
        run([podman, "system", "connection", "remove", name])
    make_default = not (connections.keys() - {name})
    argv = [podman, "system", "connection", "add", "--identity", str(identity.absolute())]
    if make_default:
        argv.append("--default")
    run([*argv, name, uri])
    return make_default


def remove_connection(podman: str, name: str) -> None:
    if name in list_connections(podman):
        run([podman, "system", "connection", "remove", name])


@dataclass(frozen=True)
class ServerInfo:
    hostname: str
    kernel: str
    version: str


def _major(version: str) -> int:
    match = re.match(r"\D*(\d+)", version)
    return int(match.group(1)) if match else 0


def client_version(podman: str) -> str:
    result = run([podman, "--version"])
    return result.stdout.strip().split()[-1]


def query_server(podman: str, name: str, server_version: str | None) -> ServerInfo:
    """Run `podman --connection NAME info`; an incompatible server is named with both versions."""
    client = client_version(podman)
    if server_version and _major(client) >= 4 and _major(server_version) < MIN_SERVER_MAJOR_FOR_V4_CLIENT:
        raise HkpodError(
            f"podman client {client} cannot talk to podman {server_version} in the guest (clients 4 and newer need a server with API 4.0 or newer)",
            "use an image that ships podman 4 or newer, e.g. Ubuntu 24.04",
        )
    try:
        result = run([podman, "--connection", name, "info", "--format", "json"], timeout=120)
    except CommandError as error:
        raise HkpodError(
            f"podman --connection {name} info failed (client {client}, server {server_version or 'unknown'}): {error.stderr.strip()[-300:]}",
            "check `hkpod logs` and `hkpod ssh` into the machine",
        ) from error
    info = json.loads(result.stdout)
    host = info.get("host", {})
    version = info.get("version", {}).get("Version", server_version or "")
    return ServerInfo(hostname=host.get("hostname", ""), kernel=host.get("kernel", ""), version=version)
