"""A throw-away OpenPGP key made with gpg for the tests, and a catalog whose upstream hosts are the local server.

The key lives in its own temporary GNUPGHOME (its agent is stopped at the end); its public keyring is exported in
binary form, as qinst's `signing_keys` takes it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mirror import DEBIAN_HOST, UBUNTU_HOST, UBUNTU_SUMS, Mirror


@dataclass(frozen=True)
class SigningKey:
    home: Path
    keyring: Path  # the binary public keyring (gpg --export)
    fingerprint: str

    def _gpg(self, *args: str, data: bytes | None = None) -> bytes:
        env = {**os.environ, "GNUPGHOME": str(self.home)}
        proc = subprocess.run(
            ["gpg", "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase", "", *args],
            input=data,
            capture_output=True,
            env=env,
            check=True,
        )
        return proc.stdout

    def sign(self, data: bytes, at: int | None = None, expire: str | None = None) -> bytes:
        """An ASCII-armored detached signature over data (like Ubuntu's SHA256SUMS.gpg); `at`: its creation time
        (seconds since the epoch; gpg's clock is faked for it); `expire`: the signature's lifetime (gpg's "1d")."""
        when = ["--faked-system-time", f"{at}!"] if at is not None else []
        lifetime = ["--default-sig-expire", expire] if expire else []
        signer = ["--local-user", self.fingerprint] if self.fingerprint else []
        return self._gpg(*when, *lifetime, *signer, "--armor", "--detach-sign", "--output", "-", data=data)

    def revoke(self) -> SigningKey:
        """Import the key's own revocation certificate (gpg made it with the key) and export the revoked keyring."""
        cert = (self.home / "openpgp-revocs.d" / f"{self.fingerprint}.rev").read_bytes()
        self._gpg(
            "--import", data=cert.replace(b":-----BEGIN PGP PUBLIC KEY BLOCK", b"-----BEGIN PGP PUBLIC KEY BLOCK")
        )
        self.keyring.write_bytes(self._gpg("--export", self.fingerprint))
        return self

    def stop(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(self.home)}, check=False)


def make_key(
    home: Path, uid: str, *, expire: str = "never", created: int | None = None, signing_subkey: bool = False
) -> SigningKey:
    """A new ed25519 key `uid` in `home`: `expire` (gpg's "1d"), `created` (seconds since the epoch: a key made in
    the past), `signing_subkey` (a certify-only primary key that signs with a subkey)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SigningKey(home, home / "keyring.gpg", "")
    when = ["--faked-system-time", f"{created}!"] if created is not None else []
    key._gpg(*when, "--quick-gen-key", uid, "ed25519", "cert" if signing_subkey else "sign", expire)
    listing = key._gpg("--with-colons", "--list-keys", uid).decode()
    if signing_subkey:
        primary = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        key._gpg(*when, "--quick-add-key", primary, "ed25519", "sign", expire)
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    key.keyring.write_bytes(key._gpg("--export", fingerprint))
    return SigningKey(home, key.keyring, fingerprint)


def upstream_catalog(mirror: Mirror, workdir: Path, key: SigningKey | None = None) -> Path:
    """The mirror's catalog with its upstream hosts moved to the local server itself: checksum files read from
    there are the entry's own upstream. With key, the Ubuntu entry's SHA256SUMS is signed by it (served beside)."""
    text = mirror.catalog.read_text().replace(DEBIAN_HOST, mirror.url).replace(UBUNTU_HOST, mirror.url)
    if key is not None:
        sums = mirror.server._docs[UBUNTU_SUMS].body
        mirror.server.add(UBUNTU_SUMS + ".gpg", key.sign(sums), "text/plain")
        text = text.replace(
            f'checksums_url = "{mirror.url}{UBUNTU_SUMS}"',
            f'checksums_url = "{mirror.url}{UBUNTU_SUMS}"\n'
            f'checksums_signature_url = "{mirror.url}{UBUNTU_SUMS}.gpg"\n'
            f'signing_keys = "{key.keyring}"',
        )
        assert "signing_keys" in text
    path = workdir / "upstream.toml"
    path.write_text(text)
    return path
