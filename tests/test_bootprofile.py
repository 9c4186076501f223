"""bootprofile.py: a boot's phases from a real console (the test image's, recorded by virtlogd under TCG) and
cloud-init's slowest modules from its real log; hostile or partial text gives fewer phases, never a crash."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_instances.bootprofile import console_phases, module_times

DATA = Path(__file__).with_name("data") / "consoles"
CONSOLE = (DATA / "qinst-test-x86_64.log").read_text(errors="replace")
EVENTS = (DATA / "qinst-test-cloud-init-events.log").read_text()


def test_every_phase_of_a_real_boot_is_read_from_its_console() -> None:
    phases = console_phases(CONSOLE, firmware=6.67)
    assert list(phases) == [
        "firmware", "kernel", "initramfs", "systemd", "cloud-init-local", "cloud-init-network",
        "cloud-init-config", "cloud-init-final", "guest-ready",
    ]  # fmt: skip
    assert phases["firmware"] == 6.67
    assert phases["kernel"] == 7.33  # "[    7.33...] Run /init as init process"
    # The guest's phases add up to its uptime when cloud-init finished (each measured by the guest's own clock).
    parts = sum(v for k, v in phases.items() if k not in ("firmware", "guest-ready"))
    assert abs(parts - phases["guest-ready"]) < 0.05


def test_the_stages_follow_cloud_inits_own_up_times() -> None:
    lines = [
        "[   10.0] cloud-init[300]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 03 Dec 2026. Up 10.00 seconds.",
        "[   16.5] cloud-init[310]: Cloud-init v. 22.4.2 running 'init' at Thu, 03 Dec 2026. Up 16.50 seconds.",
        "[   30.0] cloud-init[500]: Cloud-init v. 22.4.2 running 'modules:config' at Thu. Up 30.00 seconds.",
        "[   41.0] cloud-init[510]: Cloud-init v. 22.4.2 running 'modules:final' at Thu. Up 41.00 seconds.",
        "qinst-x login: [   44.25] cloud-init[510]: Cloud-init v. 22.4.2 finished at Thu. Source.  Up 44.25 seconds",
    ]
    phases = console_phases("\r\n".join(lines))
    assert phases == {
        "cloud-init-local": 6.5, "cloud-init-network": 13.5, "cloud-init-config": 11.0, "cloud-init-final": 3.25,
        "guest-ready": 44.25,
    }  # fmt: skip


def test_a_second_boot_in_the_same_console_log_does_not_move_the_first_boots_phases() -> None:
    """virtlogd appends: after a reboot the console holds every stage line twice. The phases are the first boot's."""
    first = [
        "[   10.0] cloud-init[300]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 03 Dec 2026. Up 10.00 seconds.",
        "[   16.5] cloud-init[310]: Cloud-init v. 22.4.2 running 'init' at Thu, 03 Dec 2026. Up 16.50 seconds.",
        "[   30.0] cloud-init[500]: Cloud-init v. 22.4.2 running 'modules:config' at Thu. Up 30.00 seconds.",
        "[   41.0] cloud-init[510]: Cloud-init v. 22.4.2 running 'modules:final' at Thu. Up 41.00 seconds.",
        "[   44.25] cloud-init[510]: Cloud-init v. 22.4.2 finished at Thu. Datasource.  Up 44.25 seconds",
    ]
    second = [line.replace("Up 1", "Up 9").replace("Up 3", "Up 7") for line in first[:4]]  # later, other up times
    phases = console_phases("\r\n".join(first + second))
    assert phases == {
        "cloud-init-local": 6.5, "cloud-init-network": 13.5, "cloud-init-config": 11.0, "cloud-init-final": 3.25,
        "guest-ready": 44.25,
    }  # fmt: skip


def test_a_boot_that_never_finished_gives_the_phases_it_reached() -> None:
    cut = CONSOLE[: CONSOLE.index("running 'modules:config'")]
    phases = console_phases(cut)
    assert "cloud-init-local" in phases and "cloud-init-network" not in phases and "guest-ready" not in phases


def test_the_slowest_modules_of_a_real_log() -> None:
    slowest = module_times(EVENTS, top=3)
    assert [name for name, _ in slowest] == [
        "init-network/config-growpart", "modules-final/config-keys-to-console", "modules-config/config-set-passwords",
    ]  # fmt: skip
    assert slowest[0][1] > slowest[1][1] >= slowest[2][1] > 0


def test_unmatched_and_backwards_events_are_ignored() -> None:
    log = "\n".join([
        "2026-12-03 18:00:10,000 - handlers.py[DEBUG]: finish: modules-config/config-a: SUCCESS: no start seen",
        "2026-12-03 18:00:20,000 - handlers.py[DEBUG]: start: modules-config/config-b: running",
        "2026-12-03 18:00:19,000 - handlers.py[DEBUG]: finish: modules-config/config-b: SUCCESS: clock went back",
        "2026-12-03 18:00:30,000 - handlers.py[DEBUG]: start: modules-final/config-c: running",
        "2026-12-03 18:00:32,500 - handlers.py[DEBUG]: finish: modules-final/config-c: SUCCESS: ran",
    ])  # fmt: skip
    assert module_times(log) == [("modules-final/config-c", 2.5)]


@settings(max_examples=150, database=None, deadline=2000)
@given(st.text(max_size=400), st.one_of(st.none(), st.floats(allow_nan=True)))
def test_any_console_text_gives_phases_never_an_error(text: str, firmware: float | None) -> None:
    phases = console_phases(CONSOLE[:2000] + text + "Up 1e309 seconds", firmware)
    assert all(value >= 0 for value in phases.values())
    module_times(text)
