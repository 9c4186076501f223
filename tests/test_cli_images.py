"""`qinst images` and `qinst pull` through the real entry point: exit codes, JSON shapes, messages on stderr."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import RunQinst, no_traceback
from mirror import Mirror

IMAGES_KEYS = {"name", "aliases", "title", "arch", "digest", "aleph_item_hash", "cached", "size"}
DEBIAN_12_DIGEST = (
    "sha512:3d94c9dd66d8a283fde060b8810373b7ae04038b956ee00d553d1ae564f6fbdeaa2fd6e7404e87e53348b5a9509170f3"
    "ea7c0731ba737590c5c4cb8d559a47f8"
)


def test_images_json(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "images", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    # One row per (entry, architecture) it pins: Debian 11 has no arm64 pin here.
    assert [(r["name"], r["arch"]) for r in rows] == [
        ("debian-11", "x86_64"),
        *[(name, arch) for name in ("debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04")
          for arch in ("x86_64", "aarch64")],
    ]  # fmt: skip
    for row in rows:
        assert set(row) >= IMAGES_KEYS
        assert row["cached"] is False
        assert row["size"] is None
    assert rows[1]["digest"] != rows[2]["digest"]  # each architecture its own pin
    rows = [r for r in rows if r["arch"] == "x86_64"]
    debian = rows[1]
    assert debian["aliases"] == ["bookworm"]
    assert debian["title"] == "Debian 12 (bookworm) genericcloud"
    assert debian["digest"] == DEBIAN_12_DIGEST
    assert debian["aleph_item_hash"] == "b6ff5c3a8205d1ca4c7c3369300eeafff498b558f71b851aa2114afd0a532717"
    # Debian publishes no signature for cloud images; Ubuntu signs its SHA256SUMS.
    assert {r["name"]: (r["trust"], r["latest_trust"]) for r in rows} == {
        "debian-11": ("pinned", "unsigned"),
        "debian-12": ("pinned", "unsigned"),
        "debian-13": ("pinned", "unsigned"),
        "ubuntu-22.04": ("pinned", "signed"),
        "ubuntu-24.04": ("pinned", "signed"),
    }
    assert proc.stderr == ""


def test_images_table(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "images")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["NAME", "ALIASES", "ARCH", "CACHED", "DIGEST", "TRUST", "TITLE"]
    assert [r.split()[:4] + r.split()[5:6] for r in rows] == [
        ["debian-11", "bullseye", "x86_64", "no", "pinned,latest:unsigned"],
        ["debian-12", "bookworm", "x86_64", "no", "pinned,latest:unsigned"],
        ["debian-12", "bookworm", "aarch64", "no", "pinned,latest:unsigned"],
        ["debian-13", "trixie", "x86_64", "no", "pinned,latest:unsigned"],
        ["debian-13", "trixie", "aarch64", "no", "pinned,latest:unsigned"],
        ["ubuntu-22.04", "jammy", "x86_64", "no", "pinned,latest:signed"],
        ["ubuntu-22.04", "jammy", "aarch64", "no", "pinned,latest:signed"],
        ["ubuntu-24.04", "noble", "x86_64", "no", "pinned,latest:signed"],
        ["ubuntu-24.04", "noble", "aarch64", "no", "pinned,latest:signed"],
    ]


@pytest.mark.http
def test_images_shows_what_is_cached(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert qinst(*mirror.args(cache), "pull", "bookworm").returncode == 0
    proc = qinst(*mirror.args(cache), "images", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["debian-12"]["cached"] is True
    assert rows["debian-12"]["size"] == mirror.images.pinned.size
    assert rows["debian-12"]["digest"] == mirror.images.pinned.sha512  # the user catalog's pin
    assert rows["debian-12"]["title"] == "Debian 12 test build"
    assert rows["ubuntu-22.04"]["cached"] is False
    assert rows["debian-11"]["digest"].startswith("sha512:6dc6a940")  # built-in entries stay
    table = qinst(*mirror.args(cache), "images").stdout
    size = mirror.images.pinned.size
    assert size > 1 << 20
    assert (
        f"{size / (1 << 20):.1f} MiB"
        in table.splitlines()[[r.split()[0] for r in table.splitlines()].index("debian-12")]
    )


def test_user_catalog_adds_images(qinst: RunQinst, tmp_path: Path) -> None:
    catalog = tmp_path / "extra.toml"
    catalog.write_text(
        f'[images.alpine-3]\naliases = ["alpine"]\narch = "aarch64"\n'
        f'url = "https://example.org/alpine.qcow2"\ndigest = "sha256:{"a" * 64}"\n'
    )
    proc = qinst("--cache-dir", str(tmp_path), "images", "--json", env={"QINST_CATALOG": str(catalog)})
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"alpine-3", "debian-11", "debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04"}
    assert (rows["alpine-3"]["aliases"], rows["alpine-3"]["arch"]) == (["alpine"], "aarch64")


@pytest.mark.parametrize("command", ["images", "pull debian-12"])
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[images.x]\nurl = "https://e.example/x"\ndigest = "sha256:00"\n', "[images.x]: key 'digest'"),
        (
            '[images.x]\nurl = "https://e.example/x"\ndigest = "sha256:00"\nsizes = 1\n',
            "[images.x]: unknown key 'sizes'",
        ),
        ('[images.x]\ndigest = "sha256:' + "0" * 64 + '"\n', "[images.x]: missing key 'url'"),
        ("[images.x\n", "invalid TOML"),
        (
            '[images.x]\nurl = "https://e.example/x"\ndigest = "sha256:' + "0" * 64 + '"\ndefault_user = "root"\n',
            "[images.x]: key 'default_user': must not be root",
        ),
        (
            '[images.x]\nurl = "https://e.example/x"\ndigest = "sha256:' + "0" * 64 + '"\nlatest_url = ""\n',
            "[images.x]: key 'latest_url': must be a non-empty string",
        ),
    ],
)
def test_malformed_catalog_exits_3(qinst: RunQinst, tmp_path: Path, command: str, text: str, needle: str) -> None:
    catalog = tmp_path / "broken.toml"
    catalog.write_text(text)
    proc = qinst("--cache-dir", str(tmp_path), "--catalog", str(catalog), *command.split())
    assert proc.returncode == 3
    assert proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"qinst: error: {catalog}: ")
    assert needle in first
    no_traceback(proc.stderr)


def test_catalog_list_from_the_environment(qinst: RunQinst, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("")
    bad.write_text("[images.y]\nos = 3\n")
    proc = qinst("--cache-dir", str(tmp_path), "images", env={"QINST_CATALOG": f"{good}{os.pathsep}{bad}"})
    assert proc.returncode == 3
    assert f"{bad}: [images.y]: key 'os': must be a non-empty string" in proc.stderr


def test_missing_catalog_file(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "--catalog", str(tmp_path / "nope.toml"), "images")
    assert proc.returncode == 3
    assert f"cannot read catalog {tmp_path / 'nope.toml'}" in proc.stderr
    no_traceback(proc.stderr)


def test_titles_are_printed_without_terminal_escapes(qinst: RunQinst, tmp_path: Path) -> None:
    catalog = tmp_path / "evil.toml"
    catalog.write_text(
        '[images.evil]\nurl = "https://e.example/x"\ndigest = "sha256:' + "0" * 64 + '"\n'
        'title = "Evil \\u001b]0;pwned\\u0007\\u001b[31mred\\u009b2J\\u202eend"\n'
    )
    for args in (["images"], ["images", "--json"]):
        proc = qinst("--cache-dir", str(tmp_path), "--catalog", str(catalog), *args)
        assert proc.returncode == 0, proc.stderr
        assert not any((ord(ch) < 32 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 or ch == "\u202e" for ch in proc.stdout)
        assert "Evil ]0;pwned[31mred2Jend" in (
            proc.stdout
            if args == ["images"]
            else next(r["title"] for r in json.loads(proc.stdout) if r["name"] == "evil")
        )
