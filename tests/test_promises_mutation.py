"""Promises pinned down by the survivors of scripts/mutation.sh (issue 16): each test asserts what a user, a guest
or a later command sees, never how the code computes it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from qemu_instances.domain import METADATA_NS, Metadata, metadata_from_domain_xml
from qemu_instances.errors import UsageError
from qemu_instances.images import ImageStore
from qemu_instances.instances import console_log_name, disk_volume, seed_volume, validate_metadata
from qemu_instances.settings import Settings
from qemu_instances.sshkeys import generate_keypair

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
GOOD = Metadata(
    image="debian-12", digest="sha512:" + "0" * 128, user="debian", network="user",
    ssh_host="127.0.0.1", ssh_port=2222, instance_id="iid-1", private_key="/home/u/.ssh/id",
    host_keys=f"{KEY}\n", console_log=f"/var/log/{console_log_name('vm1')}", accel="tcg",
    volumes=(disk_volume("vm1"), seed_volume("vm1"), console_log_name("vm1")),
)  # fmt: skip


# -- metadata read back from libvirt is checked field by field --------------------------------------------------------


def test_a_valid_record_passes_unchanged() -> None:
    assert validate_metadata("vm1", GOOD) is GOOD


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"user": "-oProxyCommand=x"}, "invalid user name"),
        ({"user": "root"}, "invalid user name"),
        ({"network": "bogus:thing"}, "network"),
        ({"digest": "sha512:xyz"}, "sha512"),
        ({"instance_id": "-id"}, "invalid instance id"),
        ({"ssh_port": 0}, "invalid ssh-port 0"),
        ({"ssh_port": 65536}, "invalid ssh-port 65536"),
        ({"ssh_port": -22}, "invalid ssh-port -22"),
        ({"ssh_host": "-oProxyCommand=x"}, "invalid host name"),
        ({"ssh_host": "a b"}, "invalid host name"),
        ({"host_keys": f"{KEY}\nnot a key\n"}, "invalid host-keys line"),
        ({"host_keys": f"{KEY} root@vm"}, "invalid host-keys line"),
        ({"private_key": "relative/id"}, "invalid private-key path"),
        ({"private_key": "/home/u/id\nProxyCommand x"}, "invalid private-key path"),
        ({"private_key": "/home/u/id\x1f"}, "invalid private-key path"),
        ({"accel": "xen"}, "invalid accel 'xen'"),
        ({"accel": "KVM"}, "invalid accel"),
        ({"console_log": "/var/log/other-console.log"}, "console-log is not this instance's console log"),
        ({"volumes": ("other.qcow2",)}, "volumes names another instance's volume 'other.qcow2'"),
        ({"volumes": (disk_volume("vm1"), "debian-12-sha512.qcow2")}, "another instance's volume"),
    ],
)
def test_each_bad_field_is_refused_with_its_name(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        validate_metadata("vm1", replace(GOOD, **change))  # type: ignore[arg-type]


def test_long_bad_values_are_cut_in_the_message() -> None:
    with pytest.raises(UsageError, match=r"^invalid accel 'xxxxxxxxxxxxxxxxxxxx'$"):
        validate_metadata("vm1", replace(GOOD, accel="x" * 30))
    with pytest.raises(UsageError, match=r"^volumes names another instance's volume '" + "v" * 80 + "'$"):
        validate_metadata("vm1", replace(GOOD, volumes=("v" * 100, "w" * 100)))


def test_a_bad_name_is_refused() -> None:
    with pytest.raises(UsageError, match="invalid instance name"):
        validate_metadata("-vm1", GOOD)


@pytest.mark.parametrize(
    "change",
    [
        {"ssh_port": 1},
        {"ssh_port": 65535},
        {"ssh_host": "::1"},
        {"ssh_host": "vm1-host"},
        {"ssh_host": ""},
        {"digest": ""},  # pins no image
        {"instance_id": ""},
        {"private_key": ""},
        {"private_key": "/home/u/my keys/id"},  # a space is not a control character
        {"host_keys": ""},
        {"host_keys": f"\n  \n{KEY}\n\n"},  # blank lines are not keys
        {"host_keys": f"  {KEY}  "},
        {"accel": ""},
        {"accel": "kvm"},
        {"console_log": ""},
        {"volumes": ()},
    ],
)
def test_the_edges_of_each_field_are_accepted(change: dict[str, object]) -> None:
    meta = replace(GOOD, **change)  # type: ignore[arg-type]
    assert validate_metadata("vm1", meta) is meta


# -- the record's round trip through the domain XML -------------------------------------------------------------------


def _domain_xml(meta_xml: str) -> str:
    return f"<domain><name>vm1</name><metadata>{meta_xml}</metadata></domain>"


def test_the_record_survives_the_domain_xml() -> None:
    meta_xml = GOOD.to_xml().replace("<instance>", f'<instance xmlns="{METADATA_NS}">', 1)
    assert metadata_from_domain_xml(_domain_xml(meta_xml)) == GOOD


def test_a_domain_without_qinst_metadata_is_not_an_instance() -> None:
    assert metadata_from_domain_xml("<domain><name>x</name></domain>") is None
    assert metadata_from_domain_xml(_domain_xml('<instance xmlns="http://other.invalid/ns"/>')) is None
    assert metadata_from_domain_xml(_domain_xml("<instance/>")) is None  # not in qinst's namespace


def test_missing_fields_take_their_defaults_and_empty_ones_are_empty() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image>i</image><digest/><user>u</user><network>user</network>'
    xml += "<ssh-port/><volumes><volume/></volumes></instance>"
    meta = metadata_from_domain_xml(_domain_xml(xml))
    assert meta == Metadata(image="i", digest="", user="u", network="user", ssh_port=0, volumes=("",))


def test_fields_outside_qinst_namespace_are_read_not_a_crash() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image xmlns="">i</image><digest/><user>u</user>'
    meta = metadata_from_domain_xml(_domain_xml(xml + "<network>user</network></instance>"))
    assert meta is not None and (meta.image, meta.user, str(meta.network)) == ("i", "u", "user")


def test_a_record_with_a_non_numeric_port_is_refused() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image>i</image><digest/><user>u</user><network>user</network>'
    with pytest.raises(UsageError, match=r"^unreadable qinst metadata: .*22x"):  # says what is wrong
        metadata_from_domain_xml(_domain_xml(xml + "<ssh-port>22x</ssh-port></instance>"))


def test_recorded_forwards_and_mounts_are_validated() -> None:
    """`up --forward`/`--mount` rules read back from libvirt are untrusted: a valid record passes, a forged one
    (a port out of range, a mount of a relative or '..' path) is refused."""
    good = replace(GOOD, forwards=("127.0.0.1:8080:80",), mounts=("virtiofs:ro:/srv/data:/mnt/data",))
    assert validate_metadata("vm1", good) is good
    for bad, message in [
        ({"forwards": ("127.0.0.1:8080:99999",)}, "invalid forward '127.0.0.1:8080:99999'"),
        ({"forwards": ("8080",)}, "invalid forward '8080'"),
        ({"mounts": ("virtiofs:ro:srv:/mnt",)}, "invalid mount 'virtiofs:ro:srv:/mnt'"),
        ({"mounts": ("virtiofs:rw:/srv/../etc:/mnt",)}, "invalid mount"),
    ]:
        with pytest.raises(UsageError, match=message):
            validate_metadata("vm1", replace(good, **bad))  # type: ignore[arg-type]


# -- the cache's temporaries: links planted in the cache go, their targets stay -----------------------------------


def test_planted_links_are_removed_not_followed_and_count_no_bytes(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path / "cache"))
    store.cache.dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    links = [store.cache.dir / name for name in (".a.part", "b.qcow2", ".c.json", "dangling")]
    for link in links[:3]:
        link.symlink_to(victim)
    links[3].symlink_to(tmp_path / "nowhere")
    emptied = store.cache.dir / ".d.tmp"  # a directory temporary: its size is not a file's
    emptied.mkdir()
    removed = dict(store.prune(set()))
    assert removed == {**dict.fromkeys(links, 0), emptied: 0}
    assert victim.read_bytes() == b"precious" * 100
    assert list(store.cache.dir.iterdir()) == []


# -- qinst's own key pair is made without asking anything, even from a terminal ------------------------------------


def test_generating_the_key_pair_from_a_terminal_asks_no_passphrase(tmp_path: Path) -> None:
    """Run in a terminal (a pty as controlling terminal), ssh-keygen would prompt for a passphrase unless told -N ''."""
    key = tmp_path / "keys" / "id_ed25519"
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        try:
            generate_keypair(key)
        finally:
            os._exit(0)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and b"passphrase" not in output.lower():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    assert b"passphrase" not in output.lower(), output
    assert key.exists() and key.with_name("id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
