"""Lua scripts, one file per state change in ``app/store/lua/``.

Each is loaded once and called by SHA; redis-py's Script reloads it on a
NOSCRIPT reply (after a Redis restart or SCRIPT FLUSH). Each starts with
``_record.lua``, the one Lua spelling of the storage format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from redis.commands.core import AsyncScript

NAMES = (
    "accept",
    "promote",
    "ack",
    "fail",
    "reclaim",
    "extend",
    "quarantine",
    "forget_consumers",
)


def _read(name: str) -> str:
    return resources.files("app.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The script ``name`` after the storage-format functions of ``_record.lua``.

    Redis has no include: sharing the format's code means sending it with each script.
    """
    return _read("_record") + _read(name)


@dataclass(frozen=True, slots=True)
class Scripts:
    accept: AsyncScript
    promote: AsyncScript
    ack: AsyncScript
    fail: AsyncScript
    reclaim: AsyncScript
    extend: AsyncScript
    quarantine: AsyncScript
    forget_consumers: AsyncScript

    @classmethod
    def register(cls, client) -> Scripts:  # client: redis.asyncio.Redis
        return cls(**{name: client.register_script(source(name)) for name in NAMES})
