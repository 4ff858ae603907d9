"""Run ``echo-at-time`` with a bug that fires on demand: ``python -m tests.chaos.inject
<console script> <command> [args...]`` (the chaos rig puts it before the script).

With ``EAT_CHAOS_BUGS`` naming a directory, a file appearing there arms one bug,
once, in whichever process reaches the hooked call first (it claims the file by
deleting it):

- ``promote``: the next ``Store.promote`` raises, as a decoding bug on an odd
  record would (anything but a Redis error), inside a leading scheduler;
- ``ack``: the next ``Store.ack`` raises, inside a worker, after its handler ran.

What the process must do then is what the test checks: log the traceback, let go
of what it holds, and exit non-zero.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

from app.store import Store


class InjectedBug(Exception):
    """The deliberate failure: not a Redis error, so no loop retries it."""


def _armed(name: str) -> bool:
    directory = os.environ.get("EAT_CHAOS_BUGS")
    if not directory:
        return False
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / name).unlink()
        return True
    return False


def _hook(method_name: str, bug: str) -> None:
    original = getattr(Store, method_name)

    @functools.wraps(original)
    async def hooked(self, *args, **kwargs):
        if _armed(bug):
            raise InjectedBug(f"injected bug in Store.{method_name}")
        return await original(self, *args, **kwargs)

    setattr(Store, method_name, hooked)


def main() -> int:
    _hook("promote", "promote")
    _hook("ack", "ack")
    from app.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
