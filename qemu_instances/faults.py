"""A debug-only fault point for tests: with QINST_TEST_PAUSE_AT=PHASE, `up` stops at PHASE until it is killed.

The phases: overlay (the disk volume exists), seed (the seed volume too), define (the domain is defined, not
started), wait (the guest is booting). A test waits for the marker line on stderr, then sends SIGKILL.
"""

from __future__ import annotations

import os
import sys
import threading

ENV = "QINST_TEST_PAUSE_AT"


def _test_pause(phase: str) -> None:
    if os.environ.get(ENV) != phase:
        return
    sys.stderr.write(f"qinst: test pause at {phase}\n")
    sys.stderr.flush()
    threading.Event().wait()  # until killed
