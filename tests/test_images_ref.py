"""IMAGE references: catalog name or alias, aleph:<hash>, local path, or URL with --sha256/--sha512."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances.catalog import Catalog
from qemu_instances.digests import Algorithm, Digest
from qemu_instances.errors import CatalogError, ImageError, UsageError
from qemu_instances.images import RefKind, mirror_url, parse_image_ref

SHA256 = "ab" * 32
SHA512 = "cd" * 64
ITEM = "b6ff5c3a8205d1ca4c7c3369300eeafff498b558f71b851aa2114afd0a532717"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.mark.parametrize(
    ("text", "name"), [("debian-12", "debian-12"), ("bookworm", "debian-12"), ("jammy", "ubuntu-22.04")]
)
def test_catalog_name_or_alias(catalog: Catalog, text: str, name: str) -> None:
    ref = parse_image_ref(text, catalog)
    assert ref.kind is RefKind.CATALOG
    assert ref.entry is not None and ref.entry.name == name
    assert ref.name == name
    assert ref.url is None and ref.digest is None  # the entry carries them


def test_unknown_catalog_name(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="unknown image 'debain-12'") as info:
        parse_image_ref("debain-12", catalog)
    assert info.value.exit_code == 3
    assert "debian-12" in (info.value.hint or "")


def test_aleph_item(catalog: Catalog) -> None:
    ref = parse_image_ref(f"aleph:{ITEM.upper()}", catalog)
    assert ref.kind is RefKind.ALEPH
    assert ref.aleph_hash == ITEM
    assert ref.entry is None
    assert ref.name == f"aleph-{ITEM[:8]}"


@pytest.mark.parametrize("text", ["aleph:", "aleph:1234", f"aleph:{'x' * 64}", f"aleph:{ITEM}0"])
def test_bad_aleph_item_is_a_usage_error(catalog: Catalog, text: str) -> None:
    with pytest.raises(UsageError, match="invalid aleph item hash") as info:
        parse_image_ref(text, catalog)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["./disk.qcow2", "disk.qcow2", "sub/disk.raw", "disk.img"])
def test_local_path(catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / text).write_bytes(b"\0" * 512)
    ref = parse_image_ref(text, catalog)
    assert ref.kind is RefKind.FILE
    assert ref.path == (tmp_path / text).resolve()
    assert ref.path.is_absolute()
    assert ref.name == "disk"


def test_absolute_and_home_paths(catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"\0")
    assert parse_image_ref(str(image), catalog).path == image
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_image_ref("~/x.qcow2", catalog).path == image


@pytest.mark.parametrize("text", ["./missing.qcow2", "/nonexistent/disk.img", "missing.raw"])
def test_missing_local_file_is_an_image_error(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageError, match="no such image file") as info:
        parse_image_ref(text, catalog)
    assert info.value.exit_code == 3


def test_a_directory_is_not_an_image(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image file"):
        parse_image_ref(str(tmp_path), catalog)


@pytest.mark.parametrize(
    ("kwargs", "digest"),
    [
        ({"sha256": SHA256}, Digest(Algorithm.SHA256, SHA256)),
        ({"sha512": SHA512.upper()}, Digest(Algorithm.SHA512, SHA512)),
    ],
)
def test_url_with_digest(catalog: Catalog, kwargs: dict[str, str], digest: Digest) -> None:
    url = "https://example.org/images/fedora-40.qcow2?token=1"
    ref = parse_image_ref(url, catalog, **kwargs)
    assert ref.kind is RefKind.URL
    assert ref.url == url
    assert ref.digest == digest
    assert ref.name == "fedora-40"


def test_url_without_digest_is_refused(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="without a digest") as info:
        parse_image_ref("http://example.org/x.qcow2", catalog)
    assert info.value.exit_code == 2
    assert "--sha256" in (info.value.hint or "")


def test_both_digests_are_refused(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="not both"):
        parse_image_ref("https://example.org/x.qcow2", catalog, sha256=SHA256, sha512=SHA512)


@pytest.mark.parametrize("kwargs", [{"sha256": SHA512}, {"sha512": SHA256}, {"sha256": "g" * 64}])
def test_malformed_digest_is_a_usage_error(catalog: Catalog, kwargs: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="hex digits"):
        parse_image_ref("https://example.org/x.qcow2", catalog, **kwargs)


def test_digest_applies_only_to_urls(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="only to an http"):
        parse_image_ref("debian-12", catalog, sha256=SHA256)


@pytest.mark.parametrize(
    ("url", "mirror", "expected"),
    [
        ("https://cloud.debian.org/images/cloud/x.qcow2", None, "https://cloud.debian.org/images/cloud/x.qcow2"),
        (
            "https://cloud.debian.org/images/cloud/x.qcow2",
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/images/cloud/x.qcow2",
        ),
        ("https://cloud.debian.org/images/x.qcow2", "http://m.lan/debian/", "http://m.lan/debian/images/x.qcow2"),
        ("https://h.example:8443/a/b?c=d", "https://m.lan", "https://m.lan/a/b?c=d"),
    ],
)
def test_mirror_url(url: str, mirror: str | None, expected: str) -> None:
    assert mirror_url(url, mirror) == expected
