"""Upload of a base image to a libvirt host over qemu+ssh (qinst's libvirt stream) against scp of the same file.

Needs an SSH server the benchmark can log in to as root with a key: by default it starts one on 127.0.0.1
(Debian's openssh-server, key-only, loopback only), exactly as the remote tests do. Runs alternate
(qinst, scp, qinst, scp, ...); medians and the throughput ratio are printed, and written with --json.

    .venv/bin/python bench/upload.py [--size-mib 1024] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qemu_instances.digests import Algorithm, hash_file  # noqa: E402
from qemu_instances.host import VERIFIED, Host  # noqa: E402
from testsupport.sshd import serving_sshd  # noqa: E402

POOL_DIR = Path("/var/lib/libvirt/images/qinst")


def qinst_upload(uri: str, source: Path, name: str) -> float:
    digest = hash_file(source, Algorithm.SHA512)
    with Host(uri) as host:
        pool = host.pool()
        for vol in (name, name + VERIFIED):
            host.delete_volume(pool, vol)
        started = time.monotonic()
        host.base_volume(pool, name, source, digest)
        seconds = time.monotonic() - started
        for vol in (name, name + VERIFIED):
            host.delete_volume(pool, vol)
    return seconds


def scp_upload(d: Path, port: int, source: Path, target: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        ["scp", "-q", "-F", str(d / "ssh_config"), "-P", str(port), str(source), f"root@127.0.0.1:{target}"],
        check=True,
    )
    seconds = time.monotonic() - started
    target.unlink(missing_ok=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qinst-bench-upload-") as tmp:
        d = Path(tmp)
        source = d / "image.raw"
        with source.open("wb") as f:  # incompressible bytes, so neither side gains from compression
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        name = "sha512-bench-upload"
        (d / "sshd").mkdir()
        with serving_sshd(d / "sshd") as sshd:
            times: dict[str, list[float]] = {"qinst": [], "scp": []}
            for _ in range(args.runs):
                times["qinst"].append(qinst_upload(sshd.uri, source, name))
                times["scp"].append(scp_upload(sshd.directory, sshd.port, source, POOL_DIR / "bench-upload-scp.raw"))
    size = args.size_mib << 20
    result = {
        "size_bytes": size,
        "runs": args.runs,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "median_mib_per_s": {k: args.size_mib / statistics.median(v) for k, v in times.items()},
    }
    result["throughput_ratio"] = result["median_mib_per_s"]["qinst"] / result["median_mib_per_s"]["scp"]
    print(f"| upload {args.size_mib} MiB | median s | MiB/s | min s | max s |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        median = statistics.median(v)
        print(f"| {k} | {median:.2f} | {args.size_mib / median:.0f} | {min(v):.2f} | {max(v):.2f} |")
    print(f"\nqinst throughput / scp throughput: {result['throughput_ratio']:.2f} (goal: >= 0.8)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
