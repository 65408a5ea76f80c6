"""The HyperKit driver end to end, as an unprivileged user, with the stand-in booting the real test guest.

The user gets a sudoers rule for exactly the supervisor command that hkpod prints, and nothing
else: hkpod runs as that user, the supervisor as root. The tests share one machine and run in
file order, which is the machine's life.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, GuestImage, require_tool, run_hkpod
from hkpod.drivers.hyperkit.leases import find_ip, read_leases

pytestmark = pytest.mark.e2e

USER = "hkpod-e2e"
NAME = "hke2e"
SUDOERS_FILE = Path("/etc/sudoers.d/hkpod-e2e")
FAKE = Path(__file__).with_name("fake_hyperkit.py")
# The packages hkpod imports, copied into a virtual environment that the user can run.
DEPENDENCIES = ("click", "pycdlib", "platformdirs", "yaml", "requests", "tqdm", "urllib3", "idna",
                "charset_normalizer", "certifi")
# Bounds for waits on a guest under TCG; a test that reaches one fails.
BOOT_WAIT = 600.0


@dataclass
class Rig:
    """Everything made for the test user, under one root-owned, world-readable directory."""

    root: Path
    python: str
    image: Path
    leases: Path
    home: Path
    user_home: Path
    uid: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def machine_dir(self) -> Path:
        return self.home / "hkpod" / "machines" / NAME

    def hkpod(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run_hkpod(list(args), env=self.env, check=check, timeout=timeout, user=USER, python=self.python)

    def as_user(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["runuser", "-u", USER, "--", *argv], env=self.env, cwd=REPO, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def state(self) -> dict[str, object]:
        return json.loads((self.machine_dir / "supervisor.json").read_text())


def our_processes(marker: str) -> list[int]:
    """Pids whose command line names MARKER, a directory only this test's processes use."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command:
            found.append(int(entry.name))
    return found


def wait_for(condition: Callable[[], bool], description: str, timeout: float = BOOT_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {description} after {timeout:.0f} s")
        time.sleep(2)


def make_venv(directory: Path) -> str:
    """A virtual environment on the system's Python with copies of hkpod and its dependencies."""
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.fail(f"{system_python} is needed: the test user cannot run {sys.executable}")
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python3"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        source = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
        if source.is_dir():
            shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__"))
            # mypyc-compiled packages keep helper modules beside the package.
            for helper in source.parent.glob("*__mypyc*.so"):
                shutil.copy2(helper, site / helper.name)
        else:
            shutil.copy2(source, site / source.name)
    shutil.copytree(REPO / "hkpod", site / "hkpod", ignore=shutil.ignore_patterns("__pycache__"))
    return str(python)


def ensure_user() -> tuple[int, Path]:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/sh", USER], check=True)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, Path(entry.pw_dir)


def install_sudoers_rule(rig: Rig) -> str:
    """Install the rule hkpod prints for the user, after visudo accepts it."""
    rule = rig.as_user(rig.python, "-c", f"from hkpod.drivers.hyperkit.driver import sudoers_rule; print(sudoers_rule({USER!r}))")
    text = rule.stdout.strip() + "\n"
    candidate = rig.root / "sudoers"
    candidate.write_text(text)
    candidate.chmod(0o440)
    subprocess.run(["visudo", "-cf", str(candidate)], check=True, capture_output=True)
    shutil.copy2(candidate, SUDOERS_FILE)
    SUDOERS_FILE.chmod(0o440)
    return text


def build_rig(root: Path, image: GuestImage) -> Rig:
    uid, user_home = ensure_user()
    gid = pwd.getpwnam(USER).pw_gid
    for directory in ("bin", "image", "leases"):
        (root / directory).mkdir(mode=0o755)
    python = make_venv(root / "venv")

    shutil.copyfile(FAKE, root / "bin" / "hyperkit")
    (root / "bin" / "hyperkit").chmod(0o755)
    leases = root / "leases" / "dhcpd_leases"
    settings = {"leases": str(leases), "qemu": require_tool("qemu-system-x86_64"), "accel": "tcg,thread=multi,tb-size=256"}
    (root / "bin" / "fake_hyperkit.json").write_text(json.dumps(settings))
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        subprocess.run(["cp", "--sparse=always", str(image.dir / name), str(root / "image" / name)], check=True)
        (root / "image" / name).chmod(0o644)

    home = root / "home"
    for directory in (home, home / "run"):
        directory.mkdir(mode=0o700)
        os.chown(directory, uid, gid)
    (home / "containers.conf").touch()
    os.chown(home / "containers.conf", uid, gid)

    rig = Rig(root=root, python=python, image=root / "image", leases=leases, home=home, user_home=user_home, uid=uid)
    rig.env = {
        "PATH": f"{root / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(user_home),
        "LANG": "C.UTF-8",
        "HKPOD_HOME": str(home / "hkpod"),
        "HKPOD_CACHE": str(home / "cache"),
        "HKPOD_MIRROR": "http://127.0.0.1:9/",
        "HKPOD_DHCPD_LEASES": str(leases),
        "HKPOD_HYPERKIT_ANY_HOST": "1",
        "CONTAINERS_CONF": str(home / "containers.conf"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_RUNTIME_DIR": str(home / "run"),
    }
    install_sudoers_rule(rig)
    return rig


def kill_ours(marker: str) -> None:
    for pid in our_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def rig(test_image: GuestImage) -> Iterator[Rig]:
    for tool in ("sudo", "visudo", "useradd", "userdel", "runuser", "qemu-system-x86_64", "podman", "ssh"):
        require_tool(tool)
    if os.geteuid() != 0:
        pytest.skip("needs root to create the test user and its sudoers rule")
    root = Path(tempfile.mkdtemp(prefix="hkpod-e2e-", dir="/tmp"))
    root.chmod(0o755)
    subject: Rig | None = None
    try:
        subject = build_rig(root, test_image)
        result = subject.hkpod("create", NAME, "--driver", "hyperkit", "--image", str(subject.image / "disk.qcow2"),
                               "--kernel", str(subject.image / "vmlinuz"), "--initrd", str(subject.image / "initrd.img"),
                               "--disk", "4G", "--memory", "1G", "--cpus", "2", "--timeout", "900", check=False)
        if result.returncode != 0:
            log = subject.machine_dir / "hyperkit.log"
            pytest.fail(f"hkpod create failed:\n{result.stdout}\n{result.stderr}\n"
                        f"{log.read_text() if log.exists() else ''}")
        subject.create_output = result.stderr  # type: ignore[attr-defined]
        yield subject
    finally:
        if subject is not None:
            subject.hkpod("rm", "--force", NAME, check=False, timeout=300)
        kill_ours(str(root))
        SUDOERS_FILE.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", USER], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_create_reports_phases(rig: Rig) -> None:
    output = rig.create_output  # type: ignore[attr-defined]
    for phase in ("cloud-init finished", "SSH is up", "podman.socket is active"):
        assert phase in output


def test_doctor_sees_sudo_rule(rig: Rig) -> None:
    checks = json.loads(rig.hkpod("doctor", "--format", "json").stdout)
    vmnet = next(check for check in checks if check["check"] == "vmnet (root)")
    assert vmnet["status"] == "ok"


def test_address_from_leases(rig: Rig) -> None:
    mac = json.loads((rig.machine_dir / "config.json").read_text())["mac"]
    expected = find_ip(read_leases(rig.leases), mac, now=time.time())
    assert rig.hkpod("ip", NAME).stdout.strip() == expected


def test_address_is_loopback(rig: Rig) -> None:
    assert rig.hkpod("ip", NAME).stdout.startswith("127.")


def test_ssh(rig: Rig) -> None:
    assert rig.hkpod("ssh", NAME, "--", "hostname").stdout.strip() == NAME


def test_podman_info_as_user(rig: Rig) -> None:
    result = rig.as_user("podman", "--connection", NAME, "info", "--format", "json")
    assert json.loads(result.stdout)["host"]["hostname"] == NAME


def test_hyperkit_runs_as_root(rig: Rig) -> None:
    pid = int((rig.machine_dir / "vm.pid").read_text())
    assert os.stat(f"/proc/{pid}").st_uid == 0


def test_supervisor_socket_private(rig: Rig) -> None:
    status = (rig.machine_dir / "supervisor.sock").stat()
    assert (status.st_uid, status.st_mode & 0o777) == (rig.uid, 0o600)


def test_files_owned_by_user(rig: Rig) -> None:
    owners = {path.name: path.lstat().st_uid for path in rig.machine_dir.iterdir()}
    assert {name: uid for name, uid in owners.items() if uid != rig.uid} == {}


def test_reboot_restarts_hyperkit(rig: Rig) -> None:
    old_pid = int((rig.machine_dir / "vm.pid").read_text())
    rig.hkpod("ssh", NAME, "--", "sudo", "reboot", check=False)
    wait_for(lambda: any(item["status"] == 2 for item in rig.state().get("exits", [])), "exit status 2 recorded")  # type: ignore[union-attr]
    wait_for(lambda: rig.hkpod("ssh", NAME, "--", "true", check=False).returncode == 0, "SSH after the reboot")
    assert int((rig.machine_dir / "vm.pid").read_text()) != old_pid


def test_reboot_state(rig: Rig) -> None:
    state = rig.state()
    assert (state["state"], state["restarts"]) == ("running", 1)


def test_files_owned_by_user_after_reboot(rig: Rig) -> None:
    owners = {path.name: path.lstat().st_uid for path in rig.machine_dir.iterdir()}
    assert {name: uid for name, uid in owners.items() if uid != rig.uid} == {}


def test_stop(rig: Rig) -> None:
    rig.hkpod("stop", NAME)
    assert json.loads(rig.hkpod("inspect", NAME).stdout)["state"] == "stopped"


def test_stop_records_poweroff(rig: Rig) -> None:
    assert rig.state()["exits"][-1]["status"] == 0  # type: ignore[index]


def test_stop_leaves_no_process(rig: Rig) -> None:
    assert our_processes(str(rig.machine_dir)) == []


def test_start(rig: Rig) -> None:
    rig.hkpod("start", NAME)
    assert rig.hkpod("ssh", NAME, "--", "systemctl", "is-active", "podman.socket").stdout.strip() == "active"


def test_podman_after_start(rig: Rig) -> None:
    result = rig.as_user("podman", "--connection", NAME, "info", "--format", "json")
    assert json.loads(result.stdout)["host"]["hostname"] == NAME


def test_rm_leaves_nothing(rig: Rig) -> None:
    rig.hkpod("rm", "--force", NAME)
    known_hosts = rig.user_home / ".ssh" / "known_hosts"
    connections = rig.as_user("podman", "system", "connection", "list", "--format", "json").stdout
    assert our_processes(str(rig.machine_dir)) == []
    assert not rig.machine_dir.exists()
    assert "hkpod:" not in (known_hosts.read_text() if known_hosts.exists() else "")
    assert NAME not in [entry["Name"] for entry in json.loads(connections or "[]") or []]
