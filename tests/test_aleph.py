"""aleph.im items through the real `qinst` entry point, against the API double (testsupport/aleph.py) on 127.0.0.1.

The hash asked for pins the message (sha256 of item_content, or the CID of stored content), the message pins the
file (sha256 for storage items, a CID recomputed while downloading for ipfs items), and nothing else the API says
is believed: each hostile answer fails closed, exit 3, nothing cached, the reason in one line.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst
from mirror import Mirror

from qemu_instances.cid import Cid
from qemu_instances.unixfs import CHUNK_SIZE, MAX_LINKS
from testsupport.aleph import (
    AlephDouble,
    gateway_target,
    inline_message,
    messages_target,
    raw_target,
    status_target,
    store_content,
)

pytestmark = pytest.mark.http


def pull(qinst: RunQinst, mirror: Mirror, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return qinst(*mirror.args(cache), "pull", *args, timeout=120)


def pulled(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def refused(proc: subprocess.CompletedProcess[str], code: int = 3) -> str:
    """A clean one-line error with `code`."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("qinst: ")
    assert proc.stdout == ""
    return proc.stderr


def cache_files(cache: Path) -> list[str]:
    """What the cache holds besides lock files (empty after a refusal: no image, no record, no .part)."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def targets(mirror: Mirror) -> list[str]:
    return [h.target for h in mirror.server.hits()]


def raw_image(size: int, seed: int) -> bytes:
    """Bytes qemu-img takes as a raw image (random data has no other format's magic)."""
    return random.Random(seed).randbytes(size)


# -- good paths --


@pytest.mark.parametrize("by_name", [True, False])
def test_storage_item(qinst: RunQinst, mirror: Mirror, tmp_path: Path, by_name: bool) -> None:
    args = ["debian-12", "--source", "aleph"] if by_name else [f"aleph:{mirror.aleph_item}"]
    data = pulled(pull(qinst, mirror, tmp_path / "cache", *args, "--json"))
    assert data["source"] == "aleph-storage"
    assert data["digest"] == mirror.images.pinned.sha256  # the sha256 pin named by the verified message
    assert Path(str(data["path"])).read_bytes() == mirror.images.pinned.data
    assert targets(mirror) == [messages_target(mirror.aleph_item), raw_target(mirror.images.pinned.sha256_hex)]


def test_ipfs_item_cidv0_from_storage_raw(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = pulled(pull(qinst, mirror, cache, "ubuntu-22.04", "--source", "aleph", "--json"))
    assert mirror.aleph_cid.startswith("Qm")
    assert (data["source"], data["digest"]) == ("aleph-ipfs", f"cid:{mirror.aleph_cid}")
    assert Path(str(data["path"])).read_bytes() == mirror.images.ubuntu.data
    assert targets(mirror) == [messages_target(mirror.aleph_ipfs_item), raw_target(mirror.aleph_cid)]
    # `images` tells that the cached copy is aleph's (its own pin), not the upstream file.
    rows = json.loads(qinst(*mirror.args(cache), "images", "--json").stdout)
    ubuntu = next(r for r in rows if r["name"] == "ubuntu-22.04")
    assert (ubuntu["cached"], ubuntu["source"], ubuntu["path"]) == (True, "aleph-ipfs", data["path"])
    table = qinst(*mirror.args(cache), "images").stdout
    assert "(aleph-ipfs)" in next(line for line in table.splitlines() if line.startswith("ubuntu-22.04"))


@pytest.mark.parametrize(
    ("size", "version", "prefix"),
    [
        (1000, 1, "bafk"),  # one chunk with raw leaves: the file is a raw block
        (3 * CHUNK_SIZE + 5, 1, "bafy"),
        (CHUNK_SIZE, 0, "Qm"),
        (MAX_LINKS * CHUNK_SIZE + CHUNK_SIZE // 2, 0, "Qm"),  # 45.7 MiB: a two-level tree
        (MAX_LINKS * CHUNK_SIZE + CHUNK_SIZE // 2, 1, "bafy"),
    ],
)
def test_ipfs_items(qinst: RunQinst, mirror: Mirror, tmp_path: Path, size: int, version: int, prefix: str) -> None:
    body = raw_image(size, seed=size + version)
    item, cid = mirror.aleph.store(body, item_type="ipfs", version=version)
    assert cid.startswith(prefix)
    data = pulled(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}", "--json"))
    assert (data["source"], data["digest"], data["size"]) == ("aleph-ipfs", f"cid:{cid}", size)
    assert hashlib.sha256(Path(str(data["path"])).read_bytes()).digest() == hashlib.sha256(body).digest()


@pytest.mark.parametrize("storage", ["413", "404"])
def test_gateway_fallback(qinst: RunQinst, mirror: Mirror, tmp_path: Path, storage: str) -> None:
    body = raw_image(2 << 20, seed=7)
    if storage == "413":
        double = AlephDouble(mirror.server, raw_limit=1 << 20)  # an old node: 413 above its limit
        item, cid = double.store(body, item_type="ipfs", version=1)
    else:
        item, cid = mirror.aleph.store(body, item_type="ipfs", version=1, raw=False)  # not on this node
    data = pulled(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}", "--json"))
    assert data["source"] == "aleph-ipfs"
    assert Path(str(data["path"])).read_bytes() == body
    assert targets(mirror) == [messages_target(item), raw_target(cid), gateway_target(cid)]
    assert [h.status for h in mirror.server.hits(raw_target(cid))] == [int(storage)]


@pytest.mark.parametrize("kind", ["ipfs", "storage"])
def test_message_stored_off_chain(qinst: RunQinst, mirror: Mirror, tmp_path: Path, kind: str) -> None:
    # A message whose content is kept off-chain: its hash is the CID (ipfs) or the sha256 (storage) of that content,
    # which qinst fetches and recomputes before reading it.
    from testsupport.aleph import file_cid

    content = json.dumps(store_content(mirror.images.pinned.sha256_hex, "storage")).encode()
    item = file_cid(content, 0) if kind == "ipfs" else hashlib.sha256(content).hexdigest()
    message = {**inline_message({}), "item_hash": item, "item_type": kind, "item_content": None, "content": {}}
    mirror.aleph.add_message(message)
    mirror.server.add(raw_target(item), content)
    data = pulled(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}", "--json"))
    assert (data["source"], data["digest"]) == ("aleph-storage", mirror.images.pinned.sha256)
    assert targets(mirror) == [messages_target(item), raw_target(item), raw_target(mirror.images.pinned.sha256_hex)]


def test_message_stored_off_chain_with_other_content(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    content = json.dumps(store_content(mirror.images.pinned.sha256_hex, "storage")).encode()
    item = hashlib.sha256(content).hexdigest()
    mirror.aleph.add_message({**inline_message({}), "item_hash": item, "item_type": "storage", "item_content": None})
    mirror.server.add(raw_target(item), content.replace(b"1700000000", b"1700000001"))
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}"))
    assert f"aleph message {item} does not match its hash: its stored content hashes to" in stderr
    assert raw_target(mirror.images.pinned.sha256_hex) not in targets(mirror)


def test_forged_content_field_is_ignored(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    # The API's parsed `content` names another file than the hashed item_content: only item_content counts.
    message = inline_message(store_content(mirror.images.pinned.sha256_hex, "storage"))
    message["content"] = store_content(mirror.images.latest.sha256_hex, "storage")
    mirror.server.add(raw_target(mirror.images.latest.sha256_hex), mirror.images.latest.data)
    item = mirror.aleph.add_message(message)
    data = pulled(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}", "--json"))
    assert data["digest"] == mirror.images.pinned.sha256
    assert raw_target(mirror.images.latest.sha256_hex) not in targets(mirror)


def test_storage_raw_cannot_resume_restarts_and_says_so(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    target = raw_target(mirror.images.pinned.sha256_hex)
    mirror.server.fault(target, ignore_range=True, cut_after=1 << 20)  # cut once, then whole bodies, Range or not
    proc = pull(qinst, mirror, tmp_path / "cache", f"aleph:{mirror.aleph_item}", "--json")
    assert pulled(proc)["digest"] == mirror.images.pinned.sha256
    warning = f"{mirror.url}{target} cannot resume a download (it ignores Range); downloading it again from the start"
    assert warning in proc.stderr
    hits = mirror.server.hits(target)
    assert [(h.status, h.range is not None) for h in hits] == [(200, False), (200, True)]
    assert all(h.headers.get("Accept-Encoding") == "identity" for h in hits)


def test_gateway_resumes_with_range(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    body = raw_image(3 << 20, seed=11)
    item, cid = mirror.aleph.store(body, item_type="ipfs", version=0, raw=False)
    mirror.server.fault(gateway_target(cid), cut_after=(1 << 20) + 12345)  # mid-chunk: the CID must still add up
    data = pulled(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}", "--json"))
    assert data["digest"] == f"cid:{cid}"
    hits = mirror.server.hits(gateway_target(cid))
    assert [(h.status, h.range) for h in hits] == [(200, None), (206, f"bytes={(1 << 20) + 12345}-")]


def test_resume_of_a_partial_file_rehashes_its_prefix(mirror: Mirror, tmp_path: Path) -> None:
    # A pull interrupted earlier left a .part: the CID is computed over its bytes, then over the rest.
    from qemu_instances.digests import Algorithm, Digest
    from qemu_instances.download import RetryPolicy, download_verified, new_session

    body = raw_image(2 * CHUNK_SIZE + 3, seed=12)
    _, cid = mirror.aleph.store(body, item_type="ipfs", version=1, raw=False)
    dest = tmp_path / "out"
    (tmp_path / ".out.part").write_bytes(body[: CHUNK_SIZE + 100])
    url = mirror.url + gateway_target(cid)
    size = download_verified(url, dest, Digest(Algorithm.CID, cid), session=new_session(), policy=RetryPolicy())
    assert size == len(body) and dest.read_bytes() == body
    assert [h.range for h in mirror.server.hits(gateway_target(cid))] == [f"bytes={CHUNK_SIZE + 100}-"]


# -- hostile and broken answers --


def test_cid_mismatch_caches_nothing(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.add(raw_target(mirror.aleph_cid), mirror.images.latest.data)  # other bytes under the CID
    cache = tmp_path / "cache"
    stderr = refused(pull(qinst, mirror, cache, "ubuntu-22.04", "--source", "aleph"))
    assert f"CID mismatch for {mirror.url}{raw_target(mirror.aleph_cid)}: expected {mirror.aleph_cid}" in stderr
    assert "Kubo's defaults" in stderr
    assert cache_files(cache) == []  # no image, no record, no .part
    assert gateway_target(mirror.aleph_cid) not in targets(mirror)  # a mismatch is not a reason to try elsewhere


def test_item_hash_is_not_the_hash_of_item_content(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    honest = inline_message(store_content(mirror.images.pinned.sha256_hex, "storage"))
    forged = inline_message(store_content(mirror.images.latest.sha256_hex, "storage"))
    item = honest["item_hash"]
    mirror.aleph.add_message({**forged, "item_hash": item}, item_hash=item)  # the API swapped the content
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}"))
    assert f"aleph message {item} does not match its hash: its item_content hashes to {forged['item_hash']}" in stderr
    assert targets(mirror) == [messages_target(item)]


ITEM = "7" * 64


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda a: a.forgotten(ITEM, "f" * 64), f"aleph message {ITEM} was forgotten (its content deleted) by FORGET"),
        (lambda a: a.pending(ITEM), f"aleph message {ITEM} is pending (received, not processed yet)"),
        (lambda a: a.rejected(ITEM, "invalid signature"), f"{ITEM} was rejected by the network: invalid signature"),
        (lambda a: a.unknown(ITEM), f"aleph message {ITEM} not found at http://127.0.0.1:"),
    ],
)
def test_unresolvable_messages_say_why(
    qinst: RunQinst, mirror: Mirror, tmp_path: Path, setup: object, needle: str
) -> None:
    setup(mirror.aleph)  # type: ignore[operator]
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{ITEM}"))
    assert needle in stderr
    if "forgotten" in needle:
        assert "f" * 64 in stderr
    assert targets(mirror) == [messages_target(ITEM), status_target(ITEM)]
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (inline_message({"address": "0x1", "time": 1.0, "type": "amend", "content": {}}, type="POST"), "is a POST"),
        # The envelope says STORE but the hashed content is a POST's: not a STORE.
        (inline_message({"address": "0x1", "time": 1.0, "type": "amend", "content": {}}), "is not a STORE"),
        (inline_message(store_content("8" * 64, "inline")), "is not a STORE"),
        (inline_message(store_content("Qm123", "storage")), "is not a sha256"),
        (inline_message(store_content("Qm123", "ipfs")), "invalid CID"),
        (inline_message({}, item_content="[1, 2]"), "not a JSON object"),
        (inline_message({}, item_content="{"), "not JSON"),
    ],
)
def test_bad_messages(qinst: RunQinst, mirror: Mirror, tmp_path: Path, message: dict[str, object], needle: str) -> None:
    item = mirror.aleph.add_message(message)
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}"))
    assert needle in stderr
    assert not [t for t in targets(mirror) if "/storage/raw/" in t or "/ipfs/" in t]


def test_cid_qinst_cannot_recompute_is_refused_before_downloading(
    qinst: RunQinst, mirror: Mirror, tmp_path: Path
) -> None:
    sha512_cid = str(Cid(1, 0x70, 0x13, bytes(64)))
    item = mirror.aleph.add_message(inline_message(store_content(sha512_cid, "ipfs")))
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{item}"))
    assert f"cannot verify IPFS content {sha512_cid}: it is a CIDv1 dag-pb sha2-512" in stderr
    assert targets(mirror) == [messages_target(item)]


def test_an_api_that_ignores_the_filter(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    other = inline_message(store_content(mirror.images.latest.sha256_hex, "storage"))
    mirror.server.add_json(messages_target(ITEM), {"messages": [other]})
    stderr = refused(pull(qinst, mirror, tmp_path / "cache", f"aleph:{ITEM}"))
    assert f"aleph message {ITEM} not found" in stderr  # the other message is not taken


@pytest.mark.parametrize(
    ("option", "url"),
    [
        ("--aleph-api", "http://api2.aleph.im"),
        ("--aleph-api", "http://10.0.0.1:4024"),
        ("--ipfs-gateway", "http://ipfs.aleph.im"),
        ("--aleph-api", "ftp://127.0.0.1"),
    ],
)
def test_plain_http_only_on_loopback(qinst: RunQinst, mirror: Mirror, tmp_path: Path, option: str, url: str) -> None:
    proc = qinst(*mirror.args(tmp_path / "cache"), option, url, "pull", f"aleph:{mirror.aleph_item}")
    stderr = refused(proc, 2)
    assert f"{url!r} must be an https:// URL (plain http only on a loopback host)" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert targets(mirror) == []


def test_bad_message_hash_is_a_usage_error(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "pull", "aleph:Qm" + "0" * 44)
    assert "invalid aleph item hash" in refused(proc, 2)
