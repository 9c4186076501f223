"""launch.py: the launcher's boot loop on libvirt's test driver (test:///default, in memory): the KVM->TCG fallback,
a guest that pauses under KVM, the undo of what a boot made, a port taken before QEMU binds it; and the names and
KVM records `up` reads from other domains; confidential (SEV) launches attested before they run."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import RunQinst
from mirror import Mirror

from qemu_instances import launch
from qemu_instances.digests import Digest
from qemu_instances.domain import (
    METADATA_KEY,
    METADATA_NS,
    Accel,
    Confidential,
    Firmware,
    InstanceSpec,
    Metadata,
    Network,
    NetworkKind,
)
from qemu_instances.errors import HypervisorError, QinstError, UsageError
from qemu_instances.host import Domain, Host, domain_capabilities
from qemu_instances.images import CachedImage
from qemu_instances.launch import Launcher, Plan, SevInputs, UpRequest, _Run, attest
from qemu_instances.settings import Settings
from qemu_instances.sev import LaunchInfo, MeasurementMismatch, Session, SevSupport, expected_measurement
from qemu_instances.wait import GuestPaused, Readiness
from testsupport.aleph import messages_target
from testsupport.testdriver import (
    PORT_TAKEN,
    TEST_URI,
    boot_plan,
    boot_run,
    driver_xml,
    record_domain_xml,
    sample_record,
)


def test_boot_falls_back_from_kvm_to_tcg_when_kvm_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    plan, spec = boot_plan("fallback", (Accel.KVM, Accel.TCG), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert result.instance.metadata.accel == "tcg"
        dom = host.lookup("fallback")
        assert dom is not None and dom.state()[0] == "running"
        undo.close()  # what a later failure does: everything the boot made goes
        assert host.lookup("fallback") is None


def test_boot_relaunches_a_guest_that_pauses_under_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", lambda spec: driver_xml(spec if spec.accel is Accel.TCG else _tcg(spec)))
    attempts: list[str] = []

    def wait(self: Launcher, run: _Run, dom: object, spec: InstanceSpec) -> list[tuple[str, str]]:
        attempts.append(str(spec.accel))
        if spec.accel is Accel.KVM:
            assert run.host.lookup(spec.name) is not None
            raise GuestPaused("the guest paused by itself (unknown)")
        return [("ssh-ed25519", "A" * 68)]

    monkeypatch.setattr(Launcher, "_wait", wait)
    plan, spec = boot_plan("paused", (Accel.KVM, Accel.TCG), wait=True)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert attempts == ["kvm", "tcg"]
        assert result.ready and result.instance.metadata.accel == "tcg"
        assert result.instance.metadata.host_keys == "ssh-ed25519 " + "A" * 68
        assert [d.name for d in host.domains() if d.name == "paused"] == ["paused"]
        undo.pop_all()


def _tcg(spec: InstanceSpec) -> InstanceSpec:
    import dataclasses

    return dataclasses.replace(spec, accel=Accel.TCG)


def test_boot_with_nothing_left_to_try_raises_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    plan, spec = boot_plan("nokvm", (Accel.KVM,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(HypervisorError) as err:
            Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert err.value.exit_code == 4
        assert host.lookup("nokvm") is None


def test_ctrl_c_while_the_domain_starts_removes_its_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Under load, starting a domain takes seconds: an interrupt lands there more often than anywhere else.
    monkeypatch.setenv("HOME", str(tmp_path))
    console = tmp_path / ".cache/libvirt/qemu/log/slowstart-console.log"  # where a session daemon's virtlogd writes
    console.parent.mkdir(parents=True)

    def interrupted_start(self: Host, xml: str, name: str, *, paused: bool = False) -> None:
        console.write_text("[    0.000000] Linux version 6.1\n")  # virtlogd had begun recording
        raise KeyboardInterrupt

    monkeypatch.setattr(Host, "define_and_start", interrupted_start)
    plan, spec = boot_plan("slowstart", (Accel.TCG,), wait=False)
    with pytest.raises(KeyboardInterrupt), Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
    assert not console.exists()


# -- a port taken before QEMU binds it ---------------------------------------------------------------------------------


@pytest.mark.promise
def test_the_launcher_picks_again_when_its_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launcher._boot on libvirt's test driver: the first start fails as QEMU does on a taken forward port; the
    launcher's own picker gives the next port, and the instance records it. With --ssh-port given, no retry."""
    from qemu_instances.host import Host
    from qemu_instances.launch import Launcher
    from qemu_instances.settings import Settings

    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    monkeypatch.setattr(launch, "_pick_port", lambda host: 2223)
    started: list[int] = []
    real_start = Host.define_and_start

    def define_and_start(self: Host, xml: str, name: str, *, paused: bool = False) -> object:
        assert not paused
        port = 2222 if not started else 2223
        started.append(port)
        if port == 2222:
            raise HypervisorError(PORT_TAKEN % port)
        return real_start(self, xml, name, paused=paused)

    monkeypatch.setattr(Host, "define_and_start", define_and_start)
    plan, spec = boot_plan("port-race", (Accel.TCG,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert started == [2222, 2223]
        assert result.instance.metadata.ssh_port == 2223
        undo.close()
    chosen, spec = boot_plan("port-chosen", (Accel.TCG,), wait=False)
    chosen = dataclasses.replace(chosen, req=dataclasses.replace(chosen.req, ssh_port=2222))
    started.clear()
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(UsageError, match=r"port 2222 on 127\.0\.0\.1 is already in use"):
            Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), chosen, spec)
        assert started == [2222]


# -- what `up` reads from other domains --------------------------------------------------------------------------------


def test_up_auto_is_not_stopped_by_another_domains_invalid_record() -> None:
    """Another domain paused with a record that does not validate (a bad forward) says nothing about KVM."""
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(record_domain_xml("stranger-rec", None))
        try:
            dom.create()
            record = sample_record(accel="kvm", forwards=("127.0.0.1:8080:80",)).to_xml()
            record = record.replace("127.0.0.1:8080:80", "not:a:forward:at:all")  # as another program wrote it
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, record, METADATA_KEY, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            dom.suspend()
            assert launch._paused_kvm_instance(host) is None
        finally:
            dom.destroy()
            dom.undefine()


def test_generated_names_never_reuse_a_taken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Host(TEST_URI) as host:
        taken = host.conn.defineXML(record_domain_xml("img-aaaa", None))
        try:
            assert launch._taken(host, "img-aaaa") and not launch._taken(host, "img-bbbb")
        finally:
            taken.undefine()


# -- confidential (AMD SEV) launches --
# The guest starts paused and runs only when the host's launch measurement is the one its owner expects (attest);
# a host without SEV refuses before anything is made; the firmware comes by hash like an image, its aleph message
# checked against the published validation hash. No SEV hardware is here: the measurement the host would report is
# computed by the test with the owner's TIK (the algorithm itself is checked against sevctl, libvirt and
# sev-snp-measure in test_sev.py) and read through a patched Domain.launch_security_info on the test driver.

REAL_DOMAIN_XML = launch.domain_xml
SUPPORT = SevSupport(True, cbitpos=51, reduced_phys_bits=1, max_guests=15)
SEV_DOMCAPS = """<domainCapabilities><features><sev supported='yes'><cbitpos>51</cbitpos>
<reducedPhysBits>1</reducedPhysBits><maxGuests>15</maxGuests><maxESGuests>0</maxESGuests></sev></features>
</domainCapabilities>"""


def _session(tmp_path: Path) -> tuple[Path, Session]:
    """A guest owner's session files, as `sevctl session --name PREFIX` writes them."""
    prefix = tmp_path / "owner"
    (tmp_path / "owner_tik.bin").write_bytes(secrets.token_bytes(16))
    (tmp_path / "owner_tek.bin").write_bytes(secrets.token_bytes(16))
    (tmp_path / "owner_godh.b64").write_text(base64.b64encode(secrets.token_bytes(64)).decode() + "\n")
    (tmp_path / "owner_session.b64").write_text(base64.b64encode(secrets.token_bytes(52)).decode() + "\n")
    return prefix, Session.load(prefix)


def _report(tik: bytes, firmware: bytes, policy: int = 0x1, nonce: bytes = b"N" * 16) -> dict[str, object]:
    """What a host that launched `firmware` under `policy` for the holder of `tik` reports through libvirt."""
    info = LaunchInfo(b"", nonce, 1, 55, 24, policy)
    measurement = expected_measurement(tik, info, hashlib.sha256(firmware).digest())
    return {
        "sev-measurement": base64.b64encode(measurement + nonce).decode(),
        "sev-api-major": 1, "sev-api-minor": 55, "sev-build-id": 24, "sev-policy": policy,
    }  # fmt: skip


def _inputs(tmp_path: Path, firmware: bytes) -> SevInputs:
    _, session = _session(tmp_path)
    path = tmp_path / "OVMF.fd"
    path.write_bytes(firmware)
    digest = Digest.parse("sha256:" + hashlib.sha256(firmware).hexdigest())
    cached = CachedImage("test-ovmf", digest, path, len(firmware), "file", "raw")
    return SevInputs(SUPPORT, session, cached, hashlib.sha256(firmware).digest(), 0x1)


def _test_domain(name: str) -> str:
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory").text = "65536"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    return ET.tostring(root, encoding="unicode")


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, object]]:
    """The launch security parameters the (patched) host reports, by domain name; the domain must be paused.
    The test driver has no VIR_DOMAIN_START_PAUSED: its domains start, then are suspended (the same state; the flag
    itself is checked on the real libvirtd below)."""
    reports: dict[str, dict[str, object]] = {}
    real_start = Domain.start

    def start(self: Domain, *, paused: bool = False) -> None:
        real_start(self)
        if paused:
            self._dom.suspend()

    def launch_security_info(self: Domain) -> dict[str, object]:
        assert self.state()[0] == "paused", "the measurement is read while the guest is paused"
        return reports[self.name]

    monkeypatch.setattr(Domain, "launch_security_info", launch_security_info)
    monkeypatch.setattr(Domain, "start", start)
    return reports


def test_a_paused_start_on_the_real_libvirtd_runs_no_vcpu(tmp_path: Path) -> None:
    """Host.define_and_start(paused=True) through the real libvirtd and QEMU: a diskless guest is left paused
    (QEMU's -S), and undefine destroys it."""
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")
    name = f"qinst-paused-{secrets.token_hex(4)}"
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "32"
    ET.SubElement(ET.SubElement(root, "os"), "type", arch="x86_64", machine="q35").text = "hvm"
    with Host("qemu:///system") as host:
        dom = host.define_and_start(ET.tostring(root, encoding="unicode"), name, paused=True)
        try:
            assert dom.state()[0] == "paused"
            dom.resume()
            assert dom.state()[0] == "running"
        finally:
            dom.undefine()
        assert host.lookup(name) is None


def test_attest_resumes_the_guest_only_for_the_expected_measurement(
    tmp_path: Path, reported: dict[str, dict[str, object]]
) -> None:
    firmware = secrets.token_bytes(4096)
    sev = _inputs(tmp_path, firmware)
    with Host(TEST_URI) as host:
        for name, report, why in [
            ("sev-other-fw", _report(sev.session.tik, b"another firmware"), "does not match the firmware"),
            ("sev-other-tik", _report(secrets.token_bytes(16), firmware), "does not match the firmware"),
            ("sev-debug", _report(sev.session.tik, firmware, policy=0x0), "policy 0x0, not the 0x1"),
        ]:
            dom = host.define_and_start(_test_domain(name), name, paused=True)
            reported[name] = report
            with pytest.raises(MeasurementMismatch, match=why) as err:
                attest(dom, sev)
            assert err.value.exit_code == 3
            assert dom.state()[0] == "paused"  # never ran a single instruction
            dom.undefine()
        dom = host.define_and_start(_test_domain("sev-ok"), "sev-ok", paused=True)
        reported["sev-ok"] = _report(sev.session.tik, firmware)
        attest(dom, sev)
        assert dom.state()[0] == "running"
        dom.undefine()


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({}, "no usable SEV launch measurement"),
        ({"sev-measurement": "not base64!"}, "no usable SEV launch measurement"),
        ({"sev-measurement": base64.b64encode(bytes(47)).decode()}, "48 bytes"),
        ({"sev-measurement": base64.b64encode(bytes(48)).decode(), "sev-api-major": "1"}, "sev-api-major"),
        ({**_report(bytes(16), b""), "sev-policy": True}, "sev-policy"),
        ({**_report(bytes(16), b""), "sev-build-id": 256}, "sev-build-id"),
    ],
)
def test_a_malformed_report_is_refused_and_the_guest_stays_paused(
    tmp_path: Path, reported: dict[str, dict[str, object]], params: dict[str, object], needle: str
) -> None:
    sev = _inputs(tmp_path, b"fw")
    with Host(TEST_URI) as host:
        dom = host.define_and_start(_test_domain("sev-bad"), "sev-bad", paused=True)
        reported["sev-bad"] = params
        try:
            with pytest.raises(HypervisorError, match=needle):
                attest(dom, sev)
            assert dom.state()[0] == "paused"
        finally:
            dom.undefine()


def _plan(name: str, sev: SevInputs) -> tuple[Plan, InstanceSpec]:
    spec = InstanceSpec(
        name=name, cpus=1, memory_mib=64, disk_path="/nonexistent/disk.qcow2", seed_path="/nonexistent/seed.iso",
        console_log=f"/nonexistent/{name}-console.log", network=Network(NetworkKind.USER), accel=Accel.KVM,
        firmware=Firmware.UEFI, ssh_port=2222,
        metadata=Metadata(image="debian-12", digest="sha256:" + "ab" * 32, user="cloud",
                          network="user", ssh_host="127.0.0.1", ssh_port=2222),  # type: ignore[arg-type]
        confidential=Confidential(str(sev.firmware.path), 51, 1, 0x1, sev.session.godh, sev.session.session),
    )  # fmt: skip
    req = UpRequest(image="x", name=name, wait=False, confidential="sev")
    plan = Plan(req, name, None, None, None, b"", spec.network, 2222, (Accel.KVM,), Path(spec.console_log), spec,  # type: ignore[arg-type]
                sev=sev)  # fmt: skip
    return plan, spec


def _as_test_domain(spec: InstanceSpec) -> str:
    """The real domain XML must carry the launch security; the test driver gets a plain domain of that name."""
    root = ET.fromstring(REAL_DOMAIN_XML(spec))
    sev = root.find("launchSecurity")
    assert sev is not None and sev.get("type") == "sev" and sev.findtext("policy") == "0x0001"
    assert root.find("os/loader").get("stateless") == "yes"  # type: ignore[union-attr]
    test = ET.fromstring(_test_domain(spec.name))
    test.append(root.find("metadata"))  # type: ignore[arg-type]
    return ET.tostring(test, encoding="unicode")


@pytest.mark.parametrize("right", [True, False])
def test_boot_attests_before_the_guest_runs_and_a_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported: dict[str, dict[str, object]], right: bool
) -> None:
    monkeypatch.setattr(launch, "domain_xml", _as_test_domain)
    firmware = secrets.token_bytes(2048)
    sev = _inputs(tmp_path, firmware)
    name = f"sev-boot-{right}"
    reported[name] = _report(sev.session.tik, firmware if right else firmware + b"\0")
    plan, spec = _plan(name, sev)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        run = _Run(host, undo, time.monotonic(), None, Readiness(), threading.Event(), 5.0)
        if right:
            result = Launcher(Settings(connect=TEST_URI))._boot(run, plan, spec)
            assert result.instance.state == "running"
            assert host.lookup(name).state()[0] == "running"  # type: ignore[union-attr]
            undo.close()
        else:
            with pytest.raises(MeasurementMismatch):
                Launcher(Settings(connect=TEST_URI))._boot(run, plan, spec)
            assert host.lookup(name).state()[0] == "paused"  # type: ignore[union-attr]
            undo.close()  # what `up` does on the way out of a failure
        assert host.lookup(name) is None


# -- refusals before anything is made --


def _cached(cache: Path) -> list[str]:
    """What a cache holds besides lock files (images, records, .part files)."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def _up(tmp_path: Path, connect: str, **fields: object) -> None:
    prefix, _ = _session(tmp_path)
    values: dict[str, object] = {"image": "debian-12", "name": "sev-refused", "wait": False, "confidential": "sev",
                                 "sev_session": prefix, "sev_firmware": "aleph-sev-ovmf"}  # fmt: skip
    Launcher(Settings(connect=connect, cache_dir=tmp_path / "cache")).up(UpRequest(**{**values, **fields}))  # type: ignore[arg-type]


def test_a_host_without_sev_refuses_with_exit_4_before_anything_is_made(tmp_path: Path) -> None:
    """On this machine's real libvirtd (no SEV here): exit 4, nothing downloaded, no domain, no volume."""
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")
    with Host("qemu:///system") as host:
        if SevSupport.from_domcaps(domain_capabilities(host)).sev:
            pytest.skip("this host has SEV")
        before = set(host.volume_names(host.pool()))
    with pytest.raises(HypervisorError, match="cannot run AMD SEV guests") as err:
        _up(tmp_path, "qemu:///system")
    assert err.value.exit_code == 4
    assert not _cached(tmp_path / "cache")  # nothing downloaded: not the firmware, not the image
    with Host("qemu:///system") as host:
        assert host.lookup("sev-refused") is None
        assert set(host.volume_names(host.pool())) == before


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"accel": Accel.TCG}, "KVM only"),
        ({"mounts": ("/tmp",)}, "without shared folders"),
        ({"sev_session": None}, "needs --sev-session"),
        ({"sev_session": Path("/nonexistent/owner")}, "owner_tik.bin does not exist"),
        ({"confidential": "tdx"}, "only sev"),
    ],
)
def test_confidential_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, object], needle: str
) -> None:
    monkeypatch.setattr("qemu_instances.host.domain_capabilities", lambda host, *a: SEV_DOMCAPS)
    with pytest.raises(UsageError, match=needle) as err:
        _up(tmp_path, TEST_URI, **fields)
    assert err.value.exit_code == 2


def test_a_session_with_a_short_tik_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.host.domain_capabilities", lambda host, *a: SEV_DOMCAPS)
    prefix, _ = _session(tmp_path)
    (tmp_path / "owner_tik.bin").write_bytes(bytes(15))
    req = UpRequest(image="debian-12", confidential="sev", sev_session=prefix, sev_firmware="aleph-sev-ovmf")
    with pytest.raises(UsageError, match="15 bytes, not a 16-byte TIK"):
        Launcher(Settings(connect=TEST_URI, cache_dir=tmp_path / "cache")).up(req)
    assert not _cached(tmp_path / "cache")


# -- the firmware, pulled by hash through aleph and checked against the validation hash --


def _firmware_catalog(tmp_path: Path, item: str, digest: str) -> Path:
    path = tmp_path / "firmware.toml"
    path.write_text(f'[firmware.test-ovmf]\naleph_item_hash = "{item}"\ndigest = "sha256:{digest}"\n')
    return path


@pytest.mark.http
@pytest.mark.parametrize("item_type", ["storage", "ipfs"])
def test_firmware_pull_checks_the_validation_hash(
    qinst: RunQinst, mirror: Mirror, tmp_path: Path, item_type: str
) -> None:
    firmware = secrets.token_bytes(64 << 10)
    item, _ = mirror.aleph.store(firmware, item_type=item_type)
    good = _firmware_catalog(tmp_path, item, hashlib.sha256(firmware).hexdigest())
    cache = tmp_path / "cache"
    proc = qinst(*mirror.args(cache), "--catalog", str(good), "pull", f"aleph:{item}", "--json")
    assert proc.returncode == 0, proc.stderr
    assert Path(json.loads(proc.stdout)["path"]).read_bytes() == firmware

    other = tmp_path / "other"
    other.mkdir()
    bad = _firmware_catalog(other, item, hashlib.sha256(b"the published firmware").hexdigest())
    cache = tmp_path / "cache-bad"
    hits = len(mirror.server.hits())
    proc = qinst(*mirror.args(cache), "--catalog", str(bad), "pull", f"aleph:{item}")
    assert proc.returncode == 3, proc.stderr
    assert "validation hash" in proc.stderr and "Traceback" not in proc.stderr
    assert not _cached(cache)
    targets = [h.target for h in mirror.server.hits()[hits:]]
    if item_type == "storage":  # the message names another file: refused before a byte of it is downloaded
        assert targets == [messages_target(item)]
    else:
        assert messages_target(item) in targets


def test_the_builtin_catalog_names_alephs_confidential_firmware() -> None:
    from qemu_instances.catalog import Catalog

    fw = Catalog.load().firmware["aleph-sev-ovmf"]
    assert fw.aleph_item_hash == "ba5bb13f3abca960b101a759be162b229e2b7e93ecad9d1307e54de887f177ff"
    assert str(fw.digest) == "sha256:89b76b0e64fe9015084fbffdf8ac98185bafc688bfe7a0b398585c392d03c7ee"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[firmware.x]\ndigest = "sha256:' + "a" * 64 + '"\n', "missing key 'aleph_item_hash' or 'url'"),
        ('[firmware.x]\nurl = "https://e.invalid/OVMF.fd"\n', "must be the file's sha256"),
        ('[firmware.x]\nurl = "https://e.invalid/f"\ndigest = "sha512:' + "a" * 128 + '"\n', "file's sha256"),
        ('[firmware.x]\nurl = "https://e.invalid/f"\ndigest = "sha256:' + "a" * 64 + '"\nkind = "tdx"\n', "'sev'"),
        ('[firmware.x]\nurl = "https://e.invalid/f"\nsize = 3\n', "unknown key 'size'"),
        ("firmware = 3\n", "'firmware' must be a table"),
    ],
)
def test_bad_firmware_entries_name_the_key(text: str, needle: str) -> None:
    from qemu_instances.catalog import parse_catalog_file
    from qemu_instances.errors import CatalogError

    with pytest.raises(CatalogError, match=needle):
        parse_catalog_file(text, "user.toml")


def test_session_files_are_not_printed(tmp_path: Path) -> None:
    """The TIK and TEK are the owner's secrets: no error quotes them."""
    prefix, session = _session(tmp_path)
    (tmp_path / "owner_godh.b64").write_text("not base64 " + session.tik.hex())
    with pytest.raises(UsageError) as err:
        Session.load(prefix)
    assert session.tik.hex() not in str(err.value) + str(getattr(err.value, "hint", ""))


def test_the_confidential_domain_xml_is_valid_for_libvirt(tmp_path: Path) -> None:
    """The SEV domain passes libvirt's own schema (virt-xml-validate) and the test driver defines it; the firmware is
    the only loader, stateless and read-only, and nothing that would run unmeasured is left."""
    sev = _inputs(tmp_path, b"firmware")
    _, spec = _plan("sev-xml", sev)
    xml = REAL_DOMAIN_XML(spec)
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = ET.fromstring(xml)
    loaders = root.findall("os/loader")
    assert [(x.text, x.get("stateless"), x.get("readonly")) for x in loaders] == [
        (str(sev.firmware.path), "yes", "yes")
    ]
    assert root.find("os").get("firmware") is None and root.find("os/nvram") is None  # type: ignore[union-attr]
    assert root.find("memoryBacking/locked") is not None and root.findtext("on_reboot") == "destroy"
    security = root.find("launchSecurity")
    assert security is not None
    assert {c.tag: c.text for c in security} == {
        "cbitpos": "51", "reducedPhysBits": "1", "policy": "0x0001",
        "dhCert": sev.session.godh, "session": sev.session.session,
    }  # fmt: skip
    assert all(d.get("iommu") == "on" for d in root.iterfind("devices/disk/driver"))
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(xml)
        try:
            assert ET.fromstring(dom.XMLDesc(0)).find("launchSecurity") is not None
        finally:
            dom.undefine()


def test_a_firmware_cannot_take_an_images_name(tmp_path: Path) -> None:
    from qemu_instances.catalog import Catalog
    from qemu_instances.errors import CatalogError

    path = tmp_path / "user.toml"
    path.write_text('[firmware.debian-12]\nurl = "https://e.invalid/OVMF.fd"\ndigest = "sha256:' + "a" * 64 + '"\n')
    with pytest.raises(CatalogError, match=r"\[firmware.debian-12\]: an image of the catalog has that name"):
        Catalog.load([path])


@pytest.mark.http
def test_pull_by_firmware_name(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    """`qinst pull NAME` of a catalog firmware goes through its aleph message and its validation hash."""
    firmware = secrets.token_bytes(8192)
    item, _ = mirror.aleph.store(firmware)
    catalog = _firmware_catalog(tmp_path, item, hashlib.sha256(firmware).hexdigest())
    proc = qinst(*mirror.args(tmp_path / "cache"), "--catalog", str(catalog), "pull", "test-ovmf", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert Path(data["path"]).read_bytes() == firmware and data["name"] == "test-ovmf"


# -- a launch failing at each step, and what it leaves -----------------------------------------------------------------
# The whole of Launcher.up on the test driver: a real qcow2 image (qemu-img) imported into the cache, qinst's pool, the
# overlay on its base volume, the seed volume, define and start; the guest's side is scripted (wait_ready). The test
# driver streams no volume data, so the base and seed uploads create their volumes without bytes. Each step fails in
# turn, and what is left is listed: the pool's volumes of the instance, its domain, its console and libvirt logs.

STEPS = ["pull", "overlay", "seed", "define", "start", "readiness", "interrupt"]


class _Failure(Exception):
    """What a scripted step raises (a download that fails, libvirt refusing: the same for what is left)."""


@dataclasses.dataclass
class _Launch:
    settings: Settings
    image: Path
    logs: Path  # where a session daemon's virtlogd writes (under HOME)
    fail: str = ""
    defined: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture
def scripted_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Launch]:
    held = Host(TEST_URI)  # the test driver's state lives while a connection to it is open
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    settings = Settings(connect=TEST_URI, cache_dir=tmp_path / "cache", config_dir=tmp_path / "config")
    state = _Launch(settings, image, tmp_path / "home/.cache/libvirt/qemu/log")
    state.logs.mkdir(parents=True)
    real_pull, real_overlay, real_define = launch.ImageStore.pull, Host.overlay_volume, Host.define_and_start

    def pull(self: object, *args: object, **kwargs: object) -> CachedImage:
        if state.fail == "pull":
            raise _Failure("download failed")
        return real_pull(self, *args, **kwargs)  # type: ignore[arg-type]

    def created(host: Host, pool: object, name: str) -> object:
        xml = f"<volume><name>{name}</name><capacity unit='bytes'>1024</capacity></volume>"
        return pool.createXML(xml, 0)  # type: ignore[attr-defined]

    def base_volume(self: Host, pool: object, name: str, *args: object, **kwargs: object) -> object:
        return self.volume(pool, name) or created(self, pool, name)  # type: ignore[arg-type]

    def overlay(self: Host, *args: object) -> object:
        if state.fail == "overlay":
            raise HypervisorError("cannot create the disk volume: No space left on device")
        return real_overlay(self, *args)  # type: ignore[arg-type]

    def upload(self: Host, pool: object, name: str, *args: object, **kwargs: object) -> object:
        if state.fail == "seed":  # upload_volume leaves nothing of its own (test_host.py): the rest is up's
            raise HypervisorError(f"cannot upload volume {name}: No space left on device")
        return created(self, pool, name)

    def define_and_start(self: Host, xml: str, name: str, *, paused: bool = False) -> Domain:
        (state.logs / f"{name}-console.log").write_text("SeaBIOS\n")  # virtlogd's and libvirt's logs, made at define
        (state.logs / f"{name}.log").write_text("qemu-system-x86_64 ...\n")
        state.defined.append(name)
        if state.fail == "define":
            xml = "<domain type='test'><name>" + name + "</name></domain>"  # no memory: libvirt refuses it
        if state.fail == "start":
            xml = xml.replace("<type>hvm</type>", "<type>no-kvm-here</type>")  # the test driver does not start it
        return real_define(self, xml, name, paused=paused)

    def wait_ready(probe: object, *, timeout: float, readiness: object) -> list[tuple[str, str]]:
        if state.fail == "readiness":
            raise GuestPaused("the guest paused by itself (unknown)")  # under the last accelerator: a failure
        if state.fail == "interrupt":
            raise KeyboardInterrupt  # Ctrl-C while the guest boots
        if state.fail == "timeout":
            raise launch.GuestTimeout("the guest was not ready within 5 s")
        return [("ssh-ed25519", "A" * 68)]

    monkeypatch.setattr(launch.ImageStore, "pull", pull)
    monkeypatch.setattr(Host, "base_volume", base_volume)
    monkeypatch.setattr(Host, "overlay_volume", overlay)
    monkeypatch.setattr(Host, "upload_volume", upload)
    monkeypatch.setattr(Host, "define_and_start", define_and_start)
    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    monkeypatch.setattr(launch, "wait_ready", wait_ready)
    with held:
        yield state


def _left(state: _Launch, name: str) -> list[str]:
    """What instance `name` has on the host: pool volumes, a domain, logs (the base volume is the cache's)."""
    with Host(TEST_URI) as host:
        found = [] if host.lookup(name) is None else [f"domain {name}"]
        if "qinst" in host.pool_names():
            pool = host.pool(create=False)
            found += [
                f"volume {v}" for v in host.volume_names(pool) if v.startswith(f"{name}.") or v.startswith(f"{name}-")
            ]
    found += [f"log {p.name}" for p in sorted(state.logs.iterdir()) if p.name.startswith(name)]
    nvram = Path(f"/var/lib/libvirt/qemu/nvram/{name}_VARS.fd")  # where a UEFI guest's variables would be
    return found + ([f"nvram {nvram}"] if nvram.exists() else [])


def _everything(name: str) -> list[str]:
    """What a launched instance has, as _left lists it."""
    volumes = [f"volume {name}-seed.iso", f"volume {name}.qcow2"]
    return [f"domain {name}", *volumes, f"log {name}-console.log", f"log {name}.log"]


def _remove(name: str) -> None:
    with Host(TEST_URI) as host:
        if (dom := host.lookup(name)) is not None:
            dom.undefine()
        if "qinst" in host.pool_names():
            pool = host.pool(create=False)
            for vol in (f"{name}.qcow2", f"{name}-seed.iso"):
                host.delete_volume(pool, vol)


@pytest.mark.promise
@pytest.mark.parametrize("firmware", [Firmware.BIOS, Firmware.UEFI])
@pytest.mark.parametrize("step", STEPS)
def test_a_launch_failing_at_each_step_leaves_nothing(scripted_launch: _Launch, step: str, firmware: Firmware) -> None:
    name = f"fail-{step}-{firmware}"
    scripted_launch.fail = step
    req = UpRequest(image=str(scripted_launch.image), name=name, accel=Accel.TCG, firmware=firmware)
    try:
        with pytest.raises((_Failure, QinstError, KeyboardInterrupt)):
            Launcher(scripted_launch.settings).up(req)
        assert _left(scripted_launch, name) == []
        assert bool(scripted_launch.defined) is (step in ("define", "start", "readiness", "interrupt"))
    finally:
        _remove(name)


@pytest.mark.promise
@pytest.mark.parametrize("firmware", [Firmware.BIOS, Firmware.UEFI])
def test_a_launch_that_succeeds_leaves_exactly_its_domain_volumes_and_logs(
    scripted_launch: _Launch, firmware: Firmware
) -> None:
    name = f"made-{firmware}"
    try:
        result = Launcher(scripted_launch.settings).up(
            UpRequest(image=str(scripted_launch.image), name=name, accel=Accel.TCG, firmware=firmware)
        )
        assert result.ready and result.instance.metadata.volumes == (f"{name}.qcow2", f"{name}-seed.iso")
        assert _left(scripted_launch, name) == _everything(name)
    finally:
        _remove(name)


@pytest.mark.promise
def test_a_guest_that_times_out_is_kept_for_inspection(scripted_launch: _Launch) -> None:
    scripted_launch.fail = "timeout"
    name = "kept-timeout"
    try:
        with pytest.raises(launch.GuestTimeout) as err:
            Launcher(scripted_launch.settings).up(
                UpRequest(image=str(scripted_launch.image), name=name, accel=Accel.TCG)
            )
        assert err.value.exit_code == 5 and f"qinst logs {name}" in (err.value.hint or "")
        assert _left(scripted_launch, name) == _everything(name)
    finally:
        _remove(name)


@pytest.mark.promise
@pytest.mark.parametrize("volume", ["orphan.qcow2", "orphan-seed.iso"])
def test_up_never_takes_the_name_of_an_orphans_volumes(scripted_launch: _Launch, volume: str) -> None:
    """An `up` killed before define leaves volumes without a domain: their name is not free, and a refused `up`
    under it removes nothing of them (its undo would be another instance's volumes)."""
    with Host(TEST_URI) as host:
        pool = host.pool()
        pool.createXML(f"<volume><name>{volume}</name><capacity unit='bytes'>1024</capacity></volume>", 0)
    try:
        with pytest.raises(UsageError, match="already exists"):
            Launcher(scripted_launch.settings).up(
                UpRequest(image=str(scripted_launch.image), name="orphan", accel=Accel.TCG)
            )
        assert _left(scripted_launch, "orphan") == [f"volume {volume}"] and not scripted_launch.defined
    finally:
        _remove("orphan")


@pytest.mark.promise
def test_an_emulated_guest_waits_longer_by_default_and_an_asked_timeout_is_kept() -> None:
    assert launch.wait_seconds(None, native=True) == launch.WAIT
    assert launch.wait_seconds(None, native=False) == launch.WAIT * launch.EMULATED > launch.WAIT
    assert launch.wait_seconds(None, native=False, default=100.0) == 100.0 * launch.EMULATED
    for native in (True, False):
        assert launch.wait_seconds(42.0, native=native) == 42.0  # --timeout is what the user asked, either way


@pytest.mark.promise
@pytest.mark.libvirt
def test_a_guest_of_another_architecture_runs_under_tcg_at_once_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the real libvirtd: KVM runs only guests of the host's own architecture. Another one goes to TCG with one
    line that says why (never a KVM attempt, never "KVM is not usable"); --accel kvm for it is a usage error."""
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")
    from qemu_instances.arch import Arch

    with Host("qemu:///system") as host:
        native = Arch(host.host_arch())
        foreign = Arch.AARCH64 if native is Arch.X86_64 else Arch.X86_64
        with caplog.at_level("INFO", logger=launch.log.name):
            assert launch._accelerators(host, Accel.AUTO, tmp_path, foreign) == (Accel.TCG,)
        said = [r.getMessage() for r in caplog.records if r.name == launch.log.name]
        assert said == [f"an {foreign} guest on this {native} host runs under TCG (software emulation, several times "
                        "slower)"]  # fmt: skip
        assert launch._accelerators(host, Accel.TCG, tmp_path, foreign) == (Accel.TCG,)
        with pytest.raises(UsageError, match=f"KVM cannot run an {foreign} guest on this {native} host"):
            launch._accelerators(host, Accel.KVM, tmp_path, foreign)
        assert launch._accelerators(host, Accel.KVM, tmp_path, native) == (Accel.KVM,)  # its own: as asked


def test_kvm_for_another_architecture_is_refused_before_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up --arch <not this machine's> --accel kvm` on a local daemon: the usage error comes from the inputs, before
    anything is downloaded or libvirt is asked; a remote daemon's architecture is only known once connected."""
    from qemu_instances.arch import Arch

    foreign = Arch.AARCH64 if Arch.host() is Arch.X86_64 else Arch.X86_64
    monkeypatch.setattr(launch.ImageStore, "pull", lambda *a, **k: pytest.fail("pulled before refusing"))
    monkeypatch.setattr(launch, "Host", lambda *a, **k: pytest.fail("connected before refusing"))
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb")
    settings = Settings(connect="qemu:///system", cache_dir=tmp_path / "cache", config_dir=tmp_path / "config")
    req = UpRequest(image=str(image), arch=foreign, accel=Accel.KVM)
    with pytest.raises(UsageError, match=f"KVM cannot run an {foreign} guest on this {Arch.host()} host"):
        Launcher(settings).up(req)
    launch._refuse_kvm_for_another_arch("qemu:///system", Arch.host())  # its own architecture: fine
    launch._refuse_kvm_for_another_arch("qemu+ssh://build@arm1/system", foreign)  # remote: decided once connected
