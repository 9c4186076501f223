"""Running the real `qinst` (the console script of the Python in use) in a clean environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def qinst_argv() -> list[str]:
    """The installed `qinst` next to this interpreter (the real entry point), else `python -m qemu_instances`."""
    beside = Path(sys.executable).with_name("qinst")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "qemu_instances"]


def qinst_env(config_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment without the user's QINST_* settings; loopback servers reached directly, never via a proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QINST_") and k.lower() != "http_proxy"}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["LANG"] = env.get("LANG") or "C.UTF-8"
    if config_home is not None:
        env["XDG_CONFIG_HOME"] = str(config_home)  # qinst's own key pair and known_hosts stay in the work dir
    return {**env, **extra}


def qinst_command() -> str:
    """The qinst of the Python in use (the project's virtualenv), else the one on PATH; exits when there is none."""
    beside = Path(sys.executable).with_name("qinst")
    found = str(beside) if beside.exists() else shutil.which("qinst")
    if not found:
        sys.exit("qinst not found: run with the project's virtualenv python (.venv/bin/python bench/...)")
    return found
