"""`qinst prune` through the real entry point (libvirt's in-memory test driver): cached images and stale partial files
go, planted and dangling links are removed without following them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import RunQinst, cache_files
from mirror import make_qcow2


@pytest.mark.skipif(
    not (Path(__file__).parents[1] / "qemu_instances" / "instances.py").exists(),
    reason="qinst prune needs qemu_instances/instances.py, not written yet",
)
def test_prune_command(qinst: RunQinst, tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    cache = tmp_path / "cache"
    local = make_qcow2(tmp_path / "disk.qcow2", 1, seed=11)
    # libvirt's in-memory test driver: no instance uses the image, and no shared pool is touched.
    args = ["--connect", "test:///default", "--cache-dir", str(cache)]
    assert qinst(*args, "pull", str(local.file)).returncode == 0
    partial = cache / "images" / f".sha256-{'4' * 64}.part"
    partial.write_bytes(b"x")
    proc = qinst(*args, "prune", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"]: r["size"] for r in json.loads(proc.stdout)}
    assert removed == {str(cache / "images" / f"sha256-{local.sha256_hex}"): local.size, str(partial): 1}
    assert cache_files(cache) == []
    again = qinst(*args, "prune")
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "nothing to prune\n")


def test_prune_copes_with_planted_and_dangling_symlinks(qinst: RunQinst, tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    cache = tmp_path / "cache"
    image = make_qcow2(tmp_path / "p.qcow2", 1, seed=25)
    args = ["--connect", "test:///default", "--cache-dir", str(cache)]
    assert qinst(*args, "pull", str(image.file)).returncode == 0
    images = cache / "images"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    target_file = tmp_path / "outside-file"
    target_file.write_text("keep")
    links = {
        images / f".sha256-{'7' * 64}.part": tmp_path / "nowhere",  # dangling
        images / ".import-dir.tmp": outside,  # a directory symlink
        images / f"sha256-{'8' * 64}": target_file,  # a link posing as an image
    }
    for link, target in links.items():
        link.symlink_to(target)
    proc = qinst(*args, "images", "--json")  # the posing link is not a cached image
    assert proc.returncode == 0, proc.stderr
    proc = qinst(*args, "prune", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"] for r in json.loads(proc.stdout)}
    assert removed == {str(images / f"sha256-{image.sha256_hex}"), *(str(p) for p in links)}
    assert cache_files(cache) == []
    assert (outside / "keep").read_text() == "keep" and target_file.read_text() == "keep"  # targets untouched
