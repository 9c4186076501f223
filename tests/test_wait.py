"""Readiness from the console and the domain: each outcome with a scripted console, fast and without a guest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted
from qemu_instances.wait import (
    GuestPaused,
    Probe,
    Readiness,
    wait_for_ssh,
    wait_ready,
)

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


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)


def test_ready_after_cloud_init_and_a_matching_host_key() -> None:
    readiness = Readiness()
    keys = wait_ready(_probe(["", BOOT, KEYS_BLOCK, DONE]), timeout=5, readiness=readiness)
    assert ED25519 in keys and len(keys) == 2
    assert list(readiness.phases) == ["running", "kernel", "cloud-init", "ssh"]
    assert set(readiness.durations()) == {"boot", "cloud-init", "ssh"}


# A server offering a different host key is refused: tests/test_hostkeys.py, against a real sshd.


def test_kernel_panic_fails_at_once_with_the_console() -> None:
    panic = BOOT + "[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"
    with pytest.raises(GuestFailed, match="Unable to mount root fs") as err:
        wait_ready(_probe([panic]), timeout=60, readiness=Readiness())
    assert "Linux version" in err.value.message


def test_paused_and_stopped_domains_fail_at_once() -> None:
    with pytest.raises(GuestPaused):
        wait_ready(_probe([BOOT], state="paused"), timeout=60, readiness=Readiness())
    with pytest.raises(GuestFailed, match="stopped during boot"):
        wait_ready(_probe([BOOT], state="shutoff"), timeout=60, readiness=Readiness())


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


def test_no_seed_and_no_host_keys_are_failures() -> None:
    none = DONE.replace("DataSourceNoCloud [seed=/dev/vdb][dsmode=net]", "DataSourceNone")
    with pytest.raises(GuestFailed, match="no NoCloud seed"):
        wait_ready(_probe([BOOT + none]), timeout=5, readiness=Readiness())
    with pytest.raises(GuestFailed, match="no SSH host keys"):
        wait_ready(_probe([BOOT + DONE]), timeout=5, readiness=Readiness())


def test_timeout_says_what_was_reached() -> None:
    with pytest.raises(GuestTimeout, match=r"reached: running, kernel"):
        wait_ready(_probe([BOOT]), timeout=0.2, readiness=Readiness())


def test_ssh_not_answering_yet_keeps_waiting_then_times_out() -> None:
    with pytest.raises(GuestTimeout, match="cloud-init"):
        wait_ready(_probe([BOOT + KEYS_BLOCK + DONE], scan=None), timeout=0.3, readiness=Readiness())


def test_cancel_stops_the_wait() -> None:
    with pytest.raises(Interrupted):
        wait_ready(_probe([BOOT], cancelled=True), timeout=60, readiness=Readiness())


def test_wait_for_ssh_outlasts_a_pause_and_a_server_not_answering_yet() -> None:
    """A restarted guest may be paused a moment, and its sshd silent at first: neither is a failure; a stop is."""
    states = iter([("paused", "user"), ("running", "booted"), ("running", "booted")])
    verdicts = iter([None, True])
    key = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample")
    wait_for_ssh("127.0.0.1", 2222, {key}, lambda: next(states), 30, check=lambda *_: next(verdicts))
    with pytest.raises(GuestFailed, match=r"the guest stopped \(shutoff: crashed\)"):
        wait_for_ssh("127.0.0.1", 2222, {key}, lambda: ("shutoff", "crashed"), 30, check=lambda *_: True)
