"""Mirror selection for Ubuntu cloud image downloads (`--mirror`, HKPOD_MIRROR).

A mirror is the root of a tree laid out like cloud-images.ubuntu.com, with
`releases/<series>/release/` below it. The user may name several, separated by
commas. They are tried in that order, and hkpod never contacts a mirror the
user did not name.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Final

from hkpod.errors import HkpodError

LOG = logging.getLogger(__name__)

MIRROR_ENV: Final = "HKPOD_MIRROR"
DEFAULT_MIRROR: Final = "ubuntu"

# Chinese university and cloud mirrors publish the tree under /ubuntu-cloud-images/.
# NOTE: not every mirror carries releases/. A mirror without it fails with 404,
# and the next mirror in the list is tried.
BUILTIN_MIRRORS: Final[Mapping[str, str]] = {
    "ubuntu": "https://cloud-images.ubuntu.com/",
    "tuna": "https://mirrors.tuna.tsinghua.edu.cn/ubuntu-cloud-images/",
    "ustc": "https://mirrors.ustc.edu.cn/ubuntu-cloud-images/",
    "sjtu": "https://mirror.sjtu.edu.cn/ubuntu-cloud-images/",
    "huawei": "https://mirrors.huaweicloud.com/ubuntu-cloud-images/",
    "aliyun": "https://mirrors.aliyun.com/ubuntu-cloud-images/",
}


def select_mirrors(option: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Return the mirror URLs to try, in order: from `--mirror`, else HKPOD_MIRROR, else `ubuntu`."""
    env = os.environ if environ is None else environ
    if option is not None and option.strip():
        return parse_mirrors(option, source="--mirror")

    from_env = env.get(MIRROR_ENV, "")
    if from_env.strip():
        return parse_mirrors(from_env, source=MIRROR_ENV)

    return (BUILTIN_MIRRORS[DEFAULT_MIRROR],)


def parse_mirrors(text: str, *, source: str = "--mirror") -> tuple[str, ...]:
    """Parse a comma-separated list of mirror names and URLs into base URLs ending in `/`."""
    urls: list[str] = []
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            raise HkpodError(
                f"invalid {source} value {text!r}: empty entry in the list",
                "separate mirror names or URLs with single commas",
            )

        url = mirror_url(entry, source=source)
        if url in urls:
            LOG.debug("mirror %s is listed twice; trying it once", url)
            continue
        urls.append(url)
    return tuple(urls)


def mirror_url(entry: str, *, source: str = "--mirror") -> str:
    """Return the base URL of one built-in mirror name or http(s) URL."""
    builtin = BUILTIN_MIRRORS.get(entry.lower())
    if builtin is not None:
        return builtin

    names = ", ".join(BUILTIN_MIRRORS)
    if "://" not in entry:
        raise HkpodError(
            f"unknown mirror {entry!r} in {source}",
            f"use one of {names}, or an http:// or https:// URL",
        )

    parts = urllib.parse.urlsplit(entry)
    if parts.scheme.lower() not in ("http", "https"):
        raise HkpodError(
            f"invalid mirror URL {entry!r} in {source}: scheme {parts.scheme!r} is not supported",
            "use an http:// or https:// URL",
        )
    if not parts.hostname:
        raise HkpodError(
            f"invalid mirror URL {entry!r} in {source}: no host name",
            "e.g. https://mirror.example.org/ubuntu-cloud-images/",
        )
    if parts.query or parts.fragment:
        raise HkpodError(
            f"invalid mirror URL {entry!r} in {source}: it has a query or fragment",
            "give the directory that contains releases/",
        )
    try:
        _ = parts.port  # urlsplit only checks the port when it is read
    except ValueError:
        raise HkpodError(f"invalid mirror URL {entry!r} in {source}: bad port number") from None

    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def mirror_label(url: str) -> str:
    """Return the built-in name of URL, or URL itself, for messages."""
    for name, builtin in BUILTIN_MIRRORS.items():
        if builtin == url:
            return name
    return url
