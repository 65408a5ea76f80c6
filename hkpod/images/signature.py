"""OpenPGP verification of a mirror's SHA256SUMS against the Ubuntu cloud image signing key.

gpgv does the cryptography, with a throwaway keyring made from one key file:
the key shipped in this package, or the file named by HKPOD_TRUSTED_KEYS.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from hkpod.errors import HkpodError
from hkpod.run import require_executable, run

LOG = logging.getLogger(__name__)

# "UEC Image Automatic Signing Key <cdimage@ubuntu.com>", which signs SHA256SUMS
# on cloud-images.ubuntu.com. The packaged file is this key alone, exported from
# /usr/share/keyrings/ubuntu-cloudimage-keyring.gpg in Debian's ubuntu-keyring
# package, version 2023.11.28.1-0.2~bpo12+1.
PINNED_FINGERPRINT: Final = "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"
PINNED_KEY_RESOURCE: Final = "ubuntu-cloud-image-key.asc"
TRUSTED_KEYS_ENV: Final = "HKPOD_TRUSTED_KEYS"
GPGV_TIMEOUT: Final = 60.0

_ARMOR_BEGIN: Final = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
_ARMOR_END: Final = "-----END PGP PUBLIC KEY BLOCK-----"


class SignatureError(HkpodError):
    """SHA256SUMS is not signed by a trusted key, or the signature does not match it."""


@dataclass(frozen=True)
class TrustedKeys:
    """The key file gpgv trusts, and which primary-key fingerprints count as a valid signer.

    `fingerprints` is None for a user-supplied file: any key in it is trusted.
    """

    path: Path | None
    fingerprints: frozenset[str] | None

    @classmethod
    def pinned(cls) -> TrustedKeys:
        return cls(path=None, fingerprints=frozenset({PINNED_FINGERPRINT}))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TrustedKeys:
        """Return the keys from HKPOD_TRUSTED_KEYS when set, else the pinned Ubuntu key."""
        env = os.environ if environ is None else environ
        value = env.get(TRUSTED_KEYS_ENV, "").strip()
        if not value:
            return cls.pinned()

        path = Path(value).expanduser()
        if not path.is_file():
            raise HkpodError(
                f"{TRUSTED_KEYS_ENV}={value} is not a file",
                "point it at an OpenPGP public key file, or unset it to trust the Ubuntu key",
            )
        LOG.warning("trusting the OpenPGP keys in %s instead of the Ubuntu cloud image key", path)
        return cls(path=path, fingerprints=None)

    def describe(self) -> str:
        if self.path is None:
            return f"the Ubuntu cloud image key {PINNED_FINGERPRINT}"
        return f"the keys in {self.path} ({TRUSTED_KEYS_ENV})"

    def keyring_bytes(self) -> bytes:
        """Return the keys as binary OpenPGP packets, the format gpgv reads."""
        if self.path is None:
            data = resources.files(__package__).joinpath(PINNED_KEY_RESOURCE).read_bytes()
            origin = f"packaged {PINNED_KEY_RESOURCE}"
        else:
            data = self.path.read_bytes()
            origin = str(self.path)
        return dearmor(data, origin)


def dearmor(data: bytes, origin: str) -> bytes:
    """Return binary OpenPGP data from DATA, which is either binary or ASCII-armored key blocks."""
    if data and data[0] & 0x80:
        return data

    text = data.decode("ascii", errors="replace")
    packets = bytearray()
    rest = text
    while _ARMOR_BEGIN in rest:
        block, _, rest = rest.partition(_ARMOR_BEGIN)[2].partition(_ARMOR_END)
        packets += _decode_armor_block(block, origin)

    if not packets:
        raise HkpodError(
            f"no OpenPGP public key found in {origin}",
            "export one with: gpg --armor --export FINGERPRINT > FILE",
        )
    return bytes(packets)


def _decode_armor_block(block: str, origin: str) -> bytes:
    lines = [line.strip() for line in block.strip().splitlines()]
    # Armor headers ("Comment: ...") end at the first blank line, if any.
    if "" in lines:
        lines = lines[lines.index("") + 1 :]
    # The last line may be the CRC-24 checksum, "=" and four base64 characters.
    body = [line for line in lines if line and not (line.startswith("=") and len(line) == 5)]
    try:
        return base64.b64decode("".join(body), validate=True)
    except binascii.Error as error:
        raise HkpodError(f"invalid ASCII armor in {origin}: {error}") from error


@dataclass(frozen=True)
class _Status:
    """The gpgv status lines that decide the verdict."""

    valid: tuple[tuple[str, str], ...]  # (signing key fingerprint, primary key fingerprint)
    bad: bool
    expired_or_revoked: bool
    missing_keys: tuple[str, ...]


def _parse_status(output: str) -> _Status:
    valid: list[tuple[str, str]] = []
    missing: list[str] = []
    bad = expired_or_revoked = False
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "[GNUPG:]":
            continue
        keyword, args = fields[1], fields[2:]
        if keyword == "VALIDSIG" and args:
            primary = args[9] if len(args) >= 10 else args[0]
            valid.append((args[0].upper(), primary.upper()))
        elif keyword == "BADSIG":
            bad = True
        elif keyword in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
            expired_or_revoked = True
        elif keyword in ("NO_PUBKEY", "ERRSIG") and args:
            missing.append(args[0].upper())
    return _Status(
        valid=tuple(valid),
        bad=bad,
        expired_or_revoked=expired_or_revoked,
        missing_keys=tuple(dict.fromkeys(missing)),
    )


def verify_signature(data: bytes, signature: bytes, *, keys: TrustedKeys, origin: str) -> str:
    """Check the detached SIGNATURE over DATA with gpgv and return the signer's fingerprint.

    ORIGIN names the signed file (its URL) in messages. Raise SignatureError
    unless a trusted key made a good signature and no signature is bad.
    """
    gpgv = require_executable(
        "gpgv", "install GnuPG (macOS: brew install gnupg; Debian/Ubuntu: apt-get install gpgv)"
    )
    keyring = keys.keyring_bytes()

    with tempfile.TemporaryDirectory(prefix="hkpod-gpgv-") as tmp:
        home = Path(tmp)
        home.chmod(0o700)
        keyring_path = home / "trusted.gpg"
        data_path = home / "SHA256SUMS"
        sig_path = home / "SHA256SUMS.gpg"
        keyring_path.write_bytes(keyring)
        data_path.write_bytes(data)
        sig_path.write_bytes(signature)

        # GNUPGHOME points at the empty temporary directory so that no user keyring takes part.
        env = {**os.environ, "GNUPGHOME": str(home), "LC_ALL": "C"}
        argv = [gpgv, "--status-fd", "1", "--keyring", str(keyring_path), str(sig_path), str(data_path)]
        result = run(argv, check=False, env=env, timeout=GPGV_TIMEOUT)

    status = _parse_status(result.stdout or "")
    LOG.debug("gpgv exit status %d for %s", result.returncode, origin)
    return _verdict(status, keys, origin, result.stderr or "")


def _verdict(status: _Status, keys: TrustedKeys, origin: str, stderr: str) -> str:
    if status.bad:
        raise SignatureError(
            f"bad OpenPGP signature on {origin}: the file does not match its signature",
            "the mirror may be in the middle of an update or serving altered files; try another --mirror",
        )
    if status.expired_or_revoked:
        raise SignatureError(
            f"the OpenPGP signature on {origin} was made by an expired or revoked key, or has expired",
            "update hkpod for the current Ubuntu signing key",
        )

    for signing, primary in status.valid:
        if keys.fingerprints is None or keys.fingerprints & {signing, primary}:
            LOG.info("%s: good signature by %s", origin, primary)
            return primary

    if status.valid:
        signers = ", ".join(primary for _, primary in status.valid)
        raise SignatureError(f"{origin} is signed by {signers}, which is not {keys.describe()}")
    if status.missing_keys:
        signers = ", ".join(status.missing_keys)
        raise SignatureError(
            f"{origin} is signed by key {signers}, which is not {keys.describe()}",
            f"for a private mirror, set {TRUSTED_KEYS_ENV} to its public key file",
        )

    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no signature found"
    raise SignatureError(f"cannot verify the OpenPGP signature on {origin}: {detail}")
