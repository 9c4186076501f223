"""Where a boot's time goes: the guest's phases read from its serial console, and cloud-init's slowest modules read
from its log.

The console gives the phases without logging in: the kernel's printk timestamps (seconds since the kernel started)
and cloud-init's own lines ("Cloud-init v. X running 'init-local' at ... Up 12.10 seconds.", one per stage, and
"... finished at ... Up 45.67 seconds"), whose "Up" is the guest's uptime. The firmware and boot loader come before
the kernel's clock starts: they are measured on the host, from the domain's start to the kernel's first line.
cloud-init's log (`/var/log/cloud-init.log`) times every module: "start: modules-config/config-locale" and
"finish: ..." events, as `cloud-init analyze` reads them.

Everything read here comes from the guest: untrusted text, parsed defensively (a phase that cannot be read is left
out, never a crash, never a negative duration).
"""

from __future__ import annotations

import datetime as dt
import re

# The stages cloud-init announces on the console, in boot order, and the name each phase gets.
STAGES = (
    ("init-local", "cloud-init-local"),
    ("init", "cloud-init-network"),
    ("modules:config", "cloud-init-config"),
    ("modules:final", "cloud-init-final"),
)
_STAGE = re.compile(
    r"Cloud-init v\. \S+ running '(?P<stage>[a-z:-]+)' at [^\r\n]*?Up (?P<up>\d{1,7}(?:\.\d+)?) seconds"
)
_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at [^\r\n]*?Up (?P<up>\d{1,7}(?:\.\d+)?) seconds")
_PRINTK = re.compile(r"\[\s*(?P<ts>\d{1,7}\.\d{1,9})\] (?P<text>[^\r\n]*)")
_INITRAMFS = re.compile(r"^Run /init as init process")
_SYSTEMD = re.compile(r"^systemd\[1\]: ")
# cloud-init.log: "2026-12-03 17:00:30,123 - handlers.py[DEBUG]: start: modules-config/config-locale: running ..."
_EVENT = re.compile(
    r"^(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - handlers\.py\[DEBUG\]: (?P<kind>start|finish): "
    r"(?P<name>(?:init-local|init-network|modules-config|modules-final)/config-[A-Za-z0-9_-]{1,64}): "
)
MODULE_LOG_COMMAND = (
    "sudo -n grep -E '^[0-9-]+ [0-9:,]+ - handlers.py.DEBUG.: (start|finish): (init-|modules-)' /var/log/cloud-init.log"
)


def console_phases(console: str, firmware: float | None = None) -> dict[str, float]:
    """The boot's phases in seconds, from its console text: firmware (the host's measure, when given), kernel (to
    the initramfs, or to systemd without one), initramfs (to systemd), systemd (to cloud-init's first stage), each
    cloud-init stage, and the guest's uptime when cloud-init finished (`guest-ready`)."""
    phases: dict[str, float] = {}
    if firmware is not None and firmware >= 0:
        phases["firmware"] = round(firmware, 2)
    initramfs = systemd = None
    for m in _PRINTK.finditer(console):
        text = m["text"].strip()
        if initramfs is None and systemd is None and _INITRAMFS.match(text):
            initramfs = float(m["ts"])
        elif systemd is None and _SYSTEMD.match(text):
            systemd = float(m["ts"])
            break
    marks: list[tuple[str, float]] = []
    seen: set[str] = set()
    for m in _STAGE.finditer(console):
        if m["stage"] not in seen:
            seen.add(m["stage"])
            marks.append((m["stage"], float(m["up"])))
    finished = _FINISHED.search(console)
    first_stage = next((up for stage, up in marks if stage == STAGES[0][0]), marks[0][1] if marks else None)
    userspace = initramfs if initramfs is not None else systemd
    if userspace is not None:
        phases["kernel"] = round(userspace, 2)
    if initramfs is not None and systemd is not None and systemd >= initramfs:
        phases["initramfs"] = round(systemd - initramfs, 2)
    if systemd is not None and first_stage is not None and first_stage >= systemd:
        phases["systemd"] = round(first_stage - systemd, 2)
    ups = dict(marks)
    order = [stage for stage, _ in STAGES if stage in ups]
    ends = [*(ups[s] for s in order[1:]), float(finished["up"]) if finished else None][: len(order)]
    for stage, end in zip(order, ends, strict=True):
        if end is not None and end >= ups[stage]:
            phases[dict(STAGES)[stage]] = round(end - ups[stage], 2)
    if finished:
        phases["guest-ready"] = round(float(finished["up"]), 2)
    return phases


def module_times(log: str, top: int = 5) -> list[tuple[str, float]]:
    """cloud-init's slowest modules (stage/module, seconds), slowest first, from its log's start/finish events."""
    started: dict[str, dt.datetime] = {}
    spent: dict[str, float] = {}
    for line in log.splitlines():
        m = _EVENT.match(line)
        if not m:
            continue
        try:
            when = dt.datetime.strptime(m["when"], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        if m["kind"] == "start":
            started[m["name"]] = when
        elif m["name"] in started:
            seconds = (when - started.pop(m["name"])).total_seconds()
            if 0 <= seconds < 1e6:
                spent[m["name"]] = round(spent.get(m["name"], 0.0) + seconds, 2)
    return sorted(spent.items(), key=lambda item: (-item[1], item[0]))[:top]
