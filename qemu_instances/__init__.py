"""qinst: launch QEMU instances from official cloud images through libvirt."""

__version__ = "0.1.0"
