"""Tests for the NoCloud seed, read back with blkid, isoinfo, cloud-init and sh."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from hkpod.errors import HkpodError
from hkpod.seed import (
    PRIVATE_KEY_PLACEHOLDER,
    SeedSpec,
    redact_seed_files,
    render_seed_files,
    render_template,
    write_seed_iso,
)

SEED_NAMES = ("user-data", "meta-data", "network-config")
MARKER = "hkpod-ready-5f0c2a9e"
ED25519_PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEHvf/wBZrnzp15yoa5Kuf1l3YkSsW7+N4FMZhtiJb59"
HOSTILE_COMMENT = "me@host \"quoted\" 'single' : # ${HOME} $UPTIME {a: [b]} ---"


def require_tool(name: str) -> str:
    """Return the path of NAME, or skip the test when it is missing (fail instead in CI, which has every tool)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI but not on PATH")
        pytest.skip(f"{name} not installed")
    return path


def keygen(path: Path, comment: str = "test", passphrase: str = "") -> Path:
    ssh_keygen = require_tool("ssh-keygen")
    subprocess.run([ssh_keygen, "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)], check=True)
    return path


def load(files: Mapping[str, bytes], name: str) -> Any:
    return yaml.safe_load(files[name])


def dig(document: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    keygen(directory / "host", "host")
    keygen(directory / "client", HOSTILE_COMMENT)
    keygen(directory / "other", "other")
    keygen(directory / "locked", "locked", passphrase="secret")
    return directory


@pytest.fixture
def spec(keys: Path) -> SeedSpec:
    return SeedSpec(
        hostname="podman",
        instance_id="iid-hkpod-0a1b2c3d",
        user="hkpod",
        authorized_key=(keys / "client.pub").read_text(),
        host_key_private=(keys / "host").read_text(),
        host_key_public=(keys / "host.pub").read_text(),
        mac="52:54:00:12:34:56",
        ready_marker=MARKER,
    )


@pytest.fixture
def files(spec: SeedSpec) -> dict[str, bytes]:
    return render_seed_files(spec)


@pytest.fixture
def iso(tmp_path: Path, files: dict[str, bytes]) -> Path:
    path = tmp_path / "seed.iso"
    write_seed_iso(files, path)
    return path


# Rendering


def test_render_names(files: dict[str, bytes]) -> None:
    assert sorted(files) == sorted(SEED_NAMES)


def test_render_user_data_header(files: dict[str, bytes]) -> None:
    assert files["user-data"].startswith(b"#cloud-config\n")


@pytest.mark.parametrize(
    ("name", "path", "expected"),
    [
        ("meta-data", ("instance-id",), lambda s: s.instance_id),
        ("meta-data", ("local-hostname",), lambda s: s.hostname),
        ("user-data", ("hostname",), lambda s: s.hostname),
        ("user-data", ("fqdn",), lambda s: s.hostname),
        ("user-data", ("preserve_hostname",), lambda s: False),
        ("user-data", ("manage_etc_hosts",), lambda s: True),
        ("user-data", ("users", 0, "name"), lambda s: s.user),
        ("user-data", ("users", 0, "shell"), lambda s: "/bin/bash"),
        ("user-data", ("users", 0, "sudo"), lambda s: "ALL=(ALL) NOPASSWD:ALL"),
        ("user-data", ("users", 0, "ssh_authorized_keys"), lambda s: [s.authorized_key.strip()]),
        ("user-data", ("ssh_authorized_keys",), lambda s: [s.authorized_key.strip()]),
        ("user-data", ("disable_root",), lambda s: False),
        ("user-data", ("ssh_pwauth",), lambda s: False),
        ("user-data", ("ssh_deletekeys",), lambda s: True),
        ("user-data", ("ssh_genkeytypes",), lambda s: ["ed25519"]),
        ("user-data", ("ssh_keys",), lambda s: {
            "ed25519_private": s.host_key_private,
            "ed25519_public": s.host_key_public.strip(),
        }),
        ("user-data", ("growpart", "mode"), lambda s: "auto"),
        ("user-data", ("growpart", "devices"), lambda s: ["/"]),
        ("user-data", ("resize_rootfs",), lambda s: True),
        ("user-data", ("runcmd", -1), lambda s: "systemctl enable --now podman.socket"),
        ("network-config", ("version",), lambda s: 2),
        ("network-config", ("ethernets", "primary", "match", "macaddress"), lambda s: s.mac),
        ("network-config", ("ethernets", "primary", "dhcp4"), lambda s: True),
        ("network-config", ("ethernets", "primary", "dhcp-identifier"), lambda s: "mac"),
    ],
)
def test_render_value(
    spec: SeedSpec,
    files: dict[str, bytes],
    name: str,
    path: tuple[str | int, ...],
    expected: Callable[[SeedSpec], Any],
) -> None:
    assert dig(load(files, name), path) == expected(spec)


@pytest.mark.parametrize("key", ["packages", "package_update", "package_upgrade", "timezone", "user"])
def test_render_user_data_omits(files: dict[str, bytes], key: str) -> None:
    assert key not in load(files, "user-data")


def test_render_single_user(files: dict[str, bytes]) -> None:
    assert len(load(files, "user-data")["users"]) == 1


def test_render_timezone(spec: SeedSpec) -> None:
    files = render_seed_files(dataclasses.replace(spec, timezone="Europe/Berlin"))
    assert load(files, "user-data")["timezone"] == "Europe/Berlin"


@pytest.mark.parametrize(("path", "expected"), [(("hostname",), "podman"), (("fqdn",), "podman.example.test")])
def test_render_fqdn(spec: SeedSpec, path: tuple[str, ...], expected: str) -> None:
    files = render_seed_files(dataclasses.replace(spec, hostname="podman.example.test"))
    assert dig(load(files, "user-data"), path) == expected


def test_render_mac_lowercase(spec: SeedSpec) -> None:
    files = render_seed_files(dataclasses.replace(spec, mac="52:54:00:AB:CD:EF"))
    assert load(files, "network-config")["ethernets"]["primary"]["match"]["macaddress"] == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize(
    "layout",
    [
        lambda key: key.rstrip("\n"),
        lambda key: key.replace("\n", "\r\n"),
        lambda key: "\n" + key + "\n\n",
        lambda key: "\n".join([key.splitlines()[0], "".join(key.splitlines()[1:-1]), key.splitlines()[-1]]),
    ],
    ids=["no-final-newline", "crlf", "blank-lines", "one-body-line"],
)
def test_render_private_key_layout(spec: SeedSpec, layout: Callable[[str], str]) -> None:
    files = render_seed_files(dataclasses.replace(spec, host_key_private=layout(spec.host_key_private)))
    assert load(files, "user-data")["ssh_keys"]["ed25519_private"] == spec.host_key_private


def test_render_final_message(files: dict[str, bytes]) -> None:
    assert load(files, "user-data")["final_message"] == f"{MARKER} cloud-init finished after $UPTIME s"


# Values cannot change the structure of the YAML.


@pytest.mark.parametrize(
    "value",
    [
        'say "hi"',
        "it's",
        "key: value",
        "# not a comment",
        "line one\nline two: 2\n- item",
        "${other}",
        "$other $$ $",
        "{a: 1} [b] & *c !d |e >f",
        "--- \n...\n",
        "back\\slash \\n \\u0041",
        "tab\there",
        "ä € \U0001f600",
        "",
    ],
)
def test_render_template_hostile(value: str) -> None:
    text = render_template("first: ${value}\nsecond: ${other}\n", {"value": value, "other": "kept"})
    assert yaml.safe_load(text) == {"first": value, "second": "kept"}


def test_render_template_unset_line() -> None:
    text = render_template("first: ${value}\nsecond: ${other}\n", {"value": "kept", "other": None})
    assert yaml.safe_load(text) == {"first": "kept"}


def test_render_hostile_key_comment(spec: SeedSpec, files: dict[str, bytes]) -> None:
    assert load(files, "user-data")["ssh_authorized_keys"] == [spec.authorized_key.strip()]


def test_render_hostile_key_comment_present(spec: SeedSpec) -> None:
    # Guards the test above: the client key really carries the hostile comment.
    assert spec.authorized_key.strip().endswith(HOSTILE_COMMENT)


# Validation


def read_key(keys: Path, name: str) -> str:
    return (keys / name).read_text()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mac", "52:54:00:12:34"),
        ("mac", "52-54-00-12-34-56"),
        ("mac", "52:54:00:12:34:5g"),
        ("mac", "525400123456"),
        ("mac", "01:00:5e:00:00:01"),
        ("mac", ""),
        ("authorized_key", ""),
        ("authorized_key", "ssh-ed25519"),
        ("authorized_key", "ssh-ed25519 not-base64!"),
        ("authorized_key", "ssh-dss AAAAB3NzaC1kc3M="),
        ("authorized_key", f"{ED25519_PUBLIC} a\nb"),
        ("authorized_key", f"{ED25519_PUBLIC} a\u2028b"),
        ("authorized_key", f"{ED25519_PUBLIC} a\x85b"),
        ("authorized_key", f"{ED25519_PUBLIC} a\x7fb"),
        ("authorized_key", ED25519_PUBLIC.replace("ssh-ed25519", "ssh-rsa")),
        ("host_key_public", ""),
        ("host_key_public", "ssh-rsa AAAAB3NzaC1yc2E="),
        ("host_key_private", ""),
        ("host_key_private", "-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64!\n-----END OPENSSH PRIVATE KEY-----\n"),
        ("host_key_private", "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"),
        ("host_key_private", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"),
        ("host_key_private", "other"),
        ("host_key_private", "locked"),
        ("hostname", ""),
        ("hostname", "under_score"),
        ("hostname", "-podman"),
        ("hostname", "podman."),
        ("hostname", "Podman"),
        ("hostname", "a" * 64),
        ("hostname", 'x"\ny: 1'),
        ("user", "root"),
        ("user", "Hkpod"),
        ("user", ""),
        ("user", "a" * 33),
        ("instance_id", ""),
        ("instance_id", "iid/../x"),
        ("instance_id", "iid 1"),
        ("ready_marker", "short"),
        ("ready_marker", "hkpod ready 123"),
        ("ready_marker", "hkpod-ready-$UPTIME"),
        ("ready_marker", "hkpod-ready-${x}"),
        ("timezone", "Europe/../Berlin"),
        ("timezone", "Europe/Ber lin"),
        ("timezone", ""),
    ],
)
def test_validate_rejected(keys: Path, spec: SeedSpec, field: str, value: str) -> None:
    if value in ("other", "locked"):
        value = read_key(keys, value)
    with pytest.raises(HkpodError):
        render_seed_files(dataclasses.replace(spec, **{field: value}))


@pytest.mark.parametrize("field", ["mac", "hostname", "user", "instance_id", "ready_marker", "authorized_key"])
def test_validate_message_names_value(spec: SeedSpec, field: str) -> None:
    with pytest.raises(HkpodError) as raised:
        render_seed_files(dataclasses.replace(spec, **{field: "bad value"}))
    assert "'bad value'" in str(raised.value)


@pytest.mark.parametrize("field", ["mac", "hostname", "user", "instance_id", "ready_marker", "authorized_key"])
def test_validate_message_has_hint(spec: SeedSpec, field: str) -> None:
    with pytest.raises(HkpodError) as raised:
        render_seed_files(dataclasses.replace(spec, **{field: "bad value"}))
    assert raised.value.hint


@pytest.mark.parametrize("name", ["other", "locked"])
def test_validate_message_hides_private_key(keys: Path, spec: SeedSpec, name: str) -> None:
    private = read_key(keys, name)
    with pytest.raises(HkpodError) as raised:
        render_seed_files(dataclasses.replace(spec, host_key_private=private))
    assert private.splitlines()[1] not in str(raised.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mac", "52:54:00:AB:CD:EF"),
        ("authorized_key", f"{ED25519_PUBLIC} Jürgen's key ✓"),
        ("authorized_key", f"  {ED25519_PUBLIC}\n"),
        ("mac", "02:00:00:00:00:01"),
        ("hostname", "podman.example.test"),
        ("hostname", "a" * 63),
        ("user", "podman_user-1"),
        ("instance_id", "6f1c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f"),
        ("ready_marker", "HKPOD_READY.1:2-3"),
        ("timezone", "America/Argentina/Buenos_Aires"),
        ("timezone", "Etc/GMT+5"),
        ("timezone", "UTC"),
    ],
)
def test_validate_accepted(spec: SeedSpec, field: str, value: str) -> None:
    assert render_seed_files(dataclasses.replace(spec, **{field: value}))


# Redaction


def test_redact_private_key_absent(spec: SeedSpec, files: dict[str, bytes]) -> None:
    body = spec.host_key_private.splitlines()[1:-1]
    redacted = b"".join(redact_seed_files(files).values()).decode()
    assert [line for line in body if line in redacted] == []


def test_redact_private_key_present_before(spec: SeedSpec, files: dict[str, bytes]) -> None:
    # Guards the test above: the unredacted files contain the key body.
    assert spec.host_key_private.splitlines()[1] in files["user-data"].decode()


def test_redact_placeholder(files: dict[str, bytes]) -> None:
    redacted = redact_seed_files(files)
    assert load(redacted, "user-data")["ssh_keys"]["ed25519_private"] == PRIVATE_KEY_PLACEHOLDER


def test_redact_public_key_kept(spec: SeedSpec, files: dict[str, bytes]) -> None:
    redacted = redact_seed_files(files)
    assert load(redacted, "user-data")["ssh_keys"]["ed25519_public"] == spec.host_key_public.strip()


@pytest.mark.parametrize("name", ["meta-data", "network-config"])
def test_redact_other_files_unchanged(files: dict[str, bytes], name: str) -> None:
    assert redact_seed_files(files)[name] == files[name]


def test_redact_unmatched_block() -> None:
    with pytest.raises(HkpodError):
        redact_seed_files({"user-data": b"key: '-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA'\n"})


# The runcmd script, run by sh with fake package and service tools that log their arguments


def run_runcmd(files: dict[str, bytes], tmp_path: Path, fakes: Mapping[str, tuple[str, int]]) -> tuple[int, list[str]]:
    """Run the user-data's runcmd as cloud-init would, with only FAKES (name: (stdout, status)) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name, (stdout, status) in fakes.items():
        fake = bin_dir / name
        fake.write_text(
            f"#!/bin/sh\nprintf '%s\\n' \"{name} $*\" >> {shlex.quote(str(log))}\n"
            f"printf '%s' {shlex.quote(stdout)}\nexit {status}\n"
        )
        fake.chmod(0o755)
    for tool in ("awk", "xargs"):
        (bin_dir / tool).symlink_to(require_tool(tool))

    script = "\n".join(load(files, "user-data")["runcmd"]) + "\n"
    result = subprocess.run(["/bin/sh", "-c", script], env={"PATH": str(bin_dir)}, capture_output=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, calls


DPKG_STATUS = (
    "ii  linux-image-6.1.0-18-amd64\n"
    "ii  linux-image-amd64\n"
    "un  linux-image-generic\n"
    "hi  linux-virtual\n"
    "rc  linux-image-5.10.0-9-amd64\n"
)
HOLD_QUERY = (
    "dpkg-query --show --showformat=${db:Status-Abbrev} ${binary:Package}\\n linux-image-* linux-generic* linux-virtual*"
)
HOLD = "apt-mark hold linux-image-6.1.0-18-amd64 linux-image-amd64 linux-virtual"
ENABLE = "systemctl enable --now podman.socket"
TOOLS = {"dpkg-query": (DPKG_STATUS, 1), "apt-mark": ("", 0), "systemctl": ("", 0)}


@pytest.mark.parametrize(
    ("fakes", "status", "expected"),
    [
        ({**TOOLS, "podman": ("", 0), "apt-get": ("", 0)}, 0, [HOLD_QUERY, HOLD, ENABLE]),
        (
            {**TOOLS, "apt-get": ("", 0)},
            0,
            [HOLD_QUERY, HOLD, "apt-get update", "apt-get install -y podman", ENABLE],
        ),
        ({**TOOLS, "apt-get": ("", 100)}, 100, [HOLD_QUERY, HOLD, "apt-get update"]),
        ({**TOOLS, "apt-mark": ("", 1), "podman": ("", 0)}, 123, [HOLD_QUERY, HOLD]),
        ({**TOOLS, "dpkg-query": ("", 1), "podman": ("", 0)}, 0, [HOLD_QUERY, ENABLE]),
    ],
    ids=["podman-present", "podman-missing", "apt-fails", "hold-fails", "no-kernel-packages"],
)
def test_runcmd(
    files: dict[str, bytes], tmp_path: Path, fakes: dict[str, tuple[str, int]], status: int, expected: list[str]
) -> None:
    assert run_runcmd(files, tmp_path, fakes) == (status, expected)


def test_runcmd_syntax(files: dict[str, bytes]) -> None:
    script = "\n".join(load(files, "user-data")["runcmd"])
    assert subprocess.run(["/bin/sh", "-n", "-c", script]).returncode == 0


# cloud-init itself


def cloud_init_python() -> str:
    """The interpreter that runs cloud-init, from its #! line, so the test can import cloudinit."""
    first_line = Path(require_tool("cloud-init")).read_text().splitlines()[0]
    return first_line.removeprefix("#!").split()[0]


def test_cloud_init_schema_valid(tmp_path: Path, spec: SeedSpec) -> None:
    cloud_init = require_tool("cloud-init")
    user_data = tmp_path / "user-data"
    user_data.write_bytes(render_seed_files(dataclasses.replace(spec, timezone="UTC"))["user-data"])
    result = subprocess.run([cloud_init, "schema", "--config-file", str(user_data)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("valid", "broken"),
    [
        ("ssh_genkeytypes: [ed25519]", "ssh_genkeytypes: []"),
        ("resize_rootfs: true", "resize_rootfs: maybe"),
    ],
)
def test_cloud_init_schema_invalid(tmp_path: Path, files: dict[str, bytes], valid: str, broken: str) -> None:
    cloud_init = require_tool("cloud-init")
    text = files["user-data"].decode()
    assert valid in text
    user_data = tmp_path / "user-data"
    user_data.write_text(text.replace(valid, broken))
    result = subprocess.run([cloud_init, "schema", "--config-file", str(user_data)], capture_output=True, text=True)
    assert result.returncode != 0


def test_cloud_init_final_message(files: dict[str, bytes]) -> None:
    # The same substitutions cloud-init's final_message module makes, by its own template renderer.
    code = (
        "import json, sys\n"
        "from cloudinit import templater\n"
        "subs = {'uptime': '12.34', 'timestamp': 'now', 'version': '1', 'datasource': 'DataSourceNoCloud'}\n"
        "subs.update({key.upper(): value for key, value in list(subs.items())})\n"
        "print(templater.render_string(json.loads(sys.argv[1]), subs))\n"
    )
    message = load(files, "user-data")["final_message"]
    result = subprocess.run(
        [cloud_init_python(), "-c", code, json.dumps(message)], capture_output=True, text=True, check=True
    )
    assert result.stdout == f"{MARKER} cloud-init finished after 12.34 s\n"


# The ISO, read back by the system's tools


def test_iso_label(iso: Path) -> None:
    blkid = require_tool("blkid")
    result = subprocess.run([blkid, "-o", "value", "-s", "LABEL", str(iso)], capture_output=True, text=True)
    assert result.stdout.strip() == "cidata"


@pytest.mark.parametrize("extension", ["-R", "-J"])
def test_iso_names(iso: Path, extension: str) -> None:
    isoinfo = require_tool("isoinfo")
    result = subprocess.run([isoinfo, extension, "-f", "-i", str(iso)], capture_output=True, text=True, check=True)
    assert sorted(result.stdout.split()) == sorted(f"/{name}" for name in SEED_NAMES)


@pytest.mark.parametrize("extension", ["-R", "-J"])
@pytest.mark.parametrize("name", SEED_NAMES)
def test_iso_contents(iso: Path, files: dict[str, bytes], extension: str, name: str) -> None:
    isoinfo = require_tool("isoinfo")
    result = subprocess.run([isoinfo, extension, "-x", f"/{name}", "-i", str(iso)], capture_output=True, check=True)
    assert result.stdout == files[name]


def test_iso_mode(iso: Path) -> None:
    assert stat.S_IMODE(iso.stat().st_mode) == 0o600


def test_iso_mode_replaces(tmp_path: Path, files: dict[str, bytes]) -> None:
    path = tmp_path / "seed.iso"
    path.write_text("old")
    path.chmod(0o644)
    write_seed_iso(files, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_iso_mode_umask(tmp_path: Path, files: dict[str, bytes]) -> None:
    old = os.umask(0o277)
    try:
        write_seed_iso(files, tmp_path / "seed.iso")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "seed.iso").stat().st_mode) == 0o600


def test_iso_no_leftovers(iso: Path) -> None:
    assert [path.name for path in iso.parent.iterdir()] == ["seed.iso"]


@pytest.mark.parametrize(
    "names",
    [
        ("user-data", "meta-data", "userdata"),
        ("user-data", "meta-data", "../network-config"),
        ("user-data", "meta-data", "User-Data"),
        ("user-data",),
        ("meta-data", "network-config"),
    ],
)
def test_iso_names_rejected(tmp_path: Path, names: tuple[str, ...]) -> None:
    with pytest.raises(HkpodError):
        write_seed_iso({name: b"x: 1\n" for name in names}, tmp_path / "seed.iso")


def test_iso_rejected_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(HkpodError):
        write_seed_iso({"user-data": b"x: 1\n"}, tmp_path / "seed.iso")
    assert list(tmp_path.iterdir()) == []


def test_iso_vendor_data(tmp_path: Path, files: dict[str, bytes]) -> None:
    isoinfo = require_tool("isoinfo")
    path = tmp_path / "seed.iso"
    write_seed_iso({**files, "vendor-data": b"#cloud-config\n"}, path)
    result = subprocess.run([isoinfo, "-R", "-x", "/vendor-data", "-i", str(path)], capture_output=True, check=True)
    assert result.stdout == b"#cloud-config\n"


def test_iso_missing_directory(tmp_path: Path, files: dict[str, bytes]) -> None:
    with pytest.raises(HkpodError):
        write_seed_iso(files, tmp_path / "missing" / "seed.iso")
