"""Helpers shared by tests/ and bench/: free ports, virsh, an OpenSSH server on loopback, HTTP file servers,
running the real `qinst`; and what several test modules share (test modules never import each other): an sshd for
host-key checks, libvirt test-driver records and the launcher's boot on it, smoke reports. Both put the
repository's root on sys.path (pytest: pythonpath = ["."])."""
