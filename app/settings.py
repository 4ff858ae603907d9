"""Typed settings read from ``EAT_*`` environment variables, validated at start.

A bad value stops the process with a message naming the variable; nothing
starts half-configured.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import msgspec


class SettingsError(ValueError):
    """A setting is invalid; ``variable`` names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}\Z")
_LIST_NAME_RE = re.compile(r"^[!-~]{1,256}\Z")  # printable ASCII, no spaces
# msgspec reads "true", "false", "1" and "0" (any case) as booleans; these were always
# accepted too.
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}
# A count is written in digits: msgspec would also read "1e3" or "1.0" as an integer.
_INTEGER_RE = re.compile(r"-?[0-9]+\Z")
_EXPECTED = {"int": "an integer", "float": "a number of seconds", "bool": "true or false"}
_ERROR_FIELD_RE = re.compile(r"at `\$\.(\w+)`")


# The original service's list names. Old producers hard-code them, so they are not
# prefixed; operators who renamed them set EAT_LEGACY_* (``app.store.keys.LegacyLists``).
MAX_PARTITIONS = 1024

LEGACY_DELAYED = "QueueDelayed"
LEGACY_QUEUE = "Queue"
LEGACY_IN_FLIGHT = "QueueDead"


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes (``{...}``), or None when it has none.

    Redis' rule: the first ``{``, then the first ``}`` after it, with at least
    one character between them; otherwise the whole key is hashed.
    """
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def _env(name: str) -> str:
    return "EAT_" + name.upper()


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of every process. Each field's metadata holds its documentation."""

    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        repr=False,  # may carry a password
        metadata={
            "doc": "Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS, "
            "or unix://. Never logged."
        },
    )
    redis_ca_file: str = field(
        default="",
        metadata={"doc": "CA bundle to verify Redis' TLS certificate (with rediss://)."},
    )
    redis_cluster: str = field(
        default="auto",
        metadata={
            "doc": "`auto`, `true` or `false`: use the Redis Cluster client (EAT_REDIS_URL is "
            "then a seed node). `auto` asks the server (`cluster_enabled:1`)."
        },
    )
    partitions: int = field(
        default=1,
        metadata={
            "doc": "Partitions of the keyspace (1-1024), each under its own hash tag "
            "`{<prefix>:<p>}`, so a Redis Cluster spreads them over its masters. Recorded in "
            "Redis at first start; every process refuses to start with another count."
        },
    )
    wait_replicas: int = field(
        default=0,
        metadata={
            "doc": "Replicas a change must reach (Redis `WAIT`) before the api answers it; "
            "0 answers once the master has it. A timeout answers 503 (retry with the same uuid). "
            "The api's alone: the scheduler and the worker do not wait (see docs/cluster.md)."
        },
    )
    wait_timeout_ms: int = field(
        default=1000,
        metadata={"doc": "How long the api waits for EAT_WAIT_REPLICAS, milliseconds."},
    )
    zk_hosts: str = field(
        default="127.0.0.1:2181",
        metadata={"doc": "ZooKeeper connect string: comma-separated host:port."},
    )
    zk_auth: str = field(
        default="",
        repr=False,
        metadata={
            "doc": "`user:password` for ZooKeeper digest auth; the election znodes then get "
            "an ACL for that user only. Never logged."
        },
    )
    prefix: str = field(
        default="eat",
        metadata={"doc": "Namespace of every Redis key ({prefix}:...) and the ZooKeeper path."},
    )
    zk_session_timeout: float = field(
        default=6.0,
        metadata={
            "doc": "ZooKeeper session timeout, seconds. Leader failover after a crash takes "
            "about this long. The server clamps it to 2-20 x its tickTime."
        },
    )
    visibility_timeout: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds a delivered message may stay unacknowledged before another worker "
            "reclaims it. A live worker extends its claim on long handlers."
        },
    )
    handler_timeout: float = field(
        default=300.0,
        metadata={
            "doc": "Seconds a handler may run (worker `--handler-timeout`); past it the "
            "delivery fails with the reason `timeout`, is retried, then dead-lettered."
        },
    )
    max_deliveries: int = field(
        default=5,
        metadata={
            "doc": "Deliveries (handler runs, failed or crashed) before a message is dead-lettered."
        },
    )
    max_message_bytes: int = field(
        default=65536,
        metadata={"doc": "Largest `message` accepted, in UTF-8 bytes."},
    )
    max_batch_bytes: int = field(
        default=16777216,
        metadata={
            "doc": "Largest body of `POST /api/v1/save-messages` (up to 1,000 messages), in "
            "bytes; a larger one is refused with 413."
        },
    )
    http_max_header_bytes: int = field(
        default=65536,
        metadata={
            "doc": "Largest request head (request line and headers) an HTTP server reads, in "
            "bytes; a larger one is answered 431 and the connection closed."
        },
    )
    http_header_timeout: float = field(
        default=10.0,
        metadata={
            "doc": "Seconds a request head may take to arrive after its first byte; a slower "
            "one is answered 408 and the connection closed."
        },
    )
    http_body_timeout: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds a request body may take to arrive after its head; a slower one is "
            "answered 408 and the connection closed."
        },
    )
    http_send_timeout: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds a response may wait for the client to read what was sent "
            "before (a client that stops reading fills the buffers); past it the "
            "connection is closed."
        },
    )
    http_idle_timeout: float = field(
        default=5.0,
        metadata={
            "doc": "Seconds a connection may carry no request (a new one, or one kept alive "
            "after a response) before the server closes it."
        },
    )
    http_max_connections: int = field(
        default=1000,
        metadata={
            "doc": "Open connections per HTTP server. Past it a new connection closes the one "
            "idle longest, or is answered 503 when every one is busy. Lowered to fit the "
            "process' open files limit."
        },
    )
    http_max_buffered_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={
            "doc": "Bytes of request bodies an HTTP server holds at once while they arrive "
            "in pieces, over every connection; a body that would take it past this is "
            "answered 503 (retry). At least EAT_MAX_BATCH_BYTES."
        },
    )
    retention: float = field(
        default=86400.0,
        metadata={
            "doc": "Seconds a delivered record is kept: the idempotency window for re-posted uuids."
        },
    )
    retry_base: float = field(
        default=1.0,
        metadata={"doc": "First retry delay after a handler error, seconds; doubles per attempt."},
    )
    retry_max: float = field(
        default=300.0,
        metadata={"doc": "Cap on the retry delay, seconds."},
    )
    promote_batch: int = field(
        default=1000,
        metadata={"doc": "Most messages one promote script call moves to the stream."},
    )
    read_count: int = field(
        default=1000,
        metadata={"doc": "Most entries one XREADGROUP call takes."},
    )
    dead_maxlen: int = field(
        default=100000,
        metadata={"doc": "Approximate cap on the dead-letter stream's length."},
    )
    allow_eviction: bool = field(
        default=False,
        metadata={
            "doc": "`true` lets every process run on a Redis whose maxmemory-policy may evict "
            "this service's keys (allkeys-*), where accepted messages can vanish; otherwise "
            "such a process refuses to start (exit 2), and one that finds it later is not ready."
        },
    )
    memory_policy_interval: float = field(
        default=30.0,
        metadata={"doc": "Seconds between two checks of Redis' maxmemory-policy by each process."},
    )
    api_token: str = field(
        default="",
        repr=False,
        metadata={
            "doc": "When set, every /api/* request needs `Authorization: Bearer <token>` "
            "(compared in constant time). Never logged."
        },
    )
    api_url: str = field(
        default="http://127.0.0.1:8080",
        metadata={"doc": "Where the operator commands (send, status, dead) reach the API."},
    )
    ui: bool = field(
        default=True,
        metadata={
            "doc": "`true` or `false`: the api serves the operator's dashboard under `/ui` "
            "(with EAT_API_TOKEN set it asks for the token once, then keeps a session cookie)."
        },
    )
    ui_read_only: bool = field(
        default=False,
        metadata={
            "doc": "`true`: the dashboard shows everything and changes nothing (no cancel, "
            "reschedule, replay, delete or purge; such a request answers 403)."
        },
    )
    health_host: str = field(
        default="127.0.0.1",
        metadata={"doc": "Address of the scheduler's and worker's health and metrics server."},
    )
    health_port: int = field(
        default=0,
        metadata={
            "doc": "Port of that server (/healthz, /readyz, /metrics); 0 turns it off. "
            "The api serves the same paths on its own port."
        },
    )
    log_format: str = field(
        default="auto",
        metadata={"doc": "`json`, `console`, or `auto` (console when stderr is a terminal)."},
    )
    log_level: str = field(
        default="info",
        metadata={"doc": "`debug`, `info`, `warning` or `error`."},
    )
    legacy_bridge: bool = field(
        default=True,
        metadata={
            "doc": "`true` or `false`: the leading scheduler moves messages that old producers "
            "LPUSH onto the legacy lists into the service."
        },
    )
    legacy_http: bool = field(
        default=False,
        metadata={
            "doc": "`true` or `false`: `POST /api/v1/save-message` answers as the original "
            'service did, `200 {"message": {"message", "runAt", "uuid"}, "ok": true}` for '
            "a new message and a duplicate alike, for its existing clients."
        },
    )
    legacy_queue: str = field(
        default=LEGACY_QUEUE,
        metadata={"doc": "Legacy list of messages to run now (not prefixed)."},
    )
    legacy_delayed: str = field(
        default=LEGACY_DELAYED,
        metadata={"doc": "Legacy list of messages to run at their runAt (not prefixed)."},
    )
    legacy_in_flight: str = field(
        default=LEGACY_IN_FLIGHT,
        metadata={
            "doc": "Legacy list holding what the bridge took but has not accepted yet; "
            "re-driven when a scheduler starts leading. In Redis Cluster give the three legacy "
            "names one hash tag."
        },
    )
    schedule_catchup: str = field(
        default="latest",
        metadata={
            "doc": "`latest`, `all` or `none`: what a schedule's occurrences missed while no "
            "scheduler led (for longer than the 30 s it materialises ahead) produce when a "
            "leader is back: only the newest, every one, or none (see docs/schedules.md)."
        },
    )
    schedule_min_interval: float = field(
        default=1.0,
        metadata={
            "doc": "Shortest `every` a schedule may have, seconds (0.1 at least); a shorter one "
            "is refused (422, field `every`)."
        },
    )
    webhook_url: str = field(
        default="",
        metadata={
            "doc": "The webhook handler's default target (worker `--handler webhook`): where a "
            "message that names no `target` is POSTed. Always allowed as a target."
        },
    )
    webhook_secret: str = field(
        default="",
        repr=False,
        metadata={
            "doc": "The webhook signing secret, `whsec_` and base64 (Standard Webhooks); "
            "needed by `--handler webhook`. Never logged."
        },
    )
    webhook_timeout: float = field(
        default=10.0,
        metadata={
            "doc": "Seconds one webhook request may take, connecting included; past it the "
            "delivery fails (retried with backoff)."
        },
    )
    webhook_allow: str = field(
        default="",
        metadata={
            "doc": "Targets a message may name: comma-separated origins "
            "(`https://hooks.example.com`) or hosts (`hooks.example.com`, `*.example.com`). "
            "Empty: only EAT_WEBHOOK_URL. A host named here (no `*`) may resolve to a "
            "private or loopback address; other targets may not (SSRF)."
        },
    )
    webhook_per_origin: int = field(
        default=16,
        metadata={
            "doc": "Most webhook requests in flight at once to one origin, per worker process "
            "(a slow receiver holds up only its own messages beyond this)."
        },
    )
    webhook_resolve_timeout: float = field(
        default=2.0,
        metadata={
            "doc": "Seconds the api (and the bridge) may take to resolve a target's host "
            "before refusing it."
        },
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``EAT_*`` variable; ``overrides`` (CLI flags) win over the environment.

        An unset or empty variable means the default. msgspec converts the text to each
        field's type; an error names the variable and the value it was given.
        """
        environ = os.environ if environ is None else environ
        # "int", "float", "bool" or "str": annotations are text under `from __future__`.
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(overrides.keys() - kinds.keys())
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        given: dict[str, Any] = {}  # each setting's flag or text, as an error quotes it
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            if overrides.get(name) is not None:
                given[name] = values[name] = overrides[name]
            elif raw := environ.get(_env(name)):
                given[name], values[name] = raw, _text_value(name, kind, raw)
        try:
            settings = msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            found = _ERROR_FIELD_RE.search(str(exc))
            if found is None:
                raise
            name = found.group(1)
            expected = _EXPECTED.get(kinds[name], kinds[name])
            raise SettingsError(_env(name), f"expected {expected}, got {given[name]!r}") from None
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise SettingsError naming the first variable whose value cannot work."""
        url = urlparse(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(_env("redis_url"), "must start with redis://, rediss:// or unix://")
        if self.redis_ca_file:
            if url.scheme != "rediss":
                raise SettingsError(_env("redis_ca_file"), "needs a rediss:// EAT_REDIS_URL")
            if not os.path.isfile(self.redis_ca_file):
                raise SettingsError(_env("redis_ca_file"), "no such file")
        if self.zk_auth and ":" not in self.zk_auth:
            raise SettingsError(_env("zk_auth"), "expected user:password")
        if not 0 <= self.health_port <= 65535:
            raise SettingsError(_env("health_port"), "must be between 0 and 65535")
        if self.api_token and len(self.api_token) < 16:
            raise SettingsError(_env("api_token"), "use at least 16 characters")
        hosts = [h.strip() for h in self.zk_hosts.split(",")]
        if not all(_HOST_PORT_RE.match(h) and 0 < int(h.rsplit(":", 1)[1]) < 65536 for h in hosts):
            raise SettingsError(_env("zk_hosts"), "must be comma-separated host:port pairs")
        # "." and ".." would make the ZooKeeper path relative, which ZooKeeper refuses.
        if not _PREFIX_RE.match(self.prefix) or self.prefix in (".", ".."):
            raise SettingsError(_env("prefix"), "1-64 characters of letters, digits, '_', '.', '-'")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(_env(f.name), "must be a finite number")
        _positive(self, "zk_session_timeout", "visibility_timeout", "retry_base", "retry_max")
        _positive(self, "handler_timeout", "memory_policy_interval")
        _positive(self, "max_deliveries", "max_message_bytes", "promote_batch", "read_count")
        _positive(self, "dead_maxlen", "retention", "max_batch_bytes", "wait_timeout_ms")
        if self.redis_cluster not in ("auto", "true", "false"):
            raise SettingsError(_env("redis_cluster"), "one of auto, true, false")
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise SettingsError(_env("partitions"), f"from 1 to {MAX_PARTITIONS}")
        if self.wait_replicas < 0:
            raise SettingsError(_env("wait_replicas"), "must be 0 or more")
        _positive(
            self,
            "http_header_timeout",
            "http_body_timeout",
            "http_send_timeout",
            "http_idle_timeout",
        )
        _positive(self, "http_max_connections")
        if self.http_max_buffered_bytes < self.max_batch_bytes:
            raise SettingsError(
                _env("http_max_buffered_bytes"), "at least EAT_MAX_BATCH_BYTES (one bulk body)"
            )
        # A browser's or a proxy's ordinary head (cookies, forwarded-for) takes a few KiB.
        if self.http_max_header_bytes < 1024:
            raise SettingsError(_env("http_max_header_bytes"), "at least 1024")
        if self.promote_batch > 10000:
            raise SettingsError(_env("promote_batch"), "at most 10000")
        if self.retry_max < self.retry_base:
            raise SettingsError(_env("retry_max"), "must be at least EAT_RETRY_BASE")
        if self.log_format not in ("auto", "json", "console"):
            raise SettingsError(_env("log_format"), "one of auto, json, console")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(_env("log_level"), "one of debug, info, warning, error")
        api = urlparse(self.api_url)
        if api.scheme not in ("http", "https") or not api.netloc:
            raise SettingsError(_env("api_url"), "must be an http:// or https:// URL")
        _validate_legacy_names(self)
        if self.schedule_catchup not in ("latest", "all", "none"):
            raise SettingsError(_env("schedule_catchup"), "one of latest, all, none")
        # Below 0.1 s a replace would have over 350 occurrences to cancel (35 s of them).
        if not 0.1 <= self.schedule_min_interval <= 86400:
            raise SettingsError(_env("schedule_min_interval"), "from 0.1 to 86400 seconds")
        _validate_webhook(self)

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting, for the README and --help."""
        return [
            (_env(f.name), _default_text(f.default), f.metadata["doc"])
            for f in dataclasses.fields(cls)
        ]


def _default_text(default: object) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default) if default != "" else "(unset)"


def _validate_legacy_names(settings: Settings) -> None:
    names = ("legacy_queue", "legacy_delayed", "legacy_in_flight")
    seen: dict[str, str] = {}
    for name in names:
        value = getattr(settings, name)
        if not _LIST_NAME_RE.match(value):
            raise SettingsError(_env(name), "1-256 printable ASCII characters, no spaces")
        if value in seen:
            raise SettingsError(_env(name), f"must differ from {_env(seen[value])}")
        seen[value] = name
    # RPOPLPUSH spans two of the lists: in Redis Cluster they must hash to one slot. Names
    # without hash tags work on a single Redis; names with tags must then agree.
    tags = {hash_tag(getattr(settings, name)) for name in names}
    if len(tags) > 1 and tags != {None}:
        raise SettingsError(
            _env("legacy_in_flight"),
            "the three legacy list names must carry the same hash tag ({...}) or none",
        )


def _validate_webhook(settings: Settings) -> None:
    # Imported here: app.targets is a sibling of this module in the shared layer.
    from app.targets import TargetRefused, parse_allow, parse_target

    _positive(settings, "webhook_timeout", "webhook_per_origin", "webhook_resolve_timeout")
    if settings.webhook_url:
        try:
            parse_target(settings.webhook_url)
        except TargetRefused as exc:
            raise SettingsError(_env("webhook_url"), str(exc)) from None
    try:
        parse_allow(settings.webhook_allow)
    except ValueError as exc:
        raise SettingsError(_env("webhook_allow"), str(exc)) from None
    if settings.webhook_secret:
        secret = settings.webhook_secret
        # Never quote the value: it is a secret.
        if not secret.startswith("whsec_"):
            raise SettingsError(_env("webhook_secret"), "must start with whsec_")
        try:
            text = secret[len("whsec_") :]
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except ValueError:
            raise SettingsError(_env("webhook_secret"), "whsec_ followed by base64") from None
        if len(key) < 24:
            raise SettingsError(_env("webhook_secret"), "use at least 24 bytes of key")


def _positive(settings: Settings, *names: str) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise SettingsError(_env(name), "must be greater than 0")


def _text_value(name: str, kind: str, raw: str) -> str:
    """An environment variable's text as msgspec should convert it to ``kind``."""
    text = raw.strip()
    if kind == "bool":
        return _BOOL_WORDS.get(text.lower(), text)
    if kind == "int" and not _INTEGER_RE.match(text):
        raise SettingsError(_env(name), f"expected {_EXPECTED[kind]}, got {raw!r}")
    return text


def markdown_table() -> str:
    """Every setting as a Markdown table: variable, default, meaning.

    docs/settings.md holds this table between two marker comments;
    ``scripts/settings_table.py`` rewrites it there, and a unit test fails while
    the page differs from the code.
    """
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for variable, default, doc in Settings.documentation():
        meaning = doc.replace("|", "\\|")
        lines.append(f"| `{variable}` | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"
