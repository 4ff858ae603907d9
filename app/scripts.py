"""Lua scripts, one file per state change in ``app/lua/``.

Each is loaded once and called by SHA; redis-py's Script reloads it on a
NOSCRIPT reply (after a Redis restart or SCRIPT FLUSH).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from redis.commands.core import AsyncScript

NAMES = ("accept", "promote", "ack", "fail", "reclaim", "extend")


@cache
def source(name: str) -> str:
    return resources.files("app").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    accept: AsyncScript
    promote: AsyncScript
    ack: AsyncScript
    fail: AsyncScript
    reclaim: AsyncScript
    extend: AsyncScript

    @classmethod
    def register(cls, client) -> Scripts:  # client: redis.asyncio.Redis
        return cls(**{name: client.register_script(source(name)) for name in NAMES})
