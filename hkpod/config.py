"""A machine's configuration: a frozen dataclass stored as versioned JSON, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hkpod.errors import HkpodError

SCHEMA_VERSION = 1
MAX_NAME_LENGTH = 63
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def validate_name(name: str) -> str:
    """Return NAME if it is a valid machine name (a DNS label: it becomes the guest's hostname)."""
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        raise HkpodError(
            f"invalid machine name {name!r}",
            f"use lowercase letters, digits and '-', starting and ending with a letter or digit, at most {MAX_NAME_LENGTH} characters",
        )
    return name


@dataclass(frozen=True)
class MachineConfig:
    """Everything needed to start a machine again; derived state (running or not) is never stored."""

    name: str
    driver: str
    cpus: int
    memory_mib: int
    disk_bytes: int
    image: str
    kernel_cmdline: str
    uuid: str
    mac: str
    instance_id: str
    ready_marker: str
    ssh_user: str
    ssh_port: int
    network: str
    accel: str | None
    created_at: str
    podman_connection: str | None = None
    # sha256 digests of the cached blobs the machine was made from; `image prune` keeps them.
    image_digests: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    # The hyperkit binary chosen at create, so every start uses the same one (None: search again).
    hyperkit: str | None = None
    schema_version: int = SCHEMA_VERSION

    def replace(self, **changes: Any) -> MachineConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: Path) -> MachineConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise HkpodError(f"{source} is not valid JSON: {error}", "restore it or remove the machine with `hkpod rm --force`") from error
        if not isinstance(data, dict):
            raise HkpodError(f"{source} does not hold a JSON object", "restore it or remove the machine with `hkpod rm --force`")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise HkpodError(
                f"{source} has schema version {version!r}, this hkpod reads version {SCHEMA_VERSION}",
                "use the hkpod version that created the machine",
            )
        names = {field.name for field in dataclasses.fields(cls)}
        optional = {field.name for field in dataclasses.fields(cls) if field.default is not dataclasses.MISSING}
        missing = sorted(names - optional - data.keys())
        if missing:
            raise HkpodError(f"{source} lacks {', '.join(missing)}", "restore it or remove the machine with `hkpod rm --force`")
        values = {key: value for key, value in data.items() if key in names}
        for key, value in values.items():
            if not _has_type(value, _FIELD_TYPES[key]):
                raise HkpodError(
                    f"{source}: {key} is {value!r}, which is not a valid {_FIELD_TYPES[key]}",
                    "restore it or remove the machine with `hkpod rm --force`",
                )
        values["image_digests"] = tuple(values.get("image_digests", ()))
        return cls(**values)


# JSON types of the config fields, as from_json checks them.
_FIELD_TYPES = {field.name: str(field.type) for field in dataclasses.fields(MachineConfig)}


def _has_type(value: object, annotation: str) -> bool:
    """Check VALUE from JSON against a field annotation such as `int`, `str | None` or `tuple[str, ...]`."""
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option.startswith("tuple[str") and isinstance(value, list) and all(isinstance(item, str) for item in value):
            return True
    return False


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write DATA to PATH so that readers see either the old or the new file, never a partial one."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_config(config: MachineConfig, path: Path) -> None:
    write_atomic(path, config.to_json().encode())


def load_config(path: Path) -> MachineConfig:
    try:
        text = path.read_text()
    except FileNotFoundError as error:
        raise HkpodError(f"{path} is missing", "the machine is incomplete: remove it with `hkpod rm --force`") from error
    return MachineConfig.from_json(text, source=path)
