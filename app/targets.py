"""Webhook targets: which URLs a message may name, and which addresses they may reach.

Shared by the api (a message's ``target`` is refused with 422 before anything is
stored), the legacy bridge (an item whose target is refused is dead-lettered) and the
webhook worker (checked again at delivery: settings or DNS may have changed since).

Two rules, each a pure function of the settings and, for the second, the addresses a
name resolves to:

- **Allowlist** (``EAT_WEBHOOK_ALLOW``, comma-separated). An entry is an *origin*
  (``https://hooks.example.com``, ``http://127.0.0.1:9000``: scheme, host and port must
  all match) or a *host pattern* (``hooks.example.com``, ``*.example.com``: any http(s)
  URL on that host, or on any name under that suffix). The default URL
  (``EAT_WEBHOOK_URL``) is always allowed; with an empty list it is the only one.
- **Addresses (SSRF)**. A target whose host is, or resolves to, an address that is not
  globally routable (loopback, link-local such as 169.254.169.254, private, unique-local,
  unspecified, shared, reserved, multicast; IPv4 and IPv6, an IPv4-mapped or 6to4 IPv6
  address judged by the IPv4 address inside) is refused, unless the allowlist names its
  host explicitly (an origin or a host without ``*``), or it is the default URL's host:
  naming a host is the operator's decision to reach it. Every address a name resolves
  to must pass, so a name cannot hide an internal address behind a public one.

The resolver is a seam (``Resolver``): tests inject a table; the default asks the
system resolver, bounded in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_TARGET_BYTES = 2048
SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

# (host, port) -> the addresses it resolves to, as text.
Resolver = Callable[[str, int], Awaitable[list[str]]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """A target that may not be used; ``str()`` says why (safe to log and to answer: it
    holds the host, never a secret)."""


class Unresolved(TargetRefused):
    """The target's host did not resolve (in time): refused at the api; at delivery, a
    network error like any other (retried)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed target URL."""

    url: str
    scheme: str
    host: str  # lower case; an IP literal in its compressed form, without brackets
    port: int

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _host_text(host: str) -> str:
    """A host as compared: lower case; an IP literal in one canonical form."""
    host = host.lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def parse_target(url: str) -> Target:
    """Syntax only: http or https, a host, at most 2 KiB of printable ASCII, no
    ``user:password@``. TargetRefused otherwise."""
    if len(url) > MAX_TARGET_BYTES:
        raise TargetRefused(f"target is {len(url)} bytes; the limit is {MAX_TARGET_BYTES}")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise TargetRefused(
            "target must be printable ASCII without spaces (percent-encode the rest, "
            "write an international host name in its xn-- form)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"target is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TargetRefused("target must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("target must not carry user:password@ (credentials would be logged)")
    if not parts.hostname:
        raise TargetRefused("target has no host")
    host = _host_text(parts.hostname)
    return Target(url, scheme, host, port if port is not None else DEFAULT_PORTS[scheme])


@dataclass(frozen=True, slots=True)
class _Entry:
    scheme: str | None  # None: a host pattern (any http(s) scheme and port)
    host: str
    port: int | None
    wildcard: bool  # "*.example.com": any name under example.com

    def matches(self, target: Target) -> bool:
        if self.scheme is not None and (self.scheme, self.port) != (target.scheme, target.port):
            return False
        if self.wildcard:
            return target.host.endswith("." + self.host)
        return target.host == self.host


def parse_allow(text: str) -> tuple[_Entry, ...]:
    """``EAT_WEBHOOK_ALLOW`` as entries; ValueError naming the bad entry."""
    entries = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "://" in item:
            try:
                target = parse_target(item)
            except TargetRefused as exc:
                raise ValueError(f"{item!r}: {exc}") from None
            if urlsplit(item).path not in ("", "/") or "*" in target.host:
                raise ValueError(f"{item!r}: an origin is scheme://host[:port], nothing more")
            entries.append(_Entry(target.scheme, target.host, target.port, False))
            continue
        wildcard = item.startswith("*.")
        host = item[2:] if wildcard else item
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or "*" in host or "/" in host or not host.isascii() or " " in host:
            raise ValueError(f"{item!r}: expected an origin, a host or *.suffix")
        entries.append(_Entry(None, _host_text(host), None, wildcard))
    return tuple(entries)


def address_problem(address: str) -> str | None:
    """Why ``address`` may not be reached without being named explicitly, or None."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    inner = ip
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or ip
    kinds = (
        ("unspecified", inner.is_unspecified),
        ("loopback", inner.is_loopback),
        ("link-local", inner.is_link_local),
        ("multicast", inner.is_multicast),
        ("private", inner.is_private),
        ("reserved", inner.is_reserved),
        ("not globally routable", not inner.is_global),
    )
    for kind, matched in kinds:
        if matched:
            return f"{address} is a {kind} address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (an IP literal: itself)."""
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class TargetPolicy:
    """The allowlist and the address rule (see the module docstring).

    :param default_url: EAT_WEBHOOK_URL ('' for none): always allowed, its host trusted.
    :param allow: EAT_WEBHOOK_ALLOW's text.
    :param resolve_timeout: seconds a name may take to resolve at the api.
    :param resolver: (host, port) -> addresses; the system's by default.
    """

    def __init__(
        self,
        default_url: str = "",
        allow: str = "",
        resolve_timeout: float = 2.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.default = parse_target(default_url) if default_url else None
        self.entries = parse_allow(allow)
        self.resolve_timeout = resolve_timeout
        self.resolver = resolver or system_resolver
        named = {e.host for e in self.entries if not e.wildcard}
        if self.default is not None:
            named.add(self.default.host)
        self._named = frozenset(named)

    @classmethod
    def of(cls, settings, resolver: Resolver | None = None) -> TargetPolicy:
        return cls(
            settings.webhook_url,
            settings.webhook_allow,
            settings.webhook_resolve_timeout,
            resolver,
        )

    def allowed(self, url: str) -> Target:
        """Syntax and allowlist (no lookup): the parsed target, or TargetRefused."""
        target = parse_target(url)
        if self.default is not None and url == self.default.url:
            return target
        if not any(entry.matches(target) for entry in self.entries):
            where = "EAT_WEBHOOK_ALLOW is empty: only EAT_WEBHOOK_URL may be named"
            if self.entries:
                where = "its origin is not in EAT_WEBHOOK_ALLOW"
            raise TargetRefused(f"target {target.origin} is not allowed: {where}")
        return target

    def named(self, host: str) -> bool:
        """Whether ``host`` is named explicitly (it may then reach any address)."""
        return _host_text(host) in self._named

    def refused_address(self, host: str, address: str) -> str | None:
        """Why ``host``, resolved to ``address``, may not be connected to; None if it may."""
        if self.named(host):
            return None
        return address_problem(address)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, all of them permitted (TargetRefused naming
        the first that is not, or saying it did not resolve in time)."""
        try:
            async with asyncio.timeout(self.resolve_timeout):
                found = await self.resolver(host, port)
        except TimeoutError:
            raise Unresolved(
                f"target host {host} did not resolve within {self.resolve_timeout:g} s"
            ) from None
        except OSError as exc:
            raise Unresolved(f"target host {host} does not resolve: {exc}") from None
        if not found:
            raise Unresolved(f"target host {host} does not resolve")
        for address in found:
            problem = self.refused_address(host, address)
            if problem is not None:
                raise TargetRefused(f"target host {host} refused: {problem}")
        return found

    async def check(self, url: str) -> Target:
        """Everything the api checks before it stores a target: TargetRefused or the target."""
        target = self.allowed(url)
        if not self.named(target.host):
            await self.addresses(target.host, target.port)
        return target
