"""The benchmarks' helpers under their old names, for bench/pull.py and bench/smoke.py until they import the small
modules themselves: timing.py (child processes timed), idle.py (a quiet machine), output.py (tables, JSON),
session.py (a benchmark's qinst), and testsupport/ (file server, ports, virsh) shared with the tests."""

from __future__ import annotations

import _root  # noqa: F401  (testsupport/ on sys.path)
from idle import BUSY_CPU, MINE, Disturbance, foreign_qemu, merge_idle, undisturbed, wait_idle
from output import fmt, fmt_summary, log, table, write_json
from session import (
    BENCH,
    ROOT,
    Qinst,
    interrupt_on_sigterm,
    keypair,
    qinst_session,
    test_image,
    token,
    work_dir,
    write_random_file,
)
from timing import Ran, Summary, Timed, check, quiet, run_timed, summarize, timed

from testsupport.fileserver import file_server
from testsupport.net import free_port, ssh_banner
from testsupport.qinst import qinst_command
from testsupport.qinst import qinst_env as child_env
from testsupport.virsh import URI, destroy, domains, pools, remove_domain, remove_leftovers, remove_pool, volumes

__all__ = [
    "BENCH", "BUSY_CPU", "MINE", "ROOT", "URI", "Disturbance", "Qinst", "Ran", "Summary", "Timed", "check",
    "child_env", "destroy", "domains", "file_server", "fmt", "fmt_summary", "foreign_qemu", "free_port",
    "interrupt_on_sigterm", "keypair", "log", "merge_idle", "pools", "qinst_command", "qinst_session", "quiet",
    "remove_domain", "remove_leftovers", "remove_pool", "run_timed", "ssh_banner", "summarize", "table",
    "test_image", "timed", "token", "undisturbed", "volumes", "wait_idle", "work_dir", "write_json",
    "write_random_file",
]  # fmt: skip
