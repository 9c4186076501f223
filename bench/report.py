"""Turn one bench/run results file into a Markdown report and PNG plots beside it.

    .venv/bin/python bench/report.py bench/results/DATE.json     # writes DATE.md and DATE-*.png

Everything shown comes from the JSON file (medians, min/max of the run that wrote it); nothing is typed by hand.
matplotlib (the `bench` extra) draws the plots with the Agg backend; without it only the Markdown is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import boot
import launch
import scaling
import smoke
import startup
from output import table

DPI = 80
PLOTS = ("launch", "boot", "pairs", "phases", "startup", "smoke", "scaling")


def seed_markdown(r: dict[str, Any]) -> str:
    rows = [["qinst, in-process (render + ISO)", r["qinst_build_seed_iso"]]]
    rows.append(["qinst, ISO only", r["qinst_iso_from_files"]])
    if r.get("cloud_localds"):
        rows.append(["`cloud-localds` (subprocess)", r["cloud_localds"]])
    out = [f"**NoCloud seed** ({r['rounds']} alternating rounds, ISO {r['iso_bytes']} bytes):", ""]
    cells = [[name, *(f"{s[k]:.2f} ms" for k in ("median_ms", "min_ms", "max_ms"))] for name, s in rows]
    out.append(table(["", "median", "min", "max"], cells))
    if r.get("ratio_cloud_localds_to_qinst"):
        out += ["", f"cloud-localds / qinst (medians): {r['ratio_cloud_localds_to_qinst']:.0f}x."]
    return "\n".join(out)


SECTIONS = {
    "boot": ("Boot in alternating pairs", boot.markdown),
    "boot-arm64": ("arm64 boot in alternating pairs", boot.markdown),
    "launch": ("Launch", launch.markdown),
    "smoke": ("Boot-smoke: parallel against sequential", smoke.markdown),
    "startup": ("Start-up", startup.markdown),
    "seed": ("Seed", seed_markdown),
    "scaling": ("Scaling", scaling.markdown),
}


def host_markdown(results: dict[str, Any]) -> str:
    h = results["host"]
    q = results.get("qinst", {})
    dirty = " + uncommitted changes" if q.get("dirty") else ""
    rows = [
        ["CPU", f"{h['cpu']} ({h['cores']} cores)"],
        ["memory", f"{h['memory_gib']:.0f} GiB"],
        ["OS, kernel", f"{h['os']}, {h['kernel']}"],
        ["libvirt, QEMU", f"{h['libvirt']}, {h['qemu']}"],
        ["accelerator", h["accel"]],
        ["tools", ", ".join(f"{k} {v}" for k, v in h.get("tools", {}).items())],
        ["qinst", f"{q.get('commit', '?')[:12]}{dirty} ({q.get('source')})"],
        ["mode", f"{results['mode']} (started {results['started']}, {results['minutes']:.0f} min)"],
    ]
    return table(["host", ""], rows)


def markdown(results: dict[str, Any], stem: str) -> str:
    out = [f"# qinst benchmarks, {results['date']}", ""]
    out += [host_markdown(results), "", f"Reproduce: `{results['command']}`", ""]
    benches = results.get("benchmarks", {})
    for key, (title, render) in SECTIONS.items():
        if key in benches:
            out += [f"## {title}", "", render(benches[key]), ""]
        elif key in results.get("errors", {}):
            out += [f"## {title}", "", f"Failed: {results['errors'][key]}", ""]
    idle = list(_idle_records(benches))
    waited = sum(i.get("waited_s", 0) for i in idle)
    repeated = sum(i.get("repeated", 0) for i in idle)
    contended = sum(i.get("contended", 0) for i in idle)
    out += [
        f"Before each measurement the run waited until no other QEMU process used the CPU ({waited:.0f} s of "
        f"waiting in all); {repeated} measurement(s) were repeated because another QEMU got busy meanwhile, and "
        f"{contended} went ahead on a busy host.",
        "",
    ]
    for plot in results.get("plots", []):
        out.append(f"![{plot}]({stem}-{plot}.png)")
    return "\n".join(out).rstrip() + "\n"


def _idle_records(data: Any) -> Any:
    """Every merge_idle() summary in a results tree."""
    if isinstance(data, dict):
        if "measurements" in data and "waited_s" in data:
            yield data
            return
        for value in data.values():
            yield from _idle_records(value)


# ---- plots ----


def _bars(ax: Any, labels: list[str], stats: list[dict[str, Any]], unit: str = "s", scale: float = 1.0) -> None:
    med = [s["median"] * scale for s in stats]
    low = [(s["median"] - s["min"]) * scale for s in stats]
    high = [(s["max"] - s["median"]) * scale for s in stats]
    y = range(len(labels))
    ax.barh(y, med, xerr=[low, high], color="#4c72b0", capsize=3)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} (median; bars show min-max)")
    for i, (m, s) in enumerate(zip(med, stats, strict=True)):
        ax.text(s["max"] * scale, i, f"  {m:.2f}", va="center", ha="left", fontsize=8)
    ax.set_xlim(0, max(s["max"] for s in stats) * scale * 1.15)


def plots(results: dict[str, Any], stem: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install 'matplotlib>=3.7'): no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    b = results.get("benchmarks", {})

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(f"{stem}-{name}.png", dpi=DPI)
        plt.close(fig)
        made.append(name)

    tools = b.get("launch", {}).get("tools", {})
    rows = [(d["label"], d["running"]) for t, d in tools.items() if d.get("running")]
    if tools.get("virt-install", {}).get("running_with_prep"):
        rows.append(("qemu-img create + virt-install", tools["virt-install"]["running_with_prep"]))
    if rows:
        rows.sort(key=lambda r: r[1]["median"])
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(rows)))
        _bars(ax, [r[0] for r in rows], [r[1] for r in rows])
        save(fig, "launch", "Time to a running domain (image cached)")

    boots = [t for t in ("qinst", "virt-install", "kcli") if tools.get(t, {}).get("cloud_init")]
    if boots:
        keys = [("cloud_init", "cloud-init finished"), ("ssh", "SSH answers"), ("ready", "tool returns ready")]
        fig, ax = plt.subplots(figsize=(8, 3))
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(keys):
            xs = [i + k * width for i, t in enumerate(boots) if tools[t].get(key)]
            ys = [tools[t][key]["median"] for t in boots if tools[t].get(key)]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([i + width for i in range(len(boots))], boots)
        ax.set_ylabel("s from the command's start (median)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
        ax.legend(fontsize=8, loc="upper center", ncol=len(keys))
        save(fig, "boot", "Boot to ready under TCG")

    series = [
        (f"{bench}, {key}:\n{r['a']} /\n{r['b']}", r)
        for bench in ("boot", "boot-arm64")
        for key, r in [("boot", b.get(bench, {}).get("boot")), *b.get(bench, {}).get("levers", {}).items()]
        if r and r.get("pairs")
    ]
    if series:
        fig, ax = plt.subplots(figsize=(10, 0.8 + 0.75 * len(series)))
        for i, (_, r) in enumerate(series):
            ratios = [p["ratio"] for p in r["pairs"]]
            ax.scatter(ratios, [i] * len(ratios), color="#4c72b0", s=18, zorder=3)
            ax.plot([r["ratio"]["median"]] * 2, [i - 0.3, i + 0.3], color="#c44e52", lw=2)
            ax.text(r["ratio"]["max"], i, f"  {r['ratio']['median']:.2f} (n={r['n']})", va="center", fontsize=8)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(series)), [label for label, _ in series], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("per-pair ratio of time to cloud-init's final line (dots: pairs; red: median)")
        ax.set_xlim(0, max(r["ratio"]["max"] for _, r in series) * 1.3)
        save(fig, "pairs", "Boots in alternating pairs")

    profiles = [
        (bench, b[bench]["boot"]) for bench in ("boot", "boot-arm64") if b.get(bench, {}).get("boot", {}).get("n")
    ]
    if profiles:
        fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * 2 * len(profiles)))
        labels: list[str] = []
        for bench, r in profiles:
            for side in ("a", "b"):
                y, left = len(labels), 0.0
                labels.append(f"{r[side]} ({bench})")
                for k, phase in enumerate(p for p in boot.PHASES if p != "guest-ready"):
                    value = r[side + "_phases"].get(phase, {}).get("median", 0.0)
                    ax.barh(y, value, left=left, color=f"C{k}", label=phase if y == 0 else None)
                    left += value
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("s (median of each phase over the pairs, from each guest's console)")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        save(fig, "phases", "Where the boot goes, phase by phase")

    commands = b.get("startup", {}).get("commands", {})
    if commands:
        fig, ax = plt.subplots(figsize=(8, 2))
        _bars(ax, list(commands), [d["seconds"] for d in commands.values()])
        save(fig, "startup", "Start-up")

    sm = b.get("smoke", {})
    if sm.get("parallel"):
        k = sm["images"]
        labels = ["slowest single boot", f"--parallel {k}", f"{k} sequential runs"]
        fig, ax = plt.subplots(figsize=(8, 2))
        _bars(ax, labels, [sm["slowest_single"], sm["parallel"], sm["sequential"]])
        save(fig, "smoke", f"qinst smoke, {k} images")

    sc = b.get("scaling", {})
    levels = sc.get("instances", {}).get("levels", {})
    pull = {s: d for s, d in sc.get("pull", {}).items() if "qinst" in d}
    if levels or pull:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        if levels:
            counts = [int(c) for c in levels]
            for key, label in (("up", "qinst up --no-wait"), ("ls", "qinst ls")):
                axes[0].plot(counts, [levels[str(c)][key]["median"] for c in counts], marker="o", label=label)
            axes[0].set_xscale("log", base=2)
            axes[0].set_xticks(counts, [str(c) for c in counts])
            axes[0].set_xlabel("instances defined")
            axes[0].set_ylabel("s (median)")
            axes[0].set_ylim(bottom=0)
            axes[0].legend(fontsize=8)
        if pull:
            sizes = [int(s) for s in pull]
            axes[1].plot(sizes, [pull[str(s)]["qinst"]["median"] for s in sizes], marker="o", label="qinst pull")
            axes[1].plot(
                sizes, [pull[str(s)]["two_step"]["median"] for s in sizes], marker="o", label="curl + sha512sum"
            )
            axes[1].set_xscale("log")
            axes[1].set_yscale("log")
            axes[1].set_xticks(sizes, [f"{s} MiB" for s in sizes])
            axes[1].set_ylabel("s (median)")
            axes[1].legend(fontsize=8)
        save(fig, "scaling", "How cost grows")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a bench/results/DATE.json")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    stem = args.results.with_suffix("")
    results["plots"] = plots(results, stem)
    md = args.results.with_suffix(".md")
    md.write_text(markdown(results, stem.name))
    print(md)


if __name__ == "__main__":
    main()
