"""`hkpod doctor`: check what each driver needs on this host, and print how to fix what is missing."""

from __future__ import annotations

import enum
import getpass
import os
import platform
import shutil
from dataclasses import dataclass

from hkpod.errors import HkpodError
from hkpod.run import run

HYPERVISOR_ENTITLEMENT = "com.apple.security.hypervisor"
QEMU_HINT = "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86; macOS: brew install qemu)"


class Status(enum.Enum):
    OK = "ok"
    PROBLEM = "problem"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    driver: str
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"driver": self.driver, "check": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}


def _hyperkit_checks() -> list[Check]:
    from hkpod.drivers.hyperkit.leases import leases_path
    from hkpod.drivers.hyperkit.locate import find_hyperkit, host_supports_hyperkit

    checks = []
    supported, reason = host_supports_hyperkit()
    host = f"{platform.system()} {platform.release()} on {platform.machine()}"
    checks.append(Check("hyperkit", "host", Status.OK if supported else Status.PROBLEM,
                        host if supported else f"{host}: {reason}",
                        None if supported else "use --driver qemu on this host"))

    binary_path: str | None = None
    try:
        binary = find_hyperkit()
    except HkpodError as error:
        checks.append(Check("hyperkit", "hyperkit binary", Status.PROBLEM, error.message, error.hint))
    else:
        binary_path = str(binary.path)
        version = binary.version.text if binary.version else "unknown version"
        checks.append(Check("hyperkit", "hyperkit binary", Status.OK,
                            f"{binary.path} (from {binary.source.value}), {version}"))

    checks.append(_vmnet_check())
    checks.append(_entitlement_check(binary_path))

    leases = leases_path()
    if leases.exists():
        checks.append(Check("hyperkit", "DHCP leases", Status.OK, f"{leases} exists"))
    else:
        checks.append(Check("hyperkit", "DHCP leases", Status.PROBLEM if supported else Status.SKIPPED,
                            f"{leases} does not exist yet",
                            "macOS creates it when the first vmnet guest gets an address; nothing to do before"))
    return checks


def _vmnet_check() -> Check:
    from hkpod.drivers.hyperkit.driver import sudoers_rule, supervisor_argv

    if os.geteuid() == 0:
        return Check("hyperkit", "vmnet (root)", Status.OK, "hkpod runs as root")
    rule = sudoers_rule(getpass.getuser())
    try:
        result = run(["sudo", "-n", "-l", *supervisor_argv("run")], check=False, timeout=30)
    except HkpodError:
        return Check("hyperkit", "vmnet (root)", Status.PROBLEM, "sudo is not installed",
                     "install sudo, or run hkpod as root")
    if result.returncode == 0:
        return Check("hyperkit", "vmnet (root)", Status.OK, "passwordless sudo may start the HyperKit supervisor")
    return Check(
        "hyperkit", "vmnet (root)", Status.PROBLEM,
        "vmnet needs root: hkpod will ask for your password through sudo at create and start",
        "to skip the prompt, add this line with `sudo visudo -f /etc/sudoers.d/hkpod` (it gives you root,"
        f" because hyperkit can open any host file as a disk): {rule}",
    )


def _entitlement_check(binary: str | None) -> Check:
    codesign = shutil.which("codesign")
    if codesign is None or binary is None:
        return Check("hyperkit", "hypervisor entitlement", Status.SKIPPED,
                     "no codesign on this host" if codesign is None else "no hyperkit binary to check")
    result = run([codesign, "-d", "--entitlements", "-", binary], check=False, timeout=30)
    if HYPERVISOR_ENTITLEMENT in result.stdout + result.stderr:
        return Check("hyperkit", "hypervisor entitlement", Status.OK, f"{binary} has {HYPERVISOR_ENTITLEMENT}")
    return Check("hyperkit", "hypervisor entitlement", Status.PROBLEM,
                 f"{binary} lacks {HYPERVISOR_ENTITLEMENT}; macOS 11 and newer refuse to run its VMs",
                 "use the hyperkit that Docker Desktop or Multipass ships, which is signed with it")


def _qemu_checks() -> list[Check]:
    from hkpod.drivers.qemu import host_arch

    try:
        name = f"qemu-system-{host_arch()}"
    except HkpodError as error:
        return [Check("qemu", "QEMU binary", Status.PROBLEM, error.message, error.hint)]
    path = shutil.which(name)
    if path is None:
        return [Check("qemu", "QEMU binary", Status.PROBLEM, f"{name} not found on PATH", QEMU_HINT)]
    result = run([path, "--version"], check=False, timeout=30)
    version = (result.stdout.splitlines() or ["unknown version"])[0]
    return [Check("qemu", "QEMU binary", Status.OK, f"{path}: {version}")]


def run_checks() -> list[Check]:
    return _hyperkit_checks() + _qemu_checks()


def format_table(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status.value:<8} {check.driver:<9} {check.name}: {check.detail}")
        if check.fix and check.status is Status.PROBLEM:
            lines.append(f"{'':<18} fix: {check.fix}")
    return "\n".join(lines)
