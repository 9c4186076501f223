"""Typer machinery of the command line: build only the command that runs (typer builds every command's options on
each run, ~0.04 s: a third of `qinst ls`)."""

from __future__ import annotations

from collections.abc import Callable

import typer

# The global options (_global's) that take a value: the word after one is not a command name.
GLOBAL_VALUE_OPTIONS = frozenset(
    {"--connect", "--cache-dir", "--catalog", "--mirror", "--aleph-api", "--ipfs-gateway", "--host"}
)


def _command_name(args: list[str]) -> str | None:
    """The command `args` run, after the global options; None when they ask for help or name no command."""
    words = iter(args)
    for word in words:
        if word in ("-h", "--help", "--"):
            return None
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


# Commands spelled in two words whose first word is a command with arguments of its own (`smoke IMAGE...`): click
# would take the second word for an argument, so the two words become the one command name "smoke merge".
JOINED = frozenset({("smoke", "merge")})


def joined_words(args: list[str]) -> list[str]:
    """args with `smoke merge` (after the global options) as the one word "smoke merge"."""
    words = iter(enumerate(args))
    for i, word in words:
        if word in ("-h", "--help", "--"):
            break
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            if (word, args[i + 1] if i + 1 < len(args) else "") in JOINED:
                return [*args[:i], f"{word} {args[i + 1]}", *args[i + 2 :]]
            break
    return args


def app_for(app: typer.Typer, new_app: Callable[[], typer.Typer], args: list[str]) -> typer.Typer:
    """The app holding only the command `args` run: typer builds the options of every command it holds on each
    run (~0.04 s, a third of `qinst ls`). Help, no command or an unknown one get the whole app: its listing, its
    error."""
    from typer.main import get_command_name

    name = _command_name(args)
    commands = [
        c for c in app.registered_commands if (c.name or get_command_name(getattr(c.callback, "__name__", ""))) == name
    ]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app
    one = new_app()
    one.registered_callback = app.registered_callback
    one.registered_commands = commands
    one.registered_groups = groups
    return one
