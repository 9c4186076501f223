"""Property-based tests (Hypothesis) for every parser and validator of untrusted or user-given text.

One property each: the result is a value, or a QinstError with the exit code documented for that input
(2 usage, 3 image/catalog/config), never another exception. Small example counts keep the file under a minute.
Nothing is written outside tmp_path; the aleph API is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import stat
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from httpserver import HTTPServer, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_instances import aleph
from qemu_instances.catalog import parse_catalog
from qemu_instances.checks import cloud_init_status
from qemu_instances.config import load_hosts
from qemu_instances.digests import Algorithm, Digest, parse_checksums
from qemu_instances.domain import Network, metadata_from_domain_xml, validate_name
from qemu_instances.download import RetryPolicy
from qemu_instances.errors import QinstError
from qemu_instances.images import check_format
from qemu_instances.seed import (
    SeedSpec,
    render_network_config,
    render_user_data,
    validate_hostname,
    validate_instance_id,
    validate_user,
)
from qemu_instances.sshkeys import parse_public_key
from qemu_instances.validate import seconds
from qemu_instances.wait import CLOUD_INIT_FAILED, host_keys

# Hypothesis caches what it learns from the code under test; not in the working tree (read when tests are collected).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="qinst-hypothesis-"))
T = TypeVar("T")
FAST = settings(
    max_examples=200, database=None, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SLOW = settings(
    max_examples=60, database=None, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

USAGE, IMAGE = 2, 3

# Text that looks like the real thing more often than uniform noise would.
words = st.sampled_from(
    ["ssh-ed25519", "ssh-rsa", "#cloud-config", "#!", "sha512", "qcow2", "[images.x]", "url", "=", '"', "\n", " ",
     "\x00", "\xff", "\u202e", "-----BEGIN SSH HOST KEY KEYS-----", "-----END SSH HOST KEY KEYS-----", "AAAA", "{", "}"]
)  # fmt: skip
texts = st.one_of(st.text(max_size=300), st.lists(st.one_of(words, st.text(max_size=12)), max_size=40).map("".join))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=20)
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def outcome(call: Callable[[], T], *codes: int) -> T | QinstError:
    """call's value, or the QinstError it raised, whose exit code must be one of `codes`."""
    try:
        return call()
    except QinstError as exc:
        assert exc.exit_code in codes, f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
        assert exc.message.strip(), "an error without a message"
        return exc


# --- names and other one-line values ---------------------------------------------------------------------------


@FAST
@given(texts)
def test_names_hostnames_users_instance_ids(text: str) -> None:
    for check in (validate_name, validate_hostname, validate_user, validate_instance_id):
        value = outcome(lambda check=check: check(text), USAGE)  # type: ignore[misc]
        if isinstance(value, str):
            assert value.isascii() and "\n" not in value and value.lower() == text.lower()


@FAST
@given(texts)
def test_network_option(text: str) -> None:
    outcome(lambda: Network.parse(text), USAGE)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_seconds(value: float) -> None:
    result = outcome(lambda: seconds(value, "--timeout"), USAGE)
    if isinstance(result, float):
        assert 0 < result < float("inf")


@FAST
@given(texts)
def test_digest_text(text: str) -> None:
    outcome(lambda: Digest.parse(text), IMAGE)


# --- files: catalogs, checksum files, config, SSH keys ---------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


CATALOG_KEYS = ["url", "digest", "title", "os", "release", "arch", "format", "aliases", "default_user",
                "checksums_url", "latest_url", "aleph_item_hash", "size", "bogus"]  # fmt: skip
catalog_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["https://example.invalid/x.qcow2", "sha512:" + "a" * 128, "sha256:" + "0" * 64, "qcow2",
                     "debian", "amd64", "root", "cloud"]),
    st.integers(), st.booleans(), st.lists(st.text(max_size=10), max_size=3),
)  # fmt: skip


@FAST
@given(
    st.dictionaries(
        st.text(alphabet=string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=12),
        st.dictionaries(st.sampled_from(CATALOG_KEYS), catalog_values, max_size=8),
        max_size=3,
    )
)
def test_catalog_entries(images: dict[str, dict[str, Any]]) -> None:
    text = "".join(
        f'[images."{name}"]\n' + "".join(f"{key} = {_toml_value(v)}\n" for key, v in entry.items())
        for name, entry in images.items()
    )
    outcome(lambda: parse_catalog(text, "generated.toml"), IMAGE)


@FAST
@given(texts)
def test_catalog_text(text: str) -> None:
    outcome(lambda: parse_catalog(text, "generated.toml"), IMAGE)


hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=60, max_size=130)
sums_lines = st.lists(
    st.one_of(st.tuples(hexes, st.sampled_from(["  ", " *", " "]), texts).map("".join), texts), max_size=8
).map("\n".join)


@FAST
@given(sums_lines, st.sampled_from([Algorithm.SHA256, Algorithm.SHA512]))
def test_checksum_files(text: str, algorithm: Algorithm) -> None:
    sums = parse_checksums(text, algorithm)  # never an error: lines it cannot read are skipped
    assert all(d.algorithm is algorithm and len(d.hex) == algorithm.hex_length for d in sums.values())


@FAST
@given(st.one_of(texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=200)))
def test_config_file(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "config.toml").write_bytes(data)
    hosts = outcome(lambda: load_hosts(tmp_path), IMAGE)
    if isinstance(hosts, dict):
        assert all(isinstance(uri, str) for uri in hosts.values())


KEY_BODY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@FAST
@given(st.one_of(texts, st.tuples(words, st.just(" "), st.sampled_from([KEY_BODY, KEY_BODY[:-4], "AAAA"]), texts)
                 .map("".join)))  # fmt: skip
def test_ssh_public_keys(text: str) -> None:
    line = outcome(lambda: parse_public_key(text, "key.pub"), USAGE)
    if isinstance(line, str):
        assert "\n" not in line and "\r" not in line


# --- what a guest or libvirt hands back ------------------------------------------------------------------------


@FAST
@given(texts)
def test_host_key_lines_from_the_console(text: str) -> None:
    keys = host_keys(text)  # never an error
    assert all(" " not in kind and "\n" not in body for kind, body in keys)
    list(CLOUD_INIT_FAILED.finditer(text))


METADATA_FIELDS = ["image", "digest", "user", "network", "ssh-host", "ssh-port", "created", "instance-id",
                   "private-key", "host-keys", "console-log", "accel"]  # fmt: skip


@FAST
@given(st.dictionaries(st.sampled_from(METADATA_FIELDS), st.text(max_size=30), max_size=8))
def test_metadata_xml(values: dict[str, str]) -> None:
    import xml.etree.ElementTree as ET

    root = ET.Element("domain")
    meta = ET.SubElement(ET.SubElement(root, "metadata"), "{http://qinst.invalid/xmlns/instance/1}instance")
    for key, value in values.items():
        ET.SubElement(meta, f"{{http://qinst.invalid/xmlns/instance/1}}{key}").text = "".join(
            c for c in value if c in "\t\n\r" or " " <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
        )
    outcome(lambda: metadata_from_domain_xml(ET.tostring(root, encoding="unicode")), USAGE, IMAGE)


# --- user data and network-config ------------------------------------------------------------------------------

user_data = st.one_of(
    st.binary(max_size=200),
    st.tuples(
        st.sampled_from(["#cloud-config\n", "#!/bin/sh\n", "#include\n", "#cloud-boothook\n",
                         "Content-Type: multipart/mixed; boundary=b\nMIME-Version: 1.0\n\n--b\n", ""]),
        texts,
    ).map(lambda parts: (parts[0] + parts[1]).encode("utf-8", "surrogatepass")),
)  # fmt: skip


@SLOW
@given(user_data)
def test_user_data(data: bytes) -> None:
    spec = SeedSpec(hostname="h", instance_id="i-1", user="cloud", ssh_keys=(), user_data=data, user_data_source="u")
    rendered = outcome(lambda: render_user_data(spec), USAGE)
    if isinstance(rendered, bytes):
        assert rendered.startswith((b"#cloud-config\n", b"Content-Type: multipart/mixed"))


@SLOW
@given(st.one_of(st.binary(max_size=100), texts.map(lambda t: ("network:\n  " + t).encode("utf-8", "surrogatepass"))))
def test_network_config(data: bytes) -> None:
    spec = SeedSpec(hostname="h", instance_id="i-1", user="cloud", ssh_keys=(), network_config=data)
    outcome(lambda: render_network_config(spec), USAGE)


# --- qemu-img's JSON (a stand-in qemu-img on PATH prints the generated answer) ---------------------------------


@pytest.fixture
def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "answer.json"
    script = bin_dir / "qemu-img"
    script.write_text(f"#!/bin/sh\ncat {answer}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return answer


@SLOW
@given(
    st.one_of(
        json_values.map(json.dumps),
        st.fixed_dictionaries(
            {"format": st.sampled_from(["qcow2", "raw", "vmdk", 5, None])},
            optional={"virtual-size": scalars, "backing-filename": scalars},
        ).map(lambda d: json.dumps(d, default=repr)),
        texts,
    )
)
def test_qemu_img_json(fake_qemu_img: Path, tmp_path: Path, answer: str) -> None:
    fake_qemu_img.write_text(answer, encoding="utf-8", errors="surrogatepass")
    fmt = outcome(lambda: check_format(tmp_path / "disk", None, "disk"), IMAGE)
    if isinstance(fmt, str):
        assert fmt in ("qcow2", "raw")


# --- the aleph API's JSON, served on 127.0.0.1 -----------------------------------------------------------------

ITEM = "a" * 64


@pytest.fixture(scope="module")
def aleph_api() -> Iterator[HTTPServer]:
    with serving() as server:
        yield server


message = st.fixed_dictionaries(
    {},
    optional={
        "item_hash": st.sampled_from([ITEM, "b" * 64, 5]),
        "type": st.sampled_from(["STORE", "POST", None]),
        "content": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "item_hash": st.sampled_from(["c" * 64, "xyz", None, 7]),
                    "item_type": st.sampled_from(["storage", "ipfs", None, 1]),
                },
            ),
        ),
    },
)


@SLOW
@given(st.one_of(json_values, st.fixed_dictionaries({"messages": st.one_of(json_values, st.lists(message))})))
def test_aleph_answers(aleph_api: HTTPServer, answer: Any) -> None:
    aleph_api.add(f"/api/v0/messages.json?hashes={ITEM}", json.dumps(answer).encode(), "application/json")
    policy = RetryPolicy(attempts=1, timeout=(5.0, 5.0))
    with requests.Session() as session:
        found = outcome(lambda: aleph.resolve(ITEM, api=aleph_api.url, session=session, policy=policy), IMAGE, USAGE)
    if isinstance(found, aleph.AlephFile):
        assert found.url.startswith(aleph_api.url) and found.digest.hex == "c" * 64


@given(
    st.one_of(texts, json_values.map(lambda v: json.dumps({"v1": v}))), st.one_of(texts, json_values.map(json.dumps))
)
def test_cloud_init_status_files(status: str, result: str) -> None:
    done, seen = cloud_init_status(status, result)
    assert isinstance(done, bool) and done == (seen == "") and len(seen) < 2000
