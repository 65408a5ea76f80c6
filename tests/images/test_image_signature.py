from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hkpod.errors import HkpodError
from hkpod.images.signature import (
    PINNED_FINGERPRINT,
    SignatureError,
    TrustedKeys,
    _parse_status,
    _verdict,
    dearmor,
    verify_signature,
)

from .helpers import GpgKeys

PACKAGED_KEY = Path(__file__).parents[2] / "hkpod" / "images" / "ubuntu-cloud-image-key.asc"


@pytest.fixture
def signed(tmp_path: Path, gpg_keys: GpgKeys) -> tuple[bytes, Path]:
    data = tmp_path / "SHA256SUMS"
    data.write_bytes(b"0" * 64 + b" *disk.img\n")
    return data.read_bytes(), gpg_keys.sign(data)


def test_packaged_key_is_pinned_key() -> None:
    listing = subprocess.run(
        ["gpg", "--batch", "--with-colons", "--show-keys", str(PACKAGED_KEY)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fingerprints = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]
    assert fingerprints == [PINNED_FINGERPRINT]


def test_packaged_key_loads() -> None:
    packets = TrustedKeys.pinned().keyring_bytes()
    assert packets[0] & 0x80


def test_good_signature(signed: tuple[bytes, Path], gpg_keys: GpgKeys) -> None:
    data, signature = signed
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    assert verify_signature(data, signature.read_bytes(), keys=keys, origin="SUMS") == gpg_keys.trusted_fpr


def test_good_signature_with_binary_key(
    signed: tuple[bytes, Path], gpg_keys: GpgKeys, tmp_path: Path
) -> None:
    data, signature = signed
    binary = tmp_path / "trusted.gpg"
    binary.write_bytes(dearmor(gpg_keys.trusted_pub.read_bytes(), "test"))
    keys = TrustedKeys(path=binary, fingerprints=None)
    assert verify_signature(data, signature.read_bytes(), keys=keys, origin="SUMS") == gpg_keys.trusted_fpr


def test_pinned_fingerprint_enforced(signed: tuple[bytes, Path], gpg_keys: GpgKeys) -> None:
    data, signature = signed
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=frozenset({PINNED_FINGERPRINT}))
    with pytest.raises(SignatureError, match="which is not"):
        verify_signature(data, signature.read_bytes(), keys=keys, origin="SUMS")


def test_pinned_key_rejects_test_signature(signed: tuple[bytes, Path]) -> None:
    data, signature = signed
    with pytest.raises(SignatureError) as caught:
        verify_signature(data, signature.read_bytes(), keys=TrustedKeys.pinned(), origin="SUMS")
    assert PINNED_FINGERPRINT in caught.value.message


def test_other_key_rejected(tmp_path: Path, gpg_keys: GpgKeys) -> None:
    data = tmp_path / "SHA256SUMS"
    data.write_bytes(b"content\n")
    signature = gpg_keys.sign(data, key="other")
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(SignatureError) as caught:
        verify_signature(data.read_bytes(), signature.read_bytes(), keys=keys, origin="SUMS")
    assert gpg_keys.other_fpr[-16:] in caught.value.message
    assert "HKPOD_TRUSTED_KEYS" in (caught.value.hint or "")


def test_altered_data_rejected(signed: tuple[bytes, Path], gpg_keys: GpgKeys) -> None:
    data, signature = signed
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(SignatureError, match="does not match its signature"):
        verify_signature(data + b"extra\n", signature.read_bytes(), keys=keys, origin="SUMS")


def test_garbage_signature_rejected(signed: tuple[bytes, Path], gpg_keys: GpgKeys) -> None:
    data, _ = signed
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(SignatureError, match="cannot verify"):
        verify_signature(data, b"<html>not a signature</html>", keys=keys, origin="SUMS")


def test_env_selects_key_file(gpg_keys: GpgKeys) -> None:
    keys = TrustedKeys.from_environ({"HKPOD_TRUSTED_KEYS": str(gpg_keys.trusted_pub)})
    assert keys == TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)


def test_env_unset_pins_ubuntu_key() -> None:
    assert TrustedKeys.from_environ({}) == TrustedKeys.pinned()


def test_env_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HkpodError, match="is not a file"):
        TrustedKeys.from_environ({"HKPOD_TRUSTED_KEYS": str(tmp_path / "absent.asc")})


def test_dearmor_several_blocks(gpg_keys: GpgKeys) -> None:
    both = gpg_keys.trusted_pub.read_bytes() + b"\n" + gpg_keys.other_pub.read_bytes()
    packets = dearmor(both, "test")
    first = dearmor(gpg_keys.trusted_pub.read_bytes(), "test")
    second = dearmor(gpg_keys.other_pub.read_bytes(), "test")
    assert packets == first + second


def test_dearmor_no_key() -> None:
    with pytest.raises(HkpodError, match=r"no OpenPGP public key found in notes\.txt"):
        dearmor(b"just text\n", "notes.txt")


def test_missing_gpgv(signed: tuple[bytes, Path], gpg_keys: GpgKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    data, signature = signed
    monkeypatch.setenv("PATH", "/nonexistent")
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(HkpodError, match="gpgv not found"):
        verify_signature(data, signature.read_bytes(), keys=keys, origin="SUMS")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[GNUPG:] BADSIG 1234 someone", "does not match its signature"),
        ("[GNUPG:] EXPKEYSIG 1234 someone", "expired or revoked key"),
        ("[GNUPG:] REVKEYSIG 1234 someone", "expired or revoked key"),
        ("[GNUPG:] NO_PUBKEY 1234ABCD", "signed by key 1234ABCD"),
        ("", "cannot verify"),
    ],
)
def test_status_verdicts(line: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        _verdict(_parse_status(line), TrustedKeys.pinned(), "SUMS", "")


def test_status_accepts_pinned_primary() -> None:
    line = "[GNUPG:] VALIDSIG " + "AB" * 20 + " 2026-01-01 0 0 4 0 1 8 00 " + PINNED_FINGERPRINT
    assert _verdict(_parse_status(line), TrustedKeys.pinned(), "SUMS", "") == PINNED_FINGERPRINT
