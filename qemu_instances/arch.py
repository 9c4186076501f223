"""Guest architectures: what each needs from QEMU, libvirt and firmware, and how users may name it.

x86_64 guests boot under SeaBIOS or UEFI (OVMF) on a q35 machine, their serial console on ttyS0; aarch64 guests boot
only under UEFI (AAVMF, Debian's qemu-efi-aarch64) on QEMU's `virt` machine, their serial console on the PL011
(ttyAMA0). KVM runs a guest only on a host of its own architecture; any other guest is emulated (TCG).
"""

from __future__ import annotations

import os
from enum import StrEnum

from qemu_instances.errors import UsageError

_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class Arch(StrEnum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @classmethod
    def parse(cls, text: str, option: str = "--arch") -> Arch:
        """x86_64 or aarch64, also by Debian's names (amd64, arm64); UsageError naming the option otherwise."""
        name = _ALIASES.get(text.strip().lower())
        if name is None:
            raise UsageError(
                f"{option}: unknown architecture {text[:40]!r}", hint="use x86_64 (amd64) or aarch64 (arm64)"
            )
        return cls(name)

    @classmethod
    def host(cls) -> Arch:
        """This machine's architecture (an unknown one is taken as x86_64's peer: nothing runs natively)."""
        return cls(_ALIASES.get(os.uname().machine, "x86_64"))

    @property
    def debian(self) -> str:
        """Debian's and Ubuntu's name for it (image file names): amd64, arm64."""
        return {Arch.X86_64: "amd64", Arch.AARCH64: "arm64"}[self]

    @property
    def machine(self) -> str:
        return {Arch.X86_64: "q35", Arch.AARCH64: "virt"}[self]

    @property
    def emulator_package(self) -> str:
        """The Debian package of its QEMU system emulator."""
        return {Arch.X86_64: "qemu-system-x86", Arch.AARCH64: "qemu-system-arm"}[self]

    @property
    def firmware_package(self) -> str:
        """The Debian package of its UEFI firmware."""
        return {Arch.X86_64: "ovmf", Arch.AARCH64: "qemu-efi-aarch64"}[self]

    @property
    def bios(self) -> bool:
        """Whether it boots without UEFI (SeaBIOS)."""
        return self is Arch.X86_64

    @property
    def tcg_cpu(self) -> str | None:
        """The CPU model an emulated (TCG) guest gets; None: QEMU's `max` (every feature TCG emulates). For aarch64,
        `max` includes pointer authentication, whose QARMA5 cipher TCG computes in software on every signed return:
        a Debian 12 arm64 guest took 212-248 s of QEMU CPU time to cloud-init's final line under `max` and 112-159 s
        under cortex-a72 (three alternating rounds, tests/images/README.md). cortex-a72 (ARMv8.0) runs every arm64
        cloud image."""
        return {Arch.X86_64: None, Arch.AARCH64: "cortex-a72"}[self]

    @property
    def console(self) -> str:
        """The kernel's name of its first serial port, where cloud-init prints its host keys."""
        return {Arch.X86_64: "ttyS0", Arch.AARCH64: "ttyAMA0"}[self]
