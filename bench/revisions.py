"""Benchmark: one qinst command under two revisions of qinst's sources, side by side.

Each revision's `qemu_instances/` and `cloudinit_templates/` are exported (`git archive`) to a temporary folder
and run by this virtualenv's Python with that folder first on the path (the editable install's finder removed),
alternating revisions run by run, so both see the same load. The working tree counts as a revision (`WORKTREE`).
Figures: wall clock and CPU (user+sys) of each run; median and min. For import-time work (what `ls`, `images`,
`--help` or a cached `up` import), where CPU is the steadier figure on a shared host.

    .venv/bin/python bench/revisions.py --old main --new WORKTREE --runs 20 [--ok 4] -- --connect URI ls
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
from output import log, write_json
from timing import run_timed, summarize

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"
_RUN = """import os, sys
tree = os.environ["QINST_BENCH_TREE"]
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
sys.path.insert(0, tree)
from qemu_instances.cli import main
sys.argv[0] = "qinst"
main()
"""


def export(rev: str, into: Path) -> Path:
    """The sources of `rev` (or the working tree) as a folder."""
    if rev == WORKTREE:
        return REPO
    folder = into / rev.replace("/", "_")
    folder.mkdir()
    paths = ["qemu_instances", "cloudinit_templates"]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="main", help="git revision (default main)")
    parser.add_argument("--new", default=WORKTREE, help=f"git revision or {WORKTREE} (default)")
    parser.add_argument("--runs", type=int, default=20, help="runs of each revision (default 20)")
    parser.add_argument("--ok", type=int, action="append", default=[0], help="another accepted exit code")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("args", nargs="+", help="qinst's arguments (after --)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode written once (warm-up), not on every run
    with tempfile.TemporaryDirectory(prefix="qinst-bench-rev-") as tmp:
        trees = {rev: export(rev, Path(tmp)) for rev in (args.old, args.new)}
        samples: dict[str, dict[str, list[float]]] = {rev: {"wall": [], "cpu": []} for rev in trees}
        log(f"{args.runs} alternating runs of qinst {' '.join(args.args)}: {args.old} / {args.new}")
        for i in range(args.runs + 2):  # two warm-up rounds
            order = list(trees) if i % 2 == 0 else list(trees)[::-1]
            for rev in order:
                ran = run_timed([sys.executable, "-c", _RUN, *args.args], {**env, "QINST_BENCH_TREE": str(trees[rev])})
                if ran.returncode not in args.ok:
                    raise SystemExit(f"{rev}: exit {ran.returncode}: {ran.stderr.strip()[-500:]}")
                if i >= 2:
                    samples[rev]["wall"].append(ran.seconds)
                    samples[rev]["cpu"].append(ran.cpu_seconds)
    result: dict[str, Any] = {"command": ["qinst", *args.args], "runs": args.runs, "load": os.getloadavg()}
    for rev, got in samples.items():
        result[rev] = {"wall": summarize(got["wall"]), "cpu": summarize(got["cpu"])}
        print(
            f"{rev:10} wall median {result[rev]['wall']['median']:.3f} min {result[rev]['wall']['min']:.3f}"
            f"   cpu median {result[rev]['cpu']['median']:.3f} min {result[rev]['cpu']['min']:.3f}"
        )
    print(f"load {result['load']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
