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
