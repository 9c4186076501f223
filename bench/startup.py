"""Benchmark: start-up cost of `qinst --help` and `qinst ls` against `virsh list --all`.

Many short runs of each, alternating (help, ls, virsh, help, ...) after a few warm-up runs, on an idle machine:
median, min, max and each command's peak RSS. Goal: `qinst --help` under 0.3 s (libvirt and pycdlib imported
lazily).

    .venv/bin/python bench/startup.py [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
from idle import merge_idle, undisturbed
from output import fmt_summary, log, table, write_json
from timing import Ran, run_timed, summarize

from testsupport.qinst import qinst_command, qinst_env
from testsupport.virsh import URI

# Measure qinst as installed: Python writes its bytecode on the first run (warm-up), not on every run.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
GOAL_HELP_S = 0.3
WARMUP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    qinst = qinst_command()
    with tempfile.TemporaryDirectory(prefix="qinst-bench-startup-") as tmp:
        env = qinst_env(Path(tmp))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],  # the interpreter's own start: the floor
            "qinst --help": [qinst, "--help"],
            "qinst images": [qinst, "images"],
            "qinst ls": [qinst, "--connect", URI, "ls"],
            "virsh list --all": ["virsh", "--connect", URI, "list", "--all"],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        rss: dict[str, list[float]] = {name: [] for name in commands}
        idle: list[dict[str, Any]] = []

        def one_round() -> dict[str, Ran]:
            got = {}
            for name, argv in commands.items():
                ran = run_timed(argv, env)
                if ran.returncode != 0:
                    raise RuntimeError(f"{name} failed ({ran.returncode}): {ran.stderr.strip()}")
                got[name] = ran
            return got

        log(f"start-up: {args.runs} alternating runs of {', '.join(commands)}")
        for _ in range(WARMUP):
            one_round()
        for _ in range(args.runs):
            for name, ran in undisturbed(one_round, idle).items():
                seconds[name].append(ran.seconds)
                rss[name].append(ran.max_rss_kib / 1024)
    results: dict[str, Any] = {
        "benchmark": "startup",
        "runs": args.runs,
        "commands": {name: {"seconds": summarize(seconds[name]), "rss_mib": summarize(rss[name])} for name in commands},
        "goal": {"qinst --help": GOAL_HELP_S},
        "idle": merge_idle(idle),
        "instances_listed": _count(qinst, env),
    }
    virsh = results["commands"]["virsh list --all"]["seconds"]["median"]
    python = results["commands"]["python -c pass"]["seconds"]["median"]
    results["ratios"] = {
        **{
            f"{name} / virsh list --all": results["commands"][name]["seconds"]["median"] / virsh
            for name in ("qinst --help", "qinst ls")
        },
        **{
            f"{name} / python -c pass": results["commands"][name]["seconds"]["median"] / python
            for name in ("qinst --help", "qinst images", "qinst ls")
        },
    }
    print(markdown(results))
    write_json(args.json, results)


def _count(qinst: str, env: dict[str, str]) -> int:
    """How many qinst instances `ls` listed (its cost grows with them: see bench/scaling.py)."""
    import json

    ran = run_timed([qinst, "--connect", URI, "ls", "--json"], {**env, "COLUMNS": os.environ.get("COLUMNS", "80")})
    try:
        return len(json.loads(ran.stdout))
    except ValueError:
        return -1


def markdown(r: dict[str, Any]) -> str:
    rows = []
    for name, data in r["commands"].items():
        rows.append([f"`{name}`", *fmt_summary(data["seconds"], 3), f"{data['rss_mib']['median']:.0f} MiB"])
    out = [f"**Start-up** ({r['runs']} alternating runs each, after {WARMUP} warm-up runs):", ""]
    out.append(table(["", "median", "min", "max", "peak RSS"], rows))
    help_ = r["commands"]["qinst --help"]["seconds"]["median"]
    verdict = "meets" if help_ < r["goal"]["qinst --help"] else "misses"
    ratios = "; ".join(f"{k} = {v:.1f}" for k, v in r["ratios"].items())
    out += ["", f"`qinst --help` {verdict} the goal of < {r['goal']['qinst --help']} s. Ratios (medians): {ratios}."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
