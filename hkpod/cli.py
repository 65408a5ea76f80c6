"""The `hkpod` command line; errors become one line and an exit status here and nowhere else."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from hkpod import __version__, machine
from hkpod.drivers import DRIVER_NAMES, default_driver_name, get_driver
from hkpod.errors import HkpodError
from hkpod.readiness import ReadinessError
from hkpod.images.catalog import DEFAULT_IMAGE, is_catalog_name, resolve_image_name
from hkpod.sizes import GIB, format_size, human_size, parse_disk_bytes, parse_memory_mib, parse_size
from hkpod.images.urls import is_url
from hkpod.sources import BootFiles, resolve_boot_files

LOG = logging.getLogger("hkpod")
DEFAULT_TIMEOUT = 600.0


class _UserFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UserFormatter())
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hkpod")
@click.option("--debug", is_flag=True, help="Log every step and show tracebacks.")
@click.pass_context
def cli(context: click.Context, debug: bool) -> None:
    """Run Podman in a lean VM driven directly by HyperKit (Intel macOS) or QEMU."""
    context.obj = {"debug": debug}
    _setup_logging(debug)


@cli.command()
@click.argument("name", default="podman")
@click.option("--cpus", type=int, default=2, show_default=True, help="Number of virtual CPUs.")
@click.option("--memory", default="2G", show_default=True, help="Guest memory; binary units (512M, 2G, 2GiB); a bare number is MiB.")
@click.option("--disk", default="10G", show_default=True, help="Disk size; binary units (20G, 20GiB); a bare number is GiB.")
@click.option("--image", help="ubuntu:lts (the default), ubuntu:VERSION or ubuntu:CODENAME, or the path of a raw or qcow2 disk image.")
@click.option("--mirror", help="Where catalog images come from: a URL or a name (ubuntu, tuna, ustc, sjtu, huawei, aliyun), or a comma-separated list tried in order. Default: $HKPOD_MIRROR, else ubuntu.")
@click.option("--insecure-skip-verify", is_flag=True, help="Skip the OpenPGP signature check of a catalog image (sha256 sums are still checked).")
@click.option("--kernel", help="Guest kernel (bzImage), a path or, with an --image URL, a URL; default: the one found next to --image.")
@click.option("--initrd", help="Guest initrd, a path or, with an --image URL, a URL; default: the one found next to --image.")
@click.option("--cmdline-extra", default="", help="Words appended to the guest kernel command line (a root= here replaces the default).")
@click.option("--driver", type=click.Choice(DRIVER_NAMES), default=default_driver_name, show_default="hyperkit on Intel macOS, else qemu", help="Hypervisor driver.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "hvf", "tcg"]), default="auto", show_default=True, help="QEMU accelerator; auto probes which one really boots here and remembers it.")
@click.option("--network", type=click.Choice(["nat", "isolated"]), default="nat", show_default=True, help="nat: the guest reaches the network; isolated (QEMU): it reaches only its forwarded SSH port.")
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT, show_default=True, help="Seconds to wait for the guest to become ready.")
@click.option("--hyperkit", "hyperkit_path", type=click.Path(path_type=Path), help="The hyperkit binary to use (HyperKit driver); default: $HKPOD_HYPERKIT, PATH, Docker Desktop, Multipass. Kept for later starts.")
@click.option("--dry-run", is_flag=True, help="Print the hypervisor argv and the seed files, create nothing.")
def create(name: str, cpus: int, memory: str, disk: str, image: str | None, mirror: str | None, insecure_skip_verify: bool,
           kernel: str | None, initrd: str | None, cmdline_extra: str, driver: str, accel: str, network: str,
           hyperkit_path: Path | None, timeout: float, dry_run: bool) -> None:
    """Create and start machine NAME (default: podman) and register it as a podman connection."""
    from hkpod.config import validate_name

    validate_name(name)
    memory_mib = parse_memory_mib(memory)
    disk_bytes = parse_disk_bytes(disk)
    machine.check_cpus(cpus)
    machine.check_memory(memory_mib)
    if any(not character.isprintable() for character in cmdline_extra):
        raise HkpodError(f"--cmdline-extra {cmdline_extra!r} contains control characters", "give the words on one line")
    if network == "isolated" and driver != "qemu":
        raise HkpodError(f"--network isolated is not available with --driver {driver}", "use --driver qemu, or --network nat")
    if hyperkit_path is not None and driver != "hyperkit":
        raise HkpodError(f"--hyperkit is only used by --driver hyperkit, not --driver {driver}", "drop --hyperkit, or add --driver hyperkit")
    if insecure_skip_verify:
        LOG.warning("--insecure-skip-verify: the image's signature is NOT checked; anyone who can alter the mirror's files can alter this machine")
    if dry_run and is_catalog_name(image or DEFAULT_IMAGE):
        release = resolve_image_name(image or DEFAULT_IMAGE)
        placeholder = Path(f"<{release.name} from the image cache>")
        files = BootFiles(image=placeholder, kernel=placeholder, initrd=placeholder, description=release.name)
    elif dry_run and image is not None and is_url(image):
        placeholder = Path(f"<{image} from the image cache>")
        files = BootFiles(image=placeholder, kernel=placeholder, initrd=placeholder, description=image)
    else:
        if not dry_run:
            # Fail before any download when this host cannot run the driver at all.
            get_driver(driver).check_host()
        files = resolve_boot_files(image, kernel, initrd, driver=driver, mirror=mirror, verify=not insecure_skip_verify)
    request = machine.CreateRequest(
        name=name, driver=driver, cpus=cpus, memory_mib=memory_mib, disk_bytes=disk_bytes, image=files.image,
        kernel=files.kernel, initrd=files.initrd, image_description=files.description, image_digests=files.digests,
        insecure_skip_verify=insecure_skip_verify, cmdline_extra=cmdline_extra, accel=accel, network=network,
        timeout=timeout, dry_run=dry_run, hyperkit=str(hyperkit_path.expanduser().absolute()) if hyperkit_path else None,
    )
    if dry_run:
        click.echo(machine.dry_run(request))
        return
    config = machine.create(request)
    click.echo(f"Machine {config.name!r} is ready: `hkpod ssh {config.name}`"
               + (f", `podman --connection {config.podman_connection} info`" if config.podman_connection else ""))


@cli.command()
@click.argument("name", default="podman")
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT, show_default=True, help="Seconds to wait for the guest to become ready.")
def start(name: str, timeout: float) -> None:
    """Start machine NAME and wait until podman responds."""
    machine.start(name, timeout)
    click.echo(f"Machine {name!r} is ready")


@cli.command()
@click.argument("name", default="podman")
@click.option("--force", is_flag=True, help="Kill the VM at once instead of asking the guest to power off.")
@click.option("--timeout", type=click.FloatRange(min=0), default=machine.STOP_TIMEOUT, show_default=True, help="Seconds to wait for a clean power-off before killing the VM.")
def stop(name: str, force: bool, timeout: float) -> None:
    """Stop machine NAME."""
    if machine.stop(name, force=force, timeout=timeout):
        click.echo(f"Machine {name!r} stopped")
    else:
        click.echo(f"Machine {name!r} is not running")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(name: str, command: tuple[str, ...]) -> None:
    """Open a shell in machine NAME, or run COMMAND there (after `--`) and exit with its status."""
    from hkpod import ssh as ssh_module

    config, paths, driver = machine.load(name)
    if driver.running_pid(config, paths) is None:
        raise HkpodError(f"machine {name!r} is not running", f"start it with `hkpod start {name}`")
    target = machine.ssh_target(config, paths, driver)
    if target is None:
        raise HkpodError(f"the address of machine {name!r} is not known yet", "wait for it to finish booting")
    ssh_module.exec_ssh(target, command)


@cli.command(name="list")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format.")
def list_command(output_format: str) -> None:
    """List machines and their state."""
    machines = [machine.describe(*found) for found in machine.all_machines()]
    if output_format == "json":
        click.echo(json.dumps(machines, indent=2))
        return
    rows = [("NAME", "DRIVER", "STATE", "CPUS", "MEMORY", "DISK", "SSH")]
    for item in machines:
        ssh_info = item["ssh"]
        rows.append((item["name"], item["driver"], item["state"], str(item["cpus"]), format_size(item["memory_mib"] << 20),
                     format_size(item["disk_bytes"]), f"{ssh_info['host']}:{ssh_info['port']}" if ssh_info["host"] and item["state"] != "stopped" else "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@cli.command()
@click.argument("name", default="podman")
def inspect(name: str) -> None:
    """Print machine NAME's configuration, state, SSH and podman details as JSON."""
    click.echo(json.dumps(machine.describe(*machine.load(name)), indent=2))


@cli.command()
@click.argument("name", default="podman")
def ip(name: str) -> None:
    """Print the address of machine NAME's SSH server."""
    config, paths, driver = machine.load(name)
    address = driver.ssh_address(config, paths)
    if address is None:
        raise HkpodError(f"the address of machine {name!r} is not known yet",
                         "it is known once the guest got a DHCP lease; start it with `hkpod start` or wait for it to boot")
    click.echo(address[0])


@cli.command()
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format.")
def doctor(output_format: str) -> None:
    """Check what the HyperKit and QEMU drivers need on this host, and how to fix what is missing."""
    from hkpod.doctor import format_table, run_checks

    checks = run_checks()
    if output_format == "json":
        click.echo(json.dumps([check.to_json() for check in checks], indent=2))
    else:
        click.echo(format_table(checks))


@cli.command()
@click.argument("name", default="podman")
@click.option("--previous", is_flag=True, help="Show the console of the boot before the current one.")
@click.option("--hypervisor", is_flag=True, help="Show the output of hyperkit and its supervisor instead (HyperKit driver only).")
def logs(name: str, previous: bool, hypervisor: bool) -> None:
    """Print machine NAME's serial console output."""
    paths = machine.existing_paths(name)
    path = paths.previous_console_log if previous else paths.console_log
    if hypervisor:
        path = paths.hypervisor_log
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if previous and not hypervisor:
            raise HkpodError(f"machine {name!r} has no console log of an earlier boot", f"see the current one with `hkpod logs {name}`") from None
        what = "hypervisor log (only the HyperKit driver writes one)" if hypervisor else "console log"
        raise HkpodError(f"machine {name!r} has no {what} yet", f"start it with `hkpod start {name}`") from None
    click.echo(data.decode(errors="replace").replace("\r", "").rstrip("\0"), nl=False)


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove the machine even when it is running (kills it).")
def rm(name: str, force: bool) -> None:
    """Remove machine NAME: its VM, disk, keys and podman connection."""
    machine.remove(name, force=force)
    click.echo(f"Machine {name!r} removed")


@cli.group()
def image() -> None:
    """Manage cached catalog images and convert disk images."""


def _images_in_use() -> set[str]:
    return {digest for config, _, _ in machine.all_machines() for digest in config.image_digests}


@image.command(name="ls")
def image_ls() -> None:
    """List cached images with their size on disk (allocated) and their file size (apparent)."""
    from hkpod.images.cache import disk_usage, list_images
    from hkpod.images.resolve import Role
    from hkpod.sources import image_cache_root

    root = image_cache_root()
    rows = [("IMAGE", "ARCH", "FILE", "ON DISK", "SIZE", "PULLED", "MIRROR")]
    for listing in list_images(root):
        cached = listing.image
        serial = cached.file(Role.IMAGE).name
        rows.append((f"ubuntu:{cached.version}", cached.arch.value, serial, human_size(listing.allocated_bytes),
                     human_size(listing.apparent_bytes), cached.pulled_at, cached.mirror))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    apparent, allocated = disk_usage(root)
    click.echo(f"All cached files, including those kept for machines: {human_size(allocated)} on disk, {human_size(apparent)} apparent, in {root}")


@image.command(name="pull")
@click.argument("name", default=DEFAULT_IMAGE)
@click.option("--mirror", help="A URL or mirror name, or a comma-separated list tried in order (default: $HKPOD_MIRROR, else ubuntu).")
@click.option("--driver", type=click.Choice(DRIVER_NAMES), default=default_driver_name, show_default="hyperkit on Intel macOS, else qemu", help="The driver whose architecture to pull for.")
@click.option("--insecure-skip-verify", is_flag=True, help="Skip the OpenPGP signature check (sha256 sums are still checked).")
def image_pull(name: str, mirror: str | None, driver: str, insecure_skip_verify: bool) -> None:
    """Download the newest build of catalog image NAME (default: ubuntu:lts) into the cache."""
    from hkpod.images.cache import pull_image
    from hkpod.images.mirrors import select_mirrors
    from hkpod.sources import driver_arch, image_cache_root

    if insecure_skip_verify:
        LOG.warning("--insecure-skip-verify: the image's signature is NOT checked")
    cached = pull_image(image_cache_root(), name, driver_arch(driver), select_mirrors(mirror), verify=not insecure_skip_verify)
    click.echo(f"Pulled {cached.key} from {cached.mirror}")


@image.command(name="rm")
@click.argument("name")
def image_rm(name: str) -> None:
    """Remove catalog image NAME from the cache; files a machine was made from are kept."""
    from hkpod.images.cache import remove_image
    from hkpod.sources import image_cache_root

    result = remove_image(image_cache_root(), name, _images_in_use())
    click.echo(f"Removed {', '.join(result.images) or 'nothing'}; freed {human_size(result.freed_bytes)}")


@image.command(name="prune")
def image_prune() -> None:
    """Remove every cached image and file that no machine was made from."""
    from hkpod.images.cache import prune
    from hkpod.sources import image_cache_root

    result = prune(image_cache_root(), _images_in_use())
    click.echo(f"Removed {len(result.images)} images and {len(result.blobs)} files; freed {human_size(result.freed_bytes)}")


@image.command(name="convert")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--size", help="Grow the raw output to this size (binary units, e.g. 20G); default: the image's virtual size.")
def image_convert(source: Path, dest: Path, size: str | None) -> None:
    """Convert qcow2 image SOURCE into the sparse raw file DEST."""
    from hkpod import qcow2
    from hkpod.disk import progress_bar
    from hkpod.sources import check_readable

    source = check_readable(source, "SOURCE")
    if dest.exists():
        raise HkpodError(f"{dest} already exists", "remove it first or choose another DEST; hkpod never overwrites a disk")
    header = qcow2.read_header(source)
    target_size = parse_size(size, bare_unit=GIB, option="--size") if size else None
    with progress_bar(header.virtual_size, "convert") as update:
        qcow2.convert_to_raw(source, dest, size=target_size, progress=update)
    click.echo(f"Wrote {dest} ({human_size(dest.stat().st_size)}, {human_size(dest.stat().st_blocks * 512)} on disk)")


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived; raised like Ctrl-C so a create in progress cleans up."""


def _terminate(signal_number: int, _frame: object) -> None:
    raise Terminated(128 + signal_number)


def main() -> None:
    """Run the CLI; an HkpodError is one line on stderr and exit 1, Ctrl-C is exit 130."""
    debug = "--debug" in sys.argv[1:]
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, _terminate)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ReadinessError as error:
        click.echo(f"Error: {error}", err=True)
        click.echo("Last console lines:\n" + error.console, err=True)
        if debug:
            raise
        sys.exit(error.exit_code)
    except HkpodError as error:
        click.echo(f"Error: {error}", err=True)
        if debug:
            raise
        sys.exit(error.exit_code)
    except Terminated as error:
        click.echo("Terminated", err=True)
        sys.exit(error.code)
    except SystemExit:
        raise
