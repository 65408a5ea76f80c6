"""The HyperKit supervisor: the one part of hkpod that runs as root.

vmnet, and so hyperkit's virtio-net device and its -M query, needs root, yet
hkpod runs as the user and every file of a machine stays the user's. sudo
cannot relay SIGKILL, and a user cannot signal a root process, so hkpod does
not run hyperkit under sudo itself. It runs this module under sudo instead:

    python -I .../hkpod/drivers/hyperkit/supervisor.py run --dir DIR --hyperkit PATH -- ARGS...
    python -I .../hkpod/drivers/hyperkit/supervisor.py query-mac --hyperkit PATH --uuid UUID
    python -I .../hkpod/drivers/hyperkit/supervisor.py signal --dir DIR --uuid UUID --signal KILL

It is run by path with -I, so that neither the environment nor the working
directory decides which code runs as root, and a sudoers rule can name this
exact file.

`run` detaches (a new session) and starts hyperkit with ARGS. It writes its
own files (the state file, hyperkit.log, the control socket) as the owner of
DIR: its effective user id is root only to start, signal and chown.
It chowns the files hyperkit writes (pid file, pty file, console log) to the
owner, records each start and exit status in the state file, starts hyperkit
again when the guest reboots (exit status 2), at most RESTART_LIMIT times in
RESTART_WINDOW seconds, and takes `stop`, `kill` and `status` requests on a
unix socket in DIR. The socket is mode 0600 and owned by DIR's owner, DIR is
0700, and each connection's peer uid is checked as well (SO_PEERCRED on Linux,
LOCAL_PEERCRED on macOS): only DIR's owner and root are answered.

sudo strips the environment, so everything comes as arguments. Under sudo
(SUDO_UID set), DIR must belong to the user who ran sudo, and the hyperkit
binary must be owned by root and writable by nobody else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

if __name__ == "__main__":
    # Run by path: make the hkpod package that contains this file importable (-I adds no directory).
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from hkpod.drivers.hyperkit.lifecycle import (
    EXIT_REBOOT,
    FINAL_STATES,
    RESTART_LIMIT,
    RESTART_WINDOW,
    Outcome,
    State,
    decide,
    describe_exit,
    is_hyperkit_process,
)
from hkpod.paths import MachinePaths
from hkpod.process import command_line, read_pid_file

# How long `run` waits for hyperkit to set up its devices before it reports success anyway.
HANDSHAKE_TIMEOUT = 60.0
POLL_INTERVAL = 0.5
CONSOLE_TAIL_LINES = 30
MAX_RECORDED_EXITS = 20
MAX_REQUEST_BYTES = 4096

# macOS <sys/un.h>: getsockopt(fd, SOL_LOCAL, LOCAL_PEERCRED) fills a struct xucred.
SOL_LOCAL = 0
LOCAL_PEERCRED = 0x001
XUCRED_SIZE = 76


class SupervisorError(Exception):
    """A request the supervisor cannot carry out; printed as one line."""


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def peer_uid(connection: socket.socket) -> int:
    """Return the uid of the process at the other end of a unix socket connection."""
    if sys.platform.startswith("linux"):
        data = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", data)[1])
    # struct xucred: u_int cr_version; uid_t cr_uid; ...
    data = connection.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, XUCRED_SIZE)
    return int(struct.unpack_from("I", data, 4)[0])


# ---- checks on what sudo hands over -------------------------------------------------


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def sudo_uid() -> int | None:
    """Return the uid of the user who ran sudo, or None when not run through sudo by another user."""
    text = os.environ.get("SUDO_UID", "")
    if os.getuid() != 0 or not text.isdigit() or int(text) == 0:
        return None
    return int(text)


def check_machine_dir(path: Path) -> Owner:
    """Return the owner of machine directory PATH after checking it may be acted on."""
    try:
        status = path.lstat()
    except OSError as error:
        raise SupervisorError(f"machine directory {path}: {error.strerror}") from error
    if not stat.S_ISDIR(status.st_mode):
        raise SupervisorError(f"{path} is not a directory (a symbolic link is not accepted)")
    if status.st_mode & 0o022:
        raise SupervisorError(f"machine directory {path} is writable by others than its owner")
    invoker = sudo_uid()
    if invoker is not None and status.st_uid != invoker:
        raise SupervisorError(f"machine directory {path} belongs to uid {status.st_uid}, not to uid {invoker} who ran sudo")
    return Owner(uid=status.st_uid, gid=status.st_gid)


def check_hyperkit_binary(path: str) -> None:
    """Under sudo, refuse a hyperkit that the user could have replaced."""
    if not os.path.isabs(path):
        raise SupervisorError(f"the hyperkit path {path} must be absolute")
    if sudo_uid() is None:
        return
    for checked in (Path(path), Path(os.path.realpath(path)), Path(os.path.realpath(path)).parent):
        try:
            status = checked.stat()
        except OSError as error:
            raise SupervisorError(f"hyperkit {path}: {checked}: {error.strerror}") from error
        if status.st_uid != 0 or status.st_mode & 0o022:
            raise SupervisorError(
                f"refusing to run hyperkit {path} as root: {checked} is not owned by root or is writable by others"
            )


# ---- privileges ------------------------------------------------------------------------


class Privileges:
    """Act as the machine's owner, and as root only where vmnet, signals and chown need it."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.dropped = os.geteuid() == 0 and owner.uid != 0

    def drop(self) -> None:
        if self.dropped:
            os.setgroups([])
            os.setegid(self.owner.gid)
            os.seteuid(self.owner.uid)

    @contextlib.contextmanager
    def root(self) -> Iterator[None]:
        if not self.dropped:
            yield
            return
        os.seteuid(0)
        os.setegid(0)
        try:
            yield
        finally:
            os.setegid(self.owner.gid)
            os.seteuid(self.owner.uid)


def open_owned(path: Path, flags: int, mode: int = 0o644) -> int:
    # O_NOFOLLOW: a symbolic link planted in the machine directory is never followed.
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = open_owned(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


# ---- the supervisor proper -----------------------------------------------------------


class Supervisor:
    """The supervision of one machine's hyperkit, until it powers off, fails, or is stopped."""

    def __init__(self, paths: MachinePaths, hyperkit: str, args: Sequence[str], privileges: Privileges,
                 log: TextIO) -> None:
        self.paths = paths
        self.hyperkit = hyperkit
        self.argv = [hyperkit, *args]
        self.uuid = _option_value(args, "-U")
        self.privileges = privileges
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.state = State.STARTING
        self.exits: list[dict[str, Any]] = []
        self.restart_times: list[float] = []
        self.restarts = 0
        self.error: str | None = None
        self.stop_deadline: float | None = None
        self.killed = False
        self.unowned: set[Path] = set()

    # -- records --

    def say(self, message: str) -> None:
        self.log.write(f"{now_text()} supervisor: {message}\n")
        self.log.flush()

    def record(self) -> None:
        write_json_atomic(self.paths.supervisor_state, {
            "state": self.state.value,
            "supervisor_pid": os.getpid(),
            "hyperkit_pid": self.process.pid if self.process and self.process.poll() is None else None,
            "hyperkit": self.hyperkit,
            "uuid": self.uuid,
            "restarts": self.restarts,
            "exits": self.exits[-MAX_RECORDED_EXITS:],
            "error": self.error,
            "updated": now_text(),
        })

    # -- hyperkit --

    def remove_stale_files(self) -> None:
        pid = read_pid_file(self.paths.pid_file)
        if pid is not None and self.uuid and is_hyperkit_process(command_line(pid), self.uuid):
            raise SupervisorError(f"hyperkit (pid {pid}) already runs this machine")
        # hyperkit opens its pid file with O_EXCL, so a file left by a killed hyperkit blocks the start.
        for stale in (self.paths.pid_file, self.paths.console_pty):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def spawn(self) -> None:
        self.remove_stale_files()
        self.log.flush()
        with self.privileges.root():
            self.process = subprocess.Popen(self.argv, cwd=self.paths.dir, stdin=subprocess.DEVNULL,
                                            stdout=self.log.fileno(), stderr=self.log.fileno())
        self.unowned = {self.paths.pid_file, self.paths.console_pty, self.paths.console_log}
        self.say(f"started hyperkit, pid {self.process.pid}")
        self.state = State.RUNNING
        self.record()

    def chown_outputs(self) -> None:
        """Give the files hyperkit wrote as root to the machine's owner."""
        for path in list(self.unowned):
            try:
                status = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(status.st_mode) and status.st_uid != self.privileges.owner.uid:
                with self.privileges.root():
                    os.chown(path, self.privileges.owner.uid, self.privileges.owner.gid, follow_symlinks=False)
            self.unowned.discard(path)

    def devices_ready(self) -> bool:
        # hyperkit writes the pty file while it sets up the LPC bridge, its last device (slot 31).
        return self.paths.console_pty.exists()

    def signal_hyperkit(self, signum: int) -> None:
        # Only our own child, not yet reaped, so its pid cannot belong to another process.
        if self.process is not None and self.process.poll() is None:
            with self.privileges.root():
                self.process.send_signal(signum)

    def request_stop(self, force: bool, timeout: float) -> None:
        if self.state in FINAL_STATES:
            return
        self.state = State.STOPPING
        self.record()
        if force:
            self.say("kill requested: sending SIGKILL")
            self.killed = True
            self.signal_hyperkit(signal.SIGKILL)
        else:
            self.say(f"stop requested: pressing the power button (SIGTERM), SIGKILL after {timeout:.0f} s")
            self.signal_hyperkit(signal.SIGTERM)
            self.stop_deadline = time.monotonic() + timeout

    def check_stop_deadline(self) -> None:
        if self.stop_deadline is not None and not self.killed and time.monotonic() >= self.stop_deadline:
            self.say("the guest did not power off in time: sending SIGKILL")
            self.killed = True
            self.signal_hyperkit(signal.SIGKILL)

    def handle_exit(self) -> None:
        assert self.process is not None
        status = self.process.returncode
        meaning = describe_exit(status)
        self.chown_outputs()
        self.exits.append({"time": now_text(), "status": status, "meaning": meaning})
        self.say(f"hyperkit exited with status {status}: {meaning}")
        outcome = decide(status, self.restart_times, time.monotonic(), stopping=self.state is State.STOPPING)
        if outcome is Outcome.RESTART:
            self.restart_times.append(time.monotonic())
            self.restarts += 1
            self.state = State.RESTARTING
            self.record()
            self.spawn()
            return
        if outcome is Outcome.STOPPED:
            self.state = State.STOPPED
        else:
            self.state = State.ERROR
            if status == EXIT_REBOOT:
                self.error = f"the guest rebooted {RESTART_LIMIT + 1} times within {RESTART_WINDOW:.0f} s"
            else:
                self.error = f"hyperkit exited with status {status} ({meaning})"
            self.keep_console_tail()
        self.process = None
        self.record()

    def keep_console_tail(self) -> None:
        try:
            text = self.paths.console_log.read_bytes().decode(errors="replace").replace("\r", "").strip("\0\n")
        except OSError:
            text = ""
        lines = text.splitlines()[-CONSOLE_TAIL_LINES:]
        self.log.write(f"--- last {len(lines)} lines of the serial console ---\n" + "\n".join(lines) + "\n---\n")
        self.log.flush()

    # -- requests --

    def answer(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            uid = peer_uid(connection)
            if uid not in (0, self.privileges.owner.uid):
                self.say(f"refused a request from uid {uid}")
                return
            request = json.loads(connection.recv(MAX_REQUEST_BYTES).decode() or "{}")
            operation = request.get("op")
            if operation in ("stop", "kill"):
                self.request_stop(operation == "kill", float(request.get("timeout", 60)))
            elif operation != "status":
                self.say(f"rejected the unknown request {operation!r} from uid {uid}")
                connection.sendall(json.dumps({"ok": False, "error": f"unknown request {operation!r}"}).encode() + b"\n")
                return
            connection.sendall(json.dumps({"ok": True, "state": self.state.value}).encode() + b"\n")

    # -- the loop --

    def serve(self, ready: int | None) -> int:
        """Run until hyperkit is gone for good; report to READY once devices are set up."""
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_write.setblocking(False)
        signal.set_wakeup_fd(wakeup_write.fileno())
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.paths.supervisor_socket.unlink()
        old_umask = os.umask(0o177)
        try:
            # Relative to the machine directory (our working directory): sun_path has room for about 100 bytes.
            listener.bind(self.paths.supervisor_socket.name)
        finally:
            os.umask(old_umask)
        listener.listen(4)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "request")
        selector.register(wakeup_read, selectors.EVENT_READ, "signal")

        try:
            self.spawn()
            started = time.monotonic()
            while self.state not in FINAL_STATES:
                for key, _ in selector.select(POLL_INTERVAL):
                    if key.data == "request":
                        connection, _ = listener.accept()
                        try:
                            self.answer(connection)
                        except (OSError, ValueError) as error:
                            self.say(f"bad request: {error}")
                    else:
                        for number in wakeup_read.recv(64):
                            if number in (signal.SIGTERM, signal.SIGINT):
                                self.request_stop(False, 60)
                self.chown_outputs()
                self.check_stop_deadline()
                if self.process is not None and self.process.poll() is not None:
                    self.handle_exit()
                if ready is not None and self.state not in FINAL_STATES and (
                        self.devices_ready() or time.monotonic() - started > HANDSHAKE_TIMEOUT):
                    _report(ready, f"ok {self.process.pid if self.process else 0}")
                    ready = None
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.supervisor_socket.unlink()
        if ready is not None:
            _report(ready, f"error {self.error or 'hyperkit exited at once'}: {self.output_tail()}")
        self.say(f"done: {self.state.value}")
        return 0 if self.state is State.STOPPED else 1

    def output_tail(self) -> str:
        try:
            lines = self.paths.hypervisor_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        hyperkit_lines = [line for line in lines if " supervisor: " not in line and line.strip()]
        return hyperkit_lines[-1] if hyperkit_lines else "no output"


def _option_value(args: Sequence[str], option: str) -> str:
    for first, second in zip(args, args[1:]):
        if first == option:
            return second
    return ""


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (message.replace("\n", " ") + "\n").encode())
        os.close(fd)


# ---- entry points ----------------------------------------------------------------------


def command_run(machine_dir: str, hyperkit: str, args: Sequence[str]) -> int:
    """Check, detach, and supervise; the calling process exits once hyperkit is up or has failed."""
    paths = MachinePaths(Path(machine_dir))
    owner = check_machine_dir(paths.dir)
    check_hyperkit_binary(hyperkit)
    if not _option_value(args, "-U"):
        raise SupervisorError("the hyperkit arguments lack -U UUID, which the supervisor needs to recognize its hyperkit")

    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os._exit(_daemon(paths, hyperkit, args, owner, write_end))
    os.close(write_end)
    os.waitpid(first, 0)
    with os.fdopen(read_end) as reports:
        line = reports.readline().strip()
    if line.startswith("ok "):
        print(f"hyperkit pid {line[3:]}")
        return 0
    print(line.removeprefix("error ") or "the supervisor exited without a report", file=sys.stderr)
    return 1


def _daemon(paths: MachinePaths, hyperkit: str, args: Sequence[str], owner: Owner, ready: int) -> int:
    try:
        privileges = Privileges(owner)
        privileges.drop()
        os.chdir(paths.dir)
        log_fd = open_owned(paths.hypervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        log = os.fdopen(log_fd, "a", buffering=1)
    except Exception as error:  # noqa: BLE001 - the caller needs one line whatever went wrong
        _report(ready, f"error the supervisor could not set up: {error}")
        return 1
    supervisor = Supervisor(paths, hyperkit, args, privileges, log)
    try:
        supervisor.say(f"supervising {' '.join([hyperkit, *args])}")
        return supervisor.serve(ready)
    except Exception as error:  # noqa: BLE001 - recorded for `hkpod logs`, then the supervisor ends
        log.write(traceback.format_exc())
        supervisor.error = f"the supervisor failed: {error}"
        supervisor.state = State.ERROR
        if supervisor.process is not None and supervisor.process.poll() is None:
            supervisor.signal_hyperkit(signal.SIGKILL)
            supervisor.process.wait()
        with contextlib.suppress(OSError):
            supervisor.record()
        _report(ready, f"error {supervisor.error}")
        return 1


def command_query_mac(hyperkit: str, uuid: str) -> int:
    from hkpod.drivers.hyperkit.argv import mac_query_argv
    from hkpod.run import run

    check_hyperkit_binary(hyperkit)
    result = run(mac_query_argv(hyperkit, uuid), check=False, timeout=60)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def command_signal(machine_dir: str, uuid: str, signal_name: str) -> int:
    """Signal the hyperkit in DIR's pid file, only if it is a hyperkit with -U UUID."""
    paths = MachinePaths(Path(machine_dir))
    check_machine_dir(paths.dir)
    pid = read_pid_file(paths.pid_file)
    if pid is None or not is_hyperkit_process(command_line(pid), uuid):
        print(f"no hyperkit with UUID {uuid} runs from {paths.pid_file}", file=sys.stderr)
        return 1
    os.kill(pid, signal.Signals[f"SIG{signal_name}"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hkpod-supervisor", description="Run hyperkit as root for hkpod.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start and supervise hyperkit for one machine")
    run_parser.add_argument("--dir", required=True)
    run_parser.add_argument("--hyperkit", required=True)
    run_parser.add_argument("args", nargs=argparse.REMAINDER)
    query = commands.add_parser("query-mac", help="print the MAC vmnet gives UUID (hyperkit -M)")
    query.add_argument("--hyperkit", required=True)
    query.add_argument("--uuid", required=True)
    kill = commands.add_parser("signal", help="signal a hyperkit whose supervisor is gone")
    kill.add_argument("--dir", required=True)
    kill.add_argument("--uuid", required=True)
    kill.add_argument("--signal", choices=["TERM", "KILL"], required=True)
    options = parser.parse_args(argv)

    try:
        if options.command == "run":
            args = options.args[1:] if options.args[:1] == ["--"] else options.args
            return command_run(options.dir, options.hyperkit, args)
        if options.command == "query-mac":
            return command_query_mac(options.hyperkit, options.uuid)
        return command_signal(options.dir, options.uuid, options.signal)
    except SupervisorError as error:
        print(f"hkpod supervisor: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
