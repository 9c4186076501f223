"""wait.py: readiness from the console and the domain: each outcome with a scripted console, fast and without a
guest; the host keys read from the console; and the SSH check against a real sshd on 127.0.0.1 that offers a key
other than the one printed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PRINTED_KEY

from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted
from qemu_instances.wait import (
    CloudInitErrors,
    ConsoleLog,
    GuestPaused,
    Probe,
    Readiness,
    host_keys,
    wait_for_ssh,
    wait_ready,
)
from testsupport.hostkeys import KEY_A, KEY_B, KEY_C, HostKeySshd, Key

KEYS_BLOCK = (
    "-----BEGIN SSH HOST KEY KEYS-----\r\n"
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBExample= root@vm\r\n"
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample root@vm\r\n"
    "-----END SSH HOST KEY KEYS-----\r\n"
)
ED25519 = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample")
BOOT = "[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)\r\n"
DONE = (
    "[   42.8] cloud-init[514]: Cloud-init v. 22.4.2 finished at Sat, 28 Nov 2026 13:25:36 +0000. "
    "Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 42.74 seconds\r\n"
)


class ScriptedConsole:
    """A console that reveals one more chunk of text at each read."""

    def __init__(self, chunks: list[str]) -> None:
        self._chunks: Iterator[str] = iter(chunks)
        self.text = ""

    def read(self) -> str:
        self.text += next(self._chunks, "")
        return self.text

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.text.splitlines()[-n:])

    def close(self) -> None:
        pass


def _probe(chunks: list[str], *, state: str = "running", scan: object = True, cancelled: bool = False) -> Probe:
    return Probe(
        state=lambda: (state, "booted"),
        console=ScriptedConsole(chunks),
        ssh_host=lambda: "127.0.0.1",
        ssh_port=2222,
        cancelled=lambda: cancelled,
        scan=lambda host, port, keys: scan,  # type: ignore[arg-type,return-value]
    )


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)


@pytest.mark.usefixtures("fast_poll")
def test_ready_after_cloud_init_and_a_matching_host_key() -> None:
    readiness = Readiness()
    keys = wait_ready(_probe(["", BOOT, KEYS_BLOCK, DONE]), timeout=5, readiness=readiness)
    assert ED25519 in keys and len(keys) == 2
    assert list(readiness.phases) == ["running", "kernel", "cloud-init", "ssh"]
    assert set(readiness.durations()) == {"boot", "cloud-init", "ssh"}


# A server offering a different host key is refused: the host-key tests below, against a real sshd.


@pytest.mark.usefixtures("fast_poll")
def test_kernel_panic_fails_at_once_with_the_console() -> None:
    panic = BOOT + "[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"
    with pytest.raises(GuestFailed, match="Unable to mount root fs") as err:
        wait_ready(_probe([panic]), timeout=60, readiness=Readiness())
    assert "Linux version" in err.value.message


@pytest.mark.usefixtures("fast_poll")
def test_paused_and_stopped_domains_fail_at_once() -> None:
    with pytest.raises(GuestPaused):
        wait_ready(_probe([BOOT], state="paused"), timeout=60, readiness=Readiness())
    with pytest.raises(GuestFailed, match="stopped during boot"):
        wait_ready(_probe([BOOT], state="shutoff"), timeout=60, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_cloud_init_module_failures_fail_the_launch() -> None:
    failed = (
        "[   40.1] cloud-init[520]: 2026-11-28 13:19:03,123 - util.py[WARNING]: Failed running "
        "/var/lib/cloud/instance/scripts/runcmd [1]\r\n"
        "[   40.2] cloud-init[520]: 2026-11-28 13:19:03,124 - cc_scripts_user.py[WARNING]: Failed to run module "
        "scripts-user (scripts in /var/lib/cloud/instance/scripts)\r\n"
    )
    with pytest.raises(GuestFailed, match=r"cloud-init finished with errors in module\(s\) scripts-user") as err:
        wait_ready(_probe([BOOT + KEYS_BLOCK + failed + DONE]), timeout=5, readiness=Readiness())
    assert "Failed running /var/lib/cloud/instance/scripts/runcmd" in err.value.message


@pytest.mark.promise
@pytest.mark.usefixtures("fast_poll")
def test_ready_only_at_the_finished_line_so_a_module_failing_after_the_host_keys_is_seen() -> None:
    """cloud-init prints the host keys (keys_to_console, a final-stage module) before its last modules run: the guest
    answers SSH with the printed key by then, yet a module that fails afterwards (scripts-user) must fail the boot."""
    failed = (
        "[   44.0] cloud-init[520]: 2026-11-28 13:19:03,124 - cc_scripts_user.py[WARNING]: Failed to run module "
        "scripts-user (scripts in /var/lib/cloud/instance/scripts)\r\n"
    )
    readiness = Readiness()
    probe = _probe([BOOT, KEYS_BLOCK, "[   43.0] cloud-init[520]: running scripts-user\r\n", failed + DONE])
    with pytest.raises(CloudInitErrors, match=r"in module\(s\) scripts-user") as err:
        wait_ready(probe, timeout=30, readiness=readiness)
    assert ED25519 in err.value.keys
    assert list(readiness.phases) == ["running", "kernel", "cloud-init", "ssh"]
    # Nothing between the keys and "finished": ready, with the keys.
    assert ED25519 in wait_ready(_probe([BOOT, KEYS_BLOCK, "x\r\n", DONE]), timeout=30, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_no_seed_and_no_host_keys_are_failures() -> None:
    none = DONE.replace("DataSourceNoCloud [seed=/dev/vdb][dsmode=net]", "DataSourceNone")
    with pytest.raises(GuestFailed, match="no NoCloud seed"):
        wait_ready(_probe([BOOT + none]), timeout=5, readiness=Readiness())
    with pytest.raises(GuestFailed, match="no SSH host keys"):
        wait_ready(_probe([BOOT + DONE]), timeout=5, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_timeout_says_what_was_reached() -> None:
    with pytest.raises(GuestTimeout, match=r"reached: running, kernel"):
        wait_ready(_probe([BOOT]), timeout=0.2, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_ssh_not_answering_yet_keeps_waiting_then_times_out() -> None:
    with pytest.raises(GuestTimeout, match="cloud-init"):
        wait_ready(_probe([BOOT + KEYS_BLOCK + DONE], scan=None), timeout=0.3, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_cancel_stops_the_wait() -> None:
    with pytest.raises(Interrupted):
        wait_ready(_probe([BOOT], cancelled=True), timeout=60, readiness=Readiness())


@pytest.mark.usefixtures("fast_poll")
def test_wait_for_ssh_outlasts_a_pause_and_a_server_not_answering_yet() -> None:
    """A restarted guest may be paused a moment, and its sshd silent at first: neither is a failure; a stop is."""
    states = iter([("paused", "user"), ("running", "booted"), ("running", "booted")])
    verdicts = iter([None, True])
    key = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample")
    wait_for_ssh("127.0.0.1", 2222, {key}, lambda: next(states), 30, check=lambda *_: next(verdicts))
    with pytest.raises(GuestFailed, match=r"the guest stopped \(shutoff: crashed\)"):
        wait_for_ssh("127.0.0.1", 2222, {key}, lambda: ("shutoff", "crashed"), 30, check=lambda *_: True)


# -- cloud-init errors -------------------------------------------------------------------------------------------------


KEY = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
CONSOLE = (
    "[    0.0] Linux version 6.1.0\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n"
    f"{KEY[0]} {KEY[1]} root@vm\r\n-----END SSH HOST KEY KEYS-----\r\n"
    "[   40.1] cloud-init[520]: 2026-11-28 13:19:03,123 - util.py[WARNING]: Failed running "
    "/var/lib/cloud/instance/scripts/runcmd [3]\r\n"
    "[   40.2] cloud-init[520]: 2026-11-28 13:19:03,124 - util.py[WARNING]: Running module scripts-user "
    "(<module 'cloudinit.config.cc_scripts_user'>) failed\r\n"
    "[   42.8] cloud-init[514]: Cloud-init v. 22.4.2 finished at Sat, 28 Nov 2026 13:25:36 +0000. "
    "Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 42.74 seconds\r\n"
)


class _ErrorsConsole:
    text = CONSOLE

    def read(self) -> str:
        return self.text

    def tail(self, n: int = 20) -> str:
        return self.text

    def close(self) -> None:
        pass


def _errors_probe(verdict: bool | None) -> Probe:
    return Probe(
        state=lambda: ("running", "booted"),
        console=_ErrorsConsole(),
        ssh_host=lambda: "127.0.0.1",
        ssh_port=2222,
        scan=lambda host, port, keys: verdict,
    )


def test_errors_with_ssh_verified_carry_the_keys_and_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)
    with pytest.raises(CloudInitErrors) as caught:
        wait_ready(_errors_probe(True), timeout=5, readiness=Readiness())
    assert caught.value.exit_code == 5
    assert caught.value.keys == [KEY] and caught.value.modules == ["scripts-user"]
    assert "Failed running /var/lib/cloud/instance/scripts/runcmd [3]" in caught.value.message


def test_errors_without_ssh_fail_at_the_timeout_as_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)
    with pytest.raises(GuestFailed, match="SSH did not answer") as caught:
        wait_ready(_errors_probe(None), timeout=0.3, readiness=Readiness())
    assert not isinstance(caught.value, CloudInitErrors) and "scripts-user" in caught.value.message


# -- a console and a banner that are not UTF-8 -------------------------------------------------------------------------


UNDECODABLE_CONSOLE = (
    b"Linux version 6.1 \xff\xfe\n"
    b"-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 "
    + PRINTED_KEY.encode()
    + b" root@g\n-----END SSH HOST KEY KEYS-----\n"
    b"Cloud-init v. 24.1 finished at Sat, 28 Nov 2026 \xc3\xa9\xff. Datasource DataSourceNoCloud [seed=/dev/sr0]\n"
)


def test_readiness_with_undecodable_console_and_banner_times_out_cleanly(bad_sshd: int, tmp_path: Path) -> None:
    """What `up` does: the console says ready, the SSH server's banner is not UTF-8 -> GuestTimeout (exit 5)."""
    log = tmp_path / "console.log"
    log.write_bytes(UNDECODABLE_CONSOLE)
    probe = Probe(
        state=lambda: ("running", "booted"),
        console=ConsoleLog(log),
        ssh_host=lambda: "127.0.0.1",
        ssh_port=bad_sshd,
    )
    readiness = Readiness()
    with pytest.raises(GuestTimeout) as caught:
        wait_ready(probe, timeout=1.5, readiness=readiness)
    assert caught.value.exit_code == 5
    assert {"kernel", "cloud-init"} <= set(readiness.phases)
    assert "\ufffd" in probe.console.text


# -- host keys: read from the console, checked against a real sshd -----------------------------------------------------


def _keys_block(*keys: Key) -> str:
    lines = "".join(f"{kind} {body} root@vm\r\n" for kind, body in keys)
    return f"-----BEGIN SSH HOST KEY KEYS-----\r\n{lines}-----END SSH HOST KEY KEYS-----\r\n"


def _sshd_probe(console: str, port: int) -> Probe:
    class Console:
        text = console

        def read(self) -> str:
            return self.text

        def tail(self, n: int = 20) -> str:
            return self.text

        def close(self) -> None:
            pass

    return Probe(state=lambda: ("running", "booted"), console=Console(), ssh_host=lambda: "127.0.0.1", ssh_port=port)


def test_up_readiness_refuses_a_server_with_a_key_the_console_did_not_print(hostkey_sshd: HostKeySshd) -> None:
    console = BOOT + _keys_block(hostkey_sshd.other) + DONE
    with pytest.raises(GuestFailed, match=f"127.0.0.1:{hostkey_sshd.port} offers host keys the guest did not print"):
        wait_ready(_sshd_probe(console, hostkey_sshd.port), timeout=20, readiness=Readiness())


def test_up_readiness_accepts_the_server_with_the_printed_key(hostkey_sshd: HostKeySshd) -> None:
    readiness = Readiness()
    keys = wait_ready(
        _sshd_probe(BOOT + _keys_block(hostkey_sshd.key) + DONE, hostkey_sshd.port), timeout=20, readiness=readiness
    )
    assert keys == [hostkey_sshd.key] and "ssh" in readiness.phases


def test_wait_for_ssh_refuses_a_different_key(hostkey_sshd: HostKeySshd) -> None:
    with pytest.raises(GuestFailed, match="offers host keys that were not recorded"):
        wait_for_ssh("127.0.0.1", hostkey_sshd.port, {hostkey_sshd.other}, lambda: ("running", "booted"), timeout=20)
    wait_for_ssh("127.0.0.1", hostkey_sshd.port, {hostkey_sshd.key}, lambda: ("running", "booted"), timeout=20)


def test_keys_are_read_only_between_the_markers() -> None:
    before = f"[   30.0] sshd: user-data printed {KEY_C[0]} {KEY_C[1]} here\r\n"
    after = f"[   50.0] {KEY_B[0]} {KEY_B[1]} root@vm\r\n"
    assert host_keys(BOOT + before + _keys_block(KEY_A) + after + DONE) == [KEY_A]


def test_the_marker_regex_is_not_greedy() -> None:
    """Two marker blocks with a key line between them: the text between the blocks is not a host key."""
    between = f"[   45.0] some-service: {KEY_C[0]} {KEY_C[1]}\r\n"
    keys = host_keys(_keys_block(KEY_A) + between + _keys_block(KEY_B))
    assert KEY_C not in keys
    assert keys == [KEY_A]


def test_no_markers_no_keys() -> None:
    assert host_keys(f"{KEY_A[0]} {KEY_A[1]} root@vm\r\n" + DONE) == []
    assert host_keys("-----BEGIN SSH HOST KEY KEYS-----\r\n" + f"{KEY_A[0]} {KEY_A[1]}\r\n") == []  # never closed
