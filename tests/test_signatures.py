"""Signed checksum files: gpgv against a pinned keyring, with Canonical's real signed SHA256SUMS pairs (tests/data,
see tests/data/SOURCE.md) and throw-away keys made by gpg; then the same through `qinst pull --latest`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunQinst
from httpserver import HTTPServer
from mirror import UBUNTU_LATEST, UBUNTU_SUMS, Mirror
from signing import SigningKey, make_key

from qemu_instances.errors import ImageError
from qemu_instances.signatures import keyring_fingerprints, keyring_path, shipped_keyrings, verify_detached

DATA = Path(__file__).parent / "data" / "ubuntu"
UEC_KEY = "D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"  # UEC Image Automatic Signing Key: signs SHA256SUMS
BUILDER_KEY = "4A3CE3CD565D7EB5C810E2B97FF3F408476CF100"  # Ubuntu Cloud Image Builder: signs simplestreams
PAIRS = ["noble-current-20260926", "jammy-22.04-release-20260722"]


def cached(cache: Path) -> list[str]:
    """What the cache holds, lock files aside."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def pair(name: str) -> tuple[bytes, bytes]:
    return (DATA / name / "SHA256SUMS").read_bytes(), (DATA / name / "SHA256SUMS.gpg").read_bytes()


def test_the_shipped_keyring_holds_both_ubuntu_keys() -> None:
    assert "ubuntu-cloud-images" in shipped_keyrings()
    shipped = keyring_path("ubuntu-cloud-images")
    assert keyring_fingerprints(shipped) == {UEC_KEY, BUILDER_KEY}
    assert shipped.read_bytes() == (DATA / "ubuntu-cloudimage-keyring.gpg").read_bytes()


def test_fingerprints_agree_with_gpg(test_key: SigningKey) -> None:
    assert keyring_fingerprints(test_key.keyring) == {test_key.fingerprint}
    assert keyring_fingerprints(DATA / "ubuntu-cloudimage-keyring_2013.11.11.gpg") == {BUILDER_KEY}


@pytest.mark.parametrize("name", PAIRS)
def test_real_signed_pairs_verify(name: str) -> None:
    sums, sig = pair(name)
    assert verify_detached(sums, sig, keyring_path("ubuntu-cloud-images"), what=name).fingerprint == UEC_KEY


@pytest.mark.parametrize("name", PAIRS)
def test_one_byte_changed_is_refused(name: str) -> None:
    sums, sig = pair(name)
    line = sums.index(b"-server-cloudimg-amd64.img")
    start = sums.rindex(b"\n", 0, line) + 1  # the digest of the amd64 image: one hex digit changed
    changed = sums[:start] + (b"0" if sums[start : start + 1] != b"0" else b"1") + sums[start + 1 :]
    with pytest.raises(ImageError, match=r"signature check failed .*BAD signature"):
        verify_detached(changed, sig, keyring_path("ubuntu-cloud-images"), what=name)


def test_a_keyring_without_the_signing_key_is_refused() -> None:
    sums, sig = pair(PAIRS[0])
    with pytest.raises(ImageError, match=r"signature check failed .*not in the keyring"):
        verify_detached(sums, sig, DATA / "ubuntu-cloudimage-keyring_2013.11.11.gpg", what="noble")


def test_a_signature_by_another_key_is_refused(other_key: SigningKey) -> None:
    sums, _ = pair(PAIRS[0])
    with pytest.raises(ImageError, match=r"signature check failed .*not in the keyring"):
        verify_detached(sums, other_key.sign(sums), keyring_path("ubuntu-cloud-images"), what="noble")


def test_own_key_good_and_bad(test_key: SigningKey, other_key: SigningKey) -> None:
    data = b"0" * 64 + b" *image.img\n"
    assert verify_detached(data, test_key.sign(data), test_key.keyring, what="x").fingerprint == test_key.fingerprint
    with pytest.raises(ImageError, match=r"signature"):
        verify_detached(data, test_key.sign(data), other_key.keyring, what="x")
    with pytest.raises(ImageError, match=r"signature"):
        verify_detached(data + b"\n", test_key.sign(data), test_key.keyring, what="x")


@pytest.mark.parametrize("signature", [b"", b"not a signature\n", b"-----BEGIN PGP SIGNATURE-----\n\nxx\n"])
def test_garbage_signatures_are_refused(test_key: SigningKey, signature: bytes) -> None:
    with pytest.raises(ImageError, match=r"signature check failed"):
        verify_detached(b"data\n", signature, test_key.keyring, what="x")


# Who must be refused even though gpgv finds the signature cryptographically good (gpgv exits 0 and prints VALIDSIG
# for a key that expired or was revoked: only its status lines say so).

DAY = 86400


@pytest.fixture
def key_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "gpg"
    yield home
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, check=False)


@pytest.mark.promise
def test_a_signature_by_an_expired_key_is_refused(key_home: Path) -> None:
    """A key made ten days ago that expired after one day; the signature was made while it was valid."""
    made = int(time.time()) - 10 * DAY
    key = make_key(key_home, "expired <expired@qinst.invalid>", expire="1d", created=made)
    data = b"0" * 64 + b" *image.img\n"
    with pytest.raises(ImageError, match=r"signature check failed for x: the signature or its key has expired"):
        verify_detached(data, key.sign(data, at=made + 60), key.keyring, what="x")


@pytest.mark.promise
def test_an_expired_signature_is_refused(key_home: Path) -> None:
    made = int(time.time()) - 10 * DAY
    key = make_key(key_home, "old <old@qinst.invalid>", created=made)
    data = b"0" * 64 + b" *image.img\n"
    assert verify_detached(data, key.sign(data, at=made + 60), key.keyring, what="x").created == made + 60
    with pytest.raises(ImageError, match=r"signature check failed for x: the signature or its key has expired"):
        verify_detached(data, key.sign(data, at=made + 60, expire="1d"), key.keyring, what="x")


@pytest.mark.promise
def test_a_signature_by_a_revoked_key_is_refused(key_home: Path) -> None:
    """Signed while the key was good, then the key's revocation certificate is published in the keyring."""
    key = make_key(key_home, "revoked <revoked@qinst.invalid>")
    data = b"0" * 64 + b" *image.img\n"
    signature = key.sign(data)
    assert verify_detached(data, signature, key.keyring, what="x").fingerprint == key.fingerprint
    key.revoke()
    with pytest.raises(ImageError, match=r"signature check failed for x: the signing key is revoked"):
        verify_detached(data, signature, key.keyring, what="x")


@pytest.mark.promise
def test_a_signing_subkey_counts_for_its_primary_key_only(key_home: Path, other_key: SigningKey) -> None:
    """A certify-only primary key signing with its subkey (as Debian's archive keys do): the signer is the primary
    key that VALIDSIG names, the one the keyring pins; the subkey's own fingerprint is never taken for a signer."""
    key = make_key(key_home, "subkey signer <sub@qinst.invalid>", signing_subkey=True)
    data = b"0" * 64 + b" *image.img\n"
    signature = key.sign(data)
    assert keyring_fingerprints(key.keyring) == {key.fingerprint}  # primary keys only
    signer = verify_detached(data, signature, key.keyring, what="x")
    assert signer.fingerprint == key.fingerprint
    with pytest.raises(ImageError, match=r"signature check failed .*not in the keyring"):
        verify_detached(data, signature, other_key.keyring, what="x")


def test_an_armored_or_broken_keyring_is_refused(tmp_path: Path) -> None:
    sums, sig = pair(PAIRS[0])
    with pytest.raises(ImageError, match=r"cannot read keyring .*binary keyring"):
        verify_detached(sums, sig, DATA / "uec-image-automatic-signing-key.asc", what="noble")


def test_gpgv_ignores_the_users_keyrings(test_key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GNUPGHOME whose trustedkeys hold the other key must not make that key's signatures pass.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "trustedkeys.gpg").write_bytes(test_key.keyring.read_bytes())
    monkeypatch.setenv("GNUPGHOME", str(home))
    data = b"data\n"
    with pytest.raises(ImageError, match=r"not in the keyring"):
        verify_detached(data, test_key.sign(data), DATA / "ubuntu-cloudimage-keyring_2013.11.11.gpg", what="x")


# Through `qinst pull --latest`: the signature is checked before any image byte is requested.


def real_noble_catalog(server: HTTPServer, tmp_path: Path, sums: bytes, sig: bytes) -> Path:
    """A catalog whose latest channel is the real signed noble pair, served from 127.0.0.1, with the shipped keys."""
    server.add("/noble/current/SHA256SUMS", sums, "text/plain")
    server.add("/noble/current/SHA256SUMS.gpg", sig, "text/plain")
    server.add("/noble/current/noble-server-cloudimg-amd64.img", b"not the real image")
    catalog = tmp_path / "noble.toml"
    catalog.write_text(
        f"""[images.noble-test]
url = "{server.url}/noble/pinned.img"
digest = "sha256:{"0" * 64}"
latest_url = "{server.url}/noble/current/noble-server-cloudimg-amd64.img"
checksums_url = "{server.url}/noble/current/SHA256SUMS"
checksums_signature_url = "{server.url}/noble/current/SHA256SUMS.gpg"
signing_keys = "ubuntu-cloud-images"
"""
    )
    return catalog


@pytest.mark.http
def test_pull_latest_with_the_real_signed_pair(qinst: RunQinst, http_server: HTTPServer, tmp_path: Path) -> None:
    catalog = real_noble_catalog(http_server, tmp_path, *pair(PAIRS[0]))
    proc = qinst("--catalog", str(catalog), "--cache-dir", str(tmp_path / "c"), "pull", "noble-test", "--latest")
    # The signature verified, so the image was requested; its bytes are not Canonical's, so nothing is cached.
    assert proc.returncode == 3, proc.stderr
    assert "digest mismatch" in proc.stderr
    assert "expected sha256:6a81c37564db9b1ee84e141922625e1d7c5b389b99bb3c572e0243607d5bb4d2" in proc.stderr
    assert http_server.hits("/noble/current/noble-server-cloudimg-amd64.img")
    assert cached(tmp_path / "c") == []


@pytest.mark.http
def test_pull_latest_with_a_changed_real_checksum_file(
    qinst: RunQinst, http_server: HTTPServer, tmp_path: Path
) -> None:
    sums, sig = pair(PAIRS[0])
    forged = sums.replace(b"6a81c37564db9b1ee84e141922625e1d7c5b389b99bb3c572e0243607d5bb4d2", b"f" * 64)
    assert forged != sums
    catalog = real_noble_catalog(http_server, tmp_path, forged, sig)
    proc = qinst("--catalog", str(catalog), "--cache-dir", str(tmp_path / "c"), "pull", "noble-test", "--latest")
    assert proc.returncode == 3, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("qinst: error: signature check failed for ") and "BAD signature" in first
    assert not http_server.hits("/noble/current/noble-server-cloudimg-amd64.img")  # the image was never requested


@pytest.mark.http
@pytest.mark.parametrize("attack", ["other-key", "no-signature", "changed-sums"])
def test_signed_latest_fails_closed(
    qinst: RunQinst, mirror: Mirror, upstream: Path, other_key: SigningKey, tmp_path: Path, attack: str
) -> None:
    sums = mirror.server._docs[UBUNTU_SUMS].body
    if attack == "other-key":
        mirror.server.add(UBUNTU_SUMS + ".gpg", other_key.sign(sums))
    elif attack == "no-signature":
        mirror.server.remove(UBUNTU_SUMS + ".gpg")
    else:
        mirror.server.add(UBUNTU_SUMS, sums.replace(b"*ubuntu", b"*ubuntu", 1) + b"\n")
    cache = tmp_path / "cache"
    proc = qinst("--catalog", str(upstream), "--cache-dir", str(cache), "pull", "jammy", "--latest")
    assert proc.returncode == 3, proc.stderr
    assert "signature" in proc.stderr.splitlines()[0]
    assert "Traceback" not in proc.stderr
    assert not mirror.server.hits(UBUNTU_LATEST)
    assert cached(cache) == []


@pytest.mark.http
def test_signed_checksum_file_may_come_through_a_mirror(
    qinst: RunQinst, mirror: Mirror, upstream: Path, test_key: SigningKey, tmp_path: Path
) -> None:
    # The Ubuntu entry's upstream is a host nobody serves: only the mirror has the files, and it is trusted for the
    # signed checksum file because the signature is checked against the pinned keyring.
    text = upstream.read_text().replace(mirror.url, "https://cloud-images.ubuntu.invalid")
    catalog = tmp_path / "signed-upstream.toml"
    catalog.write_text(text)
    cache = tmp_path / "cache"
    args = ("--mirror", mirror.url, "--catalog", str(catalog), "--cache-dir", str(cache))
    proc = qinst(*args, "pull", "jammy", "--latest", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == mirror.images.ubuntu.sha256
    assert [h.target for h in mirror.server.hits() if "SHA256SUMS" in h.target] == [UBUNTU_SUMS, UBUNTU_SUMS + ".gpg"]
    proc = qinst("--catalog", str(catalog), "--cache-dir", str(cache), "images", "--json")
    row = next(r for r in json.loads(proc.stdout) if r["name"] == "ubuntu-22.04")
    assert row["latest_trust"] == "signed"


# Rollback: a signature proves who signed, not that the file is current.


@pytest.mark.http
def test_a_pinned_pull_never_takes_a_mirrors_signed_checksum_file(
    qinst: RunQinst, http_server: HTTPServer, tmp_path: Path
) -> None:
    """The attack, with Canonical's genuine old signed SHA256SUMS: a mirror that answers 404 for the built-in
    ubuntu-22.04 pin and serves a validly signed checksum file and the build it names. A plain pull (no --latest)
    reads no checksum file: the pin or nothing (upstream is unreachable here)."""
    sums, sig = pair("jammy-22.04-release-20260722")
    http_server.add("/releases/jammy/release/SHA256SUMS", sums, "text/plain")
    http_server.add("/releases/jammy/release/SHA256SUMS.gpg", sig, "text/plain")
    http_server.add("/releases/jammy/release/ubuntu-22.04-server-cloudimg-amd64.img", b"an older build")
    cache = tmp_path / "c"
    proc = qinst("--mirror", http_server.url, "--cache-dir", str(cache), "pull", "ubuntu-22.04")
    assert proc.returncode == 3, proc.stderr
    error, hint = proc.stderr.splitlines()[-2:]
    assert error.startswith("qinst: error: ") and "Traceback" not in proc.stderr
    assert "HTTP 404" in error and "; then cannot download https://cloud-images.ubuntu.com/" in error  # upstream
    assert hint.startswith("hint: the mirror does not hold the pinned file")
    assert [h.target for h in http_server.hits()] == [
        "/releases/jammy/release-20260722/ubuntu-22.04-server-cloudimg-amd64.img"
    ]
    assert cached(cache) == []


@pytest.mark.http
def test_latest_refuses_a_genuine_signed_file_older_than_one_accepted(
    qinst: RunQinst, http_server: HTTPServer, tmp_path: Path
) -> None:
    """Canonical's noble SHA256SUMS (signed 2026-09-26) is accepted; then the same URL serves Canonical's jammy
    release-20260722 file (signed 2026-07-22, genuine too): refused as stale, before any image byte is asked for."""
    catalog = real_noble_catalog(http_server, tmp_path, *pair("noble-current-20260926"))
    cache = tmp_path / "c"
    first = qinst("--catalog", str(catalog), "--cache-dir", str(cache), "pull", "noble-test", "--latest")
    assert "digest mismatch" in first.stderr  # accepted (the image is a stand-in, so nothing is cached)
    old_sums, old_sig = pair("jammy-22.04-release-20260722")
    http_server.add("/noble/current/SHA256SUMS", old_sums, "text/plain")
    http_server.add("/noble/current/SHA256SUMS.gpg", old_sig, "text/plain")
    images_before = len(http_server.hits("/noble/current/noble-server-cloudimg-amd64.img"))
    proc = qinst("--catalog", str(catalog), "--cache-dir", str(cache), "pull", "noble-test", "--latest")
    assert proc.returncode == 3, proc.stderr
    error = proc.stderr.splitlines()[0]
    assert error.startswith("qinst: error: refusing a stale checksum file ")
    assert (
        "signed 2026-07-22 19:16:08 UTC, older than the one already accepted (signed 2026-09-26 18:23:12 UTC)" in error
    )
    assert len(http_server.hits("/noble/current/noble-server-cloudimg-amd64.img")) == images_before
    assert cached(cache) == []


@pytest.mark.http
def test_latest_moves_forward_and_never_back(
    qinst: RunQinst, mirror: Mirror, upstream: Path, test_key: SigningKey, tmp_path: Path
) -> None:
    """Signed at t1, then t2 > t1 (accepted: newer), then t1 again through the same URL (refused), then t2 again
    (the same file: accepted)."""
    sums = mirror.server._docs[UBUNTU_SUMS].body
    cache = tmp_path / "cache"

    def pull_signed_at(at: int) -> subprocess.CompletedProcess[str]:
        mirror.server.add(UBUNTU_SUMS + ".gpg", test_key.sign(sums, at=at), "text/plain")
        return qinst("--catalog", str(upstream), "--cache-dir", str(cache), "pull", "jammy", "--latest")

    t1 = int(time.time()) + 60  # after the test key was made (gpg signs nothing older than its key)
    t2 = t1 + 3600
    assert pull_signed_at(t1).returncode == 0
    assert pull_signed_at(t2).returncode == 0
    stale = pull_signed_at(t1)
    assert stale.returncode == 3 and "refusing a stale checksum file" in stale.stderr, stale.stderr
    assert pull_signed_at(t2).returncode == 0


def test_gpgv_is_what_checks(tmp_path: Path) -> None:
    # The check runs Debian's gpgv (not gpg): the test machine must have it, as scripts/setup.sh installs it.
    out = subprocess.run(["gpgv", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("gpgv (GnuPG)")
