"""Benchmark: boot to cloud-init's final console line in alternating pairs, phase by phase; `up --no-wait` in pairs.

One boot each proves nothing on a host that swings by 1.7x between runs (issue 26), so every comparison here is a
series of pairs run back to back in alternating order (A B, B A, A B, ...) and reported as the median of the
per-pair ratios (and differences) with their spread (min-max and the interquartile range), beside the load average
the host had meanwhile:

- **boot**: `qinst up` with its defaults against virt-install's defaults (`virt-install --import --cloud-init`, its
  own CPU model) on the same image, cloud-config, vCPUs, memory, disk and user-mode network with a 127.0.0.1 SSH
  forward; both consoles are cut into the same phases by qinst's own parser (qemu_instances/bootprofile.py);
- **no-wait**: `qinst up --no-wait` against the floor (libvirt's define + start of qinst's XML, in-process) and
  virt-install, to a running domain;
- **levers** (`--levers`): one setting changed at a time, each side booted the same way: the host-key types qinst
  asks for (`qinst up --host-key-types`), the TCG CPU model and the disk cache mode (qinst's own domain XML booted
  through libvirt's API with the one element changed).

    .venv/bin/python bench/boot.py [--pairs N] [--no-wait-pairs N] [--levers host-keys,cpu,cache]
        [--lever-pairs N] [--image NAME] [--arch x86_64|aarch64] [--image-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
import launch
import libvirt
from idle import merge_idle, undisturbed
from launch import Floor, Peer, QinstTool, VirtInstall, Watch, learn_kvm_verdict
from output import log, table, write_json
from session import Qinst, qinst_session, test_image, token
from timing import check, quiet, run_timed, summarize

from qemu_instances import seed as seeds
from qemu_instances.bootprofile import console_phases
from testsupport.net import free_port
from testsupport.virsh import URI

# Measure qinst as installed: Python writes its bytecode on the first run (warm-up), not on every run.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
LEVERS = ("host-keys", "cpu", "cache")
ALL_HOST_KEYS = ("rsa", "ecdsa", "ed25519")  # cloud-init's default ssh_genkeytypes
GOALS = {"boot_ratio": 0.6, "no_wait_minus_floor_s": 0.15}
# Every domain of this run is named bench-RUN-...: a run's cleanup removes its own, never another run's.
RUN = token()
CHECKPOINT: list[Path] = []  # FILE.jsonl beside --json: every pair as it is measured (a long run's partial results)
PHASES = (
    "firmware",
    "kernel",
    "initramfs",
    "systemd",
    "cloud-init-local",
    "cloud-init-network",
    "cloud-init-config",
    "cloud-init-final",
    "guest-ready",
)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """median, min, max and the interquartile range of values (and the values)."""
    if not values:
        return {}
    out = summarize(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        out.update(q1=q1, q3=q3)
    return out


class Load(threading.Thread):
    """The host's 1-minute load average, sampled every 5 s while the benchmark runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    @staticmethod
    def now() -> float:
        return float(Path("/proc/loadavg").read_text().split()[0])

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(self.now())
            self._stop_event.wait(5.0)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(10)
        return {"loadavg_1min": spread(self.samples), "cores": os.cpu_count()}


# ---- the tools booted in pairs (launch.Peer) ----


class QinstBoot(QinstTool):
    """`qinst up` (waiting for ready) with its defaults; its own boot profile from --json kept."""

    def __init__(self, q: Qinst, image: str, label: str, more: tuple[str, ...] = ()) -> None:
        super().__init__(q, accel=None, image=image, more=more)
        self.label = label

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        timeout = str(int(launch.BOOT_TIMEOUT))
        ran = check(self.q.run(*self.args(name, "--ssh-port", str(ssh_port), "--timeout", timeout)), "qinst up")
        data = launch._json(ran.stdout)
        return {"ready": ran.seconds, "own_profile": data.get("profile", {})}


class XmlBoot(Floor):
    """qinst's own domain XML (from its warm-up guest) defined and started through libvirt's API with one setting
    changed: the CPU model (None: qinst's), the overlay's cache mode (None: QEMU's default), the host-key types."""

    def __init__(
        self,
        label: str,
        template: str,
        work: Path,
        base: Path,
        q: Qinst,
        *,
        cpu: str | None = None,
        cache: str | None = None,
        host_key_types: tuple[str, ...] = seeds.DEFAULT_HOST_KEY_TYPES,
    ) -> None:
        super().__init__(template, work, base, q)
        self.label, self.cpu, self.cache, self.host_key_types = label, cpu, cache, host_key_types
        self.xml_text: dict[str, str] = {}

    def prepare_boot(self, name: str) -> None:
        d = self.work / name
        d.mkdir()
        d.chmod(0o755)
        overlay = d / "disk.qcow2"
        argv: list[str | os.PathLike[str]] = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2"]
        check(run_timed([*argv, "-b", self.base, overlay, "10G"]), "qemu-img create")
        spec = seeds.SeedSpec(
            hostname=name,
            instance_id=seeds.new_instance_id(),
            user="debian",
            ssh_keys=(self.q.key.read_text().strip(),),
            host_key_types=self.host_key_types,
        )
        (d / "seed.iso").write_bytes(seeds.build_seed_iso(spec))
        self.xml_text[name] = self.xml(name)

    def lever_xml(self, name: str, ssh_port: int) -> str:
        root = ET.fromstring(self.xml_text.pop(name))
        for arg in root.iter(f"{{{launch.QEMU_NS}}}arg"):
            value = re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-", f"hostfwd=tcp:127.0.0.1:{ssh_port}-", arg.get("value", ""))
            arg.set("value", value)
        if self.cpu:
            for cpu in root.findall("cpu"):
                root.remove(cpu)
            cpu = ET.SubElement(root, "cpu", mode="custom", match="exact", check="none")
            ET.SubElement(cpu, "model", fallback="forbid").text = self.cpu
        if self.cache:
            driver = root.find("./devices/disk/target[@dev='vda']/../driver")
            assert driver is not None
            driver.set("cache", self.cache)
        return ET.tostring(root, encoding="unicode")

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        conn = libvirt.open(URI)
        try:
            conn.defineXML(self.lever_xml(name, ssh_port)).create()
        finally:
            conn.close()
        return {}


# ---- one boot, and pairs of them ----


def domain_hardware(name: str) -> dict[str, str]:
    """The running domain's CPU model and machine, as libvirt expanded them (what the guest really got)."""
    xml = quiet(["virsh", "--connect", URI, "dumpxml", name]).stdout
    if not xml:
        return {}
    root = ET.fromstring(xml)
    cpu = root.find("cpu")
    model = root.find("cpu/model")
    typ = root.find("os/type")
    disk = root.find("./devices/disk/driver")
    return {
        "cpu": " ".join(
            filter(None, [cpu.get("mode", "") if cpu is not None else "", model.text if model is not None else ""])
        )
        or "default",
        "machine": typ.get("machine", "") if typ is not None else "",
        "disk_cache": disk.get("cache", "default") if disk is not None else "",
    }


def boot_once(peer: Peer, kind: str) -> dict[str, Any]:
    """Boot a fresh domain with peer, watched from outside; its times, its console phases, the load around it."""
    name, port = f"bench-{RUN}-{kind}-{token()}", free_port()
    peer.prepare_boot(name)
    # No SSH probes while it boots: under load a probe's 0.5 s banner timeout is never met, and each one makes the
    # guest fork an sshd. `qinst up` itself waits for SSH (its own `ready` figure); cloud-init's final line is the mark.
    watch = Watch(name, time.perf_counter())
    load_before = Load.now()
    watch.start()
    hardware: dict[str, str] = {}
    try:
        got = peer.boot(name, port)
        hardware = domain_hardware(name)
        deadline = time.monotonic() + launch.BOOT_TIMEOUT
        while not watch.done() and watch.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        watch.stop()
        peer.remove(name)
    if watch.error or not watch.done() or watch.cloud_init is None:
        raise RuntimeError(f"{peer.label}: the boot of {name} was not seen through: {watch.error or 'timeout'}")
    firmware = watch.kernel - watch.running if watch.kernel is not None and watch.running is not None else None
    got.update(
        running=watch.running,
        cloud_init=watch.cloud_init,
        ssh=watch.ssh,
        datasource=watch.datasource,
        phases=console_phases("".join(watch.console), firmware),
        hardware=hardware,
        load=[load_before, Load.now()],
    )
    return got


def checkpoint(record: dict[str, Any]) -> None:
    """One measurement appended to FILE.jsonl as it is made: a run stopped early keeps what it measured."""
    for path in CHECKPOINT:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def pairs(a: Peer, b: Peer, n: int, kind: str, idle: list[dict[str, Any]]) -> dict[str, Any]:
    """n pairs of boots of a and b, alternating which goes first; per-pair ratios a/b and differences a-b.

    A pair whose boot fails is recorded as lost and another is run in its place (at most 3 more)."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for i in range(n + 3):
        if len(rows) == n:
            break
        order = (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))
        log(f"{kind} pair {i + 1} ({len(rows)}/{n} done): {' then '.join(p.label for _, p in order)}")
        row: dict[str, Any] = {"first": order[0][0]}
        try:
            for key, peer in order:

                def one(peer: Peer = peer) -> dict[str, Any]:
                    return boot_once(peer, kind)

                row[key] = undisturbed(one, idle)
                log(f"  {peer.label}: cloud-init finished at {row[key]['cloud_init']:.1f} s")
        except RuntimeError as exc:  # one failed boot loses its pair, not the run
            log(f"  pair {i + 1} lost: {exc}")
            errors.append(str(exc))
            checkpoint({"kind": kind, "lost": str(exc)})
            continue
        row["ratio"] = row["a"]["cloud_init"] / row["b"]["cloud_init"]
        row["diff_s"] = row["a"]["cloud_init"] - row["b"]["cloud_init"]
        rows.append(row)
        checkpoint({"kind": kind, "a": a.label, "b": b.label, "row": row})
    return summarize_pairs(a.label, b.label, rows, errors)


def summarize_pairs(a: str, b: str, rows: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"a": a, "b": b, "pairs": rows, "errors": errors, "n": len(rows)}
    out["ratio"] = spread([r["ratio"] for r in rows])
    out["diff_s"] = spread([r["diff_s"] for r in rows])
    for side in ("a", "b"):
        boots = [r[side] for r in rows]
        out[side + "_summary"] = {
            key: spread([x[key] for x in boots if x.get(key) is not None]) for key in ("running", "cloud_init", "ssh")
        }
        out[side + "_phases"] = {p: spread([x["phases"][p] for x in boots if p in x["phases"]]) for p in PHASES}
        out[side + "_hardware"] = boots[0]["hardware"] if boots else {}
        out[side + "_datasources"] = sorted({x["datasource"] or "?" for x in boots})
    out["phase_diff_s"] = {
        p: spread(
            [r["a"]["phases"][p] - r["b"]["phases"][p] for r in rows if p in r["a"]["phases"] and p in r["b"]["phases"]]
        )
        for p in PHASES
    }
    loads = [v for r in rows for side in ("a", "b") for v in r[side]["load"]]
    out["load"] = spread(loads)
    return out


def no_wait_rounds(
    qinst: QinstTool, floor: Floor, vi: VirtInstall, n: int, idle: list[dict[str, Any]]
) -> dict[str, Any]:
    """n rounds of `up --no-wait`, the floor and virt-install to a running domain, the order rotating."""
    tools: list[tuple[str, Peer]] = [("qinst", qinst), ("floor", floor), ("virt-install", vi)]
    rows: list[dict[str, float]] = []
    for i in range(n):
        order = tools[i % 3 :] + tools[: i % 3]
        row: dict[str, float] = {"load": Load.now()}
        for key, peer in order:
            name = f"bench-{RUN}-nowait{key.replace('-', '')}-{token()}"

            def one(peer: Peer = peer, name: str = name) -> dict[str, float]:
                return peer.to_running(name)

            try:
                row[key] = undisturbed(one, idle)["running"]
            finally:
                peer.remove(name)
        log(f"no-wait round {i + 1}/{n}: " + ", ".join(f"{k} {row[k]:.3f} s" for k, _ in tools))
        rows.append(row)
        checkpoint({"kind": "no-wait", "row": row})
    return {
        "rounds": rows,
        "n": len(rows),
        "qinst": spread([r["qinst"] for r in rows]),
        "floor": spread([r["floor"] for r in rows]),
        "virt-install": spread([r["virt-install"] for r in rows]),
        "qinst_minus_floor_s": spread([r["qinst"] - r["floor"] for r in rows]),
        "qinst_over_virt_install": spread([r["qinst"] / r["virt-install"] for r in rows]),
        "load": spread([r["load"] for r in rows]),
    }


# ---- the benchmark ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="qinst/virt-install boot pairs (default 5; 0 skips)")
    parser.add_argument("--no-wait-pairs", type=int, default=7, help="rounds of up --no-wait/floor (default 7)")
    parser.add_argument("--levers", default="", help=f"comma-separated subset of {','.join(LEVERS)} (default none)")
    parser.add_argument("--lever-pairs", type=int, default=3, help="pairs per lever (default 3)")
    parser.add_argument("--image", default="qinst-test", help="catalog entry to boot (default qinst-test)")
    parser.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"), help="guest architecture")
    parser.add_argument("--image-dir", type=Path, help="test image result dir (default: tests/images/build.sh)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--timeout", type=float, help="seconds a boot may take (default 600; 1800 for aarch64): a busy host needs more"
    )
    args = parser.parse_args()
    levers = [lever for lever in args.levers.split(",") if lever]
    if unknown := set(levers) - set(LEVERS):
        sys.exit(f"unknown lever(s): {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
    for tool in ("virt-install", "qemu-img", "virsh", "ssh-keygen"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install virtinst qemu-utils libvirt-clients openssh-client)")
    # Emulated arm64: 3-5 minutes a boot on an idle host; any boot takes several times longer on a busy one.
    launch.BOOT_TIMEOUT = args.timeout or (1800.0 if args.arch == "aarch64" else launch.BOOT_TIMEOUT)
    image_dir = test_image(args.image_dir)
    if args.json:
        CHECKPOINT.append(args.json.with_suffix(".jsonl"))
    results: dict[str, Any] = {
        "benchmark": "boot",
        "image": args.image,
        "image_dir": str(image_dir),
        "arch": args.arch,
        "goals": GOALS,
    }
    load = Load()
    load.start()
    try:
        with qinst_session("boot", args.image, image_dir, prefix=f"bench-{RUN}-") as (q, work):
            results.update(measure(q, work, args, levers))
    finally:
        results["load"] = load.stop()
    write_json(args.json, results)
    print(markdown(results))


def measure(q: Qinst, work: Path, args: argparse.Namespace, levers: list[str]) -> dict[str, Any]:
    base = q.shared_base()
    arch = ("--arch", args.arch) if args.arch != "x86_64" else ()
    qinst = QinstBoot(q, args.image, "qinst up (defaults)", more=arch)
    vi = VirtInstall(q, work, base, cpu=None, arch=args.arch)
    vi.label = "virt-install (defaults)"
    idle: list[dict[str, Any]] = []
    out: dict[str, Any] = {}

    log("warm-up: qinst, virt-install (not measured)")
    warm = f"bench-{RUN}-warm"
    # The floor's and the levers' domain XML: qinst's own under TCG (under --accel auto a first guest may be KVM's).
    tcg = QinstTool(q, accel="tcg", image=args.image, more=arch)
    tcg.running(warm)
    template = quiet(["virsh", "--connect", URI, "dumpxml", "--inactive", warm]).stdout
    tcg.remove(warm)
    if args.arch == "x86_64":
        learn_kvm_verdict(QinstTool(q, accel=None, image=args.image), warm)  # qinst's later `up`s: TCG at once
    vi.prepare(warm)
    try:
        vi.running(warm, free_port())
    finally:
        vi.remove(warm)
    out["argv"] = {
        "qinst": ["qinst", *qinst.args("NAME", "--ssh-port", "PORT")],
        "virt-install": [str(a) for a in vi.argv("NAME", 2222)],
    }

    if args.no_wait_pairs and args.arch == "x86_64":
        floor = Floor(template, work, base, q)
        nowait = QinstTool(q, accel=None, image=args.image)
        out["no_wait"] = no_wait_rounds(nowait, floor, vi, args.no_wait_pairs, idle)
    if args.pairs:
        out["boot"] = pairs(qinst, vi, args.pairs, "boot", idle)

    lever_pairs: dict[str, tuple[Peer, Peer]] = {
        "host-keys": (
            qinst,
            QinstBoot(
                q,
                args.image,
                "qinst up --host-key-types rsa,ecdsa,ed25519",
                more=(*arch, "--host-key-types", "rsa,ecdsa,ed25519"),
            ),
        ),
        "cpu": (
            XmlBoot("cpu mode=maximum (qinst)", template, work, base, q, host_key_types=ALL_HOST_KEYS),
            XmlBoot("cpu qemu64 (virt-install)", template, work, base, q, cpu="qemu64", host_key_types=ALL_HOST_KEYS),
        ),
        "cache": (
            XmlBoot("disk cache=unsafe (smoke)", template, work, base, q, cache="unsafe"),
            XmlBoot("disk cache default (up)", template, work, base, q),
        ),
    }
    out["levers"] = {}
    for lever in levers:
        a, b = lever_pairs[lever]
        out["levers"][lever] = pairs(a, b, args.lever_pairs, f"lever{lever.replace('-', '')}", idle)
    out["idle"] = merge_idle(idle)
    out["contended"] = sum(1 for r in idle if r.get("disturbed_by"))
    return out


# ---- the report ----


def _spread_text(s: dict[str, Any], digits: int = 2, unit: str = "", iqr: bool = True) -> str:
    """median (min to max, IQR q1 to q3)."""
    if not s:
        return "-"
    text = f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f} to {s['max']:.{digits}f}"
    if iqr and "q1" in s:
        text += f", IQR {s['q1']:.{digits}f} to {s['q3']:.{digits}f}"
    return text + ")"


def pairs_markdown(title: str, r: dict[str, Any]) -> list[str]:
    out = [
        f"**{title}**: {r['a']} against {r['b']}, {r['n']} alternating pairs (load {_spread_text(r['load'], 1)}):",
        "",
    ]
    rows = []
    for i, p in enumerate(r["pairs"], 1):
        rows.append(
            [
                str(i),
                f"{p['first']} first",
                f"{p['a']['cloud_init']:.1f} s",
                f"{p['b']['cloud_init']:.1f} s",
                f"{p['ratio']:.2f}",
                f"{p['diff_s']:+.1f} s",
                f"{p['a']['load'][0]:.1f} / {p['b']['load'][0]:.1f}",
            ]
        )
    out.append(table(["pair", "order", r["a"], r["b"], "ratio", "difference", "load at start"], rows))
    out += [
        "",
        f"Median of the per-pair ratios {_spread_text(r['ratio'])}; "
        f"of the differences {_spread_text(r['diff_s'], 1, ' s')}.",
    ]
    if r["errors"]:
        out.append(f"Pairs lost ({len(r['errors'])}): " + "; ".join(r["errors"]))
    phases = [
        [
            p,
            _spread_text(r["a_phases"].get(p, {}), 1, iqr=False),
            _spread_text(r["b_phases"].get(p, {}), 1, iqr=False),
            _spread_text(r["phase_diff_s"].get(p, {}), 1, iqr=False),
        ]
        for p in PHASES
        if r["a_phases"].get(p) or r["b_phases"].get(p)
    ]
    if phases:
        out += ["", "Phases from each console (seconds, median (min to max)), and the per-pair differences:", ""]
        out.append(table(["phase", r["a"], r["b"], "difference"], phases))
    hw = [r.get("a_hardware", {}), r.get("b_hardware", {})]
    if any(hw):
        out += [
            "",
            f"Domains: {r['a']}: {hw[0]}; {r['b']}: {hw[1]}; datasources {r['a_datasources']} / {r['b_datasources']}.",
        ]
    return out


def markdown(r: dict[str, Any]) -> str:
    """The boot results as Markdown."""
    out = [
        f"Image `{r['image']}` ({r['arch']}); host load average (1 min) "
        f"{_spread_text(r['load']['loadavg_1min'], 1)} on {r['load']['cores']} cores.",
        "",
    ]
    nw = r.get("no_wait")
    if nw:
        out += [
            f"**`up --no-wait` to a running domain**, {nw['n']} rotating rounds (load {_spread_text(nw['load'], 1)}):",
            "",
            table(
                ["", "seconds, median (min-max, IQR)"],
                [
                    ["qinst up --no-wait (defaults)", _spread_text(nw["qinst"], 3)],
                    ["floor: libvirt define + start (API)", _spread_text(nw["floor"], 3)],
                    ["virt-install (defaults)", _spread_text(nw["virt-install"], 3)],
                    ["qinst - floor, per round", _spread_text(nw["qinst_minus_floor_s"], 3)],
                    ["qinst / virt-install, per round", _spread_text(nw["qinst_over_virt_install"], 2)],
                ],
            ),
            "",
        ]
    if r.get("boot"):
        out += [*pairs_markdown("Boot to cloud-init's final line", r["boot"]), ""]
    for lever, data in r.get("levers", {}).items():
        out += [*pairs_markdown(f"Lever {lever}", data), ""]
    if "idle" in r:
        out.append(
            f"Measurements disturbed by another QEMU using the CPU: {r['contended']} of {r['idle']['measurements']}."
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
