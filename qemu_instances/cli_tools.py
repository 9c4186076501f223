"""Commands that hand qinst's checked SSH connection to other tools (`ssh-config`, `inventory`) and `smoke merge`.

Registered on the app by cli.py; like every command, each parses, calls one function of api.py and prints.
"""

from __future__ import annotations

import sys

import typer

from qemu_instances import api
from qemu_instances import cli_options as opt
from qemu_instances.cli_output import print_json, say
from qemu_instances.errors import SmokeFailed


def ssh_config(ctx: typer.Context, names: opt.NamesArg = None) -> None:
    """Print OpenSSH Host blocks for instances: ssh -F, scp, rsync and editors with qinst's host-key checks."""
    sys.stdout.write(api.ssh_config(ctx.obj, names or ()))


def inventory(ctx: typer.Context, list_: opt.InventoryListOpt = False, host: opt.InventoryHostOpt = None) -> None:
    """Ansible dynamic inventory (--list, --host NAME): groups by image, host and state; host keys checked."""
    if list_ and host is not None:
        raise typer.BadParameter("give --list or --host NAME, not both", param_hint="--host")
    found = api.inventory(ctx.obj)
    for name, why in found.skipped:
        say(f"qinst: warning: {name} is not in the inventory: {why}")
    print_json(found.host(host) if host is not None else found.to_json())


def smoke_merge(
    files: opt.MergeFilesArg,
    junit: opt.JunitOpt = None,
    summary: opt.SummaryOpt = None,
    as_json: opt.JsonOpt = False,
) -> None:
    """Join the results.json of smoke shards into one report (exit 6 if any result failed or a shard is missing)."""
    from qemu_instances.smoke import write_reports

    merged = api.smoke_merge(files)
    write_reports(merged.reports, junit=junit, summary=summary, artifacts=None, baseline=None)
    if as_json:
        print_json(merged.to_json())
    failed = [r.suite for r in merged.reports if not r.passed]
    say(f"merged {len(merged.reports)} result(s) from {len(files)} file(s); {len(failed)} failed")
    if merged.missing:
        raise SmokeFailed(f"no results for shard(s) {', '.join(merged.missing)}: their CI jobs wrote none")
    if failed:
        raise SmokeFailed(f"{len(failed)} of {len(merged.reports)} image(s) failed: {', '.join(failed)}")


def register(app: typer.Typer) -> None:
    """Add these commands to the app; `smoke merge` is one command word (cli_app.joined_words makes it so)."""
    app.command("smoke merge")(smoke_merge)
    app.command("ssh-config")(ssh_config)
    app.command("inventory")(inventory)
