"""What the code defines, for tests that check hand-written files against it.

The deployment files (Dockerfile, docker-compose.yml, the Helm chart) and the
docs name subcommands, flags and ``EAT_*`` settings. These helpers answer
whether each one exists, from ``app.cli.build_parser()`` and
``app.settings.Settings`` themselves, so a renamed flag or setting fails the
test of every file that still uses the old name.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from app.cli import build_parser
from app.settings import Settings

# An EAT_* name as written in a file; a trailing "*" makes it a family ("EAT_LEGACY_*").
EAT_NAME = re.compile(r"\bEAT_[A-Z0-9_]+(?:\*|\b)")


def settings_names() -> set[str]:
    return {variable for variable, _default, _doc in Settings.documentation()}


def assert_known_settings(names: set[str], where: str) -> None:
    """Each name is a setting; a name ending in "*" must be the prefix of at least one."""
    known = settings_names()

    def defined(name: str) -> bool:
        if name.endswith("*"):
            return any(setting.startswith(name[:-1]) for setting in known)
        return name in known

    unknown = {name for name in names if not defined(name)}
    assert not unknown, (
        f"{where} uses EAT_* variables that app.settings.Settings does not define: "
        f"{sorted(unknown)}"
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_path(argv: list[str], where: str) -> tuple[list[str], argparse.ArgumentParser]:
    """The subcommands argv starts with ("dead", "list") and the parser that takes the rest.

    Fails when a token where a subcommand goes (not a flag) names none.
    """
    parser = build_parser()
    path: list[str] = []
    for token in argv:
        choices = _subcommands(parser)
        if not choices or token.startswith("-"):
            break
        assert token in choices, (
            f"{where}: unknown subcommand {' '.join([*path, token])!r} "
            f"(known after {' '.join(['echo-at-time', *path])!r}: {sorted(choices)})"
        )
        path.append(token)
        parser = choices[token]
    return path, parser


def assert_known_flags(argv: list[str], where: str) -> None:
    """argv (after the entry point) names real subcommands and only their real flags.

    For synopses such as ``worker [--concurrency N] [--handler echo|list]``, which
    name flags without being a command line that parses.
    """
    assert argv, f"{where}: empty command"
    path, parser = command_path(argv, where)
    known = _options(parser)
    for token in argv[len(path) :]:
        flag = token.lstrip("[").split("=", 1)[0].rstrip("]")
        if flag.startswith("-"):
            assert flag in known, f"{where}: {' '.join(path)} has no option {flag!r}"


def assert_known_command(argv: list[str], where: str) -> None:
    """argv (after the entry point) is a command line the parser accepts, flag by flag."""
    assert_known_flags(argv, where)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports and exits on a bad command line
        pytest.fail(f"{where}: `echo-at-time {shlex.join(argv)}` does not parse ({exc})")
