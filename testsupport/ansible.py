"""Running the real ansible-core (the test extra) with no ansible.cfg of its own: everything it needs is in ANSIBLE_*
variables, its state in a folder of the caller's; each host's result read from the minimal callback's output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AnsibleRun:
    returncode: int
    hosts: dict[str, dict[str, Any]]  # host -> the module's result (with "unreachable" or "failed" when so)
    stdout: str
    stderr: str


def ansible_env(work: Path, **extra: str) -> dict[str, str]:
    """An environment for ansible: no config file read, state under `work`, JSON results, python3 on the target."""
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(work),
        "ANSIBLE_CONFIG": str(work / "no-ansible.cfg"),  # a file that does not exist: built-in defaults only
        "ANSIBLE_HOME": str(work / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(work / "cp"),
        "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",  # the stdout callback for ad-hoc commands too
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",  # HOST | STATUS => {json}
        "ANSIBLE_TIMEOUT": "60",
        **extra,
    }


def ansible(inventory: Path, pattern: str, module: str, work: Path, env: dict[str, str], *args: str) -> AnsibleRun:
    """`ansible PATTERN -i INVENTORY -m MODULE ARGS...`; each host's result."""
    argv = [str(Path(sys.executable).with_name("ansible")), pattern, "-i", str(inventory), "-m", module, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=work, timeout=600, check=False)
    hosts: dict[str, dict[str, Any]] = {}
    for match in _RESULT.finditer(proc.stdout):
        try:
            hosts[match[1]] = {"status": match[2], **json.loads(match[3])}
        except ValueError:
            hosts[match[1]] = {"status": match[2], "raw": match[3]}
    return AnsibleRun(proc.returncode, hosts, proc.stdout, proc.stderr)


_RESULT = re.compile(r"^(\S+) \| ([A-Z]+!?) => (\{.*?^\})$", re.MULTILINE | re.DOTALL)


def inventory_script(path: Path, command: list[str]) -> Path:
    """An executable inventory for ansible's script plugin: `exec COMMAND "$@"` (ansible runs it with --list)."""
    import shlex

    path.write_text(f'#!/bin/sh\nexec {shlex.join(command)} "$@"\n')
    path.chmod(0o755)
    return path
