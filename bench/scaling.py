"""Benchmark: how qinst's cost grows with the work.

- `qinst up --no-wait` and `qinst ls` with 1, 4 and 16 qinst instances defined (tiny guests: 128 MiB, 1 vCPU,
  powered off right after they start so they use no CPU; all removed at the end): time and peak RSS.
- `qinst pull` of 100 MiB, 1 GiB and 4 GiB files from 127.0.0.1 against `curl` + `sha512sum` (bench/pull.py).

    .venv/bin/python bench/scaling.py [--counts 1,4,16] [--runs N] [--pull-sizes 100,1024,4096] [--pull-runs N]
                                      [--json FILE] [--image-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
from idle import merge_idle, undisturbed
from output import fmt_summary, log, table, write_json
from session import BENCH, Qinst, qinst_session, test_image, token
from timing import Ran, check, quiet, summarize

from testsupport.virsh import destroy, domains, remove_domain

# Measure qinst as installed: Python writes its bytecode on the first run (warm-up), not on every run.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
IMAGE = "qinst-test"


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def up(q: Qinst, name: str) -> Ran:
    return check(
        q.run(
            "up",
            IMAGE,
            "--name",
            name,
            "--no-wait",
            "--memory",
            "128",
            "--cpus",
            "1",
            "--disk",
            "1",
            "--accel",
            "tcg",
            "--network",
            "user:restrict",
            "--ssh-key",
            q.key,
            "--json",
        ),
        f"qinst up {name}",
    )


def instances(q: Qinst, counts: list[int], runs: int) -> dict[str, Any]:
    prefix = f"bench-n{token()}-"
    defined: list[str] = []
    levels: dict[str, Any] = {}
    idle: list[dict[str, Any]] = []
    serial = iter(range(1_000_000))
    for count in counts:
        while len(defined) < count:
            name = f"{prefix}{len(defined):02d}"
            up(q, name)
            destroy(name)  # defined but powered off: listed by ls, no CPU used
            defined.append(name)
        log(f"{count} instances defined: {runs} runs of qinst ls and qinst up --no-wait")
        ls_s, ls_rss, up_s, up_rss = [], [], [], []

        def ls(count: int = count) -> Ran:
            ran = check(q.run("ls", "--json"), "qinst ls")
            listed = len([i for i in json.loads(ran.stdout) if i["name"].startswith(prefix)])
            if listed != count:
                raise RuntimeError(f"qinst ls listed {listed} of the {count} benchmark instances")
            return ran

        def one_more() -> Ran:
            extra = f"{prefix}x{next(serial)}"
            try:
                return up(q, extra)
            finally:
                quiet(q.argv("rm", "--force", extra), q.env)
                remove_domain(extra)

        for _ in range(runs):
            ran = undisturbed(ls, idle)
            ls_s.append(ran.seconds)
            ls_rss.append(ran.max_rss_kib / 1024)
            ran = undisturbed(one_more, idle)
            up_s.append(ran.seconds)
            up_rss.append(ran.max_rss_kib / 1024)
        levels[str(count)] = {
            "ls": summarize(ls_s),
            "ls_rss_mib": summarize(ls_rss),
            "up": summarize(up_s),
            "up_rss_mib": summarize(up_rss),
        }
    quiet(q.argv("rm", "--force", *defined), q.env)
    for name in domains(prefix):
        remove_domain(name)
    return {"levels": levels, "idle": merge_idle(idle)}


def pulls(pull_sizes: list[int], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qinst-bench-pull-") as tmp:
        for size in pull_sizes:
            need = 3 * size * (1 << 20) + (1 << 30)  # the file, the cache copy, curl's copy, and room
            if shutil.disk_usage(tmp).free < need:
                out[str(size)] = {"skipped": f"not enough free disk in {tmp} for {size} MiB"}
                continue
            log(f"pull: {size} MiB, {runs} runs (bench/pull.py)")
            result = Path(tmp) / f"pull-{size}.json"
            argv = [sys.executable, str(BENCH / "pull.py"), "--size", str(size), "--runs", str(runs)]

            def pull(argv: list[str] = argv, result: Path = result, size: int = size) -> dict[str, Any]:
                proc = subprocess.run([*argv, "--json", str(result), "--workdir", tmp], stdout=subprocess.PIPE)
                if proc.returncode != 0:
                    raise RuntimeError(f"bench/pull.py --size {size} failed ({proc.returncode})")
                return dict(json.loads(result.read_text()))

            idle: list[dict[str, Any]] = []
            out[str(size)] = {**undisturbed(pull, idle, tries=2), "idle": merge_idle(idle)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,4,16", help="instances defined (default 1,4,16)")
    parser.add_argument("--runs", type=int, default=3, help="runs of ls and up at each count (default 3)")
    parser.add_argument("--pull-sizes", default="100,1024,4096", help="MiB (default 100,1024,4096; '' skips)")
    parser.add_argument("--pull-runs", type=int, default=2, help="runs of each side per size (default 2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--image-dir", type=Path, help="test image result dir (default: tests/images/build.sh)")
    args = parser.parse_args()
    counts = sorted(sizes(args.counts))
    results: dict[str, Any] = {"benchmark": "scaling", "runs": args.runs}
    if counts:
        image_dir = test_image(args.image_dir)
        with qinst_session("scaling", IMAGE, image_dir) as (q, _work):
            results["instances"] = instances(q, counts, args.runs)
    if sizes(args.pull_sizes):
        results["pull"] = pulls(sizes(args.pull_sizes), args.pull_runs)
    print(markdown(results))
    write_json(args.json, results)


def markdown(r: dict[str, Any]) -> str:
    out: list[str] = []
    levels = r.get("instances", {}).get("levels", {})
    if levels:
        out += [f"**Scaling with instances defined** ({r['runs']} runs each; tiny powered-off guests):", ""]
        rows = []
        for count, d in levels.items():
            rows.append(
                [
                    count,
                    *fmt_summary(d["ls"], 3)[:1],
                    f"{d['ls_rss_mib']['median']:.0f} MiB",
                    *fmt_summary(d["up"], 3)[:1],
                    f"{d['up_rss_mib']['median']:.0f} MiB",
                ]
            )
        out.append(table(["instances", "`qinst ls`", "ls peak RSS", "`qinst up --no-wait`", "up peak RSS"], rows))
    pull = r.get("pull", {})
    if pull:
        out += ["", "**Verified pull from 127.0.0.1** (`qinst pull URL --sha512` vs `curl` + `sha512sum`):", ""]
        rows = []
        for size, d in pull.items():
            if "skipped" in d:
                rows.append([f"{size} MiB", d["skipped"], "", "", "", ""])
                continue
            q, t = d["qinst"], d["two_step"]
            rows.append(
                [
                    f"{size} MiB",
                    f"{q['median']:.2f} s ({int(size) / q['median']:.0f} MiB/s)",
                    f"{t['median']:.2f} s ({int(size) / t['median']:.0f} MiB/s)",
                    f"{d['ratio']:.2f}",
                    f"{q['peak_rss_mib']:.0f} MiB",
                    f"{t['curl_peak_rss_mib']:.0f} MiB",
                ]
            )
        out.append(table(["size", "qinst pull", "curl + sha512sum", "ratio", "qinst RSS", "curl RSS"], rows))
    return "\n".join(out)


if __name__ == "__main__":
    main()
