"""AMD SEV launches: what the guest owner expects to be measured, checked against what the host's firmware reports.

A confidential guest starts paused. The AMD secure processor has measured what QEMU loaded into the encrypted
memory: the firmware file (and, with measured direct kernel boot, a table of the kernel's, initrd's and command
line's hashes). It reports, through libvirt (`virDomainGetLaunchSecurityInfo`), a measurement keyed with the
guest owner's TIK (transport integrity key, from `sevctl session`):

    GCTX.LD     = SHA256(firmware || kernel_hashes_table)
    measurement = HMAC-SHA256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD || POLICY (u32 LE) || GCTX.LD || MNONCE)

qinst computes the same from the firmware it verified by hash and the owner's TIK; only an equal measurement (a
constant-time comparison) lets the guest resume: the host launched exactly that firmware, under that policy, for
the holder of that session. aleph.im's "hash for verification" of its confidential OVMF is the sha256 of the firmware
file, which for plain SEV (no SEV-ES, no kernel table) is GCTX.LD itself (aleph-sdk's compute_confidential_measure).

Not covered: SEV-ES (the launch digest would also cover the vCPUs' initial state; policy bit 2 is refused) and
SEV-SNP (another protocol: the report comes from inside the guest). No part of this ran on SEV hardware here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import HypervisorError, ImageError, UsageError

POLICY_NODBG = 0x1  # debugging of the guest refused: aleph's default, and qinst's
POLICY_ES = 0x4  # SEV-ES: its launch digest also covers the vCPUs' state, which qinst does not compute
MEASURE_COMMAND = 0x04  # the first byte of the measured message (the SEV API's LAUNCH_MEASURE context)

# The measured direct kernel boot table (QEMU's PaddedSevHashTable): GUIDs as OVMF reads them (little-endian fields).
_TABLE_HEADER = "9438d606-4f22-4cc9-b479-a793d411fd21"
_CMDLINE = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a"
_INITRD = "44baf731-3a2f-4bd7-9af1-41e29169781d"
_KERNEL = "4de79437-abd2-427f-b835-d5b172d2045b"


class MeasurementMismatch(ImageError):
    """The host launched something else than the firmware (or policy, or session) the guest owner expects."""


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def kernel_hashes_table(kernel: bytes, initrd: bytes = b"", cmdline: str = "") -> bytes:
    """The 176-byte table QEMU appends to the firmware for measured direct kernel boot (`kernelHashes='yes'`)."""
    entries = b"".join(
        _guid(guid) + struct.pack("<H", 50) + hashlib.sha256(data).digest()
        for guid, data in ((_CMDLINE, cmdline.encode() + b"\0"), (_INITRD, initrd), (_KERNEL, kernel))
    )
    table = _guid(_TABLE_HEADER) + struct.pack("<H", 16 + 2 + len(entries)) + entries
    return table + bytes(-len(table) % 16)


def launch_digest(firmware: Path, kernel_table: bytes = b"") -> bytes:
    """GCTX.LD: the sha256 of the firmware file (read in constant memory), then the kernel table when there is one."""
    h = hashlib.sha256()
    with firmware.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    h.update(kernel_table)
    return h.digest()


@dataclass(frozen=True)
class LaunchInfo:
    """What the host's secure processor reported for a paused guest (libvirt's launch security parameters)."""

    measurement: bytes  # 32 bytes: HMAC-SHA256 keyed with the TIK
    nonce: bytes  # 16 bytes: MNONCE, chosen by the firmware
    api_major: int
    api_minor: int
    build: int
    policy: int

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> LaunchInfo:
        """The parameters as libvirt returns them (sev-measurement: base64 of measurement || nonce; sev-api-major,
        sev-api-minor, sev-build-id, sev-policy): untrusted, validated field by field."""
        raw = params.get("sev-measurement")
        try:
            blob = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            blob = b""
        if len(blob) != 48:
            raise HypervisorError("the host reported no usable SEV launch measurement (48 bytes of base64 expected)")
        numbers = []
        for key, top in (
            ("sev-api-major", 0xFF),
            ("sev-api-minor", 0xFF),
            ("sev-build-id", 0xFF),
            ("sev-policy", 0xFFFFFFFF),
        ):
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise HypervisorError(f"the host reported no usable {key} ({str(value)[:20]!r})")
            numbers.append(value)
        return cls(blob[:32], blob[32:], *numbers)


def expected_measurement(tik: bytes, info: LaunchInfo, digest: bytes) -> bytes:
    """The measurement a host launching `digest` under info's policy, firmware API and nonce must report."""
    import hmac  # only a confidential launch needs it (`up` imports no more than it uses: test_speed)

    message = bytes([MEASURE_COMMAND, info.api_major, info.api_minor, info.build])
    message += struct.pack("<I", info.policy) + digest + info.nonce
    return hmac.new(tik, message, hashlib.sha256).digest()


def check_measurement(tik: bytes, info: LaunchInfo, digest: bytes, policy: int) -> None:
    """MeasurementMismatch unless the host measured `digest` under `policy` (the guest owner's, not the host's say)."""
    import hmac

    if info.policy != policy:
        raise MeasurementMismatch(
            f"the guest was launched under SEV policy {info.policy:#x}, not the {policy:#x} asked for",
            hint="the guest was destroyed; the host did not launch what was asked",
        )
    if not hmac.compare_digest(expected_measurement(tik, info, digest), info.measurement):
        raise MeasurementMismatch(
            "the SEV launch measurement does not match the firmware: the host launched another firmware, or for "
            "another session (TIK)",
            hint=f"the guest was destroyed; expected launch digest {digest.hex()}",
        )


@dataclass(frozen=True)
class Session:
    """The guest owner's files from `sevctl session --name PREFIX PDH POLICY`: PREFIX_tik.bin (16 bytes),
    PREFIX_godh.b64 and PREFIX_session.b64 (base64 text, handed to the host), and PREFIX_tek.bin for secrets."""

    tik: bytes
    godh: str
    session: str
    tek: bytes | None = None

    @classmethod
    def load(cls, prefix: Path) -> Session:
        from qemu_instances.files import read_bounded

        def part(suffix: str, limit: int) -> bytes:
            path = prefix.with_name(f"{prefix.name}_{suffix}")
            try:
                return read_bounded(path, "--sev-session", limit)
            except FileNotFoundError:
                raise UsageError(
                    f"--sev-session: {path} does not exist",
                    hint="make the files with: sevctl session --name PREFIX PDH_CERT_FILE POLICY",
                ) from None

        tik = part("tik.bin", 64)
        if len(tik) != 16:
            raise UsageError(f"--sev-session: {prefix.name}_tik.bin holds {len(tik)} bytes, not a 16-byte TIK")
        texts = []
        for suffix in ("godh.b64", "session.b64"):
            text = part(suffix, 64 << 10).decode("ascii", "replace").strip()
            try:
                base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError(f"--sev-session: {prefix.name}_{suffix} is not base64") from None
            texts.append(text)
        tek_path = prefix.with_name(f"{prefix.name}_tek.bin")
        tek = part("tek.bin", 64) if tek_path.exists() else None
        if tek is not None and len(tek) != 16:
            raise UsageError(f"--sev-session: {prefix.name}_tek.bin holds {len(tek)} bytes, not a 16-byte TEK")
        return cls(tik, texts[0], texts[1], tek)


@dataclass(frozen=True)
class SevSupport:
    """What libvirt's domain capabilities say of SEV on a host."""

    sev: bool
    cbitpos: int = 0
    reduced_phys_bits: int = 0
    max_guests: int | None = None
    max_es_guests: int | None = None  # SEV-ES: guests the host can run at once (libvirt 9.0 reports no SEV-SNP)

    @classmethod
    def from_domcaps(cls, xml: str) -> SevSupport:
        try:
            node = ET.fromstring(xml).find("features/sev")
        except ET.ParseError:
            node = None
        if node is None or node.get("supported") != "yes":
            return cls(False)

        def number(tag: str) -> int | None:
            text = (node.findtext(tag) or "").strip()
            return int(text) if text.isdigit() and len(text) < 10 else None

        cbitpos, reduced = number("cbitpos"), number("reducedPhysBits")
        if cbitpos is None or reduced is None:
            return cls(False)
        return cls(True, cbitpos, reduced, number("maxGuests"), number("maxESGuests"))

    def describe(self) -> str:
        if not self.sev:
            return "no AMD SEV: libvirt's domain capabilities say it is not supported here"
        es = self.max_es_guests
        es_text = f"SEV-ES yes ({es} guests)" if es else "SEV-ES no"
        guests = f", {self.max_guests} guests" if self.max_guests is not None else ""
        where = f"cbitpos {self.cbitpos}, reducedPhysBits {self.reduced_phys_bits}{guests}"
        return f"AMD SEV ({where}); {es_text}; SEV-SNP: not reported by this libvirt"


def parse_policy(text: str) -> int:
    """--sev-policy: a 32-bit policy (0x1 by default); SEV-ES (bit 2) is refused: its measurement is not computed."""
    try:
        policy = int(text, 0)
    except ValueError:
        raise UsageError(f"--sev-policy: {text[:20]!r} is not a number (e.g. 0x1)") from None
    if not 0 <= policy <= 0xFFFFFFFF:
        raise UsageError(f"--sev-policy: {text[:20]!r} is not a 32-bit policy")
    if policy & POLICY_ES:
        raise UsageError("--sev-policy: SEV-ES (bit 2) is not supported: its launch digest covers the vCPUs' state")
    return policy
