"""seals.py: a seal is one client's record of one volume on one host. (Base volumes and their seals under host.py's
checks: test_host.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances.seals import Seal, SealStore

pytestmark = pytest.mark.promise


def test_a_seal_of_another_host_or_volume_is_not_taken(tmp_path: Path) -> None:
    seal = Seal("sha512:" + "0" * 128, "/pool/vol", 10, "1.5", "1.5")
    SealStore(tmp_path, "qemu+ssh://a/system").put(seal)
    assert SealStore(tmp_path, "qemu+ssh://a/system").get("/pool/vol") == seal
    assert SealStore(tmp_path, "qemu+ssh://b/system").get("/pool/vol") is None
    assert SealStore(tmp_path, "qemu+ssh://a/system").get("/pool/other") is None


def test_a_seal_file_copied_from_another_hosts_store_is_not_taken(tmp_path: Path) -> None:
    """The seal names its host inside: a file put where this host's seal goes (a copied cache) is refused."""
    seal = Seal("sha512:" + "0" * 128, "/pool/vol", 10, "1.5", "1.5")
    other, here = SealStore(tmp_path, "qemu+ssh://a/system"), SealStore(tmp_path, "qemu+ssh://b/system")
    other.put(seal)
    here._path("/pool/vol").write_bytes(other._path("/pool/vol").read_bytes())
    assert here.get("/pool/vol") is None
