"""Benchmark: a verified pull with `qinst pull URL --sha512 HEX` against `curl -o` followed by `sha512sum`.

Both fetch the same random file from one local server (a separate process using sendfile), runs alternate
(qinst, two-step, qinst, ...), and the cache is emptied before every qinst run. qinst hashes while the bytes
arrive, so it should take at most 0.8 of the two-step's time, with a peak RSS under 100 MiB whatever the size.

--ipfs measures instead an aleph ipfs item (`qinst pull aleph:<item>`, the file's UnixFS CID recomputed while it
downloads, the message from testsupport/aleph.py) against a plain verified pull of the same bytes
(`qinst pull URL --sha256 HEX`): at most 1.15 times as long, peak RSS under 100 MiB.

    .venv/bin/python bench/pull.py [--size MiB] [--runs N] [--json FILE] [--ipfs]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import _root  # noqa: F401  (testsupport/ and qemu_instances on sys.path)
from session import write_random_file
from timing import Summary, timed

from testsupport.fileserver import file_server

GOAL_RATIO = 0.8
GOAL_IPFS_RATIO = 1.15
GOAL_RSS_MIB = 100


def qinst_command() -> str:
    beside = Path(sys.executable).with_name("qinst")
    found = str(beside) if beside.exists() else shutil.which("qinst")
    if not found:
        sys.exit("qinst not found: run with the project's virtualenv python (.venv/bin/python bench/pull.py)")
    return found


def sha512_of(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, metavar="MiB", help="file size (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", type=Path, help="where to put the file, the cache and curl's output")
    parser.add_argument("--ipfs", action="store_true", help="an aleph ipfs item against a plain verified pull")
    args = parser.parse_args()
    if args.ipfs:
        main_ipfs(args)
        return
    for tool in ("curl", "sha512sum"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install curl coreutils)")
    qinst = qinst_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QINST_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"

    work = Path(tempfile.mkdtemp(prefix="qinst-bench-", dir=args.workdir))
    try:
        served = work / "srv"
        served.mkdir()
        blob = served / "image.raw"
        print(f"writing {args.size} MiB of random data to {blob}", file=sys.stderr)
        write_random_file(blob, args.size)
        digest = sha512_of(blob)
        load_before = os.getloadavg()[0]
        results = run(args.runs, blob, digest, qinst, env, work)
        # Other work on the host skews both sides; the load average says how quiet it was.
        results["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["size_mib"] = args.size
    report(results, args.size)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def cid_and_sha256(path: Path) -> tuple[str, str]:
    """The file's CIDv0 (Kubo's defaults, as the aleph items are) and sha256, to publish the item."""
    from qemu_instances.unixfs import UnixfsHasher
    from testsupport.aleph import CIDV0

    unixfs, sha256 = UnixfsHasher(CIDV0), hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            unixfs.update(chunk)
            sha256.update(chunk)
    return unixfs.hexdigest(), sha256.hexdigest()


def main_ipfs(args: argparse.Namespace) -> None:
    from testsupport.aleph import inline_message, message_documents, store_content

    qinst = qinst_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QINST_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    work = Path(tempfile.mkdtemp(prefix="qinst-bench-", dir=args.workdir))
    try:
        served = work / "srv"
        blob = served / "image.raw"
        served.mkdir()
        print(f"writing {args.size} MiB of random data to {blob}", file=sys.stderr)
        write_random_file(blob, args.size)
        cid, sha256 = cid_and_sha256(blob)
        # The aleph API as files: the message documents by target, and storage/raw/<cid> (same inode).
        message = inline_message(store_content(cid, "ipfs"))
        for target, data in message_documents(message).items():
            path = served / target.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
        raw = served / "api/v0/storage/raw" / cid
        raw.parent.mkdir(parents=True)
        os.link(blob, raw)
        load_before = os.getloadavg()[0]
        ipfs_times: list[float] = []
        plain_times: list[float] = []
        rss: list[int] = []
        cpu: dict[str, list[float]] = {"ipfs": [], "plain": []}
        with file_server(served) as base:
            ipfs_argv = [qinst, "--aleph-api", base, "--ipfs-gateway", base]
            for i in range(args.runs):
                cache = work / f"cache-{i}"
                got = timed([*ipfs_argv, "--cache-dir", cache, "pull", f"aleph:{message['item_hash']}", "--json"], env)
                assert json.loads(got.stdout)["digest"] == f"cid:{cid}", got.stdout
                ipfs_times.append(got.seconds)
                cpu["ipfs"].append(got.cpu_seconds)
                rss.append(got.max_rss_kib)
                shutil.rmtree(cache)
                plain = timed([qinst, "--cache-dir", cache, "pull", f"{base}/image.raw", "--sha256", sha256], env)
                plain_times.append(plain.seconds)
                cpu["plain"].append(plain.cpu_seconds)
                rss.append(plain.max_rss_kib)
                shutil.rmtree(cache)
                print(f"run {i + 1}: ipfs item {got.seconds:.2f} s, plain {plain.seconds:.2f} s", file=sys.stderr)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    i, p = Summary.of(ipfs_times), Summary.of(plain_times)
    results = {
        "size_mib": args.size,
        "runs": args.runs,
        "cid": cid,
        "ipfs_item": {"seconds": ipfs_times, "median": i.median, "cpu_seconds_median": statistics.median(cpu["ipfs"])},
        "plain_sha256": {
            "seconds": plain_times,
            "median": p.median,
            "cpu_seconds_median": statistics.median(cpu["plain"]),
        },
        "peak_rss_mib": max(rss) / 1024,
        "ratio": i.median / p.median,
        "goal": {"ratio": GOAL_IPFS_RATIO, "peak_rss_mib": GOAL_RSS_MIB},
        "loadavg_1min": {"before": load_before, "after": load_after},
    }
    print(
        f"\naleph ipfs item ({cid[:12]}..., CID recomputed) vs `pull URL --sha256` of the same {args.size} MiB "
        f"from 127.0.0.1, {args.runs} alternating runs, {os.cpu_count()} CPUs, load {load_before:.1f}/{load_after:.1f}:"
        f"\nmedian {i.median:.2f} s vs {p.median:.2f} s: ratio {results['ratio']:.2f} (goal <= {GOAL_IPFS_RATIO}); "
        f"CPU {statistics.median(cpu['ipfs']):.2f} s vs {statistics.median(cpu['plain']):.2f} s; "
        f"peak RSS {results['peak_rss_mib']:.0f} MiB (goal < {GOAL_RSS_MIB})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(runs: int, blob: Path, digest: str, qinst: str, env: dict[str, str], work: Path) -> dict[str, object]:
    qinst_times: list[float] = []
    qinst_cpu: list[float] = []
    qinst_rss: list[int] = []
    curl_times: list[float] = []
    sum_times: list[float] = []
    two_step_cpu: list[float] = []
    curl_rss: list[int] = []
    with file_server(blob.parent) as base:
        url = f"{base}/{blob.name}"
        for i in range(runs):
            cache = work / f"cache-{i}"
            got = timed([qinst, "--cache-dir", cache, "pull", url, "--sha512", digest, "--json"], env)
            pulled = json.loads(got.stdout)
            assert pulled["digest"] == f"sha512:{digest}", pulled
            qinst_times.append(got.seconds)
            qinst_cpu.append(got.cpu_seconds)
            qinst_rss.append(got.max_rss_kib)
            shutil.rmtree(cache)
            print(f"run {i + 1}: qinst {got.seconds:.2f} s, {got.max_rss_kib / 1024:.0f} MiB", file=sys.stderr)

            out = work / "curl.out"
            fetched = timed(["curl", "--silent", "--show-error", "--fail", "--output", out, url], env)
            summed = timed(["sha512sum", out], env)
            assert summed.stdout.split()[0] == digest, "sha512sum disagrees with the served file"
            curl_times.append(fetched.seconds)
            sum_times.append(summed.seconds)
            two_step_cpu.append(fetched.cpu_seconds + summed.cpu_seconds)
            curl_rss.append(fetched.max_rss_kib)
            out.unlink()
            print(f"run {i + 1}: curl {fetched.seconds:.2f} s + sha512sum {summed.seconds:.2f} s", file=sys.stderr)

    two_step = [c + s for c, s in zip(curl_times, sum_times, strict=True)]
    q, t = Summary.of(qinst_times), Summary.of(two_step)
    return {
        "runs": runs,
        "qinst": {
            "seconds": qinst_times,
            "median": q.median,
            "min": q.minimum,
            "max": q.maximum,
            "peak_rss_mib": max(qinst_rss) / 1024,
            "cpu_seconds_median": statistics.median(qinst_cpu),
        },
        "two_step": {
            "seconds": two_step,
            "curl_seconds": curl_times,
            "sha512sum_seconds": sum_times,
            "median": t.median,
            "min": t.minimum,
            "max": t.maximum,
            "curl_peak_rss_mib": max(curl_rss) / 1024,
            "cpu_seconds_median": statistics.median(two_step_cpu),
        },
        "ratio": q.median / t.median,
        "goal": {"ratio": GOAL_RATIO, "peak_rss_mib": GOAL_RSS_MIB},
    }


def report(results: dict[str, object], size_mib: int) -> None:
    q = results["qinst"]
    t = results["two_step"]
    assert isinstance(q, dict) and isinstance(t, dict)
    ratio = results["ratio"]
    assert isinstance(ratio, float)
    load = results["loadavg_1min"]
    assert isinstance(load, dict)
    print(
        f"\nVerified pull of {size_mib} MiB from 127.0.0.1, {results['runs']} alternating runs each, "
        f"{os.cpu_count()} CPUs, load average {load['before']:.1f} before / {load['after']:.1f} after:\n"
    )
    print("| | median | min | max | MiB/s (median) | CPU time (median) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| `qinst pull URL --sha512 HEX` | {q['median']:.2f} s | {q['min']:.2f} s | {q['max']:.2f} s "
        f"| {size_mib / q['median']:.0f} | {q['cpu_seconds_median']:.2f} s | {q['peak_rss_mib']:.0f} MiB |"
    )
    print(
        f"| `curl -o` + `sha512sum` | {t['median']:.2f} s | {t['min']:.2f} s | {t['max']:.2f} s "
        f"| {size_mib / t['median']:.0f} | {t['cpu_seconds_median']:.2f} s | {t['curl_peak_rss_mib']:.0f} MiB (curl) |"
    )
    verdict_time = "meets" if ratio <= GOAL_RATIO else "misses"
    verdict_rss = "meets" if q["peak_rss_mib"] < GOAL_RSS_MIB else "misses"
    print(
        f"\nratio qinst / two-step: {ratio:.2f} ({verdict_time} the goal of <= {GOAL_RATIO}); "
        f"qinst peak RSS {q['peak_rss_mib']:.0f} MiB ({verdict_rss} the goal of < {GOAL_RSS_MIB} MiB)"
    )


if __name__ == "__main__":
    main()
