"""The webhook handler (``--handler webhook``): POST each due message to its target.

The request, for every message (docs/webhooks.md is the reference for receivers):

- ``POST`` to the message's ``target``, or EAT_WEBHOOK_URL when it names none;
- body: the message exactly as it was posted (its UTF-8 bytes), ``Content-Type:
  text/plain; charset=utf-8``: a receiver in any language reads it as it was sent, and
  the signature covers those very bytes;
- Standard Webhooks headers: ``webhook-id`` (the message's uuid: the same on every
  attempt, so a receiver can deduplicate), ``webhook-timestamp`` (epoch seconds of this
  attempt), ``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of
  ``id.timestamp.body`` under EAT_WEBHOOK_SECRET, signed by the ``standardwebhooks``
  reference library); and ``X-Eat-Run-At`` (runAt, epoch ms), ``X-Eat-Attempt`` (1 for
  the first).

Outcomes (raised as :class:`~workers.handlers.DeliveryFailed` for the worker):

====================================  ====================================================
2xx                                   done: acknowledged
408, 429, 5xx                         retried with the backoff (``Retry-After`` seconds or
                                      HTTP-date honoured when longer, up to EAT_RETRY_MAX),
                                      then dead-lettered with the status and the answer's
                                      first bytes
network error, timeout                retried likewise
other 4xx (and 1xx, 3xx)              dead-lettered at once: the receiver refused it
a target refused at delivery          dead-lettered at once, never connected to (the
                                      allowlist, or an address outside the allowed ranges:
                                      DNS may have changed since the api checked it)
====================================  ====================================================

One ``httpx.AsyncClient`` serves every request: connections are kept alive and pooled
per origin (a pool of its own per origin, :class:`OriginPools`), and at most
EAT_WEBHOOK_PER_ORIGIN requests are in flight to one origin (a slow receiver holds up
its own messages only). The pool's connector resolves each
host itself and connects to an address it has checked (:class:`GuardedBackend`), so a
name that resolves elsewhere between the check and the connection cannot slip through.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpcore
import httpx
from standardwebhooks import Webhook

from app.backoff import describe
from app.log import get_logger
from app.settings import Settings
from app.store import Delivery
from app.targets import TargetPolicy, TargetRefused, Unresolved
from workers.handlers import DeliveryFailed

log = get_logger("webhook")

ANSWER_BYTES = 200  # of a failed answer's body, kept in the reason
READ_MOST = 65536  # bytes of any answer read (the rest is not waited for)
RETRIED_STATUSES = frozenset({408, 429})
USER_AGENT = "echo-at-time-webhook/1"
_SECONDS = re.compile(r"[0-9]{1,10}\Z")  # delay-seconds; ASCII digits only


class AddressRefused(Exception):
    """The target's host resolved to an address the policy refuses: nothing was sent."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, but every TCP connection goes to an address the
    policy permits: the host is resolved here, each address checked, and the
    connection made to a checked address (TLS still names the host: SNI and
    certificate checks are unchanged)."""

    def __init__(self, policy: TargetPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options=None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self.policy.addresses(host.strip("[]"), port)
        except Unresolved as exc:
            raise httpcore.ConnectError(str(exc)) from None  # a network error: retried
        except TargetRefused as exc:
            raise AddressRefused(str(exc)) from None
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ASYNC109
        raise httpcore.ConnectError("webhooks go over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class OriginPools(httpx.AsyncBaseTransport):
    """One httpx connection pool per origin, each connecting through ``backend``.

    httpcore's pool looks over every connection it holds each time a request starts or
    ends, so one pool shared by many connections costs time in proportion to their
    number for every request (measured: 300 requests/s with 64 connections to one
    origin, 890/s with 8). A pool per origin keeps that to the origin's own connections,
    which the per-origin cap bounds.
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend, per_origin: int) -> None:
        self.backend = backend
        self.per_origin = per_origin
        self.pools: dict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = {}

    def _pool(self, url: httpx.URL) -> httpx.AsyncHTTPTransport:
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self.pools.get(origin)
        if pool is None:
            pool = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=self.per_origin, max_keepalive_connections=self.per_origin
                ),
                retries=0,
            )
            inner = pool._pool  # the one place httpx lets a connector in is its pool
            if not hasattr(inner, "_network_backend"):
                raise RuntimeError("this httpx has no pool network backend to guard; pin httpx")
            inner._network_backend = self.backend
            self.pools[origin] = pool
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pool(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.aclose()


def retry_after_seconds(value: str | None, now: float) -> float:
    """A ``Retry-After`` header as seconds from ``now`` (0 when absent or unreadable):
    delay-seconds or an HTTP-date."""
    if not value:
        return 0.0
    value = value.strip()
    if _SECONDS.match(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _answer_text(status: int, body: bytes) -> str:
    text = body[:ANSWER_BYTES].decode("utf-8", "replace")
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


class WebhookHandler:
    """An async handler: one signed POST per delivery.

    :param secret: the ``whsec_...`` signing secret.
    :param policy: the allowlist and address rules (``app.targets``); its default URL is
        where a message that names no target goes.
    :param timeout: seconds one request may take, connecting included.
    :param per_origin: most requests in flight to one origin.
    :param clock: epoch seconds (the signature's timestamp, ``Retry-After`` dates).
    """

    def __init__(
        self,
        secret: str,
        policy: TargetPolicy,
        timeout: float = 10.0,
        per_origin: int = 16,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = Webhook(secret)
        self.policy = policy
        self.timeout = timeout
        self.per_origin = per_origin
        self.clock = clock
        self._caps: dict[str, asyncio.Semaphore] = {}
        # trust_env off: a proxy from the environment would connect where the guard cannot see.
        self.client = httpx.AsyncClient(
            transport=OriginPools(GuardedBackend(policy), per_origin),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT},
        )

    @classmethod
    def of(cls, settings: Settings, policy: TargetPolicy | None = None) -> WebhookHandler:
        return cls(
            settings.webhook_secret,
            policy or TargetPolicy.of(settings),
            settings.webhook_timeout,
            settings.webhook_per_origin,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, delivery: Delivery, body: str, now: float) -> dict[str, str]:
        stamp = int(now)
        signature = self.signer.sign(delivery.uuid, datetime.fromtimestamp(stamp, tz=UTC), body)
        return {
            "content-type": "text/plain; charset=utf-8",
            "webhook-id": delivery.uuid,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature,
            "x-eat-run-at": str(delivery.run_at),
            "x-eat-attempt": str(delivery.attempts + 1),
        }

    def _url(self, delivery: Delivery) -> tuple[str, str]:
        """The URL and its origin; DeliveryFailed (dead now) when there is none allowed."""
        url = delivery.target
        if url is None:
            if self.policy.default is None:
                raise DeliveryFailed(
                    "no target: the message names none and EAT_WEBHOOK_URL is unset", retry=False
                )
            return self.policy.default.url, self.policy.default.origin
        try:
            return url, self.policy.allowed(url).origin
        except TargetRefused as exc:
            raise DeliveryFailed(f"target refused: {exc}", retry=False) from None

    async def __call__(self, delivery: Delivery) -> None:
        url, origin = self._url(delivery)
        cap = self._caps.get(origin)
        if cap is None:
            cap = self._caps[origin] = asyncio.Semaphore(self.per_origin)
        async with cap:
            await self._post(delivery, url)

    async def _post(self, delivery: Delivery, url: str) -> None:
        body = delivery.message
        headers = self.headers(delivery, body, self.clock())
        try:
            async with asyncio.timeout(self.timeout):
                request = self.client.build_request("POST", url, content=body, headers=headers)
                response = await self.client.send(request, stream=True)
                try:
                    answer = await _read_some(response)
                finally:
                    await response.aclose()
        except AddressRefused as exc:
            raise DeliveryFailed(f"target refused at delivery: {exc}", retry=False) from None
        except (TimeoutError, httpx.TimeoutException):
            raise DeliveryFailed(f"timeout: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"network error: {describe(exc)}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        reason = _answer_text(status, answer)
        if status in RETRIED_STATUSES or status >= 500:
            wait = retry_after_seconds(response.headers.get("retry-after"), self.clock())
            raise DeliveryFailed(reason, not_before=wait)
        raise DeliveryFailed(reason, retry=False)


async def _read_some(response: httpx.Response) -> bytes:
    """The answer's first bytes (up to READ_MOST): enough for a reason, and a small answer
    read whole lets its connection be kept alive."""
    got = bytearray()
    async for chunk in response.aiter_raw():
        got += chunk
        if len(got) >= READ_MOST:
            break
    return bytes(got)
