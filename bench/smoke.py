"""Benchmark: `qinst smoke` of K images with --parallel K against K sequential single-image runs.

The K images are the test image under K catalog names (bench-a, bench-b, ...), so every boot does the same work.
Rounds alternate (parallel first, then sequential first, ...), each starting on an idle machine. Reported: the wall
time of each, the ratio of the parallel run to the slowest single boot of its round (goal: at most 1.3 for K=2 on a
2-core host), and the median of each phase from the runs' --json timings.

    .venv/bin/python bench/smoke.py [--images K] [--runs N] [--json FILE] [--image-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from idle import merge_idle, undisturbed
from output import fmt_summary, log, table, write_json
from session import Qinst, qinst_session, test_image
from timing import Ran, summarize

IMAGE = "qinst-test"
GOAL_RATIO = 1.3
TIMEOUT = 600


def catalog(image_dir: Path, names: list[str]) -> str:
    """A catalog with the test image's entry under each of names (TOML strings written as JSON strings)."""
    entry = tomllib.loads((image_dir / "catalog.toml").read_text())["images"][IMAGE]
    lines = []
    for name in names:
        lines.append(f"[images.{name}]")
        for key, value in entry.items():
            if key != "aliases":
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def smoke(q: Qinst, images: list[str], artifacts: Path, parallel: int) -> tuple[Ran, list[dict[str, Any]]]:
    ran = q.run(
        "smoke",
        *images,
        "--parallel",
        str(parallel),
        "--accel",
        "tcg",
        "--network",
        "user:restrict",
        "--timeout",
        str(TIMEOUT),
        "--artifacts",
        artifacts,
        "--json",
    )
    try:
        data = json.loads(ran.stdout)
        reports = data["results"] if isinstance(data, dict) else data  # {"schema": ..., "results": [...]}
    except (ValueError, KeyError):
        reports = []
    if ran.returncode != 0 or len(reports) != len(images) or not all(r.get("passed") for r in reports):
        failed = [r.get("image") for r in reports if not r.get("passed")]
        raise RuntimeError(
            f"qinst smoke {' '.join(images)} failed (exit {ran.returncode}, failed: {failed}): "
            f"{ran.stderr.strip()[-1500:]}"
        )
    return ran, reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, metavar="K", help="images per run (default 2)")
    parser.add_argument("--runs", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--image-dir", type=Path, help="test image result dir (default: tests/images/build.sh)")
    args = parser.parse_args()
    if args.images < 1 or args.images > 26:
        sys.exit("--images must be between 1 and 26")
    image_dir = test_image(args.image_dir)
    names = [f"bench-{chr(ord('a') + i)}" for i in range(args.images)]

    parallel_s: list[float] = []
    sequential_s: list[float] = []
    slowest_single: list[float] = []
    ratios: list[float] = []
    phases: dict[str, dict[str, list[float]]] = {"parallel": {}, "sequential": {}}
    rss: list[float] = []
    idle: list[dict[str, Any]] = []
    session = qinst_session("smoke", names[0], image_dir, catalog(image_dir, names), prefix="smoke-bench-")
    with session as (q, work):
        serial = iter(range(1_000_000))

        def artifacts() -> Path:
            return work / f"artifacts-{next(serial)}"

        for i in range(args.runs):
            order = ["parallel", "sequential"] if i % 2 == 0 else ["sequential", "parallel"]
            round_single: list[float] = []
            round_parallel = 0.0
            for mode in order:
                log(f"round {i + 1}/{args.runs}: {mode}")
                if mode == "parallel":
                    ran, reports = undisturbed(lambda: smoke(q, names, artifacts(), len(names)), idle)
                    round_parallel = ran.seconds
                    parallel_s.append(ran.seconds)
                    rss.append(ran.max_rss_kib / 1024)
                else:
                    total = 0.0
                    for name in names:
                        ran, reports = undisturbed(lambda name=name: smoke(q, [name], artifacts(), 1), idle)
                        total += ran.seconds
                        round_single.append(ran.seconds)
                        rss.append(ran.max_rss_kib / 1024)
                        _phases(phases["sequential"], reports)
                    sequential_s.append(total)
                    continue
                _phases(phases["parallel"], reports)
            slowest_single.append(max(round_single))
            ratios.append(round_parallel / max(round_single))

    results: dict[str, Any] = {
        "benchmark": "smoke",
        "images": args.images,
        "runs": args.runs,
        "parallel": summarize(parallel_s),
        "sequential": summarize(sequential_s),
        "slowest_single": summarize(slowest_single),
        "ratio_parallel_to_slowest_single": summarize(ratios),
        "ratio_parallel_to_sequential": summarize([p / s for p, s in zip(parallel_s, sequential_s, strict=True)]),
        "phases": {mode: {k: summarize(v) for k, v in by.items()} for mode, by in phases.items()},
        "peak_rss_mib": max(rss) if rss else None,
        "goal": {"ratio_parallel_to_slowest_single": GOAL_RATIO},
        "idle": merge_idle(idle),
    }
    print(markdown(results))
    write_json(args.json, results)


def _phases(into: dict[str, list[float]], reports: list[dict[str, Any]]) -> None:
    for report in reports:
        for phase, seconds in report.get("timings", {}).items():
            into.setdefault(phase, []).append(seconds)


def markdown(r: dict[str, Any]) -> str:
    k = r["images"]
    rows = [
        [f"`qinst smoke` {k} images `--parallel {k}`", *fmt_summary(r["parallel"], 1)],
        [f"{k} sequential single-image runs (sum)", *fmt_summary(r["sequential"], 1)],
        ["slowest single-image run", *fmt_summary(r["slowest_single"], 1)],
    ]
    out = [f"**Boot-smoke, {k} images** ({r['runs']} alternating rounds):", ""]
    out.append(table(["", "median", "min", "max"], rows))
    ratio = r["ratio_parallel_to_slowest_single"]
    if ratio:
        verdict = "meets" if ratio["median"] <= r["goal"]["ratio_parallel_to_slowest_single"] else "misses"
        out += [
            "",
            f"parallel / slowest single: {ratio['median']:.2f} (min {ratio['min']:.2f}, max {ratio['max']:.2f}; "
            f"{verdict} the goal of <= {r['goal']['ratio_parallel_to_slowest_single']}); parallel / sequential: "
            f"{r['ratio_parallel_to_sequential']['median']:.2f}.",
        ]
    phases = r.get("phases", {})
    names = sorted({p for by in phases.values() for p in by}, key=_phase_order)
    if names:
        out += ["", "Per-phase medians (seconds, from `qinst smoke --json`):", ""]
        rows = []
        for mode in ("sequential", "parallel"):
            by = phases.get(mode, {})
            rows.append([mode, *(f"{by[p]['median']:.2f}" if by.get(p) else "-" for p in names)])
        out.append(table(["", *names], rows))
    return "\n".join(out)


def _phase_order(name: str) -> int:
    order = ["download", "define", "running", "kernel", "cloud-init", "ssh", "checks", "total"]
    return order.index(name) if name in order else len(order)


if __name__ == "__main__":
    main()
