"""Port forwards: parsing, the hostfwd rules in the domain XML, the bind test, the tunnel's argv and its end."""

from __future__ import annotations

import socket
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from qemu_instances.domain import QEMU_NS, Metadata, Network, domain_xml, metadata_from_domain_xml
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.forwarding import Forward, check_free, parse_forwards
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.tunnel import run_tunnel, tunnel_argv
from testsupport.testdriver import instance_spec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAuBUfUBCujFmHWWVVWaubWIPHRW795crgJj2nycx7Y0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", Forward("127.0.0.1", 8080, 80)),
        ("127.0.0.1:2222:22", Forward("127.0.0.1", 2222, 22)),
        ("0.0.0.0:8443:443", Forward("0.0.0.0", 8443, 443)),
    ],
)
def test_parse(text: str, expected: Forward) -> None:
    assert Forward.parse(text) == expected
    assert Forward.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["80", "a:80:80", "localhost:80:80", "1.2.3:80:80", "0:80", "80:0", "70000:80", "8080:80:1", "::1:80:80"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        Forward.parse(text)


def test_same_host_port_twice_or_on_the_ssh_port() -> None:
    with pytest.raises(UsageError, match="forwarded twice"):
        parse_forwards(["8080:80", "0.0.0.0:8080:81"])
    with pytest.raises(UsageError, match="2222 is forwarded twice"):
        parse_forwards(["2222:80"], taken=[2222])


def test_hostfwd_rules_beside_the_ssh_one() -> None:
    spec = instance_spec()
    spec = replace(spec, metadata=replace(spec.metadata, forwards=("127.0.0.1:18080:80", "0.0.0.0:18443:443")))
    root = ET.fromstring(domain_xml(spec))
    netdev = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")][1]
    assert netdev.split(",")[2:] == [
        "hostfwd=tcp:127.0.0.1:2222-:22",
        "hostfwd=tcp:127.0.0.1:18080-:80",
        "hostfwd=tcp:0.0.0.0:18443-:443",
    ]
    assert metadata_from_domain_xml(domain_xml(spec)) == spec.metadata


def test_metadata_with_a_bad_forward_is_refused() -> None:
    good = Metadata("img", "sha512:00", "debian", "user", forwards=("127.0.0.1:80:80",))
    # As if another program had written the record:
    xml = domain_xml(replace(instance_spec(), metadata=good, network=Network.parse("none")))
    forged = xml.replace("127.0.0.1:80:80<", "127.0.0.1:80:80,hostfwd=tcp::1-:22<")
    assert forged != xml
    with pytest.raises(QinstError, match="invalid forward"):
        metadata_from_domain_xml(forged)
    with pytest.raises(QinstError, match="invalid forward"):  # the typed record cannot even be made with it
        Metadata("img", "sha512:00", "debian", "user", forwards=("127.0.0.1:80:80,hostfwd=tcp::1-:22",))


def test_a_port_in_use_is_an_error_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port 127.0.0.1:{port} is already in use"):
            check_free([Forward("127.0.0.1", port, 80)])
    check_free([Forward("127.0.0.1", port, 80)])  # free again


def test_tunnel_argv_uses_the_checked_connection(tmp_path: Path) -> None:
    meta = Metadata("img", "sha512:00", "debian", "user", ssh_host="127.0.0.1", ssh_port=2200, host_keys=KEY)
    settings = Settings(connect="qemu+ssh://root@lab1/system", cache_dir=tmp_path, config_dir=tmp_path)
    argv = tunnel_argv(Instance("vm1", "running", meta), settings, [Forward("127.0.0.1", 8080, 80)])
    assert argv[0] == "ssh" and argv[-2:] == ["--", "debian@127.0.0.1"]
    joined = " ".join(argv)
    for part in ("-N", "ExitOnForwardFailure=yes", "StrictHostKeyChecking=yes", "-L 127.0.0.1:8080:localhost:80"):
        assert part in joined
    assert "ProxyCommand=ssh -l root -o BatchMode=yes -W %h:%p -- lab1" in argv
    with pytest.raises(UsageError, match="is shutoff"):
        tunnel_argv(Instance("vm1", "shutoff", meta), settings, [])


def test_tunnel_that_ends_by_itself_is_an_error() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('bind: Address already in use\\n'); sys.exit(255)"]
    with pytest.raises(QinstError, match="the tunnel ended: bind: Address already in use"):
        run_tunnel(argv, [Forward("127.0.0.1", 1, 1)], lambda: None)


@pytest.mark.promise
def test_the_one_taken_port_among_several_forwards_is_named() -> None:
    with socket.socket() as free, socket.socket() as busy:
        free.bind(("127.0.0.1", 0))
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        first, taken = free.getsockname()[1], busy.getsockname()[1]
        free.close()
        with pytest.raises(UsageError, match=f"port 127.0.0.1:{taken} is already in use"):
            check_free([Forward("127.0.0.1", first, 80), Forward("127.0.0.1", taken, 443)])
