"""The HyperKit driver and its supervisor, without a guest: pid trust, exit statuses, restarts, the CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_hkpod
from hkpod.config import MachineConfig
from hkpod.drivers.hyperkit.driver import SUPERVISOR, HyperkitDriver, request, sudoers_escape, sudoers_rule
from hkpod.drivers.hyperkit.lifecycle import RESTART_LIMIT, RESTART_WINDOW, Outcome, decide, describe_exit, is_hyperkit_process
from hkpod.errors import HkpodError
from hkpod.paths import MachinePaths
from hkpod.process import is_alive

from .kernels import write_bzimage

UUID = "6ba7b810-9dad-51d1-80b4-00c04fd430c8"
OTHER_UUID = "7bed8094-b2b6-5196-aafe-f9830e7cebff"


def config(**changes: object) -> MachineConfig:
    base = MachineConfig(
        name="podman", driver="hyperkit", cpus=2, memory_mib=1024, disk_bytes=1 << 30, image="test",
        kernel_cmdline="root=/dev/vda console=ttyS0", uuid=UUID, mac="1e:a2:79:aa:bf:e2", instance_id="i",
        ready_marker="m", ssh_user="hkpod", ssh_port=22, network="nat", accel=None, created_at="now",
    )
    return base.replace(**changes)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "600"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def machine_dir(tmp_path: Path) -> MachinePaths:
    directory = tmp_path / "machine"
    directory.mkdir(mode=0o700)
    return MachinePaths(directory)


# ---- trusting pids ----


@pytest.mark.parametrize(("argv", "expected"), [
    (["/usr/local/bin/hyperkit", "-A", "-U", UUID, "-F", "x"], True),
    (["/Applications/Docker.app/Contents/Resources/bin/com.docker.hyperkit", "-U", UUID], True),
    (["/usr/bin/python3", "/tmp/bin/hyperkit", "-A", "-U", UUID], True),
    (["/Library/Application", "Support/com.canonical.multipass/bin/hyperkit", "-U", UUID], True),
    (["/usr/local/bin/hyperkit", "-U", OTHER_UUID], False),
    (["/usr/local/bin/hyperkit", "-A", UUID], False),
    (["sleep", "600", "-U", UUID], False),
    (["/usr/bin/qemu-system-x86_64", "-uuid", UUID], False),
    (["/bin/sh", "-c", f"hyperkit -U {UUID}"], False),
    ([], False),
    (None, False),
], ids=["path", "docker", "script", "ps-split-space", "other-uuid", "no-U", "sleep", "qemu", "shell", "empty", "gone"])
def test_is_hyperkit_process(argv: list[str] | None, expected: bool) -> None:
    assert is_hyperkit_process(argv, UUID) is expected


def test_sleep_pid_not_trusted(machine_dir: MachinePaths, sleeper: subprocess.Popen[bytes]) -> None:
    machine_dir.pid_file.write_text(f"{sleeper.pid}\n")

    assert HyperkitDriver().running_pid(config(), machine_dir) is None


def test_sleep_pid_not_signalled(machine_dir: MachinePaths, sleeper: subprocess.Popen[bytes]) -> None:
    machine_dir.pid_file.write_text(f"{sleeper.pid}\n")

    HyperkitDriver().stop(config(), machine_dir, force=True, timeout=0)

    assert is_alive(sleeper.pid)
    assert sleeper.poll() is None


def test_supervisor_record_of_sleep_not_trusted(machine_dir: MachinePaths, sleeper: subprocess.Popen[bytes]) -> None:
    # A state file naming a live pid that is no supervisor must not make the machine look alive.
    machine_dir.supervisor_state.write_text(json.dumps({"state": "restarting", "supervisor_pid": sleeper.pid}))

    assert HyperkitDriver().running_pid(config(), machine_dir) is None


# ---- exit statuses and restarts ----


@pytest.mark.parametrize(("status", "meaning"), [
    (0, "the guest powered off"),
    (1, "hyperkit failed"),
    (2, "the guest rebooted"),
    (3, "the guest triple-faulted"),
    (100, "hyperkit stopped for another reason"),
    (7, "hyperkit stopped for an unknown reason"),
    (-9, "hyperkit was killed by SIGKILL"),
    (-6, "hyperkit was killed by SIGABRT"),
])
def test_describe_exit(status: int, meaning: str) -> None:
    assert describe_exit(status) == meaning


@pytest.mark.parametrize(("status", "stopping", "outcome"), [
    (0, False, Outcome.STOPPED),
    (1, False, Outcome.ERROR),
    (2, False, Outcome.RESTART),
    (3, False, Outcome.ERROR),
    (100, False, Outcome.ERROR),
    (-6, False, Outcome.ERROR),
    (-9, True, Outcome.STOPPED),
    (2, True, Outcome.STOPPED),
    (1, True, Outcome.STOPPED),
])
def test_decide(status: int, stopping: bool, outcome: Outcome) -> None:
    assert decide(status, [], 1000.0, stopping=stopping) is outcome


def test_restart_limit_reached() -> None:
    now = 1000.0
    restarts = [now - 1.0 * index for index in range(RESTART_LIMIT)]

    assert decide(2, restarts, now) is Outcome.ERROR


def test_restart_below_limit() -> None:
    now = 1000.0
    restarts = [now - 1.0 * index for index in range(RESTART_LIMIT - 1)]

    assert decide(2, restarts, now) is Outcome.RESTART


def test_old_restarts_forgotten() -> None:
    now = 1000.0
    restarts = [now - RESTART_WINDOW - 1.0 - index for index in range(RESTART_LIMIT * 2)]

    assert decide(2, restarts, now) is Outcome.RESTART


REBOOTING_HYPERKIT = """#!/bin/sh
# Stands in for a hyperkit whose guest reboots at once, every time.
echo "rebooting"
exit 2
"""


def test_supervisor_stops_reboot_loop(machine_dir: MachinePaths, tmp_path: Path) -> None:
    hyperkit = tmp_path / "bin" / "hyperkit"
    hyperkit.parent.mkdir()
    hyperkit.write_text(REBOOTING_HYPERKIT)
    hyperkit.chmod(0o755)

    result = subprocess.run([sys.executable, "-I", str(SUPERVISOR), "run", "--dir", str(machine_dir.dir),
                             "--hyperkit", str(hyperkit), "--", "-U", UUID],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while json.loads(machine_dir.supervisor_state.read_text())["state"] not in ("error", "stopped"):
        assert time.monotonic() < deadline, "the supervisor did not give up"
        time.sleep(0.1)
    state = json.loads(machine_dir.supervisor_state.read_text())

    assert result.returncode == 1
    assert f"rebooted {RESTART_LIMIT + 1} times" in result.stderr
    assert state["restarts"] == RESTART_LIMIT
    assert [item["status"] for item in state["exits"]] == [2] * (RESTART_LIMIT + 1)


def idle_hyperkit(directory: Path, on_term: str) -> Path:
    """A hyperkit stand-in that writes its pid file and pty file, then idles; ON_TERM is its SIGTERM trap."""
    path = directory / "bin" / "hyperkit"
    path.parent.mkdir()
    path.write_text(
        "#!/bin/sh\n"
        "# -F PIDFILE and autopty=PTY are found in the arguments, as hyperkit reads them.\n"
        'pidfile=$(printf "%s\\n" "$@" | sed -n "/^-F$/{n;p;}")\n'
        'printf "%s" "$$" > "$pidfile"\n'
        'pty=$(printf "%s\\n" "$@" | sed -n "s/.*autopty=\\([^,]*\\).*/\\1/p")\n'
        'printf "/dev/pts/99" > "$pty"\n'
        f"trap '{on_term}' TERM\n"
        "while :; do sleep 0.1; done\n"
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def supervised(machine_dir: MachinePaths, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MachinePaths]:
    hyperkit = idle_hyperkit(tmp_path, request.param)
    args = ["-U", UUID, "-F", str(machine_dir.pid_file), "-l", f"com1,autopty={machine_dir.console_pty},log=x"]
    result = subprocess.run([sys.executable, "-I", str(SUPERVISOR), "run", "--dir", str(machine_dir.dir),
                             "--hyperkit", str(hyperkit), "--", *args],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    try:
        yield machine_dir
    finally:
        HyperkitDriver().stop(config(), machine_dir, force=True, timeout=0)


@pytest.mark.parametrize("supervised", ["exit 0"], indirect=True)
def test_supervised_running_pid(supervised: MachinePaths) -> None:
    pid = HyperkitDriver().running_pid(config(), supervised)

    assert pid == int(supervised.pid_file.read_text())


@pytest.mark.parametrize("supervised", ["exit 0"], indirect=True)
def test_supervisor_status_request(supervised: MachinePaths) -> None:
    assert request(supervised, "status") == {"ok": True, "state": "running"}


@pytest.mark.parametrize("supervised", ["exit 0"], indirect=True)
def test_stop_power_button(supervised: MachinePaths) -> None:
    HyperkitDriver().stop(config(), supervised, force=False, timeout=30)
    state = json.loads(supervised.supervisor_state.read_text())

    assert state["state"] == "stopped"
    assert [item["status"] for item in state["exits"]] == [0]
    assert HyperkitDriver().running_pid(config(), supervised) is None


@pytest.mark.parametrize("supervised", [""], indirect=True)
def test_stop_escalates_to_kill(supervised: MachinePaths) -> None:
    HyperkitDriver().stop(config(), supervised, force=False, timeout=1)
    state = json.loads(supervised.supervisor_state.read_text())

    assert state["state"] == "stopped"
    assert [item["status"] for item in state["exits"]] == [-9]


@pytest.mark.parametrize("supervised", ["exit 0"], indirect=True)
def test_exit_reason_after_stop(supervised: MachinePaths) -> None:
    HyperkitDriver().stop(config(), supervised, force=False, timeout=30)

    assert HyperkitDriver().exit_reason(config(), supervised).startswith("hyperkit exited with status 0 (the guest powered off)")


@pytest.mark.skipif(os.geteuid() != 0, reason="for another user, the supervisor's signal command runs through sudo")
def test_stop_orphan_hyperkit(machine_dir: MachinePaths, tmp_path: Path) -> None:
    # A hyperkit whose supervisor is gone is stopped through the supervisor's one-shot `signal` command.
    hyperkit = idle_hyperkit(tmp_path, "exit 0")
    process = subprocess.Popen([str(hyperkit), "-U", UUID, "-F", str(machine_dir.pid_file),
                                "-l", f"com1,autopty={machine_dir.console_pty}"])
    try:
        deadline = time.monotonic() + 60
        while HyperkitDriver().running_pid(config(), machine_dir) is None:
            assert time.monotonic() < deadline, "the stand-in wrote no pid file"
            time.sleep(0.05)
        HyperkitDriver().stop(config(), machine_dir, force=False, timeout=30)
        status = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()

    assert status == 0


def test_supervisor_refuses_missing_uuid(machine_dir: MachinePaths) -> None:
    result = subprocess.run([sys.executable, "-I", str(SUPERVISOR), "run", "--dir", str(machine_dir.dir),
                             "--hyperkit", "/bin/true", "--", "-A"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert "-U UUID" in result.stderr


def test_supervisor_refuses_open_directory(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)

    result = subprocess.run([sys.executable, "-I", str(SUPERVISOR), "run", "--dir", str(directory),
                             "--hyperkit", "/bin/true", "--", "-U", UUID], capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert "writable by others" in result.stderr


# ---- sudo ----


@pytest.mark.parametrize(("text", "escaped"), [
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("/Users/a b/venv/bin/python", "/Users/a\\ b/venv/bin/python"),
    ("a,b:c=d\\e", "a\\,b\\:c\\=d\\\\e"),
])
def test_sudoers_escape(text: str, escaped: str) -> None:
    assert sudoers_escape(text) == escaped


def test_sudoers_rule_names_supervisor() -> None:
    assert sudoers_rule("alice") == f"alice ALL=(root) NOPASSWD: {sys.executable} -I {SUPERVISOR} *"


# ---- host check and CLI ----


@pytest.mark.skipif(platform.system() == "Darwin" and platform.machine() == "x86_64", reason="an Intel Mac runs HyperKit")
def test_check_host_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HKPOD_HYPERKIT_ANY_HOST", raising=False)

    with pytest.raises(HkpodError, match="--driver qemu"):
        HyperkitDriver().check_host()


def test_check_host_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKPOD_HYPERKIT_ANY_HOST", "1")

    HyperkitDriver().check_host()


@pytest.mark.skipif(platform.system() != "Linux", reason="the message for Linux hosts")
def test_doctor_linux_needs_intel_mac() -> None:
    result = run_hkpod(["doctor", "--format", "json"], check=True)
    host = next(check for check in json.loads(result.stdout) if check["driver"] == "hyperkit" and check["check"] == "host")

    assert host["status"] == "problem"
    assert "Intel Mac" in host["detail"]
    assert "--driver qemu" in host["fix"]


@pytest.fixture
def boot_files(tmp_path: Path) -> Path:
    directory = tmp_path / "image"
    directory.mkdir()
    write_bzimage(directory / "vmlinuz")
    (directory / "initrd.img").write_bytes(bytes(4096))
    with (directory / "disk.raw").open("wb") as disk:
        disk.truncate(1 << 20)
    return directory / "disk.raw"


def test_dry_run_prints_argv(boot_files: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{tmp_path / 'empty'}:/usr/bin:/bin")
    result = run_hkpod(["create", "--driver", "hyperkit", "--dry-run", "dry", "--image", str(boot_files)], env=env, check=True)
    argv = result.stdout.splitlines()[1]

    assert argv.startswith("hyperkit -A -u -H -c 2 -m 2048M -U ")
    assert "-s 2:0,virtio-net" in argv
    assert "-f 'kexec," in argv


def test_dry_run_uses_hyperkit_option(boot_files: Path) -> None:
    result = run_hkpod(["create", "--driver", "hyperkit", "--dry-run", "dry", "--image", str(boot_files),
                        "--hyperkit", "/opt/hk/hyperkit"], check=False)

    assert result.stdout.splitlines()[1].startswith("/opt/hk/hyperkit -A ")


def test_hyperkit_option_needs_hyperkit_driver(boot_files: Path) -> None:
    result = run_hkpod(["create", "--driver", "qemu", "--dry-run", "dry", "--image", str(boot_files),
                        "--hyperkit", "/opt/hk/hyperkit"])

    assert result.returncode == 1
    assert "--hyperkit is only used by --driver hyperkit" in result.stderr


def test_config_without_hyperkit_loads() -> None:
    data = json.loads(config().to_json())
    del data["hyperkit"]

    assert MachineConfig.from_json(json.dumps(data), source=Path("config.json")).hyperkit is None
