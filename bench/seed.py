"""Benchmark: building a NoCloud seed in-process (qemu_instances.seed, pycdlib) against cloud-localds.

Both build an ISO from the same user-data and meta-data; runs alternate so that drift in the machine's load
affects both alike. Goal: a typical seed in under 10 ms in-process.

    .venv/bin/python bench/seed.py [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycdlib

from qemu_instances import seed

GOAL_MS = 10.0

USER_DATA = b"""#cloud-config
packages: [jq, curl, htop]
runcmd:
  - [systemctl, enable, --now, example.service]
  - echo "provisioned: yes # by qinst" > /etc/motd
write_files:
  - path: /etc/example/config.toml
    permissions: "0644"
    content: |
      [server]
      listen = "0.0.0.0:8080"
      workers = 4
"""


def fake_key(key_type: str, size: int, comment: str) -> str:
    """A well-formed public key line of a realistic size (the benchmark needs no real key)."""
    fields = (key_type.encode(), bytes(range(256)) * (size // 256) + bytes(size % 256))
    blob = b"".join(struct.pack(">I", len(f)) + f for f in fields)
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}"


def typical_spec() -> seed.SeedSpec:
    """One instance's seed: host name, two keys (ed25519, RSA 4096), a user cloud-config merged in."""
    keys = (fake_key("ssh-ed25519", 32, "alice@laptop"), fake_key("ssh-rsa", 520, "alice@desktop"))
    return seed.SeedSpec(
        hostname="web-1",
        instance_id="i-0123456789abcdef",
        user="debian",
        ssh_keys=keys,
        user_data=USER_DATA,
        user_data_source="user-data.yaml",
    )


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - start) / 1e6


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "runs": len(samples),
    }


def read_user_data(iso_path: Path) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/user-data")
        return out.getvalue()
    finally:
        iso.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50, help="alternating rounds (default 50)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)

    spec = typical_spec()
    cold_ms = timed(lambda: seed.build_seed_iso(spec))  # first call: templates parsed, imports warm
    files = seed.seed_files(spec)
    localds = shutil.which("cloud-localds")

    full: list[float] = []
    iso_only: list[float] = []
    external: list[float] = []
    with tempfile.TemporaryDirectory(prefix="qinst-bench-") as tmp:
        work = Path(tmp)
        for name in ("user-data", "meta-data"):
            (work / name).write_bytes(files[name])
        out = work / "seed.iso"
        argv_localds = [localds or "cloud-localds", out, work / "user-data", work / "meta-data"]
        for _ in range(args.rounds):
            full.append(timed(lambda: seed.build_seed_iso(spec)))
            iso_only.append(timed(lambda: seed.iso_from_files(files)))
            if localds:
                external.append(timed(lambda: subprocess.run(argv_localds, check=True, capture_output=True)))
        if localds:
            # Same inputs: the user-data cloud-localds wrote is the one qinst builds.
            assert read_user_data(out) == files["user-data"]

    results: dict[str, Any] = {
        "benchmark": "seed",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "iso_bytes": len(seed.build_seed_iso(spec)),
        "cold_first_build_ms": cold_ms,
        "qinst_build_seed_iso": summary(full),
        "qinst_iso_from_files": summary(iso_only),
        "cloud_localds": summary(external) if external else None,
        "goal_ms": GOAL_MS,
    }
    if external:
        results["ratio_cloud_localds_to_qinst"] = statistics.median(external) / statistics.median(full)

    rows = [
        ("qinst build_seed_iso (render + ISO)", results["qinst_build_seed_iso"]),
        ("qinst iso_from_files (ISO only)", results["qinst_iso_from_files"]),
    ]
    if external:
        rows.append(("cloud-localds (subprocess)", results["cloud_localds"]))
    print(f"seed benchmark: {args.rounds} alternating rounds, ISO {results['iso_bytes']} bytes")
    print(f"{'method':<38} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for label, row in rows:
        print(f"{label:<38} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {row['max_ms']:>8.2f}")
    print(f"first (cold) build_seed_iso: {cold_ms:.2f} ms")
    if external:
        print(f"cloud-localds / qinst (median): {results['ratio_cloud_localds_to_qinst']:.1f}x")
    else:
        print("cloud-localds not found (package cloud-image-utils): comparison skipped")
    met = results["qinst_build_seed_iso"]["median_ms"] < GOAL_MS
    print(f"goal: under {GOAL_MS:.0f} ms in-process: {'met' if met else 'NOT met'}")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
