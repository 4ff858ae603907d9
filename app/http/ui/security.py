"""The dashboard's sessions, CSRF tokens and response headers.

Why a login form and a session cookie rather than HTTP Basic: a browser keeps
Basic credentials for the whole origin until it is closed (no way to log out),
sends the token itself with every request, and shows a prompt that cannot say
what is asked for. Here the token is typed once; the cookie holds no secret,
only a random session id and an expiry signed with a key derived from the token
(HMAC-SHA256), so changing EAT_API_TOKEN ends every session, and the cookie
authorises the dashboard only, never the JSON API (which still wants the bearer
token). It is ``Secure``, ``HttpOnly`` and ``SameSite=Strict``, and named
``__Host-``, so no sibling subdomain can plant one.

Without EAT_API_TOKEN the dashboard is as open as the API, and the same cookie,
issued on the first page, anchors the CSRF token.

Every state-changing request is a POST whose form carries a CSRF token bound to
the session (an HMAC of its id), compared in constant time; a POST that a
browser marks ``Sec-Fetch-Site: cross-site`` is refused before anything else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "__Host-eat-ui"
_DIGITS = re.compile(r"[0-9]{1,12}\Z")
SESSION_S = 12 * 3600
_KEY_LABEL = b"echo-at-time dashboard session v1"

# No inline script or style, nothing from another origin, no framing, forms post here only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Sessions:
    """Issues and checks session cookies and CSRF tokens.

    :param token: EAT_API_TOKEN; empty: the dashboard asks for no login.
    :param clock: epoch seconds (tests pass their own).
    """

    token: str
    clock: Callable[[], float] = time.time

    @property
    def login_required(self) -> bool:
        return bool(self.token)

    @property
    def _key(self) -> bytes:
        return hmac.new(self.token.encode(), _KEY_LABEL, hashlib.sha256).digest()

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def issue(self) -> str:
        """A new session cookie's value: ``<id>.<expires>.<signature>``."""
        body = f"{secrets.token_urlsafe(16)}.{int(self.clock()) + SESSION_S}"
        return f"{body}.{self._sign(body)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The id of a valid, unexpired session cookie; None otherwise."""
        if not cookie or cookie.count(".") != 2:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        sid, _, expires = body.partition(".")
        if not _DIGITS.match(expires) or int(expires) <= self.clock():
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return self._sign("csrf:" + sid)

    def csrf_matches(self, sid: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(sid).encode())


def cookie_header(value: str, max_age: int = SESSION_S) -> str:
    return f"{COOKIE}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict"


class SecurityHeaders:
    """Adds the dashboard's security headers to every response it sends (pages, static
    files and errors alike), and ``Cache-Control: no-store`` to all but static files."""

    def __init__(self, app, static_prefix: str) -> None:
        self.app = app
        self.static_prefix = static_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(self.static_prefix)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
