"""arch.py: the guest architectures, their names and what each needs."""

from __future__ import annotations

import pytest

from qemu_instances.arch import Arch
from qemu_instances.errors import UsageError


@pytest.mark.parametrize(("text", "arch"), [("x86_64", Arch.X86_64), ("AMD64", Arch.X86_64), ("arm64", Arch.AARCH64),
                                            (" aarch64 ", Arch.AARCH64)])  # fmt: skip
def test_debian_and_kernel_names_are_both_accepted(text: str, arch: Arch) -> None:
    assert Arch.parse(text) is arch


@pytest.mark.parametrize("text", ["", "arm", "i386", "ppc64el", "x86-64", "aarch 64"])
def test_other_names_are_refused_with_the_option_named(text: str) -> None:
    with pytest.raises(UsageError, match="--arch: unknown architecture") as err:
        Arch.parse(text)
    assert err.value.hint == "use x86_64 (amd64) or aarch64 (arm64)"


def test_what_each_architecture_needs() -> None:
    assert (Arch.X86_64.machine, Arch.X86_64.console, Arch.X86_64.bios) == ("q35", "ttyS0", True)
    assert (Arch.AARCH64.machine, Arch.AARCH64.console, Arch.AARCH64.bios) == ("virt", "ttyAMA0", False)
    assert (Arch.AARCH64.emulator_package, Arch.AARCH64.firmware_package) == ("qemu-system-arm", "qemu-efi-aarch64")
    assert (Arch.X86_64.debian, Arch.AARCH64.debian) == ("amd64", "arm64")
