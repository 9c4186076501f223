"""Helpers shared by tests/ and bench/: free ports, virsh, an OpenSSH server on loopback, HTTP file servers,
running the real `qinst`. Both put the repository's root on sys.path (pytest: pythonpath = ["."])."""
