"""Tests for qemu_instances.seed: cloud-init data from templates and the NoCloud ISO built with pycdlib."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pycdlib
import pycdlib.pycdlib
import pytest
import yaml

from qemu_instances import seed
from qemu_instances.errors import UsageError
from qemu_instances.seed import SeedSpec


def make_key(key_type: str = "ssh-ed25519", comment: str = "alice@laptop") -> str:
    """A well-formed public key line: the blob starts with the key type, as OpenSSH's do."""
    blob = b"".join(struct.pack(">I", len(f)) + f for f in (key_type.encode(), bytes(range(32))))
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}"


KEY = make_key()


def make_spec(**changes: Any) -> SeedSpec:
    spec = SeedSpec(hostname="web-1", instance_id="i-0123456789abcdef", user="debian", ssh_keys=(KEY,))
    return dataclasses.replace(spec, **changes)


def user_data_of(spec: SeedSpec) -> dict[str, Any]:
    data = seed.render_user_data(spec)
    assert data.startswith(b"#cloud-config\n")
    loaded: dict[str, Any] = yaml.safe_load(data)
    return loaded


def read_iso(iso_bytes: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(iso_bytes))
    return iso


def iso_file(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed (CI installs it)")


# --- the base cloud-config and meta-data ---------------------------------------------------------------


def test_base_cloud_config_has_the_user_keys_and_safe_defaults() -> None:
    config = user_data_of(make_spec())
    assert config["hostname"] == "web-1"
    assert config["fqdn"] == "web-1"
    [user] = config["users"]
    assert user["name"] == "debian"
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [KEY]
    assert config["ssh_pwauth"] is False
    assert config["disable_root"] is True
    assert config["growpart"] == {"mode": "auto", "devices": ["/"]}
    assert config["resize_rootfs"] is True
    assert config["package_update"] is False
    assert config["package_upgrade"] is False


def test_meta_data_holds_instance_id_and_hostname() -> None:
    meta = yaml.safe_load(seed.render_meta_data(make_spec()))
    assert meta == {"instance-id": "i-0123456789abcdef", "local-hostname": "web-1"}


def test_new_instance_ids_are_fresh_tokens() -> None:
    ids = {seed.new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    for instance_id in ids:
        assert instance_id.startswith("i-") and len(instance_id) == 18
        assert seed.validate_instance_id(instance_id) == instance_id


@pytest.mark.parametrize("name", ["user-data", "meta-data", "network-config", "smoke"])
def test_templates_ship_as_mappings_and_load_as_fresh_copies(name: str) -> None:
    first = seed.load_template(name)
    assert isinstance(first, dict) and first
    first.clear()
    assert seed.load_template(name), "a caller's change must not leak into the next load"


def test_smoke_template_writes_the_marker_with_the_instance_id() -> None:
    config = seed.cloud_config(make_spec(extra_config=seed.load_template("smoke")))
    [command] = config["runcmd"]
    assert command[-2:] == ["/var/lib/cloud/data/instance-id", "/var/lib/qinst/smoke-marker"]
    assert config["users"][0]["name"] == "debian", "the smoke config adds to the base, it does not replace it"


def test_default_network_config_is_v2_dhcp_on_en_interfaces() -> None:
    config = yaml.safe_load(seed.default_network_config())
    assert config["version"] == 2
    [ethernet] = config["ethernets"].values()
    assert ethernet["match"] == {"name": "en*"}
    assert ethernet["dhcp4"] is True


# --- merging the user's data -----------------------------------------------------------------------------


def test_merge_appends_lists_merges_mappings_and_overlay_scalars_win() -> None:
    base = {"runcmd": ["one"], "growpart": {"mode": "auto", "devices": ["/"]}, "package_update": False}
    overlay = {"runcmd": ["two"], "growpart": {"mode": "off"}, "package_update": True, "packages": ["jq"]}
    merged = seed.merge_cloud_config(base, overlay)
    assert merged == {
        "runcmd": ["one", "two"],
        "growpart": {"mode": "off", "devices": ["/"]},
        "package_update": True,
        "packages": ["jq"],
    }
    assert base["runcmd"] == ["one"] and overlay["runcmd"] == ["two"], "inputs are left untouched"


def test_user_cloud_config_is_merged_over_the_template() -> None:
    user_data = textwrap.dedent("""\
        #cloud-config
        package_update: true
        runcmd:
          - echo user
        users:
          - name: bob
        ssh_authorized_keys:
          - ssh-ed25519 AAAA bob
        """).encode()
    spec = make_spec(extra_config=seed.load_template("smoke"), user_data=user_data, user_data_source="u.yaml")
    config = user_data_of(spec)
    assert config["package_update"] is True, "the user's scalar wins"
    assert config["package_upgrade"] is False, "what the user did not set stays"
    assert config["runcmd"][0][0] == "install", "the smoke runcmd comes first..."
    assert config["runcmd"][1] == "echo user", "...and the user's is appended"
    assert [u["name"] for u in config["users"]] == ["debian", "bob"]
    assert config["ssh_authorized_keys"] == ["ssh-ed25519 AAAA bob"]


def test_user_hostname_carries_the_fqdn_with_it() -> None:
    config = user_data_of(make_spec(user_data=b"#cloud-config\nhostname: db\n"))
    assert (config["hostname"], config["fqdn"]) == ("db", "db")


def test_values_with_quotes_colons_and_hashes_survive_byte_for_byte() -> None:
    tricky = [
        'it\'s "quoted": yes # not a comment',
        "key: value",
        "#leading hash",
        "- looks like a list",
        "{looks: like a map}",
        "trailing space ",
        "multi\nline: # text\n  indented",
        "ünïcödé ✓",
        "yes",
        "0755",
        "",
    ]
    user = {"write_files": [{"path": f"/tmp/f{i}", "content": value} for i, value in enumerate(tricky)]}
    user_data = b"#cloud-config\n" + yaml.safe_dump(user, allow_unicode=True).encode()
    comment = 'o\'neil: "home" #1'
    config = user_data_of(make_spec(user_data=user_data, ssh_keys=(make_key(comment=comment),)))
    assert [f["content"] for f in config["write_files"]] == tricky
    assert config["users"][0]["ssh_authorized_keys"][0].endswith(" " + comment)


def test_empty_cloud_config_leaves_the_template() -> None:
    assert user_data_of(make_spec(user_data=b"#cloud-config\n")) == user_data_of(make_spec())


def test_a_shell_script_becomes_a_multipart_with_our_cloud_config() -> None:
    script = b"#!/bin/sh\necho 'hello: #world'\n"
    data = seed.render_user_data(make_spec(user_data=script, user_data_source="/srv/setup.sh"))
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/mixed"
    theirs, ours = message.get_payload()
    assert theirs.get_content_type() == "text/x-shellscript"
    assert theirs.get_filename() == "setup.sh"
    assert theirs.get_payload(decode=True) == script
    assert ours.get_content_type() == "text/cloud-config"
    assert ours["Merge-Type"] == seed.OUR_PART_MERGE_TYPE
    assert yaml.safe_load(ours.get_payload(decode=True)) == seed.cloud_config(make_spec())


@pytest.mark.parametrize(
    ("first_line", "mime_type"),
    [
        ("#include", "text/x-include-url"),
        ("#cloud-boothook", "text/cloud-boothook"),
        ("#!/bin/bash", "text/x-shellscript"),
    ],
)
def test_other_formats_get_their_documented_mime_type(first_line: str, mime_type: str) -> None:
    body = f"{first_line}\nhttps://example.invalid/x ünï\n".encode()
    data = seed.render_user_data(make_spec(user_data=body))
    theirs, ours = email.message_from_bytes(data).get_payload()
    assert theirs.get_content_type() == mime_type
    assert theirs.get_payload(decode=True) == body
    assert ours.get_content_type() == "text/cloud-config"


USER_MULTIPART = textwrap.dedent("""\
    Content-Type: multipart/mixed; boundary="USERBOUNDARY"
    MIME-Version: 1.0

    --USERBOUNDARY
    Content-Type: text/cloud-config; charset="us-ascii"

    #cloud-config
    hostname: from-user
    runcmd:
      - echo user
    users:
      - name: bob

    --USERBOUNDARY
    Content-Type: text/x-shellscript; charset="us-ascii"
    Content-Disposition: attachment; filename="go.sh"

    #!/bin/sh
    echo go
    --USERBOUNDARY--
    """).encode()


def test_a_user_multipart_keeps_its_parts_and_ours_comes_last() -> None:
    data = seed.render_user_data(make_spec(user_data=USER_MULTIPART, extra_config=seed.load_template("smoke")))
    parts = email.message_from_bytes(data).get_payload()
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript", "text/cloud-config"]
    assert b"hostname: from-user" in parts[0].get_payload(decode=True)
    assert parts[1].get_filename() == "go.sh"
    assert parts[1].get_payload(decode=True) == b"#!/bin/sh\necho go"
    assert parts[2]["Merge-Type"] == seed.OUR_PART_MERGE_TYPE


def test_the_multipart_is_reproducible() -> None:
    """The same bytes in another interpreter (another hash seed, another random state), not only twice here."""
    spec = make_spec(user_data=USER_MULTIPART)
    here = seed.render_user_data(spec)
    assert here.count(b"--") >= 4  # a multipart, with its boundary
    code = (
        "import sys; from test_seed import *; "
        "sys.stdout.buffer.write(seed.render_user_data(make_spec(user_data=USER_MULTIPART)))"
    )
    for hash_seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout  # fmt: skip
        assert other == here


# cloud-init's own handler merges the cloud-config parts of a multipart: our part must neither override the
# user's values nor drop their list items. Runs under the system python, where Debian's cloud-init lives.
CLOUD_INIT_MERGE = """
import json, sys, tempfile
from cloudinit import handlers, helpers, user_data
from cloudinit.handlers.cloud_config import CloudConfigPartHandler

paths = helpers.Paths({"cloud_dir": tempfile.mkdtemp()})
message = user_data.UserDataProcessor(paths).process(sys.stdin.buffer.read())
handler = CloudConfigPartHandler(paths)
handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
for part in message.walk():
    if part.get_content_type() == "text/cloud-config":
        payload = part.get_payload(decode=True).decode()
        handler.handle_part(None, "text/cloud-config", part.get_filename(), payload, "once-per-instance", dict(part))
json.dump(handler.cloud_buf, sys.stdout)
"""


def cloud_init_python() -> str | None:
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        return None
    probe = subprocess.run([python, "-c", "import cloudinit"], capture_output=True, check=False)
    return python if probe.returncode == 0 else None


def test_cloud_init_merges_a_user_multipart_with_the_user_winning() -> None:
    python = cloud_init_python()
    if python is None:
        pytest.skip("Debian's cloud-init (python3-cloudinit) is not installed (CI installs it)")
    data = seed.render_user_data(make_spec(user_data=USER_MULTIPART, extra_config=seed.load_template("smoke")))
    proc = subprocess.run([python, "-c", CLOUD_INIT_MERGE], input=data, capture_output=True, check=True)
    merged = json.loads(proc.stdout)
    assert merged["hostname"] == "from-user", "the user's scalar wins"
    assert merged["runcmd"][0] == "echo user"
    assert merged["runcmd"][1][-1] == "/var/lib/qinst/smoke-marker", "our list items are appended"
    assert [u["name"] for u in merged["users"]] == ["bob", "debian"]
    assert merged["users"][1]["ssh_authorized_keys"] == [KEY]
    assert merged["ssh_pwauth"] is False, "what the user did not set comes from our part"


# --- validation with cloud-init's own schema -------------------------------------------------------------


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
    )


@needs("cloud-init")
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"extra_config": seed.load_template("smoke")},
        {"user_data": b"#cloud-config\npackages: [jq]\nruncmd: [[touch, /x]]\nwrite_files: [{path: /y, content: z}]\n"},
        {"ssh_keys": ()},
    ],
    ids=["base", "smoke", "merged", "no-keys"],
)
def test_generated_user_data_passes_cloud_init_schema(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = tmp_path / "user-data"
    path.write_bytes(seed.render_user_data(make_spec(**changes)))
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


@needs("cloud-init")
def test_our_part_of_a_multipart_passes_cloud_init_schema(tmp_path: Path) -> None:
    data = seed.render_user_data(make_spec(user_data=b"#!/bin/sh\ntrue\n"))
    ours = email.message_from_bytes(data).get_payload()[-1]
    path = tmp_path / "ours.yaml"
    path.write_bytes(ours.get_payload(decode=True))
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs("cloud-init")
def test_the_schema_check_used_here_does_reject_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_text("#cloud-config\nusers: 3\n")
    assert cloud_init_schema(path).returncode != 0


# --- refusing bad input -----------------------------------------------------------------------------------


def test_invalid_yaml_names_the_file_line_and_column() -> None:
    bad = b"#cloud-config\nruncmd:\n  - echo ok\n  - [unclosed\n"
    with pytest.raises(UsageError) as caught:
        seed.render_user_data(make_spec(user_data=bad, user_data_source="my-data.yaml"))
    assert caught.value.exit_code == 2
    assert "my-data.yaml" in str(caught.value)
    assert "line 5, column 1" in str(caught.value)


def test_invalid_yaml_points_at_the_offending_character() -> None:
    bad = b"#cloud-config\nhostname: a\n  bad: indent\n"
    with pytest.raises(UsageError, match=r"u\.yaml: invalid YAML at line 3, column 6"):
        seed.render_user_data(make_spec(user_data=bad, user_data_source="u.yaml"))


def test_a_cloud_config_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(UsageError, match="must be a YAML mapping"):
        seed.render_user_data(make_spec(user_data=b"#cloud-config\n- a\n- b\n"))


def test_unsafe_yaml_tags_are_refused() -> None:
    with pytest.raises(UsageError, match="invalid YAML"):
        seed.render_user_data(make_spec(user_data=b"#cloud-config\nx: !!python/object/apply:os.system [id]\n"))


@pytest.mark.parametrize(
    "data", [b"hostname: x\n", b"#cloud-config-archive\n- {}\n", b"", b"\xef\xbb\xbf#cloud-config\n"]
)
def test_unknown_formats_are_refused_with_the_accepted_list(data: bytes) -> None:
    with pytest.raises(UsageError) as caught:
        seed.render_user_data(make_spec(user_data=data, user_data_source="data.txt"))
    assert "data.txt" in str(caught.value)
    assert caught.value.hint is not None and "#cloud-config" in caught.value.hint and "MIME" in caught.value.hint


@pytest.mark.parametrize(
    "data", [b"password=hunter2\n", b"#cloud-config\npassword: hunter2\n  bad: x\n", b"#cloud-config\n- hunter2\n"]
)
def test_errors_do_not_quote_the_user_data(data: bytes) -> None:
    with pytest.raises(UsageError) as caught:
        seed.render_user_data(make_spec(user_data=data))
    assert "hunter2" not in f"{caught.value} {caught.value.hint}"


def test_non_utf8_user_data_is_refused() -> None:
    with pytest.raises(UsageError, match="not UTF-8"):
        seed.render_user_data(make_spec(user_data=b"#!/bin/sh\necho \xff\n"))


def test_a_mime_message_that_is_not_multipart_is_refused() -> None:
    with pytest.raises(UsageError, match="multipart"):
        seed.render_user_data(make_spec(user_data=b"Content-Type: text/plain\n\nhello\n"))


@pytest.mark.parametrize(
    "name",
    ["web\nevil", "web\n", "-web", "web-", "a" * 64, "web.example.com", "", "we b", "web_1", "\u212aelvin", "wéb"],
)
def test_hostile_or_invalid_hostnames_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid host name"):
        seed.validate_hostname(name)
    with pytest.raises(UsageError):
        make_spec(hostname=name)


@pytest.mark.parametrize("name", ["a", "web-1", "Web-1", "a" * 63, "0"])
def test_valid_hostnames_are_accepted_in_lower_case(name: str) -> None:
    assert seed.validate_hostname(name) == name.lower()


@pytest.mark.parametrize("name", ["root", "Bob", "bob smith", "bob\n", "1bob", "", "b" * 33, "-oProxyCommand=x", "-b"])
def test_invalid_user_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid user name"):
        make_spec(user=name)


@pytest.mark.parametrize("instance_id", ["i-1\nlocal-hostname: evil", "", "a b", "-x", "x" * 129])
def test_invalid_instance_ids_are_refused(instance_id: str) -> None:
    with pytest.raises(UsageError, match="invalid instance id"):
        make_spec(instance_id=instance_id)


def test_a_key_with_an_injected_second_line_is_refused() -> None:
    with pytest.raises(UsageError):
        make_spec(ssh_keys=(KEY + "\n" + make_key(comment="mallory"),))


def test_private_key_material_never_gets_into_a_seed() -> None:
    private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(UsageError, match="private key"):
        make_spec(ssh_keys=(private,))


@pytest.mark.parametrize(
    ("config", "message"),
    [(b"- a\n", "must be a YAML mapping"), (b"ethernets: {}\n", "version"), (b"version: [\n", "invalid YAML")],
)
def test_bad_network_config_is_refused(config: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        seed.seed_files(make_spec(network_config=config, network_config_source="net.yaml"))


def test_network_config_is_passed_through_unchanged() -> None:
    config = b"network:\n  version: 1\n  config:\n    - type: physical\n      name: eth0 # keep this comment\n"
    assert seed.seed_files(make_spec(network_config=config))["network-config"] == config


# --- the ISO ---------------------------------------------------------------------------------------------


def full_spec() -> SeedSpec:
    return make_spec(
        user_data=b"#cloud-config\nruncmd: [echo hi]\n",
        network_config=seed.default_network_config(),
        vendor_data=b"#cloud-config\nbootcmd: [true]\n",
    )


def test_iso_reads_back_with_pycdlib_by_rock_ridge_joliet_and_iso9660_names() -> None:
    spec = full_spec()
    files = seed.seed_files(spec)
    assert list(files) == ["user-data", "meta-data", "network-config", "vendor-data"]
    iso = read_iso(seed.build_seed_iso(spec))
    try:
        assert iso.has_rock_ridge() and iso.has_joliet()
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"
        for name, data in files.items():
            assert iso_file(iso, rr_path=f"/{name}") == data
            assert iso_file(iso, joliet_path=f"/{name}") == data
            assert iso_file(iso, iso_path=seed.ISO_NAMES[name]) == data
    finally:
        iso.close()


def test_iso_without_optional_files_holds_exactly_user_data_and_meta_data() -> None:
    iso = read_iso(seed.build_seed_iso(make_spec()))
    try:
        names = sorted(
            child.rock_ridge.name().decode()
            for child in iso.list_children(rr_path="/")
            if not (child.is_dot() or child.is_dotdot())
        )
    finally:
        iso.close()
    assert names == ["meta-data", "user-data"]


@needs("blkid")
def test_blkid_sees_an_iso9660_labelled_cidata(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    path.write_bytes(seed.build_seed_iso(make_spec()))
    result = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True, check=True)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660"
    assert fields["LABEL"] == "cidata"


@needs("xorriso")
def test_xorriso_lists_and_extracts_the_real_names(tmp_path: Path) -> None:
    spec = full_spec()
    path = tmp_path / "seed.iso"
    path.write_bytes(seed.build_seed_iso(spec))
    listing = subprocess.run(["xorriso", "-indev", str(path), "-ls", "/"], capture_output=True, text=True, check=True)
    listed = sorted(line.strip("'") for line in listing.stdout.split())
    assert listed == ["meta-data", "network-config", "user-data", "vendor-data"]
    out = tmp_path / "out"
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(path), "-extract", "/", str(out)],
        capture_output=True,
        check=True,
    )
    for name, data in seed.seed_files(spec).items():
        assert (out / name).read_bytes() == data


def test_same_inputs_give_the_same_bytes_whatever_the_clock_and_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = full_spec()
    first = seed.build_seed_iso(spec)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        second = seed.build_seed_iso(spec)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert first == second


def test_different_inputs_give_different_bytes() -> None:
    assert seed.build_seed_iso(make_spec()) != seed.build_seed_iso(make_spec(instance_id="i-other"))


def test_building_leaves_pycdlib_on_the_real_clock() -> None:
    seed.build_seed_iso(make_spec())
    assert pycdlib.pycdlib.time is time


# -- validators name the rejected value, with a hint -------------------------------------------------------------------


@pytest.mark.promise
@pytest.mark.parametrize(
    ("validate", "value", "message", "hint"),
    [
        (seed.validate_hostname, "-web", "invalid host name '-web'", "use 1 to 63 letters, digits and '-'"),
        (seed.validate_user, "root", "invalid user name 'root'", "starting with a letter; not root"),
        (seed.validate_instance_id, "i 1", "invalid instance id 'i 1'", "use up to 128 letters, digits, '.', '_'"),
    ],
)
def test_a_rejected_value_is_named_with_a_hint(validate: object, value: str, message: str, hint: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        validate(value)  # type: ignore[operator]
    assert err.value.hint is not None and hint in err.value.hint


@pytest.mark.promise
def test_a_bad_key_in_a_seed_is_called_an_ssh_key() -> None:
    with pytest.raises(UsageError, match=r"^SSH key: unsupported or unknown SSH key type 'ssh-dss'"):
        make_spec(ssh_keys=("ssh-dss AAAAB3NzaC1kc3MAAACBAP",))
