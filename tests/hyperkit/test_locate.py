from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hkpod.drivers.hyperkit.locate import (
    DOCKER_DESKTOP_PATHS,
    HYPERKIT_ENV,
    MULTIPASS_PATHS,
    Candidate,
    HyperkitVersion,
    Source,
    find_hyperkit,
    host_supports_hyperkit,
    hyperkit_candidates,
    parse_version,
)
from hkpod.errors import HkpodError

from .fake_hyperkit import VERSION_ENV

FAKE = Path(__file__).with_name("fake_hyperkit.py")
OLD = "v0.20180403"


@pytest.fixture(autouse=True)
def default_fake_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VERSION_ENV, raising=False)


def install_fake(path: Path, version: str | None = None) -> Path:
    """Put the stand-in at PATH; it prints PATH's file name in its -v output, as hyperkit does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if version is None:
        path.symlink_to(FAKE)
        return path

    real = path.parent / ".fake" / path.name
    real.parent.mkdir(exist_ok=True)
    real.symlink_to(FAKE)
    write_script(path, f'{VERSION_ENV}={version} exec "{real}" "$@"')
    return path


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def env_with_path(*directories: Path) -> dict[str, str]:
    return {"PATH": ":".join(str(directory) for directory in directories)}


@pytest.mark.parametrize(
    ("output", "date", "text"),
    [
        ("hyperkit: v0.20200224-44-gb54460", 20200224, "v0.20200224-44-gb54460"),
        ("hyperkit: 0.20210107", 20210107, "0.20210107"),
        ("com.docker.hyperkit: v0.20190201\n\nHomepage: https://github.com/docker/hyperkit\n", 20190201, "v0.20190201"),
        ("\nhyperkit: v0.20210107-fake\n", 20210107, "v0.20210107-fake"),
    ],
)
def test_parse_version(output: str, date: int, text: str) -> None:
    version = parse_version(output)

    assert version is not None
    assert version.date == date
    assert version.text == text


@pytest.mark.parametrize(
    "output", ["", "hyperkit: 3cb0d54", "hyperkit: v0.2021010", "hyperkit: v0.202101071", "v0.20210107"]
)
def test_parse_version_none(output: str) -> None:
    assert parse_version(output) is None


def test_version_compares_dates() -> None:
    assert HyperkitVersion(20200224, "v0.20200224-44-gb54460") < HyperkitVersion(20210107, "0.20210107")
    assert HyperkitVersion(20210107, "v0.20210107") == HyperkitVersion(20210107, "0.20210107")


def test_candidates_order(tmp_path: Path, root: Path) -> None:
    bin_dir = tmp_path / "bin"
    install_fake(bin_dir / "hyperkit")

    candidates = hyperkit_candidates(
        "/opt/hk/hyperkit", env={HYPERKIT_ENV: "/opt/env/hyperkit", **env_with_path(bin_dir)}, root=root
    )

    assert [candidate.source for candidate in candidates] == [
        Source.OPTION,
        Source.ENV,
        Source.PATH,
        *[Source.DOCKER_DESKTOP] * len(DOCKER_DESKTOP_PATHS),
        *[Source.MULTIPASS] * len(MULTIPASS_PATHS),
    ]
    assert candidates[0].path == Path("/opt/hk/hyperkit")
    assert candidates[1].path == Path("/opt/env/hyperkit")
    assert candidates[2].path == bin_dir / "hyperkit"
    assert candidates[3].path == root / "Applications/Docker.app/Contents/Resources/bin/com.docker.hyperkit"
    assert candidates[-1].path == root / "Library/Application Support/com.canonical.multipass/bin/hyperkit"


def test_candidates_relative_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    candidates = hyperkit_candidates("bin/hyperkit", env={})

    assert candidates[0].path == tmp_path / "bin" / "hyperkit"


def test_candidates_skip_missing_path_entry(tmp_path: Path, root: Path) -> None:
    candidates = hyperkit_candidates(env=env_with_path(tmp_path), root=root)

    assert Source.PATH not in [candidate.source for candidate in candidates]


@pytest.fixture
def everywhere(tmp_path: Path, root: Path) -> dict[Source, Path]:
    """A working stand-in at one place for each source."""
    return {
        Source.OPTION: install_fake(tmp_path / "option" / "hyperkit"),
        Source.ENV: install_fake(tmp_path / "env" / "hyperkit"),
        Source.PATH: install_fake(tmp_path / "bin" / "hyperkit"),
        Source.DOCKER_DESKTOP: install_fake(root / DOCKER_DESKTOP_PATHS[0]),
        Source.MULTIPASS: install_fake(root / MULTIPASS_PATHS[0]),
    }


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({Source.OPTION, Source.ENV, Source.PATH, Source.DOCKER_DESKTOP, Source.MULTIPASS}, Source.OPTION),
        ({Source.ENV, Source.PATH, Source.DOCKER_DESKTOP, Source.MULTIPASS}, Source.ENV),
        ({Source.PATH, Source.DOCKER_DESKTOP, Source.MULTIPASS}, Source.PATH),
        ({Source.DOCKER_DESKTOP, Source.MULTIPASS}, Source.DOCKER_DESKTOP),
        ({Source.MULTIPASS}, Source.MULTIPASS),
    ],
)
def test_first_match_wins(
    tmp_path: Path, root: Path, everywhere: dict[Source, Path], present: set[Source], expected: Source
) -> None:
    for source, path in everywhere.items():
        if source not in present and source is not Source.OPTION and source is not Source.ENV:
            path.unlink()
    env = env_with_path(tmp_path / "bin")
    if Source.ENV in present:
        env[HYPERKIT_ENV] = str(everywhere[Source.ENV])
    explicit = str(everywhere[Source.OPTION]) if Source.OPTION in present else None

    binary = find_hyperkit(explicit, env=env, root=root)

    assert binary.source == expected
    assert binary.path == everywhere[expected]


def test_docker_desktop_version(root: Path) -> None:
    install_fake(root / DOCKER_DESKTOP_PATHS[0])

    binary = find_hyperkit(env={"PATH": ""}, root=root)

    assert binary.version == HyperkitVersion(20210107, "v0.20210107-fake")


@pytest.mark.parametrize("relative", DOCKER_DESKTOP_PATHS)
def test_each_docker_desktop_path(root: Path, relative: str) -> None:
    install_fake(root / relative)

    binary = find_hyperkit(env={"PATH": ""}, root=root)

    assert binary.path == root / relative


def test_option_missing_raises(tmp_path: Path, root: Path) -> None:
    install_fake(root / DOCKER_DESKTOP_PATHS[0])

    with pytest.raises(HkpodError, match=r"hyperkit .*nowhere/hyperkit \(from the --hyperkit option\): not found"):
        find_hyperkit(str(tmp_path / "nowhere" / "hyperkit"), env={"PATH": ""}, root=root)


def test_env_missing_raises(tmp_path: Path, root: Path) -> None:
    install_fake(root / DOCKER_DESKTOP_PATHS[0])
    env = {"PATH": "", HYPERKIT_ENV: str(tmp_path / "nowhere")}

    with pytest.raises(HkpodError, match=r"\(from \$HKPOD_HYPERKIT\): not found"):
        find_hyperkit(env=env, root=root)


def test_option_too_old_raises(tmp_path: Path, root: Path) -> None:
    install_fake(root / DOCKER_DESKTOP_PATHS[0])
    old = install_fake(tmp_path / "old" / "hyperkit", version=OLD)

    with pytest.raises(HkpodError) as raised:
        find_hyperkit(str(old), env={"PATH": ""}, root=root)

    assert f"version {OLD}" in raised.value.message
    assert "older than 0.20190201" in raised.value.message
    assert "Docker Desktop" in (raised.value.hint or "")


def test_old_candidate_skipped(tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = install_fake(tmp_path / "bin" / "hyperkit", version=OLD)
    install_fake(root / DOCKER_DESKTOP_PATHS[0])
    caplog.set_level(logging.DEBUG, logger="hkpod.drivers.hyperkit.locate")

    binary = find_hyperkit(env=env_with_path(tmp_path / "bin"), root=root)

    assert binary.source == Source.DOCKER_DESKTOP
    assert f"skipping hyperkit {old}: version {OLD} is too old" in caplog.text


def test_only_old_candidates_raise(tmp_path: Path, root: Path) -> None:
    install_fake(tmp_path / "bin" / "hyperkit", version=OLD)

    with pytest.raises(HkpodError, match=r"older than 0\.20190201"):
        find_hyperkit(env=env_with_path(tmp_path / "bin"), root=root)


def test_minimum_version_accepted(tmp_path: Path, root: Path) -> None:
    install_fake(tmp_path / "bin" / "hyperkit", version="v0.20190201")

    binary = find_hyperkit(env=env_with_path(tmp_path / "bin"), root=root)

    assert binary.version == HyperkitVersion(20190201, "v0.20190201")


def test_not_executable_skipped(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = root / DOCKER_DESKTOP_PATHS[0]
    plain.parent.mkdir(parents=True)
    plain.write_text("not a program")
    install_fake(root / MULTIPASS_PATHS[0])
    caplog.set_level(logging.DEBUG, logger="hkpod.drivers.hyperkit.locate")

    binary = find_hyperkit(env={"PATH": ""}, root=root)

    assert binary.source == Source.MULTIPASS
    assert f"skipping hyperkit candidate {plain} (Docker Desktop): not an executable file" in caplog.text


def test_failing_binary_skipped(root: Path) -> None:
    write_script(root / DOCKER_DESKTOP_PATHS[0], "exit 3")
    install_fake(root / MULTIPASS_PATHS[0])

    binary = find_hyperkit(env={"PATH": ""}, root=root)

    assert binary.source == Source.MULTIPASS


def test_failing_option_raises(tmp_path: Path, root: Path) -> None:
    broken = write_script(tmp_path / "hyperkit", "exit 3")

    with pytest.raises(HkpodError, match="exited with status 3"):
        find_hyperkit(str(broken), env={"PATH": ""}, root=root)


def test_unknown_version_accepted(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_script(root / DOCKER_DESKTOP_PATHS[0], 'echo "com.docker.hyperkit: 3cb0d54" >&2')

    binary = find_hyperkit(env={"PATH": ""}, root=root)

    assert binary.version is None
    assert "cannot tell the version of hyperkit" in caplog.text


def test_not_found(tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hkpod.drivers.hyperkit.locate")

    with pytest.raises(HkpodError) as raised:
        find_hyperkit(env=env_with_path(tmp_path), root=root)

    hint = raised.value.hint or ""
    assert raised.value.message == "hyperkit not found"
    assert "Docker Desktop for Intel Macs" in hint
    assert "Multipass before 1.13" in hint
    assert "moby/hyperkit" in hint
    assert "Homebrew no longer ships it" in hint
    assert "--hyperkit PATH" in hint
    assert "no hyperkit on PATH" in caplog.text
    assert caplog.text.count("skipping hyperkit candidate") == len(DOCKER_DESKTOP_PATHS) + len(MULTIPASS_PATHS)


def test_explicit_candidate_list(tmp_path: Path) -> None:
    fake = install_fake(tmp_path / "hyperkit")

    binary = find_hyperkit(candidates=[Candidate(tmp_path / "absent", Source.PATH), Candidate(fake, Source.MULTIPASS)])

    assert binary.path == fake
    assert binary.source == Source.MULTIPASS


@pytest.mark.parametrize(
    ("system", "machine", "translated", "supported", "reason"),
    [
        ("Linux", "x86_64", False, False, "this is Linux: use --driver qemu"),
        ("Darwin", "arm64", False, False, "Apple silicon (arm64): use --driver qemu"),
        ("Darwin", "x86_64", True, False, "Rosetta 2): use --driver qemu"),
        ("Darwin", "x86_64", False, True, "macOS on an Intel CPU"),
    ],
)
def test_host_supports_hyperkit(system: str, machine: str, translated: bool, supported: bool, reason: str) -> None:
    result = host_supports_hyperkit(system=system, machine=machine, translated=translated)

    assert result[0] is supported
    assert reason in result[1]


def test_this_linux_host_unsupported() -> None:
    import platform

    if platform.system() != "Linux":
        pytest.skip("checks the default detection on Linux")

    supported, reason = host_supports_hyperkit()

    assert not supported
    assert "--driver qemu" in reason
