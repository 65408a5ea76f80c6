from __future__ import annotations

import pytest

from hkpod.errors import HkpodError
from hkpod.images.mirrors import BUILTIN_MIRRORS, parse_mirrors, select_mirrors


def test_default_is_ubuntu_only() -> None:
    assert select_mirrors(None, {}) == ("https://cloud-images.ubuntu.com/",)


def test_env_used_without_option() -> None:
    assert select_mirrors(None, {"HKPOD_MIRROR": "tuna"}) == (BUILTIN_MIRRORS["tuna"],)


def test_option_beats_env() -> None:
    assert select_mirrors("ustc", {"HKPOD_MIRROR": "tuna"}) == (BUILTIN_MIRRORS["ustc"],)


@pytest.mark.parametrize("name", sorted(BUILTIN_MIRRORS))
def test_builtin_mirror_shape(name: str) -> None:
    url = BUILTIN_MIRRORS[name]
    assert url.startswith("https://")
    assert url.endswith("/")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tuna", ("https://mirrors.tuna.tsinghua.edu.cn/ubuntu-cloud-images/",)),
        ("SJTU", ("https://mirror.sjtu.edu.cn/ubuntu-cloud-images/",)),
        ("http://127.0.0.1:8080/cloud", ("http://127.0.0.1:8080/cloud/",)),
        ("HTTPS://Mirror.Example/x/", ("https://Mirror.Example/x/",)),
        ("http://h/", ("http://h/",)),
        (
            "tuna, http://127.0.0.1:1/ ,ustc",
            (BUILTIN_MIRRORS["tuna"], "http://127.0.0.1:1/", BUILTIN_MIRRORS["ustc"]),
        ),
        ("tuna,tuna", (BUILTIN_MIRRORS["tuna"],)),
    ],
)
def test_parse_mirrors(text: str, expected: tuple[str, ...]) -> None:
    assert parse_mirrors(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://mirror.example/ubuntu/", "scheme 'ftp' is not supported"),
        ("file:///srv/mirror", "scheme 'file' is not supported"),
        ("http:///path", "no host name"),
        ("https://h/x?y=1", "query or fragment"),
        ("http://h:99999/", "bad port number"),
        ("tuna,,ustc", "empty entry"),
        ("mirrors.example.org", "unknown mirror 'mirrors.example.org'"),
    ],
)
def test_parse_mirrors_rejects(text: str, message: str) -> None:
    with pytest.raises(HkpodError) as caught:
        parse_mirrors(text)
    assert message in caught.value.message


def test_unknown_name_hint_lists_builtins() -> None:
    with pytest.raises(HkpodError) as caught:
        parse_mirrors("tsinghua")
    assert "tuna" in (caught.value.hint or "")
